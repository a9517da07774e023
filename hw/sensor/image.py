"""Sensor image formats: geometries, 4-bit UART packing/unpacking and conversion of any print.

Over UART the module sends the upper 4 bits of each pixel, two horizontally adjacent pixels per
byte, high nibble = left pixel, rows top to bottom. Nibbles expand to 8 bit by x17 (0x0 -> 0,
0xF -> 255), the full-scale mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Image size of a sensor model."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Pixel count."""
        return self.width * self.height

    @property
    def packed_bytes(self) -> int:
        """Bytes of a 4-bit packed image (two pixels per byte)."""
        return self.pixels // 2

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


R307_GEOMETRY = Geometry(256, 288)  # ZFM-20/60, R30x, AS608 (optical)
R503_GEOMETRY = Geometry(192, 192)  # R503 (capacitive)
GEOMETRIES = (R307_GEOMETRY, R503_GEOMETRY)


def geometry_for_bytes(n: int) -> Geometry:
    """The geometry whose packed image is `n` bytes; ValueError naming the sizes known otherwise."""
    for g in GEOMETRIES:
        if g.packed_bytes == n:
            return g
    known = ", ".join(f"{g} = {g.packed_bytes} B" for g in GEOMETRIES)
    raise ValueError(f"image of {n} bytes matches no known sensor geometry ({known})")


def unpack_4bit(payload: bytes, geometry: Geometry | None = None) -> np.ndarray:
    """Packed 4-bit UART image -> 8-bit gray array (height x width, uint8)."""
    g = geometry or geometry_for_bytes(len(payload))
    if len(payload) != g.packed_bytes:
        raise ValueError(f"{g} image needs {g.packed_bytes} bytes, got {len(payload)}")
    b = np.frombuffer(payload, dtype=np.uint8)
    out = np.empty(g.pixels, dtype=np.uint8)
    out[0::2] = (b >> 4) * 17
    out[1::2] = (b & 0x0F) * 17
    return out.reshape(g.height, g.width)


def pack_4bit(image: np.ndarray) -> bytes:
    """8-bit gray array -> packed 4-bit UART image (keeps the upper nibble of each pixel)."""
    a = np.asarray(image)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"image must be a 2-D uint8 array, got shape {a.shape} dtype {a.dtype}")
    if a.shape[1] % 2:
        raise ValueError(f"image width must be even to pack two pixels per byte, got {a.shape[1]}")
    flat = a.reshape(-1)
    return ((flat[0::2] & 0xF0) | (flat[1::2] >> 4)).astype(np.uint8).tobytes()


def quantise(image: np.ndarray) -> np.ndarray:
    """16 gray levels as delivered over UART: v = (v >> 4) * 17."""
    return ((np.asarray(image, dtype=np.uint8) >> 4) * 17).astype(np.uint8)


def to_gray(image: np.ndarray) -> np.ndarray:
    """Any decoded image (gray, BGR, BGRA) -> 8-bit gray."""
    import cv2

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 4:
        a = cv2.cvtColor(a, cv2.COLOR_BGRA2GRAY)
    elif a.ndim == 3 and a.shape[2] == 3:
        a = cv2.cvtColor(a, cv2.COLOR_BGR2GRAY)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim != 2:
        raise ValueError(f"not an image: shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def fit_to_geometry(gray: np.ndarray, geometry: Geometry, fill: int = 255) -> np.ndarray:
    """Centre-crop, or pad with white, to the sensor geometry without resampling (500 ppi assumed).

    The crop offset is ``(w - W) // 2``; padding is split the same way, so this reproduces the
    corpus's `nfiq2_sensor` preparation.
    """
    a = np.asarray(gray, dtype=np.uint8)
    h, w = a.shape
    out = np.full((geometry.height, geometry.width), fill, dtype=np.uint8)
    # source window (crop) and destination window (pad)
    sx = max(0, (w - geometry.width) // 2)
    sy = max(0, (h - geometry.height) // 2)
    dx = max(0, (geometry.width - w) // 2)
    dy = max(0, (geometry.height - h) // 2)
    cw = min(w, geometry.width)
    ch = min(h, geometry.height)
    out[dy:dy + ch, dx:dx + cw] = a[sy:sy + ch, sx:sx + cw]
    return out


def to_sensor_image(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """What a UART sensor of `geometry` delivers for this print: gray, crop/pad, 16 levels."""
    return quantise(fit_to_geometry(to_gray(image), geometry))
