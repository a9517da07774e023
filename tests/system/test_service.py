"""The Supervisor: data-path start order, reverse stop order on one stop event, restart with backoff."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Any

import pytest

from firmware.system.service import FAILED, RUNNING, STOPPED, Service, Supervisor, ThreadService
from tests.support import wait_for


class Recorder:
    """A plain service that records its start/stop calls in a shared journal."""

    def __init__(self, name: str, journal: list[str], refuse: bool = False) -> None:
        self.name = name
        self.journal = journal
        self.refuse = refuse
        self.running = False

    def start(self) -> None:
        self.journal.append(f"start {self.name}")
        if self.refuse:
            raise RuntimeError(f"{self.name} cannot start")
        self.running = True

    def stop(self) -> None:
        self.journal.append(f"stop {self.name}")
        self.running = False

    def health(self) -> dict[str, Any]:
        return {"state": RUNNING if self.running else STOPPED}


class Crasher(ThreadService):
    """Ticks fast; the first `crashes` runs of the thread die with an exception."""

    def __init__(self, crashes: int) -> None:
        super().__init__("crasher", 0.01)
        self.crashes = crashes
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        super().start()

    def tick(self) -> None:
        if self.runs <= self.crashes:
            raise OSError(f"sensor went away (run {self.runs})")


def test_services_start_in_order_and_stop_in_reverse_on_one_event() -> None:
    journal: list[str] = []
    services = [Recorder(n, journal) for n in ("store", "enrollment", "usb", "relay", "api", "watchdog")]
    assert all(isinstance(s, Service) for s in services)
    stop = threading.Event()
    sup = Supervisor(services, stop, check_s=0.01)
    sup.start()
    assert journal == [f"start {s.name}" for s in services]
    assert {n: row["state"] for n, row in sup.status().items()} == {s.name: RUNNING for s in services}
    journal.clear()
    sup.stop()
    assert stop.is_set()
    assert journal == [f"stop {s.name}" for s in reversed(services)]
    assert all(row["state"] == STOPPED for row in sup.status().values())
    sup.stop()  # idempotent: nothing is stopped twice
    assert len(journal) == len(services)


def test_a_service_that_refuses_to_start_stops_the_ones_before_it() -> None:
    journal: list[str] = []
    services = [Recorder("store", journal), Recorder("enrollment", journal), Recorder("api", journal, refuse=True),
                Recorder("watchdog", journal)]
    sup = Supervisor(services, check_s=0.01)
    with pytest.raises(RuntimeError, match="api cannot start"):
        sup.start()
    # The failed one is stopped too (to release what it took), then the started ones in reverse.
    assert journal == ["start store", "start enrollment", "start api", "stop api", "stop enrollment", "stop store"]
    assert sup.status()["api"]["state"] == FAILED and "api cannot start" in sup.status()["api"]["last_error"]
    assert "watchdog" in sup.status() and sup.status()["watchdog"]["restarts"] == 0


def test_a_crashed_thread_is_restarted_with_backoff_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    svc = Crasher(crashes=2)
    sup = Supervisor([svc], check_s=0.01, backoff_lo=0.2, backoff_hi=0.4, rng=random.Random(1))
    caplog.set_level(logging.INFO, logger="rekamd.supervisor")
    t0 = time.monotonic()
    sup.start()
    try:
        wait_for(lambda: sup.status()["crasher"]["restarts"] == 2 and sup.status()["crasher"]["state"] == RUNNING,
                 10, "two restarts")
        elapsed = time.monotonic() - t0
        time.sleep(0.1)
        row = sup.status()["crasher"]
        assert row["state"] == RUNNING and row["restarts"] == 2 and svc.health()["state"] == RUNNING
        assert "OSError: sensor went away (run 2)" in row["last_error"]
        crashed = [r for r in caplog.records if "service crashed" in r.getMessage()]
        assert len(crashed) == 2
        # Backoff: equal jitter under lo, then doubled (0.1-0.2 s, then 0.2-0.4 s): never a busy loop.
        delays = [float(re.search(r"restarting in ([0-9.]+) s$", r.getMessage()).group(1)) for r in crashed]
        assert 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.4, delays
        assert elapsed >= 0.3, elapsed
        msg = crashed[0].getMessage()
        assert msg.startswith("service crashed service=crasher error=OSError: sensor went away (run 1); restarting in ")
        assert msg.endswith(" s") and crashed[0].exc_info is not None  # the traceback is logged too
        assert sum("service restarted service=crasher" in r.getMessage() for r in caplog.records) == 2
    finally:
        sup.stop()
    assert sup.status()["crasher"]["state"] == STOPPED and svc.health()["state"] == STOPPED


def test_health_that_says_failed_triggers_a_restart() -> None:
    journal: list[str] = []

    class Flaky(Recorder):
        def __init__(self) -> None:
            super().__init__("flaky", journal)
            self.broken = False

        def health(self) -> dict[str, Any]:
            if self.broken:
                return {"state": FAILED, "error": "lost the broker for good"}
            return super().health()

        def start(self) -> None:
            self.broken = False
            super().start()

    svc = Flaky()
    sup = Supervisor([svc], check_s=0.01, backoff_lo=0.05, backoff_hi=0.1)
    sup.start()
    try:
        svc.broken = True
        wait_for(lambda: sup.status()["flaky"]["restarts"] == 1, 5, "restart")
        assert journal == ["start flaky", "stop flaky", "start flaky"]
        assert sup.status()["flaky"]["last_error"] == "lost the broker for good"
    finally:
        sup.stop()


def test_no_restart_after_stop() -> None:
    svc = Crasher(crashes=100)
    sup = Supervisor([svc], check_s=0.01, backoff_lo=0.05, backoff_hi=0.05)
    sup.start()
    wait_for(lambda: sup.status()["crasher"]["restarts"] >= 1, 5, "a restart")
    sup.stop()
    runs = svc.runs
    time.sleep(0.2)
    assert svc.runs == runs
