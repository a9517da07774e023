"""The stored ID photo: an ICAO-proportioned portrait cut from the camera frame.

One similarity transform does it all: level the eye line (undo roll), scale so the head
(crown to chin, estimated as 2 T: the eyes sit near the middle of the head) fills
`head_height_ratio` of the portrait height, and place the eyes so that 40 % of the free
height is above the crown and 60 % below the chin. With the defaults (413 x 531 px = 35 x 45 mm
at 300 dpi, head 75 %) the eye line sits 52 % up from the bottom edge (ICAO: 50-70 %).
Parts outside the frame are filled with the frame's median border colour and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from firmware.quality.face.landmarks import FaceLandmarks
from firmware.quality.face.measures import CHIN, eye_centres

HEAD_T_FACTOR = 2.0  # crown-to-chin height in units of T (eye midpoint to chin)


@dataclass(frozen=True)
class PortraitSpec:
    """Output size in pixels and the share of the height the head should fill."""

    width: int = 413
    height: int = 531
    head_height_ratio: float = 0.75

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16:
            raise ValueError(f"portrait size {self.width}x{self.height}: both sides must be >= 16 px")
        if not 0.3 <= self.head_height_ratio <= 0.95:
            raise ValueError(f"head_height_ratio {self.head_height_ratio}: must be between 0.3 and 0.95")


def portrait_transform(lm: FaceLandmarks, spec: PortraitSpec) -> tuple[np.ndarray, float]:
    """2x3 affine matrix frame -> portrait, and the eye-line height from the top (px)."""
    r_eye, l_eye = eye_centres(lm)
    mid = (r_eye + l_eye) / 2
    d = l_eye - r_eye
    ied = float(np.linalg.norm(d))
    t = float(np.linalg.norm(lm.mesh[CHIN, :2] - mid))
    if ied < 1 or t < 1:
        raise ValueError("degenerate landmarks: eye distance or eye-to-chin distance below 1 px")
    head_px = spec.head_height_ratio * spec.height
    k = head_px / (HEAD_T_FACTOR * t)
    free = spec.height - head_px
    eye_y = 0.4 * free + head_px / 2  # crown = eye line - head/2
    c, s = d[0] / ied, d[1] / ied
    m = np.array([[k * c, k * s, 0.0], [-k * s, k * c, 0.0]])
    m[:, 2] = np.array([spec.width / 2, eye_y]) - m[:, :2] @ mid
    return m, eye_y


def _border_colour(bgr: np.ndarray) -> tuple[int, int, int]:
    band = max(1, bgr.shape[0] // 20)
    med = np.median(bgr[:band].reshape(-1, 3), axis=0)
    return int(med[0]), int(med[1]), int(med[2])


def make_portrait(bgr: np.ndarray, lm: FaceLandmarks, spec: PortraitSpec | None = None
                  ) -> tuple[np.ndarray, float]:
    """(portrait BGR uint8, share of its pixels that had to be filled because they lay outside
    the frame)."""
    spec = spec or PortraitSpec()
    m, _ = portrait_transform(lm, spec)
    k = float(np.hypot(m[0, 0], m[0, 1]))
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
    out = cv2.warpAffine(bgr, m, (spec.width, spec.height), flags=interp,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=_border_colour(bgr))
    inside = cv2.warpAffine(np.full(bgr.shape[:2], 255, np.uint8), m, (spec.width, spec.height),
                            flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, float((inside == 0).mean())


def centre_portrait(bgr: np.ndarray, spec: PortraitSpec | None = None) -> np.ndarray:
    """Fallback when no face was found: the largest centred crop with the portrait's aspect ratio."""
    spec = spec or PortraitSpec()
    h, w = bgr.shape[:2]
    aspect = spec.width / spec.height
    cw, ch = (int(h * aspect), h) if w / h > aspect else (w, int(w / aspect))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return cv2.resize(bgr[y0:y0 + ch, x0:x0 + cw], (spec.width, spec.height), interpolation=cv2.INTER_AREA)


def encode_jpeg(bgr: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a BGR image (raises ValueError if OpenCV cannot encode it)."""
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {bgr.shape}")
    return buf.tobytes()
