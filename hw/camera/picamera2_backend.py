"""Raspberry Pi camera backend (Picamera2 / libcamera). Runs only on a Pi: `picamera2` comes from
Raspberry Pi OS (apt `python3-picamera2`) and is imported here lazily, so nothing else needs it.

Stills use a still configuration at the configured size. Before each shot, auto-exposure is
given time to converge: frames' metadata are read until libcamera reports it settled
(`AeLocked` on older libcamera, `AeState` == converged on newer) or `settle_timeout_s` passes.

Not exercised by the test suite (no Pi camera here); kept deliberately small.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from hw.camera.base import Camera, CameraError, to_bgr

log = logging.getLogger(__name__)
AE_STATE_CONVERGED = 2  # libcamera controls::AeStateConverged


def ae_settled(metadata: dict[str, Any]) -> bool:
    """True when libcamera metadata says auto-exposure has converged."""
    if "AeState" in metadata:
        return int(metadata["AeState"]) == AE_STATE_CONVERGED
    return bool(metadata.get("AeLocked", False))


class Picamera2Camera(Camera):
    """Pi camera stills as BGR uint8 (Picamera2's "RGB888" is B, G, R in memory)."""

    name = "picamera2"

    def __init__(self, width: int = 1920, height: int = 1080, warmup_frames: int = 5,
                 settle_timeout_s: float = 2.0, camera_num: int = 0) -> None:
        super().__init__()
        try:
            from picamera2 import Picamera2  # only on Raspberry Pi OS
        except ImportError as e:
            raise CameraError(f"picamera2 backend needs the python3-picamera2 package ({e}); "
                              f"use [camera] backend = \"opencv\" or \"sim\" elsewhere") from None
        self.warmup_frames = warmup_frames
        self.settle_timeout_s = settle_timeout_s
        try:
            self._cam = Picamera2(camera_num)
            cfg = self._cam.create_still_configuration(main={"size": (width, height), "format": "RGB888"})
            self._cam.configure(cfg)
            self._cam.start()
        except Exception as e:  # libcamera raises RuntimeError/IndexError for a missing or busy camera
            raise CameraError(f"picamera2: cannot start camera {camera_num}: {e}") from e
        self.size = (width, height)
        self.last_settle_ms: float | None = None
        log.info("camera opened backend=picamera2 num=%d size=%dx%d", camera_num, width, height)

    def _settle(self) -> bool:
        t0 = time.monotonic()
        deadline = t0 + self.settle_timeout_s
        n = 0
        while time.monotonic() < deadline:
            md = self._cam.capture_metadata()
            n += 1
            if n >= self.warmup_frames and ae_settled(md):
                self.last_settle_ms = (time.monotonic() - t0) * 1000
                return True
        self.last_settle_ms = (time.monotonic() - t0) * 1000
        log.warning("camera auto-exposure not settled after %.1f s frames=%d", self.settle_timeout_s, n)
        return False

    def _capture(self) -> np.ndarray:
        try:
            self._settle()
            frame = self._cam.capture_array("main")
        except Exception as e:
            raise CameraError(f"picamera2: capture failed: {e}") from e
        return to_bgr(frame, "picamera2")

    def close(self) -> None:
        """Stop and close the camera; idempotent, never raises."""
        if not self.closed:
            try:
                self._cam.stop()
                self._cam.close()
            except Exception as e:  # closing must not hide the error that led here
                log.warning("picamera2 close failed error=%s", e)
        super().close()

    def health(self) -> dict[str, Any]:
        """Base health plus the frame size and the last exposure settle time."""
        return {**super().health(), "size": list(self.size), "last_settle_ms": self.last_settle_ms}
