"""Connects the GPIO panel (hw/panel.py) to the running kit.

LEDs follow the kit: ready = capture allowed (no HALT, no fleet lock, no sensor error); busy =
a capture or the duplicate check is running (from the enrollment's events); halted = the
capacity guard halted capture or the fleet locked it; uplink = the relay is connected. The
buzzer follows capture feedback (short: good, long: retake or kept below threshold, two short:
stored / stick released). Buttons: confirm runs the console's main action for the current step
of the signed-in operator's enrollment (take photo, capture finger, duplicate check, store after
review); eject flushes and releases the USB stick (`Store.eject`).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from hw.panel import Panel, PanelPins, PanelState

if TYPE_CHECKING:
    from firmware.daemon import Kit

log = logging.getLogger(__name__)

POLL_S = 1.0


def pins_from_config(gpio: Any) -> PanelPins:
    """The panel pin map from the validated `[gpio]` section."""
    return PanelPins(led_ready=gpio.led_ready, led_busy=gpio.led_busy, led_halted=gpio.led_halted,
                     led_uplink=gpio.led_uplink, buzzer=gpio.buzzer, button_confirm=gpio.button_confirm,
                     button_eject=gpio.button_eject)


class PanelLink:
    """Drives a `Panel` from the kit's state and enrollment events; runs the buttons' actions."""

    def __init__(self, kit: Kit, pin_factory: Any = None, poll_s: float = POLL_S) -> None:
        self.kit = kit
        self.poll_s = poll_s
        self.busy = False
        self._action = threading.Lock()  # one button action at a time
        self.last_action = ""
        self.panel = Panel(pins_from_config(kit.cfg.gpio), on_confirm=self.confirm, on_eject=self.eject,
                           pin_factory=pin_factory)
        if kit.enrollment is not None:
            kit.enrollment.listeners.append(self.on_event)

    # --- state -> LEDs --------------------------------------------------------------------

    def refresh(self) -> PanelState:
        """Read the kit's state and set the LEDs."""
        st = self.kit.store.status()
        svc = self.kit.enrollment
        locked = bool(svc is not None and svc.lock_reason)
        halted = st["guard"]["level"] == "HALT" or locked
        sensor = self.kit.services.get("sensor")
        sensor_error = bool(getattr(sensor, "error", ""))
        relay = self.kit.services.get("relay")
        uplink = False
        if relay is not None and hasattr(relay, "status"):
            try:
                uplink = relay.status().get("state") == "connected"
            except Exception as e:
                log.debug("relay status unavailable error=%s", e)
        active = svc.active if svc is not None else None
        busy = self.busy or bool(active is not None and active.busy)
        state = PanelState(ready=not halted and not sensor_error, busy=busy, halted=halted, uplink=uplink)
        self.panel.show(state)
        return state

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        """Enrollment listener: busy LED and feedback beeps."""
        if event == "busy":
            self.busy = bool(data.get("on"))
            self.panel.show(PanelState(**{**self.panel.state.__dict__, "busy": self.busy}))
        elif event in ("face", "finger"):
            if data.get("accepted"):
                self.panel.beep_good()
            else:
                self.panel.beep_retake()  # retake, or done with the best attempt below the threshold
        elif event == "committed":
            self.panel.beep_done()

    def run(self) -> None:
        """Poll the kit's state until it stops (run in a daemon thread); turns the panel off at the end."""
        try:
            while not self.kit.stop.is_set():
                try:
                    self.refresh()
                except Exception:
                    log.exception("panel refresh failed")
                self.kit.stop.wait(self.poll_s)
        finally:
            self.close()

    def close(self) -> None:
        svc = self.kit.enrollment
        if svc is not None and self.on_event in svc.listeners:
            svc.listeners.remove(self.on_event)
        self.panel.close()

    def status(self) -> dict[str, Any]:
        """The LED state and the last button action (for /api/v1/status)."""
        return {**self.panel.state.__dict__, "last_action": self.last_action}

    # --- buttons --------------------------------------------------------------------------

    def _token(self) -> str | None:
        svc = self.kit.enrollment
        e = svc.active
        if e is None:
            return None
        with svc._lock:
            for token, s in svc.sessions.items():
                if s.operator.id == e.operator_id:
                    return token
        return None

    def confirm(self) -> None:
        """The console's main action for the current step (runs on a worker thread: a capture waits)."""
        threading.Thread(target=self._confirm, name="panel-confirm", daemon=True).start()

    def _confirm(self) -> None:
        from firmware.enrollment.session import EnrollmentError

        svc = self.kit.enrollment
        token = self._token() if svc is not None else None
        if token is None:
            self.last_action = "confirm: no enrollment in progress (start one on the console)"
            self.panel.beep_retake()
            return
        if not self._action.acquire(blocking=False):
            return  # a capture started by the button is still running
        try:
            step = svc.describe()["step"]
            if step == "face":
                svc.face_attempt(token)
            elif step.startswith("finger:"):
                svc.finger_attempt(token, step[7:])
            elif step == "dupcheck":
                svc.dup_check(token)
            elif step == "review":
                svc.commit(token)
            else:  # supervisor: needs a PIN on the console
                self.last_action = f"confirm: step {step} needs the console"
                self.panel.beep_retake()
                return
            self.last_action = f"confirm: {step}"
        except EnrollmentError as e:
            self.last_action = f"confirm: {e.code}"
            log.info("panel confirm refused code=%s message=%s", e.code, e)
            self.panel.beep_retake()
        finally:
            self._action.release()

    def eject(self) -> None:
        """Flush and release the stick; two short beeps when it can be pulled."""
        try:
            self.kit.eject_usb()
        except Exception as e:
            self.last_action = f"eject failed: {e}"
            log.error("panel eject failed error=%s", e)
            self.panel.beep_retake()
            return
        self.last_action = "eject: stick released"
        self.panel.beep_done()
