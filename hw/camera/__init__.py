"""Cameras for face capture: Pi camera (Picamera2), USB webcam (OpenCV/V4L2) and a simulator.

All three implement `hw.camera.base.Camera`: ``capture() -> np.ndarray`` (BGR uint8),
``close()``, ``health()`` and the context-manager protocol. `open_camera` picks one from the
`[camera]` config values. Backends are imported only when chosen (picamera2 exists only on a Pi).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hw.camera.base import Camera, CameraError

__all__ = ["Camera", "CameraError", "open_camera"]


def open_camera(settings: Mapping[str, Any], sim_folder: str | Path | None = None) -> Camera:
    """Open the camera described by a `[camera]` section (a plain mapping; hw never reads config files).

    `sim_folder` is the resolved folder for the sim backend when `settings["sim_folder"]` is empty
    (the caller passes <corpus_dir>/faces).
    """
    backend = settings.get("backend", "sim")
    width, height = int(settings.get("width", 1920)), int(settings.get("height", 1080))
    warmup, settle = int(settings.get("warmup_frames", 5)), float(settings.get("settle_timeout_s", 2.0))
    if backend == "sim":
        from hw.camera.sim import SimCamera

        folder = settings.get("sim_folder") or sim_folder
        if not folder:
            raise CameraError("sim camera: no folder (set [camera] sim_folder or [simulation] corpus_dir)")
        return SimCamera(folder)
    if backend == "opencv":
        from hw.camera.opencv_backend import OpenCVCamera

        return OpenCVCamera(int(settings.get("device", 0)), width, height, warmup, settle)
    if backend == "picamera2":
        from hw.camera.picamera2_backend import Picamera2Camera

        return Picamera2Camera(width, height, warmup, settle)
    raise CameraError(f"camera backend {backend!r}: must be one of 'picamera2', 'opencv', 'sim'")
