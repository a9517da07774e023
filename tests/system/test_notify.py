"""rekamd speaks systemd's notify protocol: a bound AF_UNIX datagram socket stands in for systemd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.system.conftest import REPO, write_kit_config


def _recv_all(sock: socket.socket, until: float) -> list[str]:
    out: list[str] = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


def test_ready_watchdog_stopping(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = write_kit_config(tmp_path, corpus_dir)
    # Short path: AF_UNIX addresses are limited to 108 bytes and pytest's tmp paths can be long.
    sock_path = f"/tmp/rekam-notify-{os.getpid()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    p = subprocess.Popen([str(REPO / ".venv" / "bin" / "rekamd"), "--config", str(cfg), "--sim"],
                         env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        msgs: list[str] = []
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for m in msgs):
            assert p.poll() is None, f"rekamd exited {p.returncode}: {p.stderr.read() if p.stderr else ''}"
            assert time.monotonic() < deadline, f"no READY=1 within 60 s; got {msgs}"
            msgs += _recv_all(sock, time.monotonic() + 0.5)
        ready = next(m for m in msgs if "READY=1" in m)
        assert "STATUS=" in ready  # the technician sees the guard level in `systemctl status`
        # WatchdogSec=1 s -> a keep-alive every 0.5 s; in 2.5 s at least 3 must arrive.
        t0 = time.monotonic()
        after = _recv_all(sock, t0 + 2.5)
        pings = [m for m in after if m == "WATCHDOG=1"]
        assert len(pings) >= 3, f"only {len(pings)} WATCHDOG=1 in 2.5 s: {after}"
        p.send_signal(signal.SIGTERM)
        t1 = time.monotonic()
        rc = p.wait(timeout=5)
        assert rc == 0
        assert time.monotonic() - t1 < 5
        tail = _recv_all(sock, time.monotonic() + 0.3)
        assert "STOPPING=1" in tail, tail
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        sock.close()
        os.unlink(sock_path)


def test_watchdog_for_another_pid_is_ignored(tmp_path: Path, corpus_dir: Path) -> None:
    """WATCHDOG_PID naming another process (a wrapper's child) means the keep-alive is not ours to send."""
    cfg = write_kit_config(tmp_path, corpus_dir)
    sock_path = f"/tmp/rekam-notify-{os.getpid()}-b.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    p = subprocess.Popen([str(REPO / ".venv" / "bin" / "rekamd"), "--config", str(cfg), "--sim"],
                         env=env, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        msgs: list[str] = []
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for m in msgs):
            assert p.poll() is None and time.monotonic() < deadline
            msgs += _recv_all(sock, time.monotonic() + 0.5)
        msgs += _recv_all(sock, time.monotonic() + 1.5)
        assert "WATCHDOG=1" not in msgs
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
        sock.close()
        os.unlink(sock_path)
