"""Near-infrared iris cameras: Pi NoIR camera (Picamera2) with an 850 nm illuminator, UVC iris camera
(OpenCV/V4L2) and a simulator of synthetic eyes.

Every backend implements `IrisCamera`: ``capture(eye) -> np.ndarray`` (8-bit grey, H x W), ``close()``,
``health()``. `open_iris_camera` picks one from a plain mapping (the `[iris]` config section; hw never reads
config files). Backends are imported only when chosen (picamera2 and gpiozero's pin factories exist only on
a Pi), as for the face camera (`hw.camera`).

Eye safety of the illuminator (Picamera2 backend). The 850 nm LEDs are switched on only for the exposure
of a shot and a short settle before it, through a gpiozero `PWMLED` at a duty cycle of at most
`MAX_DUTY` (default 0.5) and never longer than `MAX_ON_S` (2 s) at a time, after which the camera waits at
least as long again before it lights them (`cooldown`), so the mean exposure is at most a quarter of the
LED's continuous rating. Fit LEDs whose continuous radiance at the eye already falls in the IEC 62471
*exempt* group at the capture distance (the LED vendor's IEC 62471 report states the group; a typical
850 nm 3 mm LED at 5 % of its rated current is exempt at 10 cm): the duty and on-time limit keep it there
with margin, and a stuck GPIO cannot hold the LEDs on longer than one shot because the driver turns them
off in a `finally` and on `close()`.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from firmware.errors import CameraError

log = logging.getLogger(__name__)

EYES = ("left", "right")
MAX_DUTY = 0.5
MAX_ON_S = 2.0


def to_gray(frame: Any, source: str) -> np.ndarray:
    """Validate a driver frame and normalise it to contiguous 8-bit grey (H, W); raises `CameraError`."""
    import cv2

    if not isinstance(frame, np.ndarray) or frame.size == 0:
        raise CameraError(f"{source}: no frame delivered")
    if frame.dtype != np.uint8:
        raise CameraError(f"{source}: frame dtype {frame.dtype}, expected uint8")
    if frame.ndim == 3 and frame.shape[2] in (3, 4):
        return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY if frame.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if frame.ndim != 2:
        raise CameraError(f"{source}: frame shape {frame.shape}, expected (H, W) or (H, W, 3)")
    return np.ascontiguousarray(frame)


class IrisCamera(abc.ABC):
    """An NIR still camera for one eye at a time: `capture(eye)` returns one grey frame."""

    name = "iris"

    def __init__(self) -> None:
        self.frames = 0
        self.errors = 0
        self.last_error: str | None = None
        self.closed = False
        self._lock = threading.Lock()  # one shot at a time (the preview and a capture share the camera)

    @abc.abstractmethod
    def _capture(self, eye: str) -> np.ndarray:
        """Backend-specific shot of `eye`; may raise CameraError."""

    def capture(self, eye: str) -> np.ndarray:
        """One frame of `eye` ("left"/"right"): 8-bit grey (H, W). Raises `CameraError` on failure."""
        if eye not in EYES:
            raise CameraError(f"iris camera: eye {eye!r} is not one of {EYES}")
        if self.closed:
            raise CameraError(f"{self.name}: capture after close()")
        with self._lock:
            try:
                frame = to_gray(self._capture(eye), self.name)
            except CameraError as e:
                self.errors += 1
                self.last_error = str(e)
                log.warning("iris capture failed backend=%s eye=%s error=%s", self.name, eye, e)
                raise
        self.frames += 1
        return frame

    def close(self) -> None:
        """Release the device (and switch the illuminator off); further captures raise. Idempotent."""
        self.closed = True

    def health(self) -> dict[str, Any]:
        """State for `rekam status` and the field technician."""
        return {"backend": self.name, "open": not self.closed, "frames": self.frames, "errors": self.errors,
                "last_error": self.last_error}


class SimIrisCamera(IrisCamera):
    """Synthetic NIR eyes (`hw.iris_synth`): queued frames or defects first, then good impressions of the
    current resident, deterministic per (resident, eye, impression)."""

    name = "sim"

    def __init__(self, resident: str = "sim-resident", retake_rate: float = 0.0) -> None:
        super().__init__()
        self.resident = resident
        self.retake_rate = retake_rate
        self._queue: deque[np.ndarray | str] = deque()
        self._impression: dict[str, int] = {}
        self.last_source: str | None = None

    def present(self, resident: str) -> None:
        """The next shots are of `resident`'s eyes (the enrollment calls this with the NIK)."""
        self.resident = resident

    def serve(self, *items: np.ndarray | str) -> None:
        """Queue the next shots: grey/BGR arrays, or names of `hw.iris_synth.DEFECTS` ("closed", "blurred")."""
        from hw.iris_synth import DEFECTS

        for item in items:
            if isinstance(item, str) and item not in DEFECTS:
                raise CameraError(f"sim iris camera: no defect {item!r} (one of {', '.join(DEFECTS)})")
            self._queue.append(item if isinstance(item, str) else to_gray(item, "sim iris serve()").copy())

    def pending(self) -> int:
        return len(self._queue)

    def _capture(self, eye: str) -> np.ndarray:
        from hw.iris_synth import DEFECTS, synth_eye

        n = self._impression.get(eye, 0)
        self._impression[eye] = n + 1
        item = self._queue.popleft() if self._queue else self._draw(eye, n)
        if isinstance(item, np.ndarray):
            self.last_source = "<array>"
            return item.copy()
        self.last_source = f"{item}:{eye}:{n}"
        return synth_eye(self.resident, eye, n, DEFECTS[item])

    def _draw(self, eye: str, n: int) -> str:
        """Good, or (at `retake_rate`) a defect, seeded by (resident, eye, impression): retakes as in the field,
        the same in every run."""
        import hashlib

        from hw.iris_synth import DEFECTS

        h = hashlib.sha256(f"retake\x1f{self.resident}\x1f{eye}\x1f{n}".encode()).digest()
        if h[0] / 256 >= self.retake_rate:
            return "good"
        bad = [d for d in DEFECTS if d != "good"]
        return bad[h[1] % len(bad)]

    def health(self) -> dict[str, Any]:
        return {**super().health(), "queued": len(self._queue), "last_source": self.last_source}


class Illuminator:
    """The 850 nm LEDs on a GPIO (gpiozero `PWMLED`): on only around a shot, duty and on-time capped."""

    def __init__(self, pin: int, duty: float = MAX_DUTY, max_on_s: float = MAX_ON_S, led: Any = None) -> None:
        if not 0 < duty <= MAX_DUTY:
            raise CameraError(f"illuminator duty {duty} must be in (0, {MAX_DUTY}] (eye safety)")
        if not 0 < max_on_s <= MAX_ON_S:
            raise CameraError(f"illuminator on-time {max_on_s} s must be in (0, {MAX_ON_S}] (eye safety)")
        if led is None:
            from gpiozero import PWMLED  # only on a kit with the illuminator wired

            led = PWMLED(pin, frequency=1000)
        self.led = led
        self.duty = duty
        self.max_on_s = max_on_s
        self._off_at = 0.0
        self._on_for = 0.0

    def flash(self, shot: Any) -> Any:
        """Light the LEDs, call `shot()`, switch off whatever happens; honour the cool-down after a flash."""
        wait = self._off_at + self._on_for - time.monotonic()  # off at least as long as it was last on
        if wait > 0:
            time.sleep(min(wait, self.max_on_s))
        t0 = time.monotonic()
        timer = threading.Timer(self.max_on_s, self.led.off)  # a hung driver cannot keep the LEDs on
        try:
            self.led.value = self.duty
            timer.start()
            return shot()
        finally:
            timer.cancel()
            self.led.off()
            self._off_at = time.monotonic()
            self._on_for = min(self._off_at - t0, self.max_on_s)

    def close(self) -> None:
        try:
            self.led.off()
        finally:
            close = getattr(self.led, "close", None)
            if close:
                close()


class Picamera2IrisCamera(IrisCamera):
    """Pi NoIR camera module (no IR-cut filter) with an 850 nm long-pass filter and the `Illuminator`."""

    name = "picamera2"

    def __init__(self, width: int, height: int, illuminator: Illuminator, settle_s: float = 0.2) -> None:
        super().__init__()
        try:
            from picamera2 import Picamera2  # only on a Pi (python3-picamera2)
        except ImportError as e:
            raise CameraError(f"picamera2 is not installed: {e}") from None
        self.illuminator = illuminator
        self.settle_s = settle_s
        try:
            self.cam = Picamera2()
            self.cam.configure(self.cam.create_still_configuration(main={"size": (width, height),
                                                                         "format": "RGB888"}))
            self.cam.start()
        except Exception as e:
            raise CameraError(f"picamera2: cannot open the NoIR camera: {e}") from None

    def _capture(self, eye: str) -> np.ndarray:
        def shot() -> Any:
            time.sleep(self.settle_s)  # exposure settles under the LEDs
            return self.cam.capture_array("main")
        try:
            return self.illuminator.flash(shot)
        except CameraError:
            raise
        except Exception as e:
            raise CameraError(f"picamera2: capture failed: {e}") from None

    def close(self) -> None:
        if not self.closed:
            try:
                self.cam.stop()
                self.cam.close()
            finally:
                self.illuminator.close()
        super().close()


class V4L2IrisCamera(IrisCamera):
    """A UVC iris camera (its own NIR illumination) through OpenCV's V4L2 backend."""

    name = "v4l2"

    def __init__(self, device: int, width: int, height: int, warmup: int = 3) -> None:
        super().__init__()
        import cv2

        self.cap = cv2.VideoCapture(device, cv2.CAP_V4L2)
        if not self.cap.isOpened():
            raise CameraError(f"v4l2: cannot open /dev/video{device}")
        self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.warmup = warmup

    def _capture(self, eye: str) -> np.ndarray:
        for _ in range(self.warmup):
            self.cap.grab()
        ok, frame = self.cap.read()
        if not ok:
            raise CameraError("v4l2: no frame")
        return frame

    def close(self) -> None:
        if not self.closed:
            self.cap.release()
        super().close()


def open_iris_camera(settings: Mapping[str, Any]) -> IrisCamera:
    """Open the iris camera an `[iris]`-like mapping describes (keys: camera, device, width, height,
    illuminator_pin, illuminator_duty, illuminator_max_on_s)."""
    backend = settings.get("camera", "sim")
    width, height = int(settings.get("width", 640)), int(settings.get("height", 480))
    if backend == "sim":
        return SimIrisCamera(retake_rate=float(settings.get("sim_retake_rate", 0.0)))
    if backend == "v4l2":
        return V4L2IrisCamera(int(settings.get("device", 1)), width, height)
    if backend == "picamera2":
        led = Illuminator(int(settings.get("illuminator_pin", 18)), float(settings.get("illuminator_duty", 0.5)),
                          float(settings.get("illuminator_max_on_s", 2.0)))
        return Picamera2IrisCamera(width, height, led)
    raise CameraError(f"iris camera {backend!r}: must be one of 'picamera2', 'v4l2', 'sim'")
