"""Start-up is O(1) in the backlog and a backfill never blocks READY or SIGTERM (issue 17, deliverable 1).

A kit with a few thousand records (built fast through the real Store on a tmpfs SD) and a fresh stick on the
real disk (fsync'd copies: the backfill takes a while): a real `rekamd --sim` reports READY=1 on the notify
socket while the backfill has barely begun, exits within 5 s of SIGTERM mid-backfill, and the next start
resumes the backfill where it stopped; a start after an unclean stop (SIGKILL) is READY without reconciling
first and reconciles in the background."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware import config
from firmware.seal import identity
from firmware.store.store import Store
from tests.faults.harness import payload
from tests.support import Tmpfs, rekam, write_daemon_config

N = 3000


def _ready(sock: socket.socket, proc: Any, timeout: float = 60) -> float:
    """Seconds until READY=1 arrives on the notify socket."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "rekamd exited before READY"
        sock.settimeout(0.2)
        try:
            if b"READY=1" in sock.recv(4096):
                return time.monotonic() - t0
        except TimeoutError:
            pass
    raise AssertionError(f"no READY=1 within {timeout} s")


def _on_stick(usb: Path) -> int:
    return sum(1 for _ in usb.glob("rekam/*/records/*.rkm"))


def test_ready_and_sigterm_never_wait_for_a_backfill(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path,
                                                     tmpfs: Tmpfs, rekamd_factory: Any) -> None:
    tmpfs.mount(tmp_path / "sd", None)
    usb = Path(tempfile.mkdtemp(prefix="rekam-stick-", dir="/var/tmp"))  # the real disk: copies cost fsyncs
    cfg_path = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir, usb={"mount_point": str(usb)})
    cfg = config.load(cfg_path)
    usb.rmdir()  # no stick while the backlog builds up
    s = Store(cfg, identity.load_or_create(cfg.state_dir))
    s.open()
    blob = payload(2000)
    for _ in range(N):
        s.commit(blob)
    s.close()
    usb.mkdir()  # a fresh stick
    sock_path = f"/tmp/rekam-notify-{os.getpid()}-startup.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    try:
        d = rekamd_factory(cfg_path, wait=False, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": None})
        ready_s = _ready(sock, d.proc)
        at_ready = _on_stick(usb)
        assert at_ready < N // 2, f"READY only after {at_ready} of {N} records were copied"
        deadline = time.monotonic() + 60
        while _on_stick(usb) < 20:  # the backfill is under way
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0
        stop_s = time.monotonic() - t0
        first = _on_stick(usb)
        assert first < N, "the backfill finished before the stop: nothing was shown"
        print(f"records={N} ready_s={ready_s:.2f} copied_at_ready={at_ready} stop_s={stop_s:.2f} copied={first}")
        assert "clean=True" in d.log_text()
        # The next start: READY again at once, and the backfill resumes to the end.
        d2 = rekamd_factory(cfg_path, wait=False, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": None})
        _ready(sock, d2.proc)
        deadline = time.monotonic() + 240
        while _on_stick(usb) < N:
            assert time.monotonic() < deadline, f"backfill did not resume: {_on_stick(usb)} of {N}"
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while json.loads(rekam("status", "--json", cfg=cfg_path).stdout)["mirror_lag"]["records"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        log = d2.log_text()
        copied = sum(int(line.split("copied=")[1].split()[0]) for line in log.splitlines()
                     if "usb backfill copied=" in line)
        assert copied <= N - first + 1, f"the second start copied {copied}: it started over"
        # An unclean stop: the next start is READY at once and reconciles in the background.
        d2.proc.kill()
        d2.proc.wait()
        kit_id = identity.load_or_create(cfg.state_dir).kit_id
        temp = cfg.state_dir / "records" / f"{kit_id}-{N + 7:08d}-20261201T000000Z.rkm.tmp"
        temp.write_bytes(b"half a record")  # what a kill mid-write leaves
        d3 = rekamd_factory(cfg_path, wait=False, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": None})
        _ready(sock, d3.proc)
        assert "clean=False" in d3.log_text()
        deadline = time.monotonic() + 30
        while json.loads(rekam("status", "--json", cfg=cfg_path).stdout).get("reconcile_pending"):
            assert time.monotonic() < deadline, "the background reconcile did not finish"
            time.sleep(0.2)
        assert not temp.exists()
        r = rekam("sim", "commit", "1", "--json", cfg=cfg_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)[0]["seq"] > N + 7  # the number the temp file showed is never handed out
        d3.proc.send_signal(signal.SIGTERM)
        assert d3.proc.wait(timeout=5) == 0
    finally:
        sock.close()
        os.unlink(sock_path)
        import shutil

        shutil.rmtree(usb, ignore_errors=True)
