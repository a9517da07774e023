"""rekamd under a live systemd: the shipped unit files run by systemd as PID 1.

`test_units.py` checks the units offline (`systemd-analyze verify`, the exposure rating). This runs them: a
container (`systemd-nspawn --boot`) boots this machine's own /usr with a copy of its /etc, the rekam user and
groups as `install.sh` makes them, every unit of `systemd/` in /etc/systemd/system and a venv at
/opt/rekam/venv on the Debian interpreter (/usr/bin/python3, as on the Pi) that imports this checkout and its
venv's packages. What the unit promises is then checked on the real thing: `Type=notify` (start returns at
READY), the sandbox (user, seccomp, no capabilities, no new privileges, a read-only system with the state
directory and /media writable), the watchdog (pings keep a 4 s `WatchdogSec=` from firing), `Restart=always`
after a kill with the records kept, `RestartPreventExitStatus=78` on a broken config, a clean stop well
inside `TimeoutStopSec=`, the fleet-key pin started by its path unit, a pushed update that cannot start
rolled back by the root updater its path unit starts, a promoted update that then crash-loops rolled back
by `OnFailure=` (rekam-rollback.service), the battery safe stop (exit 77) powering the machine off, and
`install.sh install|uninstall` on a machine rekam was never on. A
whole simulated enrollment (face and fingerprint quality models, sealing, the SD and the stick) runs inside
that sandbox.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.console.conftest import NIK_MALE, OPERATOR, _operators_block, enroll
from tests.support import free_port, wait_for, write_daemon_config
from tests.system.conftest import REPO, SYSTEMD_DIR, need_root, need_tool

UNIT = "rekamd.service"
# What install.sh enables on a kit (its have_systemd branch).
ENABLED = ["rekam-firstboot.service", UNIT, "rekam-usb-eject.path", "rekam-update.path", "rekam-fleet-pin.path",
           "rekam-fleet-pin.service"]
STICK = "/media/rekam-usb"
_SERIAL = itertools.count()


class Container:
    """A booted systemd-nspawn container; `sh(...)` runs a command inside it (nsenter into every namespace)."""

    def __init__(self, root: Path, sources: list[Path]) -> None:
        self.root = root
        self.etc, self.opt, self.state = root / "etc", root / "opt", root / "state"
        # Read-only folders of this machine (checkout, venv packages, corpus), each at a path of its own inside:
        # not at its own path, which may lie under /tmp, where the container's systemd mounts a fresh tmpfs.
        self.binds_ro = {src.resolve(): f"/srv/rekam-test/{i}" for i, src in enumerate(sources)}
        self.extra_binds: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 90.0) -> None:
        nspawn = need_tool("systemd-nspawn", "systemd-container")
        args = [nspawn, "--quiet", "--register=no", "--keep-unit", "--directory=/", "--volatile=yes",
                f"--machine=rekam-test-{os.getpid()}-{next(_SERIAL)}", "--console=read-only",
                f"--bind={self.etc}:/etc", f"--bind={self.opt}:/opt", f"--bind={self.state}:/var/lib/rekam",
                *(f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro.items()), *self.extra_binds, "--boot"]
        log = open(self.root / "boot.log", "wb")  # noqa: SIM115 (kept by the child)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the container did not start: {self.boot_log()}")
            kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
            for pid in kids:
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:  # gone between pgrep and here
                    continue
                if comm == "systemd":
                    self.leader = int(pid)
            time.sleep(0.1)
        # Asked too early (before PID 1 listens on its private socket) systemctl answers nothing: ask again.
        while True:
            left = max(1.0, deadline - time.monotonic())
            r = self.sh("systemctl", "is-system-running", "--wait", check=False, timeout=left)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return
            if state in ("maintenance", "stopping") or time.monotonic() > deadline:
                pytest.fail(f"the container's systemd did not finish booting ({state} {r.stderr.strip()}): "
                            f"{self.boot_log()}")
            time.sleep(0.2)

    def inside(self, path: Path | str) -> str:
        """Where `path` (under one of the read-only folders) is seen inside the container."""
        path = Path(path).resolve()
        for src, dst in sorted(self.binds_ro.items(), key=lambda kv: -len(str(kv[0]))):
            if path == src or src in path.parents:
                return str(Path(dst) / path.relative_to(src))
        raise AssertionError(f"{path} is not under a folder bound into the container")

    def boot_log(self) -> str:
        return (self.root / "boot.log").read_text(errors="replace")[-3000:]

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *cmd], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}\n"
                        f"{self.journal()}")
        return r

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, lines: int = 60) -> str:
        return self.sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "-n", str(lines), check=False).stdout

    def wait_unit(self, what: str, cond: Any, timeout: float = 60.0) -> dict[str, str]:
        """Poll the unit's properties until `cond(props)`; fail naming `what` with the journal."""
        deadline = time.monotonic() + timeout
        while True:
            props = self.show("ActiveState", "SubState", "Result", "MainPID", "NRestarts", "ExecMainStatus",
                              "ExecMainCode", "StatusText", "WatchdogTimestampMonotonic")
            if cond(props):
                return props
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not reached in {timeout:.0f} s, unit {props}\n{self.journal()}")
            time.sleep(0.2)

    def poweroff(self) -> None:
        if self.proc is None:
            return
        if self.leader and self.proc.poll() is None:
            subprocess.run(["nsenter", "-t", str(self.leader), "-a", "systemctl", "poweroff", "--no-block"],
                           capture_output=True, timeout=30)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def _free_id(used: set[int]) -> int:
    """The highest system id (uid and gid alike) below 1000 not in `used`; taken into `used`."""
    i = next(i for i in range(999, 100, -1) if i not in used)
    used.add(i)
    return i


def _stage_etc(etc: Path, with_rekam: bool = True) -> None:
    """This machine's /etc with none of its own services enabled; `with_rekam`: plus the rekam user and groups
    and the units of systemd/ (as install.sh leaves them)."""
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    units = etc / "systemd" / "system"
    for wants in units.glob("*.wants"):  # the host's postgres, mosquitto, timers ...: not part of this boot
        shutil.rmtree(wants)
    if not with_rekam:
        return
    rows = {name: (etc / name).read_text().splitlines() for name in ("passwd", "group")}
    used = {int(line.split(":")[2]) for lines in rows.values() for line in lines if line.count(":") >= 2}
    uid = _free_id(used)
    groups = {line.split(":")[0]: line for line in rows["group"] if line.count(":") >= 3}
    for g in ("dialout", "gpio", "video", "i2c"):  # install.sh: groupadd --system where missing, then usermod -a -G
        line = groups.get(g) or f"{g}:x:{_free_id(used)}:"
        groups[g] = line + ("," if not line.endswith(":") else "") + "rekam"
    groups["rekam"] = f"rekam:x:{uid}:"
    (etc / "group").write_text("".join(f"{line}\n" for line in groups.values()))
    with open(etc / "passwd", "a") as f:
        f.write(f"rekam:x:{uid}:{uid}:rekam enrollment kit daemon:/var/lib/rekam:/usr/sbin/nologin\n")
    with open(etc / "shadow", "a") as f:
        f.write("rekam:!:20000::::::\n")
    for unit in SYSTEMD_DIR.iterdir():
        if unit.suffix in (".service", ".path", ".timer"):
            shutil.copy(unit, units / unit.name)


def _stage_venv(opt: Path, c: Container) -> None:
    """/opt/rekam/venv on /usr/bin/python3 importing this checkout and this venv's packages; current -> venv."""
    venv = opt / "rekam" / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "rekam-under-test.pth").write_text(f"{c.inside(REPO)}\n{c.inside(sysconfig.get_paths()['purelib'])}\n")
    for ep in importlib.metadata.distribution("rekam").entry_points:
        if ep.group == "console_scripts":
            script = venv / "bin" / ep.name
            script.write_text(f"#!/opt/rekam/venv/bin/python\nimport sys\nfrom {ep.module} import {ep.attr}\n"
                              f"sys.exit({ep.attr}())\n")
            script.chmod(0o755)
    (opt / "rekam" / "current").symlink_to("venv")


def _container(root: Path, corpus_dir: Path, installed: bool = True, sources: tuple[Path, ...] = (),
               same_path: tuple[Path, ...] = ()) -> Container:
    """A booted container under `root`: with rekam staged (`installed`: user, units enabled, venv, the stick
    folder) or as a machine rekam was never installed on (this machine's /etc without its services)."""
    need_root("booting a systemd container")
    py = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                        text=True, timeout=30)
    if py.stdout.strip() != str(sys.version_info[:2]):
        pytest.fail(f"/usr/bin/python3 is {py.stdout.strip() or py.stderr.strip()}, this venv {sys.version_info[:2]}: "
                    "the container's venv imports this venv's compiled packages")
    c = Container(root, sorted({REPO.resolve(), Path(sysconfig.get_paths()["purelib"]).resolve(),
                                corpus_dir.resolve(), *(p.resolve() for p in sources)}))
    _stage_etc(c.etc, with_rekam=installed)
    c.opt.mkdir()
    if installed:
        _stage_venv(c.opt, c)
    c.state.mkdir()
    # Test shortcut for update slots: a slot is a venv with the system site (as on the Pi, for picamera2) and only
    # the bundle's wheels; a production bundle carries every dependency as a wheel, this CI has no wheelhouse. So
    # the container's /usr/local site (first on Debian's system path) points at this venv's packages. The
    # checkout itself is not on it: a slot runs the rekam its bundle installed.
    system_site = subprocess.run(["/usr/bin/python3", "-c", "import site; print(site.getsitepackages()[0])"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
    if system_site and Path(system_site).is_dir():
        deps = root / "system-site"
        deps.mkdir()
        (deps / "rekam-test-deps.pth").write_text(c.inside(sysconfig.get_paths()["purelib"]) + "\n")
        c.extra_binds.append(f"--bind-ro={deps}:{system_site}")
    c.extra_binds += [f"--bind-ro={p}:{p}" for p in same_path]
    # The journal on the host (persistent journald storage): readable after the container is gone.
    (root / "journal").mkdir()
    c.extra_binds.append(f"--bind={root / 'journal'}:/var/log/journal")
    try:
        c.boot()
        if installed:
            c.sh("systemctl", "enable", *ENABLED)
            c.sh("install", "-d", "-o", "rekam", "-g", "rekam", "-m", "0700", STICK)
    except BaseException:
        c.poweroff()
        raise
    return c


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Iterator[Container]:
    c = _container(tmp_path_factory.mktemp("nspawn"), corpus_dir)
    try:
        yield c
    finally:
        c.poweroff()


def _configure(c: Container, tmp: Path, dc_keys: dict[str, Any], corpus: Path, sim: bool, watchdog_s: int = 0,
               broken: bool = False, control: dict[str, Any] | None = None, power: dict[str, Any] | None = None,
               simulation: dict[str, Any] | None = None) -> int:
    """Stop the daemon, write /etc/rekam (config, data-center key) and the unit's drop-in; returns the API port."""
    c.sh("systemctl", "stop", UNIT, check=False, timeout=40)  # whatever an earlier test left running
    port = free_port()
    cfg = write_daemon_config(tmp, dc_keys["pub_path"], Path(c.inside(corpus)), _operators_block(),
                              kit={"state_dir": "/var/lib/rekam", "site": "test-site"},
                              datacenter={"public_key_files": ["/etc/rekam/datacenter.pub"]},
                              usb={"mount_point": STICK}, api={"port": port}, camera={"backend": "sim"},
                              simulation={"sensor_wire_speed": 0, **(simulation or {})}, power=power or {},
                              enrollment={"fingers": ["R1", "R2"], "dedup_fingers": []},
                              store={"reserve_floor_mb": -1 if broken else 1}, control=control or {})
    d = c.etc / "rekam"
    d.mkdir(exist_ok=True)
    shutil.copy(cfg, d / "rekam.toml")
    shutil.copy(dc_keys["pub_path"], d / "datacenter.pub")
    dropin = c.etc / "systemd" / "system" / f"{UNIT}.d"
    shutil.rmtree(dropin, ignore_errors=True)
    lines = []
    if sim:  # the shipped ExecStart plus --sim: the simulated sensor and the corpus camera
        lines += ["ExecStart=", "ExecStart=/opt/rekam/current/bin/rekamd --config /etc/rekam/rekam.toml --sim"]
    if watchdog_s:
        lines.append(f"WatchdogSec={watchdog_s}")
    if lines:
        dropin.mkdir()
        (dropin / "test.conf").write_text("[Service]\n" + "\n".join(lines) + "\n")
    c.sh("chgrp", "-R", "rekam", "/etc/rekam")
    c.sh("chmod", "0640", "/etc/rekam/rekam.toml", "/etc/rekam/datacenter.pub")
    c.sh("systemctl", "daemon-reload")
    c.sh("systemctl", "reset-failed", UNIT, check=False)
    return port


def _proc_status(c: Container, pid: str) -> dict[str, str]:
    text = c.sh("cat", f"/proc/{pid}/status").stdout
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def _stop(c: Container) -> float:
    t0 = time.monotonic()
    c.sh("systemctl", "stop", UNIT, timeout=40)
    return time.monotonic() - t0


def _api(c: Container, port: int, path: str) -> httpx.Response:
    """GET `path` of the running daemon with its local token (a new one every start)."""
    token = (c.state / "api.token").read_text().strip()
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers={"X-Rekam-Token": token}, timeout=30)


def _drop_pending(c: Container, bundle: Path) -> None:
    """Put `bundle` where the daemon's download leaves it, as update_fetch does: written whole, owned by rekam,
    then renamed into place (rekam-update.path fires on the name)."""
    uid = int(c.sh("id", "-u", "rekam").stdout)
    updates = c.state / "updates"
    updates.mkdir(exist_ok=True)
    os.chown(updates, uid, uid)
    tmp = updates / ".pending.tmp"
    shutil.copy(bundle, tmp)
    os.chown(tmp, uid, uid)
    tmp.rename(updates / "pending.rkup")


def _update_status(c: Container) -> dict[str, Any]:
    """`rekam update status --json` from the factory slot ({} if it printed no JSON)."""
    r = c.sh("/opt/rekam/venv/bin/rekam", "--config", "/etc/rekam/rekam.toml", "update", "status", "--json",
             check=False)
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


def test_shipped_unit_ready_sandboxed_and_stops_cleanly(box: Container, tmp_path: Path, dc_keys: dict[str, Any],
                                                        corpus_dir: Path) -> None:
    port = _configure(box, tmp_path, dc_keys, corpus_dir, sim=False)
    box.sh("systemctl", "start", UNIT, timeout=120)  # Type=notify: returns once the daemon said READY=1
    props = box.show("ActiveState", "SubState", "MainPID", "StatusText", "NRestarts")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), (props, box.journal())
    st = _proc_status(box, props["MainPID"])
    uid = box.sh("id", "-u", "rekam").stdout.strip()
    assert st["Uid"].split()[:2] == [uid, uid], st["Uid"]
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st  # SystemCallFilter=, NoNewPrivileges=
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, st  # CapabilityBoundingSet= (empty)
    # ProtectSystem=strict: the daemon cannot write outside its state directory (and /media, /run/rekam)
    pid = props["MainPID"]
    probe = box.sh("nsenter", "-t", pid, "-m", "-S", uid, "-G", uid, "sh", "-c",
                   "touch /etc/rekam/x 2>&1; touch /opt/rekam/x 2>&1;"
                   " touch /var/lib/rekam/probe && rm /var/lib/rekam/probe && echo state-ok",
                   check=False)
    assert "Read-only file system" in probe.stdout and "state-ok" in probe.stdout, probe.stdout + probe.stderr
    assert (box.state / "journal.db").is_file() and (box.state / "api.token").is_file()
    r = _api(box, port, "/api/v1/status")
    assert r.status_code == 200, r.text
    assert oct(box.state.stat().st_mode & 0o777) == "0o700" and box.state.stat().st_uid == int(uid)
    took = _stop(box)
    props = box.show("ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (props, box.journal())
    assert took < 5, f"stop took {took:.1f} s (TimeoutStopSec=20)"
    assert "rekamd: stopped" in box.journal(), box.journal()


def test_sim_enrollment_in_the_sandbox_watchdog_and_restart(box: Container, tmp_path: Path,
                                                            dc_keys: dict[str, Any], corpus_dir: Path) -> None:
    port = _configure(box, tmp_path, dc_keys, corpus_dir, sim=True, watchdog_s=4)
    box.sh("systemctl", "start", UNIT, timeout=180)
    first = box.show("MainPID", "NRestarts", "WatchdogTimestampMonotonic")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=120) as c:
        r = c.post("/api/v1/auth/signin", json={"operator_id": OPERATOR[0], "pin": OPERATOR[1]})
        assert r.status_code == 200, r.text
        c.headers["Authorization"] = f"Bearer {r.json()['token']}"
        receipt = enroll(c, NIK_MALE)
    rid = receipt["record_id"]
    on_sd = [p for p in (box.state / "records").rglob("*") if p.is_file() and rid in p.name]
    assert on_sd, f"record {rid} not on the SD: {sorted((box.state / 'records').rglob('*'))}"
    # the stick (a folder under /media, writable through ReadWritePaths=-/media) gets its copy
    wait_for(lambda: box.sh("find", STICK, "-name", f"*{rid}*", "-type", "f").stdout.strip(), 30,
             f"record {rid} mirrored to {STICK}", step=0.5)
    # Three watchdog periods later: still the same process (no SIGABRT), and its pings arrive.
    time.sleep(12)
    now = box.show("MainPID", "NRestarts", "WatchdogTimestampMonotonic", "ActiveState")
    assert (now["MainPID"], now["NRestarts"], now["ActiveState"]) == (first["MainPID"], first["NRestarts"], "active"), (
        now, box.journal())
    assert int(now["WatchdogTimestampMonotonic"]) > int(first["WatchdogTimestampMonotonic"]), now
    # Killed: Restart=always brings it back (RestartSec=3), READY again, the record still there.
    box.sh("systemctl", "kill", "--signal=SIGKILL", UNIT)
    box.wait_unit("restart after SIGKILL", lambda p: p["ActiveState"] == "active" and p["SubState"] == "running"
                 and p["MainPID"] not in ("0", first["MainPID"]) and int(p["NRestarts"]) == int(first["NRestarts"]) + 1)
    recs = _api(box, port, "/api/v1/records")
    assert recs.status_code == 200 and [r["id"] for r in recs.json()] == [rid], recs.text
    _stop(box)


def test_broken_config_is_not_restarted(box: Container, tmp_path: Path, dc_keys: dict[str, Any],
                                        corpus_dir: Path) -> None:
    _configure(box, tmp_path, dc_keys, corpus_dir, sim=False, broken=True)
    box.sh("systemctl", "start", UNIT, check=False, timeout=120)
    props = box.wait_unit("failed with 78", lambda p: p["ActiveState"] == "failed")
    assert props["ExecMainStatus"] == "78" and props["NRestarts"] == "0", (props, box.journal())
    time.sleep(4)  # past RestartSec=3: RestartPreventExitStatus= keeps it down
    again = box.show("ActiveState", "NRestarts")
    assert again == {"ActiveState": "failed", "NRestarts": "0"}, again
    assert "reserve_floor_mb" in box.journal(), box.journal()


def test_claimed_fleet_key_is_pinned_by_the_path_unit(box: Container, tmp_path: Path, dc_keys: dict[str, Any],
                                                      corpus_dir: Path) -> None:
    """rekam-fleet-pin.path sees the claim write control/fleet.pub and starts the root oneshot that pins it, the key
    certified by the image's fleet CA (/etc/rekam/fleet-ca.crt); a key of the daemon's own written later is refused
    and the pin kept (docs/updates.md)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.wire import control_protocol as cp
    from provisioning import ca

    _configure(box, tmp_path, dc_keys, corpus_dir, sim=False)
    pki = ca.init_ca(tmp_path / "fleet-ca", ["127.0.0.1"], batch="test")
    shutil.copy(pki.fleet_ca_crt, box.etc / "rekam" / "fleet-ca.crt")  # in the image, root's (control.ca_file)
    os.chmod(box.etc / "rekam" / "fleet-ca.crt", 0o644)
    box.sh("systemctl", "start", "rekam-fleet-pin.path")  # install.sh starts it after enabling it
    uid = int(box.sh("id", "-u", "rekam").stdout)
    control, pin = box.state / "control", box.etc / "rekam" / "fleet.pub"
    control.mkdir(exist_ok=True)
    os.chown(control, uid, uid)

    def write(name: str, data: bytes) -> None:  # as the daemon's claim writes its files, as the rekam user
        tmp = control / f".{name}.tmp"
        tmp.write_bytes(data)
        os.chown(tmp, uid, uid)
        tmp.chmod(0o644)
        tmp.rename(control / name)

    first = Ed25519PrivateKey.generate()
    write("fleet-key.crt", ca.certify_fleet_key(pki, first.public_key()))
    write("fleet.pub", (cp.public_b64(first) + "\n").encode())  # last, as the claim does: it starts the pin
    wait_for(pin.exists, 30, "the pin after the claim wrote control/fleet.pub", step=0.2)
    assert pin.read_text().strip() == cp.public_b64(first)
    assert pin.stat().st_uid == 0 and pin.stat().st_mode & 0o022 == 0
    # A compromised daemon swaps in its own key: the pin service refuses (exit 3) and keeps the pin. (Once the
    # first run is over: a change while the oneshot still runs does not queue a second run.)
    wait_for(lambda: box.sh("systemctl", "is-active", "rekam-fleet-pin.service", check=False).stdout.strip()
             != "activating", 30, "the first pin run to end", step=0.1)
    write("fleet.pub", (cp.public_b64(Ed25519PrivateKey.generate()) + "\n").encode())
    wait_for(lambda: "uncertified_fleet_key" in box.sh("journalctl", "-u", "rekam-fleet-pin.service", "--no-pager",
                                                       "-o", "cat", check=False).stdout,
             30, "uncertified_fleet_key in rekam-fleet-pin.service's journal", step=0.2)
    assert pin.read_text().strip() == cp.public_b64(first)


def test_pushed_update_that_cannot_start_is_rolled_back(box: Container, tmp_path: Path, dc_keys: dict[str, Any],
                                                        corpus_dir: Path) -> None:
    """The daemon's download lands in updates/pending.rkup; rekam-update.path starts the root oneshot, which
    verifies it with the root-owned key (here `control.fleet_public_key` in /etc/rekam), installs a slot from
    /usr/bin/python3, switches and restarts rekamd through the real systemctl; the release cannot reach READY, so
    the updater switches back and the previous daemon runs again (docs/updates.md)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.wire import control_protocol as cp
    from tests.update.conftest import make_bundle, tiny_wheel

    fleet = Ed25519PrivateKey.generate()
    port = _configure(box, tmp_path, dc_keys, corpus_dir, sim=False, control={"fleet_public_key": cp.public_b64(fleet)})
    box.sh("systemctl", "start", UNIT, timeout=120)
    box.sh("systemctl", "start", "rekam-update.path")
    before = box.show("MainPID")["MainPID"]
    _drop_pending(box, make_bundle(tmp_path, tiny_wheel(tmp_path, "0.2.0", "sys.exit(1)"), "0.2.0", fleet))
    updates = box.state / "updates"

    def updater_log() -> str:
        return box.sh("journalctl", "-u", "rekam-update.service", "--no-pager", "-o", "cat", check=False).stdout

    deadline = time.monotonic() + 240
    while True:  # the oneshot ran (it removes the pending file) and is over
        ran = "rekam-update.service: Deactivated" in (log := updater_log()) or "Failed with result" in log
        if ran and not (updates / "pending.rkup").exists():
            break
        if time.monotonic() > deadline:
            pytest.fail(f"the updater did not run to its end:\n{log}\n{box.journal()}")
        time.sleep(0.5)
    status = _update_status(box)
    assert os.readlink(box.opt / "rekam" / "current") == "venv", (status, log)
    assert status["last_result"]["version"] == "0.2.0" and status["last_result"]["status"] != "installed", status
    assert "0.2.0" in status["failed_versions"], (status, log)
    props = box.wait_unit("the previous daemon running again", lambda p: p["ActiveState"] == "active"
                         and p["SubState"] == "running")
    assert props["MainPID"] != before, props
    r = _api(box, port, "/api/v1/status")
    assert r.status_code == 200, r.text
    _stop(box)


def test_promoted_update_then_crash_loop_rolled_back_by_on_failure(box: Container, tmp_path: Path,
                                                                    dc_keys: dict[str, Any], corpus_dir: Path) -> None:
    """A good release (the real rekam wheel at 0.2.0) passes its trial and is promoted; when it then crash-loops,
    systemd gives up (StartLimitBurst=5), `OnFailure=` starts rekam-rollback.service, whose condition (the
    rollback window, this boot) holds, and the previous slot runs again: the brick guard, end to end."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.wire import control_protocol as cp
    from tests.update.conftest import build_rekam_wheel, make_bundle

    if not box.extra_binds:
        pytest.fail("no system site folder on /usr/bin/python3 to give update slots their dependencies")
    fleet = Ed25519PrivateKey.generate()
    port = _configure(box, tmp_path, dc_keys, corpus_dir, sim=False, control={"fleet_public_key": cp.public_b64(fleet)})
    box.sh("systemctl", "start", UNIT, timeout=120)
    box.sh("systemctl", "start", "rekam-update.path")
    _drop_pending(box, make_bundle(tmp_path, build_rekam_wheel(tmp_path / "wheel", "0.2.0"), "0.2.0", fleet))

    def status() -> dict[str, Any]:
        return _update_status(box)

    def logs() -> str:
        return box.sh("journalctl", "-u", "rekam-update.service", "-u", "rekam-rollback.service", "-u", UNIT,
                      "--no-pager", "-o", "cat", "-n", "80", check=False).stdout

    deadline = time.monotonic() + 300
    while (status().get("last_result") or {}).get("status") != "promoted":
        if time.monotonic() > deadline:
            pytest.fail(f"0.2.0 not promoted: {status()}\n{logs()}")
        time.sleep(1)
    assert os.readlink(box.opt / "rekam" / "current") == "releases/0.2.0"
    st = _api(box, port, "/api/v1/status").json()
    assert st["daemon"]["version"] == "0.2.0", st["daemon"]
    # The promoted release now fails at every start (a bad file, a broken dependency ...).
    (daemon_py,) = (box.opt / "rekam" / "releases" / "0.2.0").glob("lib/python3*/site-packages/firmware/daemon.py")
    daemon_py.write_text("import sys\n\n\ndef run():\n    sys.exit(1)\n")
    box.sh("systemctl", "restart", UNIT, check=False, timeout=120)
    deadline = time.monotonic() + 180
    while (status().get("last_result") or {}).get("code") != "crash_loop":
        if time.monotonic() > deadline:
            pytest.fail(f"no crash-loop rollback: {status()}\n{logs()}")
        time.sleep(1)
    assert os.readlink(box.opt / "rekam" / "current") == "venv", status()
    props = box.wait_unit("the previous daemon running after the rollback",
                         lambda p: p["ActiveState"] == "active" and p["SubState"] == "running", timeout=90)
    assert props["ActiveState"] == "active"
    st = _api(box, port, "/api/v1/status").json()
    assert st["daemon"]["version"] == "0.1.0", st["daemon"]
    assert "Triggering OnFailure= dependencies" in logs(), logs()
    _stop(box)


def test_battery_safe_stop_powers_the_machine_off(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                  dc_keys: dict[str, Any], corpus_dir: Path) -> None:
    """At critical battery the daemon stops safely and exits 77; the unit's root `ExecStopPost=` powers the machine
    off (here: the container), not a restart (`RestartPreventExitStatus=`), and the store was closed cleanly.
    A container of its own: this one does not come back."""
    import sqlite3

    c = _container(tmp_path_factory.mktemp("nspawn-power"), corpus_dir)
    try:
        _configure(c, tmp_path, dc_keys, corpus_dir, sim=True, power={"enabled": True, "gauge": "sim", "poll_s": 0.5},
                   simulation={"battery_start_percent": 5.0})
        c.sh("systemctl", "start", "--no-block", UNIT)
        assert c.proc is not None
        try:
            code = c.proc.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the container was not powered off within 120 s\n{c.journal()}")
    finally:
        c.poweroff()
    log = subprocess.run(["journalctl", f"--directory={c.root / 'journal'}", "-u", UNIT, "--no-pager", "-o", "cat"],
                         capture_output=True, text=True, timeout=60).stdout
    assert code == 0, f"nspawn exited {code} (133 would be a reboot)\n{log}"
    assert "power_critical" in log or "safe stop" in log, log
    assert "Scheduled restart job" not in log, log  # exit 77 is not restarted
    db = sqlite3.connect(f"file:{c.state / 'journal.db'}?mode=ro", uri=True)
    try:
        clean = db.execute("SELECT value FROM meta WHERE key = 'clean_shutdown'").fetchone()
    finally:
        db.close()
    assert clean == ("1",), (clean, log)


def _repack_installed(dist_name: str, out: Path) -> Path:
    """A wheel of an installed pure-Python distribution, from the files its RECORD lists (the kit installs the
    face-model package from a wheel; there is none here but the installed files)."""
    from tests.update.conftest import write_wheel

    dist = importlib.metadata.distribution(dist_name)
    base = Path(str(dist.locate_file("")))
    skip = ("INSTALLER", "REQUESTED", "direct_url.json", "RECORD")
    files = {str(f): (base / f).read_bytes() for f in dist.files or []
             if "__pycache__" not in str(f) and not str(f).startswith("..") and not str(f).endswith(skip)}
    out.mkdir(parents=True, exist_ok=True)
    name = dist.metadata["Name"].replace("-", "_")
    return write_wheel(out / f"{name}-{dist.version}-py3-none-any.whl", files)


def _pip_settings() -> tuple[str, tuple[Path, ...]]:
    """This machine's effective pip settings as a pip.conf, and the local folders they name (a mirror of the index,
    find-links), to be seen at the same paths inside: the container's pip then finds what this one finds."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    settings: dict[str, str] = {}  # the environment's (":env:", listed last) over the files'
    folders: set[Path] = set()
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.partition(".")
        if section not in ("global", ":env:", "install") or not name:
            continue
        value = value.strip().strip("'\"")
        settings[name] = value
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.is_absolute() and path.exists() and not str(path).startswith(("/tmp", "/etc")):
                folder = path if path.is_dir() else path.parent
                # a file:// index (".../simple") links to its files beside it (".../files"): the whole mirror
                folders.add(folder.parent if folder.name == "simple" else folder)
    return "[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()), tuple(sorted(folders))


def test_install_sh_on_a_machine_with_systemd(tmp_path_factory: pytest.TempPathFactory, dc_keys: dict[str, Any],
                                              corpus_dir: Path) -> None:
    """`sh systemd/install.sh install` on a machine rekam was never on, with systemd running (its live branch):
    the user and groups, the venv, the config, the units enabled and rekamd started once the data-center key is
    there; `uninstall` takes it all away but the records. (pip builds rekam with setuptools from the package
    index, as on a Pi; the face-model package comes from a local wheelhouse and rekam's dependencies from the
    system site, pointed at the test venv's packages, instead of some 500 MB of downloads.)"""
    from firmware.quality.face.models import PACKAGE

    root = tmp_path_factory.mktemp("nspawn-install")
    wheels = root / "wheels"
    _repack_installed(PACKAGE, wheels)
    pip_conf, local = _pip_settings()
    c = _container(root, corpus_dir, installed=False, sources=(wheels,), same_path=local)
    (c.etc / "pip.conf").write_text(pip_conf)  # what pip here is set to use (an index mirror, find-links)
    try:
        assert c.sh("getent", "passwd", "rekam", check=False).returncode == 2, "rekam exists before install"
        src = "/root/rekam-src"  # pip builds in the source tree: a writable copy of the checkout, without its venv
        c.sh("sh", "-c", f"mkdir -p {src} && tar -C {c.inside(REPO)} --exclude=./.venv --exclude=./var "
                         f"--exclude=./.git -cf - . | tar -C {src} -xf -")
        c.sh("install", "-d", "-m", "0755", "/etc/rekam")
        shutil.copy(dc_keys["pub_path"], c.etc / "rekam" / "datacenter.pub")
        pip_args = f"--find-links {c.inside(wheels)}"  # build isolation takes setuptools from the index, as on a Pi
        r = c.sh("env", f"REKAM_PIP_ARGS={pip_args}", "sh", f"{src}/systemd/install.sh", "install", timeout=600)
        assert "rekamd (re)started" in r.stdout, r.stdout + r.stderr
        groups = c.sh("id", "-nG", "rekam").stdout.split()
        assert {"rekam", "dialout", "gpio", "video", "i2c"} <= set(groups), groups
        assert os.readlink(c.opt / "rekam" / "current") == "venv"
        props = c.wait_unit("rekamd running after install", lambda p: p["ActiveState"] == "active"
                           and p["SubState"] == "running")
        st = _proc_status(c, props["MainPID"])
        assert st["Uid"].split()[0] == c.sh("id", "-u", "rekam").stdout.strip(), st["Uid"]
        for unit in ("rekamd.service", "rekam-firstboot.service", "rekam-usb-eject.path", "rekam-update.path",
                     "rekam-fleet-pin.path"):
            assert c.sh("systemctl", "is-enabled", unit, check=False).stdout.strip() == "enabled", unit
        assert c.sh("systemctl", "is-active", "rekam-fleet-pin.path", check=False).stdout.strip() == "active"
        cfg = c.etc / "rekam" / "rekam.toml"
        assert cfg.is_file() and oct(cfg.stat().st_mode & 0o777) == "0o640", cfg
        assert (c.state / "journal.db").is_file()  # the default config's state directory, the daemon's own
        # Again: idempotent, the config kept.
        cfg.write_text(cfg.read_text() + "\n# edited by the technician\n")
        r = c.sh("env", f"REKAM_PIP_ARGS={pip_args}", "sh", f"{src}/systemd/install.sh", "install", timeout=600)
        assert "keeping existing /etc/rekam/rekam.toml" in r.stdout and "edited by the technician" in cfg.read_text()
        r = c.sh("sh", f"{src}/systemd/install.sh", "uninstall", timeout=120)
        assert c.sh("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active", r.stdout
        assert not (c.opt / "rekam").exists() and not (c.etc / "systemd" / "system" / UNIT).exists(), r.stdout
        assert c.sh("getent", "passwd", "rekam", check=False).returncode == 2, r.stdout
        assert (c.state / "journal.db").is_file(), "the records' journal must stay"
        assert "keeping edited /etc/rekam/rekam.toml" in r.stdout, r.stdout
    finally:
        c.poweroff()
