"""USB webcam (kiosk) backend through OpenCV's VideoCapture on V4L2.

The device is opened once; each `capture()` drops `warmup_frames` frames first (webcams deliver
stale buffered frames and adjust exposure over the first frames after a scene change), bounded
by `settle_timeout_s`. The same code reads a video file, which is how it is tested without a device.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hw.camera.base import Camera, CameraError, to_bgr

log = logging.getLogger(__name__)


class OpenCVCamera(Camera):
    """`source` is a V4L2 index (0 = /dev/video0) or a path (device node or video file)."""

    name = "opencv"

    def __init__(self, source: int | str | Path = 0, width: int = 1920, height: int = 1080,
                 warmup_frames: int = 5, settle_timeout_s: float = 2.0) -> None:
        super().__init__()
        import cv2

        self.source = source
        self.warmup_frames = warmup_frames
        self.settle_timeout_s = settle_timeout_s
        if isinstance(source, int):
            api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
            self._cap = cv2.VideoCapture(source, api)
        else:
            self._cap = cv2.VideoCapture(str(source))
        if not self._cap.isOpened():
            self._cap.release()
            where = f"/dev/video{source}" if isinstance(source, int) else str(source)
            raise CameraError(f"opencv camera: cannot open {where} (missing, busy, or no permission: "
                              f"the kit user must be in the 'video' group)")
        if isinstance(source, int):
            # MJPG lets UVC webcams deliver full HD at a usable rate over USB 2
            self._cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*"MJPG"))
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if isinstance(source, int) and (self.width, self.height) != (width, height):
            log.warning("camera resolution differs requested=%dx%d actual=%dx%d",
                        width, height, self.width, self.height)
        log.info("camera opened backend=opencv source=%s size=%dx%d", source, self.width, self.height)

    def _read(self) -> np.ndarray:
        ok, frame = self._cap.read()
        if not ok:
            raise CameraError(f"opencv camera {self.source}: read failed (unplugged, or end of stream)")
        return frame

    def _capture(self) -> np.ndarray:
        deadline = time.monotonic() + self.settle_timeout_s
        for _ in range(self.warmup_frames):
            if time.monotonic() > deadline:
                log.warning("camera warm-up cut short by settle_timeout_s=%.1f", self.settle_timeout_s)
                break
            self._read()
        return to_bgr(self._read(), f"opencv camera {self.source}")

    def close(self) -> None:
        """Release the V4L2 device; idempotent."""
        if not self.closed:
            self._cap.release()
        super().close()

    def health(self) -> dict[str, Any]:
        """Base health plus the source and the frame size."""
        return {**super().health(), "source": str(self.source), "size": [self.width, self.height]}
