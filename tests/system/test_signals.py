"""SIGTERM/SIGINT turn into the stop event without a lock in the handler (firmware/system/signals.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The main thread holds the stop event's lock when the signal is handled: exactly where `Event.wait()` is for a
# few bytecodes of every wait (inside Condition.wait, before it releases the lock). A handler calling
# `stop.set()` blocks there on its own thread's lock for ever; the latch must stop the process at once.
WINDOW = textwrap.dedent("""
    import os, signal, sys, threading
    from firmware.system.signals import SignalLatch

    stop = threading.Event()
    {install}
    def call():
        pass
    with stop._cond:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(20):
            call()  # a function call: where the interpreter runs pending signal handlers
    print("latched" if {check} else "missed", flush=True)
""")


def _run(install: str, check: str, timeout: float = 10) -> subprocess.CompletedProcess[str] | None:
    code = WINDOW.format(install=install, check=check)
    try:
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_a_signal_inside_the_events_lock_stops_the_process():
    r = _run("latch = SignalLatch()", "latch.wait(stop, 1.0) and stop.is_set()")
    assert r is not None, "the latch's handler blocked"
    assert r.returncode == 0 and r.stdout.strip() == "latched", r.stderr


def test_the_window_is_real_for_a_handler_that_sets_the_event():
    # The failure the latch avoids, shown on the pattern it replaced (the test would pass for nothing if the
    # window could not be hit this way).
    r = _run("signal.signal(signal.SIGTERM, lambda *_: stop.set())", "stop.is_set()", timeout=3)
    assert r is None, "a handler calling stop.set() inside the event's lock did not block"


def test_wait_returns_at_the_timeout_and_on_another_threads_stop():
    import threading
    import time

    from firmware.system.signals import SignalLatch

    stop = threading.Event()
    latch = SignalLatch.__new__(SignalLatch)  # no handlers installed in the test process
    latch.received, latch._seen = [], 0
    t = time.monotonic()
    assert latch.wait(stop, 0.15) is False
    assert time.monotonic() - t >= 0.15
    threading.Timer(0.05, stop.set).start()
    assert latch.wait(stop, 5.0) is True
    latch.received.append(15)  # as the handler would: the next wait logs and sets stop
    stop2 = threading.Event()
    assert latch.wait(stop2, 0) is True and stop2.is_set()
