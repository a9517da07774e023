"""Fixtures for the kit in the field (issue #18): a real `rekamd --sim` with `[power]`/`[gnss]` sections, real
gpsd fed by gpsfake, real chronyd (with -x: it never touches this machine's clock)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.console import conftest as console
from tests.console.conftest import Daemon
from tests.provisioning import conftest as provisioning
from tests.support import Rekamd, end_process, free_port, wait_for, write_daemon_config

# the fleet side (a real broker with the deployed ACL, the fleet service, claimed kits) for the telemetry test
fleet_and_broker, fleet, broker, service = (provisioning.fleet_and_broker, provisioning.fleet, provisioning.broker,
                                            provisioning.service)
new_kit, online_kit, fleet_link = provisioning.new_kit, provisioning.online_kit, provisioning.fleet_link
DATA = Path(__file__).resolve().parent / "data"


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: apt-get install -y {package} (make system-deps)")
    return path


def field_config(root: Path, dc_pub: Path, corpus: Path, **sections: Mapping[str, Any]) -> Path:
    """The console tests' sim kit (SD root/sd, stick root/usb, R1+R2, the demo operators) with `sections` merged."""
    base: dict[str, dict[str, Any]] = {
        "kit": {"state_dir": str(root / "sd"), "site": "test-site"},
        "store": {"journal_reserve_mb": 1, "max_record_mb": 8},
        "simulation": {"sensor_wire_speed": 0},
        "camera": {"backend": "sim"},
        "enrollment": {"fingers": ["R1", "R2"], "dedup_fingers": ["R2"]},
    }
    for name, keys in sections.items():
        base.setdefault(name, {}).update(keys)
    return write_daemon_config(root, dc_pub, corpus, "\n" + console._operators_block(), **base)


@pytest.fixture
def field_daemon(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path,
                 rekamd_factory: Callable[..., Rekamd]) -> Callable[..., Daemon]:
    """`field_daemon(power={...}, gnss={...}, simulation={...})` starts a sim kit and waits for its API."""

    def make(**sections: Mapping[str, Any]) -> Daemon:
        cfg = field_config(tmp_path, dc_keys["pub_path"], corpus_dir, **sections)
        return Daemon(rekamd_factory(cfg), tmp_path)

    return make


def clean_marker(state_dir: Path) -> str | None:
    """The store's clean-shutdown marker in the journal ("1": the last owner closed cleanly)."""
    with sqlite3.connect(f"file:{state_dir / 'journal.db'}?mode=ro", uri=True) as c:
        row = c.execute("SELECT value FROM meta WHERE key = 'clean_shutdown'").fetchone()
    return row[0] if row else None


# --- gpsd fed by gpsfake -------------------------------------------------------------------------------------


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class GpsFake:
    """`gpsfake` playing an NMEA log once into a real gpsd on a free local port (`-c`: seconds per sentence)."""

    def __init__(self, log: Path, cycle: float = 0.02) -> None:
        self.port = free_port()
        self.argv = [need("gpsfake", "gpsd gpsd-clients"), "-1", "-q", "-c", str(cycle), "-P", str(self.port),
                     str(log)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GpsFake:
        need("gpsd", "gpsd")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(lambda: _port_open(self.port) or self.proc.poll() is not None, 10, "gpsfake's gpsd to listen")
        assert self.proc.poll() is None, f"gpsfake exited with {self.proc.returncode}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # gpsfake and the gpsd it started (its own session)
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:  # gpsfake ignores it while it waits on gpsd: end both
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc is not None:  # gpsd's control socket, named after gpsfake (left behind by a kill)
            Path(f"/tmp/gpsfake-{self.proc.pid}.sock").unlink(missing_ok=True)


@pytest.fixture
def gpsfake() -> Iterator[Callable[..., GpsFake]]:
    started: list[GpsFake] = []

    def make(name: str, cycle: float = 0.02) -> GpsFake:
        g = GpsFake(DATA / name, cycle).start()
        started.append(g)
        return g

    yield make
    for g in started:
        g.stop()


# --- chronyd with -x (no control of the system clock) --------------------------------------------------------


class Chrony:
    """A real chronyd (-x: it never sets this machine's clock) with its command socket in `root`; `server` makes
    it serve its local clock over NTP on `port`, else it is a client of 127.0.0.1:`upstream`."""

    def __init__(self, root: Path, name: str, *, port: int = 0, upstream: int = 0) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # chronyd refuses a command socket in a folder others may write
        self.sock = root / f"{name}.sock"
        self.pidfile = root / f"{name}.pid"
        lines = [f"bindcmdaddress {self.sock}", "cmdport 0", f"pidfile {self.pidfile}"]
        if port:
            lines += ["local stratum 8", "allow 127.0.0.1", f"port {port}"]
        else:
            lines += [f"server 127.0.0.1 port {upstream} iburst minpoll -2 maxpoll 0", "port 0"]
        self.conf = root / f"{name}.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        """The chronyc command that reads this chronyd's tracking report (CSV)."""
        return [need("chronyc", "chrony"), "-h", str(self.sock), "-c", "tracking"]

    def start(self) -> Chrony:
        # -d: stay in the foreground (so this process is chronyd), -x: never touch the system clock
        self.proc = subprocess.Popen([need("chronyd", "chrony"), "-d", "-x", "-u", "root", "-f", str(self.conf),
                                      "-l", str(self.log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.sock.exists() or self.proc.poll() is not None, 10, "chronyd's command socket")
        assert self.proc.poll() is None, f"chronyd exited: {self.log.read_text() if self.log.exists() else ''}"
        return self

    def stop(self) -> None:
        end_process(self.proc)


@pytest.fixture
def chrony(tmp_path: Path) -> Iterator[Callable[..., Chrony]]:
    started: list[Chrony] = []
    root = Path("/tmp") / f"rekam-chrony-{os.getpid()}-{tmp_path.name}"[:60]  # a short path: a unix socket

    def make(name: str, **kw: Any) -> Chrony:
        c = Chrony(root, name, **kw)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()
    shutil.rmtree(root, ignore_errors=True)
