"""Fixtures and image transforms for the face tests (corpus images are read, never copied)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware.quality.face.assess import FaceAssessor
from firmware.quality.face.landmarks import FaceLandmarks


@pytest.fixture(scope="session")
def faces_dir(corpus_dir: Path) -> Path:
    return corpus_dir / "faces"


@pytest.fixture(scope="session")
def assessor() -> FaceAssessor:
    return FaceAssessor()


@pytest.fixture(scope="session")
def load(faces_dir: Path):
    cache: dict[str, np.ndarray] = {}

    def _load(name: str) -> np.ndarray:
        if name not in cache:
            img = cv2.imread(str(faces_dir / name), cv2.IMREAD_COLOR)
            assert img is not None, f"corpus image missing: {faces_dir / name}"
            cache[name] = img
        return cache[name].copy()

    return _load


def close_eyes(img: np.ndarray, lm: FaceLandmarks) -> np.ndarray:
    """Synthetic closed eyes: inpaint each eye opening with the surrounding skin and draw the
    lash line where a closed lid lies (70 % of the way down from the upper lid)."""
    out = img.copy()
    for side in ("right", "left"):
        c = lm.eye_contour(side)
        w = float(np.linalg.norm(c[8] - c[0]))
        mask = np.zeros(img.shape[:2], np.uint8)
        cv2.fillConvexPoly(mask, cv2.convexHull(c.astype(np.int32)), 255)
        k = int(w / 4) | 1
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        out = cv2.inpaint(out, mask, int(w / 5), cv2.INPAINT_TELEA)
        lid = np.vstack([c[0:1], c[1:8] * 0.7 + c[9:16] * 0.3, c[8:9]]).astype(np.int32)
        cv2.polylines(out, [lid], False, (45, 40, 40), max(1, int(w / 25)), cv2.LINE_AA)
    return out


def side_light(img: np.ndarray, lm: FaceLandmarks, dark: float = 0.3) -> np.ndarray:
    """Light from one side: brightness falls linearly to `dark` across the face, image-left side dark."""
    x0, x1 = float(lm.mesh[:, 0].min()), float(lm.mesh[:, 0].max())
    ramp = np.clip((np.arange(img.shape[1]) - x0) / (x1 - x0), 0, 1) * (1 - dark) + dark
    return np.clip(img * ramp[None, :, None], 0, 255).astype(np.uint8)


def rotate(img: np.ndarray, degrees: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Rotate counter-clockwise by `degrees` about `centre` (default image centre), same size."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(centre or (w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
