"""rekamd speaks systemd's notify protocol: a bound AF_UNIX datagram socket stands in for systemd."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from tests.support import rekam
from tests.system.conftest import REPO, write_kit_config

# The installed entry point, as systemd runs it (rekamd.service's ExecStart).
REKAMD_ENTRY = [str(REPO / ".venv" / "bin" / "rekamd")]


def _recv_all(sock: socket.socket, until: float) -> list[str]:
    out: list[str] = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


def _recv_timed(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    """Like _recv_all, with each datagram's arrival time."""
    out: list[tuple[float, str]] = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        out.append((time.monotonic(), data.decode()))
    return out


def test_ready_watchdog_stopping(tmp_path: Path, corpus_dir: Path, rekamd_factory) -> None:
    cfg = write_kit_config(tmp_path, corpus_dir)
    # Short path: AF_UNIX addresses are limited to 108 bytes and pytest's tmp paths can be long.
    sock_path = f"/tmp/rekam-notify-{os.getpid()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": None}
    d = rekamd_factory(cfg, wait=False, env=env, command=REKAMD_ENTRY)
    p = d.proc
    try:
        msgs: list[str] = []
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for m in msgs):
            assert p.poll() is None, f"rekamd exited {p.returncode}: {d.log_tail()}"
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
        d.stop()
        sock.close()
        os.unlink(sock_path)


def test_watchdog_for_another_pid_is_ignored(tmp_path: Path, corpus_dir: Path, rekamd_factory) -> None:
    """WATCHDOG_PID naming another process (a wrapper's child) means the keep-alive is not ours to send."""
    cfg = write_kit_config(tmp_path, corpus_dir)
    sock_path = f"/tmp/rekam-notify-{os.getpid()}-b.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    d = rekamd_factory(cfg, wait=False, env=env, command=REKAMD_ENTRY)
    p = d.proc
    try:
        msgs: list[str] = []
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for m in msgs):
            assert p.poll() is None and time.monotonic() < deadline
            msgs += _recv_all(sock, time.monotonic() + 0.5)
        msgs += _recv_all(sock, time.monotonic() + 1.5)
        assert "WATCHDOG=1" not in msgs
    finally:
        d.stop(timeout=10)
        sock.close()
        os.unlink(sock_path)


def test_watchdog_keeps_beating_during_backfill(tmp_path: Path, corpus_dir: Path, rekamd_factory) -> None:
    cfg = write_kit_config(tmp_path, corpus_dir)
    (tmp_path / "usb").rmdir()  # no stick while the backlog builds up
    n = 120
    r = rekam("sim", "commit", str(n), "--pad-kb", "512", "--json", cfg=cfg)
    assert r.returncode == 0, r.stderr
    sock_path = f"/tmp/rekam-notify-{os.getpid()}-c.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": None}
    d = rekamd_factory(cfg, wait=False, env=env, command=REKAMD_ENTRY)
    p = d.proc
    try:
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for m in _recv_all(sock, time.monotonic() + 0.5)):
            assert p.poll() is None and time.monotonic() < deadline
        # The keep-alive rhythm before the stick arrives, so a gap spanning the copy is measured.
        pings = [t for t, m in _recv_timed(sock, time.monotonic() + 1.2) if m == "WATCHDOG=1"]
        (tmp_path / "usb").mkdir()  # the stick arrives: the whole backlog is copied
        t_insert = time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pings += [t for t, m in _recv_timed(sock, time.monotonic() + 0.25) if m == "WATCHDOG=1"]
            if len(list((tmp_path / "usb").glob("rekam/*/records/*.rkm"))) == n:
                break
        copy_s = time.monotonic() - t_insert
        pings += [t for t, m in _recv_timed(sock, time.monotonic() + 1.2) if m == "WATCHDOG=1"]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        # systemd kills the service when no keep-alive arrives within WatchdogSec (1 s here).
        print(f"backfill copy~{copy_s:.2f}s pings={len(pings)} max_gap={max(gaps or [0]):.2f}")
        assert gaps and max(gaps) < 1.0, f"longest keep-alive gap {max(gaps or [0]):.2f} s during backfill"
    finally:
        d.stop(timeout=10)
        sock.close()
        os.unlink(sock_path)


def test_watchdog_abort_leaves_python_stacks(tmp_path: Path, corpus_dir: Path, rekamd_factory) -> None:
    """With the unit's Environment= (PYTHONFAULTHANDLER), the watchdog's SIGABRT logs every thread's stack."""
    import shlex

    unit_env: dict[str, str] = {}
    for line in (REPO / "systemd" / "rekamd.service").read_text().splitlines():
        if line.startswith("Environment="):
            unit_env.update(w.split("=", 1) for w in shlex.split(line.split("=", 1)[1]))
    assert unit_env.get("PYTHONFAULTHANDLER") == "1"
    assert signal.Signals[[ln.split("=", 1)[1] for ln in (REPO / "systemd" / "rekamd.service").read_text()
                           .splitlines() if ln.startswith("WatchdogSignal=")][0]] == signal.SIGABRT
    cfg = write_kit_config(tmp_path, corpus_dir)
    env = {k: v for k, v in unit_env.items() if k != "LG_WD"}
    d = rekamd_factory(cfg, env=env, command=REKAMD_ENTRY)  # waits for its api.json
    p = d.proc
    p.send_signal(signal.SIGABRT)
    p.wait(timeout=20)
    err = d.log_text()
    assert p.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err
    assert err.count("Thread 0x") >= 2  # the main thread and the service threads
    assert 'firmware/daemon.py", line' in err
