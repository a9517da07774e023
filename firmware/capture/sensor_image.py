"""Bring any fingerprint image into the sensor's own format before it is judged.

The kit's UART sensors (R30x/AS608: 256x288; R503: 192x192) deliver 4-bit pixels that the driver
unpacks as ``nibble * 17``. Files from elsewhere (scanners, the test corpus) are converted exactly as
the corpus README and the NFIQ 2 reference tool (``--sensor``) do it, so that scores are comparable:
8-bit gray, centre crop or white pad to 256x288 with no resampling (inputs taken as 500 ppi), then
16 gray levels ``v = (v >> 4) * 17``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from firmware.errors import ImageFormatError

SENSOR_W, SENSOR_H = 256, 288
#: Geometries accepted as already coming from a kit sensor (height, width).
SENSOR_SHAPES: tuple[tuple[int, int], ...] = ((288, 256), (192, 192))


def quantise16(gray: np.ndarray) -> np.ndarray:
    """Reduce 8-bit gray to the sensor's 16 levels (0, 17, ..., 255)."""
    return ((gray >> 4) * 17).astype(np.uint8)


def crop_or_pad(gray: np.ndarray, width: int = SENSOR_W, height: int = SENSOR_H) -> np.ndarray:
    """Centre-crop, or pad with white, to ``width`` x ``height`` without resampling.

    Offsets follow Pillow's paste of the reference tool: ``x0 = (w - width) // 2`` (floor), the
    same for y, so an odd surplus loses its extra column on the right/bottom.
    """
    h, w = gray.shape
    out = np.full((height, width), 255, np.uint8)
    x0, y0 = (w - width) // 2, (h - height) // 2
    # Source window and destination window of the overlap.
    sx0, sy0 = max(x0, 0), max(y0, 0)
    dx0, dy0 = max(-x0, 0), max(-y0, 0)
    cw, ch = min(w - sx0, width - dx0), min(h - sy0, height - dy0)
    out[dy0:dy0 + ch, dx0:dx0 + cw] = gray[sy0:sy0 + ch, sx0:sx0 + cw]
    return out


def to_gray(image: np.ndarray) -> np.ndarray:
    """8-bit single-channel gray from a gray, BGR or BGRA array (ITU-R 601 luma, as Pillow "L")."""
    if image.dtype != np.uint8:
        raise ImageFormatError(f"image must be 8-bit (uint8), got dtype {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        b, g, r = (image[..., i].astype(np.uint32) for i in range(3))
        return ((r * 299 + g * 587 + b * 114) // 1000).astype(np.uint8)
    raise ImageFormatError(f"image must be 2-D gray or 3-channel/4-channel colour, got shape {image.shape}")


def to_sensor(image: np.ndarray) -> np.ndarray:
    """Any 8-bit image -> 16-level gray in sensor geometry.

    An image already 256x288 or 192x192 keeps its geometry; it is still quantised to 16 levels
    (a no-op for real sensor frames, whose levels are already multiples of 17).
    """
    gray = to_gray(image)
    if gray.shape[0] < 16 or gray.shape[1] < 16:
        raise ImageFormatError(f"image is too small ({gray.shape[1]}x{gray.shape[0]} px)")
    if tuple(gray.shape) not in SENSOR_SHAPES:
        gray = crop_or_pad(gray)
    return quantise16(gray)


def load_file(path: str | Path) -> np.ndarray:
    """Read an image file (PNG, PGM, JPEG, BMP, TIFF...) as 8-bit gray, unchanged in size."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise ImageFormatError(f"{p}: no such file")
    data = np.fromfile(p, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageFormatError(f"{p}: not an image OpenCV can decode (PNG, PGM, JPEG, BMP, TIFF)")
    if img.dtype == np.uint16:  # 16-bit PNG/TIFF: keep the top 8 bits
        img = (img >> 8).astype(np.uint8)
    try:
        return to_gray(img)
    except ImageFormatError as e:
        raise ImageFormatError(f"{p}: {e}") from None


def load_sensor_file(path: str | Path) -> np.ndarray:
    """Read an image file and convert it to the sensor format (see `to_sensor`)."""
    return to_sensor(load_file(path))
