"""The lifecycle every long-running part of the daemon implements, and the supervisor that runs them.

A `Service` is started once in data-path order by the daemon and stopped in reverse on one stop
event (Frigate's shape). `health()` answers at once, from memory, for status and telemetry.

`Supervisor` is the daemon's one restart loop: a service whose `health()` says ``state="failed"``
(a `ThreadService` whose thread died with an exception says so) is stopped and started again after
a delay from THE backoff helper, and its state, restarts and last error are reported by `status()`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from firmware.system.backoff import Backoff

log = logging.getLogger("rekamd.supervisor")

# Service states, as `health()["state"]` and in `Supervisor.status()`.
STARTING, RUNNING, FAILED, RESTARTING, STOPPED = "starting", "running", "failed", "restarting", "stopped"


@runtime_checkable
class Service(Protocol):
    """A long-running part of the kit (store maintenance, USB watcher, relay, control, API, panel, watchdog)."""

    name: str

    def start(self) -> None:
        """Start working (threads, connections); return promptly. Raise to refuse to start."""

    def stop(self) -> None:
        """Stop and release everything; idempotent; returns within a few seconds."""

    def health(self) -> dict[str, Any]:
        """A small JSON-able dict describing the service now; never blocks, never raises.

        ``{"state": "failed", "error": "..."}`` asks the supervisor to restart the service.
        """


class ThreadService:
    """A service that is one named thread calling `tick()`, then waiting `interval` s on `stop_event`, until stopped.

    An exception out of `tick()` ends the thread: `health()` then reports it failed (with the error)
    and the supervisor restarts the service. Catch inside `tick()` what should only be logged.
    """

    join_timeout = 3.0

    def __init__(self, name: str, interval: float) -> None:
        self.name = name
        self.interval = interval
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.error = ""  # what ended the thread last, "" while it runs or after a clean stop
        self.exception: BaseException | None = None

    def tick(self) -> None:
        """One round of work (override)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the thread (a no-op while it runs)."""
        if self.thread is not None and self.thread.is_alive():
            return
        self.stop_event.clear()
        self.error, self.exception = "", None
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.tick()
                if self.stop_event.wait(self.interval):
                    break
        except Exception as e:  # reported through health(); the supervisor logs it and restarts us
            self.exception = e
            self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        """Ask the thread to stop and wait for it (at most `join_timeout` s)."""
        self.stop_event.set()
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(self.join_timeout)

    def health(self) -> dict[str, Any]:
        """``running`` while the thread lives, ``failed`` (with the error) if it died, else ``stopped``."""
        t = self.thread
        if t is not None and t.is_alive():
            return {"state": RUNNING}
        if self.error:
            return {"state": FAILED, "error": self.error}
        return {"state": STOPPED}


@dataclass
class _Entry:
    service: Any
    backoff: Backoff
    state: str = STOPPED
    restarts: int = 0
    last_error: str = ""
    started_at: float = 0.0
    restart_at: float = 0.0
    health: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    """Starts services in the given (data-path) order, stops them in reverse, restarts the ones that fail.

    One stop event: `stop()` sets it (so does a signal handler or an exit request through the
    daemon); everything that should end with the daemon may wait on `stop_event`. The monitor
    thread checks every service's `health()` each `check_s`; a failed one is stopped, then started
    again after `Backoff(backoff_lo, backoff_hi).next()` s; its backoff is reset after it ran
    `stable_s` without failing.
    """

    def __init__(self, services: Sequence[Any], stop_event: threading.Event | None = None, *,
                 backoff_lo: float = 2.0, backoff_hi: float = 60.0, check_s: float = 0.5, stable_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise ValueError(f"service names must be unique, got {names}")
        self.stop_event = stop_event or threading.Event()
        self.check_s = check_s
        self.stable_s = stable_s
        self._clock = clock
        self._entries = [_Entry(s, Backoff(backoff_lo, backoff_hi, rng, clock)) for s in services]
        self._started: list[_Entry] = []  # in start order; stopped in reverse
        self._lock = threading.RLock()  # one of start/check/stop at a time
        self._monitor: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start every service in order, then the monitor. If one refuses, stop those started (in reverse) and raise."""
        with self._lock:
            # All of them even if the stop event is set meanwhile (a signal, an exit request during
            # start-up): the caller then stops them in reverse, as after any start.
            for e in self._entries:
                e.state = STARTING
                try:
                    e.service.start()
                except Exception as exc:
                    e.state, e.last_error = FAILED, f"{type(exc).__name__}: {exc}"
                    log.error("service failed to start service=%s error=%s", e.service.name, e.last_error)
                    self._stop_one(e)  # release what it took before failing
                    e.state = FAILED
                    self._stop_started()
                    raise
                e.state, e.started_at = RUNNING, self._clock()
                self._started.append(e)
        self._monitor = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        """Set the stop event, end the monitor, stop the started services in reverse order. Idempotent."""
        self.stop_event.set()
        m = self._monitor
        if m is not None and m is not threading.current_thread():
            m.join(10)
        with self._lock:
            self._stop_started()

    def _stop_started(self) -> None:
        while self._started:
            e = self._started.pop()
            self._stop_one(e)
            e.state = STOPPED

    def _stop_one(self, e: _Entry) -> None:
        try:
            e.service.stop()
        except Exception as exc:  # one service failing to stop must not keep the others running
            log.exception("service failed to stop service=%s error=%s", e.service.name, exc)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the stop event; True once it is set."""
        return self.stop_event.wait(timeout)

    # --- monitoring ---------------------------------------------------------------------

    def _watch(self) -> None:
        while not self.stop_event.wait(self.check_s):
            try:
                self.check()
            except Exception:  # the restart loop itself must never die
                log.exception("supervisor check failed")

    def check(self) -> None:
        """One pass: notice failed services, restart those whose delay is over, reset stable backoffs."""
        with self._lock:
            for e in self._started:
                if self.stop_event.is_set():
                    return
                now = self._clock()
                if e.state == RESTARTING:
                    if now >= e.restart_at:
                        self._restart(e)
                    continue
                h = self._health(e)
                if h.get("state") == FAILED:
                    self._failed(e, str(h.get("error") or "health reports failed"),
                                 getattr(e.service, "exception", None))
                elif e.backoff.failures and now - e.started_at >= self.stable_s:
                    e.backoff.reset()

    def _health(self, e: _Entry) -> dict[str, Any]:
        try:
            h = e.service.health()
            e.health = h if isinstance(h, dict) else {"status": str(h)}
        except Exception as exc:  # health must answer; one that raises counts as failed
            e.health = {"state": FAILED, "error": f"health() raised {type(exc).__name__}: {exc}"}
        return e.health

    def _failed(self, e: _Entry, error: str, exc: BaseException | None = None) -> None:
        delay = e.backoff.next()
        e.state, e.last_error, e.restart_at = RESTARTING, error, self._clock() + delay
        log.error("service crashed service=%s error=%s; restarting in %.1f s", e.service.name, error, delay,
                  exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
        self._stop_one(e)  # release its threads and handles while it waits

    def _restart(self, e: _Entry) -> None:
        try:
            e.service.start()
        except Exception as exc:
            self._failed(e, f"restart failed: {type(exc).__name__}: {exc}", exc)
            return
        e.restarts += 1
        e.state, e.started_at = RUNNING, self._clock()
        log.warning("service restarted service=%s restarts=%d", e.service.name, e.restarts)

    # --- reporting ----------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        """Each service's supervised state, restarts and last error, by name (from memory, never blocks)."""
        out: dict[str, dict[str, Any]] = {}
        for e in self._entries:
            row: dict[str, Any] = {"state": e.state, "restarts": e.restarts, "last_error": e.last_error}
            if e.state == RESTARTING:
                row["restart_in_s"] = round(max(0.0, e.restart_at - self._clock()), 1)
            out[e.service.name] = row
        return out
