"""The kit's operator panel on GPIO (gpiozero): four LEDs, an active buzzer and two buttons.

LEDs: ready (green), busy (yellow, blinks while a capture runs), halted (red), uplink (blue).
Buzzer: one short beep for a good capture, one long beep for a retake, two short beeps for a
stored enrollment or a released stick. Buttons (to ground, internal pull-up): start/confirm and
safe USB eject. The pin map is passed in as plain values (BCM numbers); this module knows nothing
about the firmware. gpiozero is imported when a panel is built, so the rest of the package works
on machines without it; tests pass ``pin_factory=gpiozero.pins.mock.MockFactory()``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from firmware.errors import ConfigError, HardwareError

log = logging.getLogger(__name__)

SHORT_BEEP_S = 0.08
LONG_BEEP_S = 0.6
DEBOUNCE_S = 0.05
BATTERY_BLINK_S = 1.0  # slow, unlike the busy LED's 0.25 s: it reads as "battery low", not "working"


@dataclass(frozen=True)
class PanelPins:
    """BCM pin numbers of the panel parts (config `[gpio]`)."""

    led_ready: int = 17
    led_busy: int = 27
    led_halted: int = 22
    led_uplink: int = 23
    buzzer: int = 24
    button_confirm: int = 5
    button_eject: int = 6

    def __post_init__(self) -> None:
        # ConfigError (a ValueError): the pins come from the `[gpio]` config section
        used = [v for v in self.__dict__.values()]
        for name, v in self.__dict__.items():
            if not isinstance(v, int) or not 0 <= v <= 27:
                raise ConfigError([f"panel pin {name}={v!r} is not a BCM GPIO number 0-27"], "gpio")
        if len(set(used)) != len(used):
            raise ConfigError([f"panel pins must all differ, got {self.__dict__}"], "gpio")


@dataclass(frozen=True)
class PanelState:
    """What the LEDs show."""

    ready: bool = False
    busy: bool = False
    halted: bool = False
    uplink: bool = False
    battery_low: bool = False  # the red LED blinks slowly (solid red, halted, wins)


class Panel:
    """Drives the LEDs and buzzer and calls back on button presses (callbacks run on gpiozero's thread).

    Raises `HardwareError` when the pins cannot be claimed (no GPIO on this machine, pins busy).
    """

    def __init__(self, pins: PanelPins, on_confirm: Callable[[], None] | None = None,
                 on_eject: Callable[[], None] | None = None, pin_factory: Any = None) -> None:
        try:
            from gpiozero import LED, Button, Buzzer
        except ImportError as e:
            raise HardwareError(f"gpio panel needs gpiozero ({e})") from e

        kw = {"pin_factory": pin_factory} if pin_factory is not None else {}
        self.pins = pins
        self._lock = threading.Lock()
        self._parts: list[Any] = []
        try:
            self.ready = self._add(LED(pins.led_ready, **kw))
            self.busy = self._add(LED(pins.led_busy, **kw))
            self.halted = self._add(LED(pins.led_halted, **kw))
            self.uplink = self._add(LED(pins.led_uplink, **kw))
            self.buzzer = self._add(Buzzer(pins.buzzer, **kw))
            self.confirm = self._add(Button(pins.button_confirm, pull_up=True, bounce_time=DEBOUNCE_S, **kw))
            self.eject = self._add(Button(pins.button_eject, pull_up=True, bounce_time=DEBOUNCE_S, **kw))
        except Exception as e:  # gpiozero: BadPinFactory, GPIOPinInUse, PinInvalidPin...
            self.close()  # release the pins already claimed
            raise HardwareError(f"gpio panel: cannot claim pins: {type(e).__name__}: {e}") from e
        if on_confirm is not None:
            self.confirm.when_pressed = self._wrap("confirm", on_confirm)
        if on_eject is not None:
            self.eject.when_pressed = self._wrap("eject", on_eject)
        self.state = PanelState()
        log.info("gpio panel ready pins=%s", pins)

    def _add(self, part: Any) -> Any:
        self._parts.append(part)
        return part

    @staticmethod
    def _wrap(name: str, cb: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            log.info("panel button pressed button=%s", name)
            try:
                cb()
            except Exception:  # a failing action must not kill gpiozero's event thread
                log.exception("panel button action failed button=%s", name)
        return run

    @staticmethod
    def _red(state: PanelState) -> str:
        return "on" if state.halted else "blink" if state.battery_low else "off"

    def show(self, state: PanelState) -> None:
        """Set the LEDs (busy blinks fast; the red one blinks slowly for a low battery); only changes are written."""
        with self._lock:
            old, self.state = self.state, state
            for led, was, now in ((self.ready, old.ready, state.ready), (self.uplink, old.uplink, state.uplink)):
                if was != now:
                    led.on() if now else led.off()
            red = self._red(state)
            if red != self._red(old):
                if red == "blink":
                    self.halted.blink(on_time=BATTERY_BLINK_S, off_time=BATTERY_BLINK_S, background=True)
                else:
                    self.halted.on() if red == "on" else self.halted.off()
            if old.busy != state.busy:
                if state.busy:
                    self.busy.blink(on_time=0.25, off_time=0.25, background=True)
                else:
                    self.busy.off()

    def beep_good(self) -> None:
        """One short beep: the capture is good."""
        self.buzzer.beep(on_time=SHORT_BEEP_S, off_time=SHORT_BEEP_S, n=1, background=True)

    def beep_retake(self) -> None:
        """One long beep: retake (or the best of the attempts was kept below the threshold)."""
        self.buzzer.beep(on_time=LONG_BEEP_S, off_time=0.1, n=1, background=True)

    def beep_done(self) -> None:
        """Two short beeps: enrollment stored, or the stick can be pulled."""
        self.buzzer.beep(on_time=SHORT_BEEP_S, off_time=SHORT_BEEP_S, n=2, background=True)

    def close(self) -> None:
        """Turn everything off and release the pins."""
        for part in reversed(self._parts):
            try:
                part.close()
            except Exception as e:
                log.warning("closing panel part failed part=%s error=%s", part, e)
        self._parts.clear()
