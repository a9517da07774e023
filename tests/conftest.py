"""Shared fixtures. Services the tests need are real (mosquitto, Chromium); a missing one fails
the test with the package to install, never a silent skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _find_corpus() -> Path:
    env = os.environ.get("REKAM_CORPUS")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "corpus", REPO / ".." / "shared" / "corpus"]
    for c in candidates:
        if (c / "MANIFEST.tsv").exists():
            return c.resolve()
    pytest.fail("biometric corpus not found: set REKAM_CORPUS or place shared/corpus next to the checkout")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """`../shared/corpus` (fingerprints/, faces/, MANIFEST.tsv)."""
    return _find_corpus()


@pytest.fixture(scope="session")
def shared_dir(corpus_dir: Path) -> Path:
    """`../shared` (corpus/, reference/, tools/)."""
    return corpus_dir.parent


# --- a real mosquitto broker (relay, ingest, control tests) --------------------------------

MOSQUITTO_BIN = "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A mosquitto process on 127.0.0.1 with a generated config; stop/start/restart keep its port."""

    def __init__(self, workdir: Path, message_size_limit: int = 0, max_packet_size: int = 0,
                 persistence: bool = False, extra: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 f"persistence {'true' if persistence else 'false'}", f"persistence_location {self.dir}/",
                 f"log_dest file {self.dir / 'mosquitto.log'}", "log_type error", "log_type warning",
                 "log_type notice"]
        if os.geteuid() == 0:
            # Started as root (CI containers) mosquitto would switch to user "mosquitto", which cannot read
            # pytest's 0700 temp folders (certificates, log file).
            lines.append("user root")
        if message_size_limit:
            lines.append(f"message_size_limit {message_size_limit}")
        if max_packet_size:
            lines.append(f"max_packet_size {max_packet_size}")
        self.conf.write_text("\n".join(lines) + "\n" + extra)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        import shutil
        import socket
        import subprocess
        import time

        if not Path(MOSQUITTO_BIN).exists() and not shutil.which("mosquitto"):
            pytest.fail("mosquitto not installed: apt-get install -y mosquitto")
        binary = MOSQUITTO_BIN if Path(MOSQUITTO_BIN).exists() else shutil.which("mosquitto")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                pytest.fail(f"mosquitto exited at start (status {self.proc.returncode}): {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        pytest.fail(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def mosquitto_factory(tmp_path: Path):
    """Make (and start) brokers: `mosquitto_factory(message_size_limit=..., max_packet_size=..., start=True)`."""
    made: list[Mosquitto] = []

    def make(start: bool = True, **kw) -> Mosquitto:
        m = Mosquitto(tmp_path / f"mosquitto-{len(made)}", **kw)
        made.append(m)
        return m.start() if start else m

    yield make
    for m in made:
        m.stop()


@pytest.fixture
def mosquitto(mosquitto_factory) -> Mosquitto:
    """One running broker on a free local port (persistence off, anonymous)."""
    return mosquitto_factory()


def write_daemon_config(root: Path, dc_pub: Path, corpus: Path, extra: str = "") -> Path:
    """A simulation kit config for a real `rekamd` under `root` (SD in root/sd, stick folder root/usb,
    API on a free port); `extra` is appended TOML. Returns its path."""
    (root / "usb").mkdir(exist_ok=True)
    cfg = root / "rekam.toml"
    cfg.write_text(f"""
[kit]
state_dir = "{root / 'sd'}"
[datacenter]
public_key_files = ["{dc_pub}"]
[usb]
mount_point = "{root / 'usb'}"
require_mountpoint = false
poll_seconds = 0.2
[store]
reserve_floor_mb = 1
[api]
port = 0
[simulation]
corpus_dir = "{corpus}"
""" + extra)
    return cfg
