"""The one camera interface every backend implements: `capture() -> BGR uint8`, `close()`, `health()`."""

from __future__ import annotations

import abc
import logging
from typing import Any

import numpy as np

from firmware.errors import CameraError

log = logging.getLogger(__name__)


def to_bgr(frame: Any, source: str) -> np.ndarray:
    """Validate a driver frame and normalise it to contiguous BGR uint8 (H, W, 3).

    Gray frames are expanded and BGRA frames lose alpha; anything else (None, empty, wrong
    dtype or channel count) raises `CameraError` naming `source`.
    """
    import cv2

    if frame is None:
        raise CameraError(f"{source}: no frame delivered")
    if not isinstance(frame, np.ndarray) or frame.size == 0:
        raise CameraError(f"{source}: empty frame")
    if frame.dtype != np.uint8:
        raise CameraError(f"{source}: frame dtype {frame.dtype}, expected uint8")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise CameraError(f"{source}: frame shape {frame.shape}, expected (H, W, 3)")
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(frame)


class Camera(abc.ABC):
    """A still camera. Use as a context manager; `capture()` returns one BGR uint8 frame."""

    name = "camera"

    def __init__(self) -> None:
        self.frames = 0
        self.errors = 0
        self.last_error: str | None = None
        self.closed = False

    @abc.abstractmethod
    def _capture(self) -> np.ndarray:
        """Backend-specific shot; may raise CameraError."""

    def capture(self) -> np.ndarray:
        """Take one still: BGR uint8 (H, W, 3). Raises `CameraError` with the reason on failure."""
        if self.closed:
            raise CameraError(f"{self.name}: capture after close()")
        try:
            frame = self._capture()
        except CameraError as e:
            self.errors += 1
            self.last_error = str(e)
            log.warning("camera capture failed backend=%s error=%s", self.name, e)
            raise
        self.frames += 1
        return frame

    def close(self) -> None:
        """Release the device; further captures raise. Idempotent."""
        self.closed = True

    def health(self) -> dict[str, Any]:
        """State for `rekam status` and the field technician."""
        return {"backend": self.name, "open": not self.closed, "frames": self.frames,
                "errors": self.errors, "last_error": self.last_error}

    def __enter__(self) -> Camera:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
