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
from typing import Any

from firmware.console.port import KitPort
from firmware.system.service import ThreadService
from hw.panel import Panel, PanelPins, PanelState

log = logging.getLogger(__name__)

POLL_S = 1.0


def pins_from_config(gpio: Any) -> PanelPins:
    """The panel pin map from the validated `[gpio]` section."""
    return PanelPins(led_ready=gpio.led_ready, led_busy=gpio.led_busy, led_halted=gpio.led_halted,
                     led_uplink=gpio.led_uplink, buzzer=gpio.buzzer, button_confirm=gpio.button_confirm,
                     button_eject=gpio.button_eject)


class PanelLink(ThreadService):
    """Drives a `Panel` from the kit's state and enrollment events; runs the buttons' actions.

    A `ThreadService`: `start()` listens to the enrollment and polls the kit's state in a thread
    named ``panel``; `stop()` ends it and releases the GPIO pins. Constructing it claims the pins
    (raises when there is no GPIO), so the daemon can leave the panel out and keep the console.
    """

    def __init__(self, kit: KitPort, gpio: Any, pin_factory: Any = None, poll_s: float = POLL_S) -> None:
        super().__init__("panel", poll_s)
        self.kit = kit
        self.gpio = gpio
        self.pin_factory = pin_factory
        self.busy = False
        self._action = threading.Lock()  # one button action at a time
        self.last_action = ""
        self.panel: Panel | None = self._open_panel()

    def _open_panel(self) -> Panel:
        return Panel(pins_from_config(self.gpio), on_confirm=self.confirm, on_eject=self.eject,
                     pin_factory=self.pin_factory)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the enrollment's events and poll the kit's state in a thread (returns at once)."""
        if self.thread is not None and self.thread.is_alive():
            return
        if self.panel is None:  # stopped before (a restart): claim the pins again
            self.panel = self._open_panel()
        svc = self.kit.enrollment
        if svc is not None:
            svc.add_listener(self.on_event)
        super().start()

    def stop(self) -> None:
        """Stop polling, stop listening, turn the panel off and release the pins (idempotent)."""
        super().stop()
        self.close()

    def tick(self) -> None:
        """One poll: the LEDs follow the kit. A failed read is logged; the next poll tries again."""
        try:
            self.refresh()
        except Exception:
            log.exception("panel refresh failed")

    # --- state -> LEDs --------------------------------------------------------------------

    def refresh(self) -> PanelState:
        """Read the kit's state and set the LEDs."""
        guard = self.kit.guard()
        svc = self.kit.enrollment
        locked = bool(svc is not None and (svc.lock_reason or svc.power_lock))  # fleet lock, critical battery
        halted = guard["level"] == "HALT" or locked
        sensor_error = bool(self.kit.sensor_error())
        try:
            uplink = self.kit.uplink_connected()
        except Exception as e:
            log.debug("relay status unavailable error=%s", e)
            uplink = False
        active = svc.active if svc is not None else None
        busy = self.busy or bool(active is not None and active.busy)
        try:
            battery_low = self.kit.power_level() == "warn"  # critical locks enrollment: halted, solid red
        except Exception as e:
            log.debug("power status unavailable error=%s", e)
            battery_low = False
        state = PanelState(ready=not halted and not sensor_error, busy=busy, halted=halted, uplink=uplink,
                           battery_low=battery_low)
        if self.panel is not None:
            self.panel.show(state)
        return state

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        """Enrollment listener: busy LED and feedback beeps."""
        panel = self.panel
        if panel is None:
            return
        if event == "busy":
            self.busy = bool(data.get("on"))
            panel.show(PanelState(**{**panel.state.__dict__, "busy": self.busy}))
        elif event in ("face", "finger", "iris"):
            if data.get("accepted"):
                panel.beep_good()
            else:
                panel.beep_retake()  # retake, or done with the best attempt below the threshold
        elif event == "committed":
            panel.beep_done()

    def close(self) -> None:
        """Stop listening to the enrollment and release the panel."""
        svc = self.kit.enrollment
        if svc is not None:
            svc.remove_listener(self.on_event)
        panel, self.panel = self.panel, None
        if panel is not None:
            panel.close()

    def _beep(self, kind: str) -> None:
        panel = self.panel
        if panel is not None:  # a button pressed while the panel is being released: no sound
            panel.beep_done() if kind == "done" else panel.beep_retake()

    def status(self) -> dict[str, Any]:
        """The LED state and the last button action (for /api/v1/status)."""
        state = self.panel.state.__dict__ if self.panel is not None else {}
        return {**state, "last_action": self.last_action}

    # --- buttons --------------------------------------------------------------------------

    def confirm(self) -> None:
        """The console's main action for the current step (runs on a worker thread: a capture waits)."""
        threading.Thread(target=self._confirm, name="panel-confirm", daemon=True).start()

    def _confirm(self) -> None:
        from firmware.enrollment.session import EnrollmentError

        svc = self.kit.enrollment
        token = svc.active_token() if svc is not None else None
        if token is None:
            self.last_action = "confirm: no enrollment in progress (start one on the console)"
            self._beep("retake")
            return
        if not self._action.acquire(blocking=False):
            return  # a capture started by the button is still running
        try:
            step = svc.describe()["step"]
            if step == "face":
                svc.face_attempt(token)
            elif step.startswith("finger:"):
                svc.finger_attempt(token, step[7:])
            elif step.startswith("iris:"):
                svc.iris_attempt(token, step[5:])
            elif step == "dupcheck":
                svc.dup_check(token)
            elif step == "review":
                svc.commit(token)
            else:  # supervisor: needs a PIN on the console; signature: the console's pad
                self.last_action = f"confirm: step {step} needs the console"
                self._beep("retake")
                return
            self.last_action = f"confirm: {step}"
        except EnrollmentError as e:
            self.last_action = f"confirm: {e.code}"
            log.info("panel confirm refused code=%s message=%s", e.code, e)
            self._beep("retake")
        finally:
            self._action.release()

    def eject(self) -> None:
        """Flush and release the stick; two short beeps when it can be pulled."""
        try:
            self.kit.eject_usb()
        except Exception as e:
            self.last_action = f"eject failed: {e}"
            log.error("panel eject failed error=%s", e)
            self._beep("retake")
            return
        self.last_action = "eject: stick released"
        self._beep("done")
