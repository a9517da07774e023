"""Stopping a process on SIGTERM/SIGINT without a lock in the signal handler, and leaving it without teardown.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread is: also inside
``Event.wait()`` after it took the event's internal lock and before it waits (``Condition.wait``). A handler
that calls ``stop.set()`` then blocks on that lock, held by its own thread, for ever: the process ignores
every later SIGTERM until systemd kills it (an unclean stop). `SignalLatch` only records the signal (a list
append takes no lock) and the main thread turns it into ``stop.set()`` in ordinary code.

`exit_now` ends a process whose work is done while daemon threads may still be inside native code (SQLite
waiting on another process's lock, OpenCV, LiteRT): interpreter teardown under them can hang or abort, so the
exit status would lie or never come.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("rekam.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.1  # how late the main thread sees a signal (or another thread's stop) at most


class SignalLatch:
    """Records `signals` (main thread only: Python installs handlers there) for `wait()` to act on."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: list[int] = []
        self._seen = 0
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.received.append(signum)  # nothing else here: see the module doc

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Sleep up to `timeout` s; True as soon as `stop` is set, by another thread or by a signal (which
        sets it, logged once per signal); False at the timeout."""
        end = time.monotonic() + timeout
        while True:
            while self._seen < len(self.received):
                name = signal.Signals(self.received[self._seen]).name
                self._seen += 1
                log.info("signal received signal=%s; stopping", name)
                stop.set()
            if stop.is_set():
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_S, left))

    def wait_forever(self, stop: threading.Event) -> None:
        """Return once `stop` is set (or a signal came)."""
        while not self.wait(stop, 3600.0):
            pass


def exit_now(code: int) -> None:
    """Flush the logs and standard streams, then leave without interpreter teardown (see the module doc)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
