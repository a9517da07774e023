"""Battery-aware safe stop: what the kit does as its battery runs down (the policy; the gauges are `hw.power`).

Levels: ``ok``; ``warn`` at or below `[power] warn_percent` (the operator is told, code ``power_low``);
``critical`` at or below `critical_percent` or when the supply is lost (code ``power_critical``). At critical:
new enrollments are refused (`EnrollmentService.power_lock`), the one under way may still finish within
`finish_grace_s` (after that it is cancelled: nothing of it was confirmed to the operator), the fleet is told
(telemetry now), then the daemon is asked to stop: its normal stop path flushes and closes the store (the
clean-shutdown marker), and the shutdown command runs after it (firmware/daemon.py). If the level climbs back
(the charger is connected) before the stop, the lock is lifted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from firmware.system.i18n import gettext
from firmware.system.service import ThreadService

log = logging.getLogger(__name__)

OK, WARN, CRITICAL = "ok", "warn", "critical"
WARN_CODE, CRITICAL_CODE, LOST_CODE = "power_low", "power_critical", "power_lost"
HYSTERESIS_PERCENT = 2.0  # a critical kit returns to normal only this far above the critical level


def assess(reading: Any, warn_percent: float, critical_percent: float) -> tuple[str, str]:
    """(level, code) for a `hw.power.PowerReading`; an unknown level (no gauge) is ok unless the supply is lost."""
    if reading.power_lost and not reading.charging:
        return CRITICAL, LOST_CODE
    pct = reading.percent
    if pct is None:
        return OK, ""
    if pct <= critical_percent:
        return CRITICAL, CRITICAL_CODE
    if pct <= warn_percent:
        return WARN, WARN_CODE
    return OK, ""


def message(level: str, code: str, percent: float | None) -> str:
    """What the operator reads for a level, in the current language ('' when all is well)."""
    pct = "?" if percent is None else f"{percent:.0f}"
    if code == LOST_CODE:
        return gettext("Power supply lost: the kit stops safely after the enrollment under way. Connect the charger.")
    if level == CRITICAL:
        return gettext("Battery almost empty ({percent} %): the kit stops safely after the enrollment under way. "
                       "Connect the charger.", percent=pct)
    if level == WARN:
        return gettext("Battery low ({percent} %): connect the charger soon.", percent=pct)
    return ""


class PowerGuard(ThreadService):
    """Reads the power monitor every `poll_s` and applies the policy above.

    `enrollment()` returns the enrollment service (or None); `stop_kit(code)` asks the daemon to stop safely and
    power off; `tell_fleet()` publishes telemetry now; `audit(kind, **detail)` journals.
    """

    def __init__(self, monitor: Any, settings: Any, enrollment: Callable[[], Any], stop_kit: Callable[[str], None],
                 tell_fleet: Callable[[], None] = lambda: None, audit: Callable[..., None] = lambda *a, **k: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__("power", min(float(settings.poll_s), 1.0))
        self.monitor, self.settings = monitor, settings
        self.enrollment, self.stop_kit, self.tell_fleet, self.audit = enrollment, stop_kit, tell_fleet, audit
        self.clock = clock
        self.level, self.code = OK, ""
        self.reading: Any = None
        self.deadline: float | None = None  # when the enrollment under way must be done (critical only)
        self.stopping = False
        self._next_read = 0.0

    def start(self) -> None:
        starter = getattr(self.monitor, "start", None)
        if callable(starter) and self.reading is None:  # the simulated day starts when the kit is up
            starter()
        super().start()

    def tick(self) -> None:
        now = self.clock()
        if now >= self._next_read:
            self._next_read = now + float(self.settings.poll_s)
            self.reading = self.monitor.read()
            self._apply(*assess(self.reading, self.settings.warn_percent, self.settings.critical_percent))
        if self.level == CRITICAL and not self.stopping:
            self._maybe_stop(now)

    def _apply(self, level: str, code: str) -> None:
        r = self.reading
        if self.level == CRITICAL and level != CRITICAL:
            if self.stopping or (r.percent is not None and r.percent < self.settings.critical_percent
                                 + HYSTERESIS_PERCENT and not r.charging):
                return  # latched: a reading that wobbles over the line does not undo a stop under way
            self._set_lock("")
            self.deadline = None
            log.warning("power back above critical level=%s percent=%s", level, r.percent)
            self.audit("power_restored", percent=r.percent)
        if level == self.level and code == self.code:
            return
        old, self.level, self.code = self.level, level, code
        log.log(logging.INFO if level == OK else logging.WARNING,
                "power level changed from=%s to=%s code=%s percent=%s voltage_v=%s charging=%s power_lost=%s",
                old, level, code or "-", r.percent, r.voltage_v, r.charging, r.power_lost)
        if level == CRITICAL:
            self.deadline = self.clock() + float(self.settings.finish_grace_s)
            self._set_lock(CRITICAL_CODE)
            self.audit("power_critical", code=code, percent=r.percent, power_lost=r.power_lost)
            self.tell_fleet()
        elif level == WARN:
            self.audit("power_low", percent=r.percent)

    def _set_lock(self, code: str) -> None:
        enr = self.enrollment()
        if enr is not None:
            enr.power_lock = code

    def _maybe_stop(self, now: float) -> None:
        enr = self.enrollment()
        if enr is not None and not enr.power_lock:
            enr.power_lock = CRITICAL_CODE  # the enrollment service was (re)built after the lock was set
        active = getattr(enr, "active", None) if enr is not None else None
        if active is not None and self.deadline is not None and now < self.deadline:
            return  # the enrollment under way may finish
        if active is not None:
            active.cancel.set()  # ends a wait for a finger at once
            if not enr.cancel_active("power critical: the kit stops"):
                return  # a capture or the commit is still running: next tick (a commit is never cut)
            log.warning("power critical: cancelled the enrollment under way after the grace enrollment=%s", active.id)
        self.stopping = True
        log.warning("power critical: stopping safely code=%s percent=%s", self.code,
                    self.reading.percent if self.reading else None)
        self.audit("power_shutdown", code=self.code, percent=self.reading.percent if self.reading else None)
        self.tell_fleet()
        self.stop_kit(self.code)

    def status(self) -> dict[str, Any]:
        """For status, the console and telemetry: the reading, the level, its code and the operator's message."""
        r = self.reading
        d: dict[str, Any] = r.as_dict() if r is not None else {}
        d.update({"level": self.level, "code": self.code,
                  "message": message(self.level, self.code, r.percent if r is not None else None),
                  "stopping": self.stopping})
        if self.level == CRITICAL and self.deadline is not None and not self.stopping:
            d["stop_in_s"] = max(0, round(self.deadline - self.clock()))
        return d
