"""The GPIO panel on gpiozero's MockFactory: LED states, buzzer beeps and button actions for real,
first the bare panel, then linked to a running kit (real store, simulator, enrollment service)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hw.panel import Panel, PanelPins, PanelState
from tests.console.conftest import NIK_MALE, OPERATOR, write_config
from tests.support import wait_for

PINS = PanelPins()


@pytest.fixture
def factory() -> Iterator[Any]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    old = Device.pin_factory
    f = MockFactory()
    Device.pin_factory = f
    try:
        yield f
    finally:
        f.reset()
        Device.pin_factory = old


def levels(f: Any) -> dict[str, bool]:
    return {name: bool(f.pin(getattr(PINS, name)).state) for name in ("led_ready", "led_busy", "led_halted",
                                                                      "led_uplink", "buzzer")}


def press(f: Any, pin: int) -> None:
    p = f.pin(pin)
    p.drive_low()
    time.sleep(0.08)  # longer than the debounce time
    p.drive_high()


def test_leds_follow_the_state_and_busy_blinks(factory: Any) -> None:
    panel = Panel(PINS, pin_factory=factory)
    try:
        assert not any(levels(factory).values())
        panel.show(PanelState(ready=True, uplink=True))
        assert levels(factory) == {"led_ready": True, "led_busy": False, "led_halted": False, "led_uplink": True,
                                   "buzzer": False}
        panel.show(PanelState(halted=True))
        assert levels(factory)["led_halted"] and not levels(factory)["led_ready"]
        panel.show(PanelState(halted=True, busy=True))
        seen = set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            seen.add(levels(factory)["led_busy"])
            time.sleep(0.02)
        assert seen == {True, False}  # blinking
        panel.show(PanelState(halted=True))
        time.sleep(0.05)
        assert not levels(factory)["led_busy"]
    finally:
        panel.close()


def led_modes(f: Any, name: str, seconds: float) -> set[bool]:
    """The states the LED `name` takes within `seconds`."""
    seen = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        seen.add(levels(f)[name])
        time.sleep(0.02)
    return seen


def test_low_battery_blinks_the_red_led_slowly_and_halted_is_solid(factory: Any) -> None:
    panel = Panel(PINS, pin_factory=factory)
    try:
        panel.show(PanelState(ready=True, battery_low=True))
        assert led_modes(factory, "led_halted", 2.5) == {True, False}  # blinking (1 s on, 1 s off)
        assert levels(factory)["led_ready"]  # the kit still enrolls
        panel.show(PanelState(halted=True, battery_low=True))
        assert led_modes(factory, "led_halted", 1.2) == {True}  # halted wins: solid red
        panel.show(PanelState(ready=True))
        assert led_modes(factory, "led_halted", 0.3) == {False}
    finally:
        panel.close()


def beep_lengths(pin: Any) -> list[float]:
    """Durations of the buzzer's on-periods from the mock pin's state history (each entry's timestamp is
    the time since the previous change)."""
    out, on = [], False
    for st in pin.states:
        if st.state and not on:
            on = True
        elif not st.state and on:
            out.append(st.timestamp)
            on = False
    return out


def test_short_beep_for_good_long_beep_for_retake(factory: Any) -> None:
    panel = Panel(PINS, pin_factory=factory)
    buzzer = factory.pin(PINS.buzzer)
    try:
        for beep, n, low, high in ((panel.beep_good, 1, 0.05, 0.3), (panel.beep_retake, 1, 0.5, 1.0),
                                   (panel.beep_done, 2, 0.05, 0.3)):
            buzzer.clear_states()
            beep()
            time.sleep(0.05)
            wait_for(lambda k=n: not buzzer.state and len(beep_lengths(buzzer)) >= k, 3.0, f"{beep.__name__} end")
            lengths = beep_lengths(buzzer)
            assert len(lengths) == n and all(low <= x <= high for x in lengths), (beep.__name__, lengths)
    finally:
        panel.close()


def test_buttons_call_back_and_bad_pin_maps_are_refused(factory: Any) -> None:
    pressed: list[str] = []
    got = threading.Event()

    def on(name: str) -> Callable[[], None]:
        def cb() -> None:
            pressed.append(name)
            got.set()
        return cb

    panel = Panel(PINS, on_confirm=on("confirm"), on_eject=on("eject"), pin_factory=factory)
    try:
        press(factory, PINS.button_confirm)
        assert got.wait(2)
        got.clear()
        press(factory, PINS.button_eject)
        assert got.wait(2)
        assert pressed == ["confirm", "eject"]
    finally:
        panel.close()
    with pytest.raises(ValueError, match="must all differ"):
        PanelPins(led_ready=5)
    with pytest.raises(ValueError, match="led_busy=40"):
        PanelPins(led_busy=40)


def test_panel_drives_a_real_kit(factory: Any, tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path) -> None:
    from firmware import config
    from firmware.daemon import Kit

    cfg_path = write_config(tmp_path, dc_keys["pub_path"], corpus_dir, fingers=["R1"], dedup=["R1"],
                            extra="[gpio]\nenabled = true\n")
    kit = Kit(config.load(cfg_path), sim=True)
    kit.start()
    try:
        link = kit.services["panel"]
        link.interval = 0.05
        wait_for(lambda: levels(factory)["led_ready"], 5, "ready LED")
        assert not levels(factory)["led_halted"] and not levels(factory)["led_uplink"]
        beeps = factory.pin(PINS.buzzer)
        svc = kit.enrollment
        # Confirm with nothing started: a long "no" beep, nothing happens.
        press(factory, PINS.button_confirm)
        wait_for(lambda: "no enrollment" in link.last_action, 5, "refusal")
        token = svc.sign_in(*OPERATOR).token
        svc.start(token, NIK_MALE)
        # The confirm button walks the steps: face, R1 (and retakes), duplicate check, store.
        for _ in range(10):
            if svc.active is None:
                break
            step = svc.describe()["step"]
            beeps.clear_states()
            press(factory, PINS.button_confirm)
            wait_for(lambda s=step: svc.active is None or svc.describe()["step"] != s
                     or link.last_action.startswith("confirm: " + s), 30, f"step {step}")
            wait_for(lambda: not link._action.locked(), 30, "action end")
            if step in ("face", "finger:R1"):
                assert any(s.state for s in beeps.states), f"no beep after {step}"
        assert svc.active is None and svc.last_receipt is not None
        rid = svc.last_receipt["record_id"]
        assert (kit.store.sd_path(rid)).exists()
        # The eject button flushes and releases the stick (here the folder stays, so the next USB poll
        # finds it again: on a kit the mount helper unmounts it).
        stick_id = kit.store.stick.stick_id
        press(factory, PINS.button_eject)
        wait_for(lambda: link.last_action == "eject: stick released", 5, "eject")
        assert [e["detail"]["stick_id"] for e in kit.store.j.audit_events("usb_eject")] == [stick_id]
        # A fleet lock halts capture: red on, green off; lifted: back.
        svc.lock_reason = "audit"
        wait_for(lambda: levels(factory)["led_halted"] and not levels(factory)["led_ready"], 5, "halted LED")
        svc.lock_reason = ""
        wait_for(lambda: levels(factory)["led_ready"] and not levels(factory)["led_halted"], 5, "ready again")
        assert kit.status()["panel"]["ready"] is True
    finally:
        kit.shutdown()


def test_the_panel_shows_the_kits_low_battery(factory: Any, tmp_path: Path, dc_keys: dict[str, Any],
                                              corpus_dir: Path) -> None:
    """A real kit on the simulated battery at 15 % (below [power] warn_percent): the red LED blinks, the green
    one stays on (the kit still enrolls)."""
    from firmware import config
    from firmware.daemon import Kit

    cfg_path = write_config(tmp_path, dc_keys["pub_path"], corpus_dir, fingers=["R1"], dedup=["R1"],
                            extra="[gpio]\nenabled = true\n[power]\nenabled = true\ngauge = \"sim\"\npoll_s = 0.1\n"
                                  "warn_percent = 20\ncritical_percent = 5\n",
                            simulation={"battery_start_percent": 15})
    kit = Kit(config.load(cfg_path), sim=True)
    kit.start()
    try:
        kit.services["panel"].interval = 0.05
        wait_for(lambda: kit.status()["power"]["level"] == "warn", 10, "power level warn")
        wait_for(lambda: kit.status()["panel"].get("battery_low") is True, 5, "panel told")
        assert led_modes(factory, "led_halted", 2.5) == {True, False}
        assert levels(factory)["led_ready"]
        # Critical: new enrollments are refused (the power guard's lock): solid red, no green.
        kit.enrollment.power_lock = "power_critical"
        wait_for(lambda: not levels(factory)["led_ready"], 5, "green off at critical")
        assert led_modes(factory, "led_halted", 1.2) == {True}
    finally:
        kit.shutdown()
