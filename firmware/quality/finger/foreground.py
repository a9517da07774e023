"""Where the finger touches the glass: a foreground mask and its size and position.

Optical UART sensors show the background as near white and the contact area as ridges. The mask is
the set of pixels whose local gray-level spread (std over a 15x15 window) shows ridge structure or
that are dark (a wet, smeared contact has no spread but is dark), closed and opened at ridge scale,
keeping the connected parts large enough to be a finger. Cheap (a few box filters) and it does not
depend on the 16-level quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STD_MIN = 12.0  # gray-level std over 15x15 that counts as ridge structure (16-level: < 1 step)
DARK_MAX = 120.0  # local mean darker than this counts as contact even without ridges (wet/smeared)
WIN = 15  # about 1.5-2 ridge periods at 500 ppi


@dataclass(frozen=True)
class Foreground:
    """The contact area and where it lies in the sensor window."""

    mask: np.ndarray  # bool, image shape
    fraction: float  # of the sensor window
    centroid_x: float  # 0..1 of the width
    centroid_y: float  # 0..1 of the height
    border_contact: int  # how many of the 4 image borders the contact covers over > 40 % of their length


def segment(img: np.ndarray) -> Foreground:
    """Foreground of an 8-bit gray image (any size)."""
    import cv2

    h, w = img.shape
    f = img.astype(np.float32)
    mean = cv2.boxFilter(f, -1, (WIN, WIN), borderType=cv2.BORDER_REFLECT)
    sq = cv2.boxFilter(f * f, -1, (WIN, WIN), borderType=cv2.BORDER_REFLECT)
    std = np.sqrt(np.maximum(sq - mean * mean, 0))
    raw = ((std > STD_MIN) | (mean < DARK_MAX)).astype(np.uint8)
    # Morphology and components at half resolution (the mask is smooth at ridge scale anyway).
    half = cv2.resize(raw, (w // 2, h // 2), interpolation=cv2.INTER_NEAREST)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    m = cv2.morphologyEx(half, cv2.MORPH_CLOSE, k)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k)
    # Keep components of at least 2 % of the window: specks of dirt are not a finger.
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    keep = np.zeros(n, np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 0.02 * m.size
    mask = cv2.resize(keep[lab], (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    mom = cv2.moments(mask.view(np.uint8), binaryImage=True)
    frac = float(mom["m00"] / mask.size)
    if mom["m00"] > 0:
        cx, cy = float(mom["m10"] / mom["m00"] / (w - 1)), float(mom["m01"] / mom["m00"] / (h - 1))
    else:
        cx = cy = 0.5
    edges = (mask[0].mean(), mask[-1].mean(), mask[:, 0].mean(), mask[:, -1].mean())
    return Foreground(mask, frac, cx, cy, int(sum(e > 0.4 for e in edges)))
