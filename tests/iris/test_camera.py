"""The iris camera seam: the simulated NIR camera (deterministic synthetic eyes, queued defects, seeded retakes)
and the illuminator's eye-safety limits on gpiozero's MockFactory (real gpiozero PWM on mock pins)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from firmware.errors import CameraError
from hw.iris_camera import Illuminator, SimIrisCamera, open_iris_camera
from hw.iris_synth import DEFECTS, synth_eye


def test_sim_camera_is_deterministic_per_resident_eye_and_impression() -> None:
    a, b = SimIrisCamera("3201011505900001"), SimIrisCamera("3201011505900001")
    la, lb = a.capture("left"), b.capture("left")
    assert la.dtype == np.uint8 and la.shape == (480, 640)
    assert np.array_equal(la, lb)
    assert not np.array_equal(a.capture("left"), la)  # the next impression differs (dilation, jitter)
    assert not np.array_equal(b.capture("right"), lb)  # the other eye is another texture
    other = SimIrisCamera("3578015505900002").capture("left")
    assert np.abs(other.astype(int) - la.astype(int)).mean() > 5


def test_sim_camera_serves_defects_then_draws_seeded_retakes() -> None:
    cam = SimIrisCamera("r1")
    cam.serve("closed", synth_eye("x", "left"))
    assert np.array_equal(cam.capture("left"), synth_eye("r1", "left", 0, DEFECTS["closed"]))
    assert cam.last_source == "closed:left:0"
    cam.capture("left")
    assert cam.last_source == "<array>" and cam.pending() == 0
    with pytest.raises(CameraError):
        cam.serve("squint")
    with pytest.raises(CameraError):
        cam.capture("middle")
    drawn = [SimIrisCamera("r2", retake_rate=0.5)._draw("left", n) for n in range(40)]
    assert 8 < sum(d != "good" for d in drawn) < 32 and drawn == [SimIrisCamera("r2", 0.5)._draw("left", n)
                                                                 for n in range(40)]
    assert open_iris_camera({"camera": "sim"}).name == "sim"
    with pytest.raises(CameraError):
        open_iris_camera({"camera": "webcam"})


@pytest.fixture
def factory() -> Iterator[Any]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory, MockPWMPin

    old = Device.pin_factory
    f = MockFactory(pin_class=MockPWMPin)
    Device.pin_factory = f
    try:
        yield f
    finally:
        f.reset()
        Device.pin_factory = old


def test_illuminator_is_lit_only_for_the_shot_within_the_duty_cap(factory: Any) -> None:
    with pytest.raises(CameraError):
        Illuminator(18, duty=0.8)
    with pytest.raises(CameraError):
        Illuminator(18, max_on_s=5)
    led = Illuminator(18, duty=0.4, max_on_s=0.3)
    pin = factory.pin(18)
    seen = led.flash(lambda: pin.state)
    assert seen == pytest.approx(0.4) and pin.state == 0
    with pytest.raises(RuntimeError):
        led.flash(lambda: (_ for _ in ()).throw(RuntimeError("driver hung")))
    assert pin.state == 0  # off whatever the shot did
    t0 = time.monotonic()
    states = []
    led.flash(lambda: (time.sleep(0.5), states.append(pin.state)))  # a shot longer than max_on_s
    assert states == [0]  # the on-time limit switched the LEDs off mid-shot
    led.flash(lambda: None)
    assert time.monotonic() - t0 >= 0.5 + 0.25  # cool-down: off at least as long as it was on
    led.close()
