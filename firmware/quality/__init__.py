"""On-device quality checks: the shared retake policy, fingers, face and iris."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from firmware.system.i18n import _


def load_image(path: str | Path, gray: bool = False) -> Any:
    """Read an image file for a `rekam quality` command: BGR uint8 (alpha and 16-bit depth dropped) or, with
    `gray`, 8-bit grey; ValueError names the file."""
    import cv2
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise ValueError(_("{path}: no such file", path=p))
    data = np.fromfile(p, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ValueError(_("{path}: not an image OpenCV can decode (JPEG/PNG/BMP/TIFF expected)", path=p))
    return img
