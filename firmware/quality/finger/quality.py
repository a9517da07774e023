"""`assess(image) -> FingerQuality`: the on-device fingerprint quality check.

Pipeline for one capture (16-level 8-bit gray in sensor geometry): features (NFIQ 2 native
measures, foreground, minutiae), hard-reject gates with operator feedback codes, and the score
0-100 predicted by the distilled-NFIQ 2 model. The score is always the model's estimate; a hard
reject is carried by `rejected` (the capture policy never accepts a rejected impression and keeps
one only when every impression was rejected), so the score keeps tracking NFIQ 2.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from firmware.capture import sensor_image
from firmware.quality.finger import features, gates, gbt

log = logging.getLogger(__name__)

MODEL_PATH = Path(__file__).resolve().parent / "data" / "fpquality_model.npz"


@dataclass
class FingerQuality:
    """The verdict on one impression."""

    score: float  # 0..100, estimated NFIQ 2 on this sensor
    codes: list[str]  # hard-reject feedback codes, most actionable first (see gates.MESSAGES)
    rejected: bool
    features: dict[str, float] = field(repr=False)
    elapsed_ms: float = 0.0

    @property
    def messages(self) -> list[str]:
        """Operator messages for `codes`."""
        return [gates.MESSAGES[c] for c in self.codes]

    def summary(self) -> dict[str, object]:
        """JSON-ready summary (features rounded) for records and the CLI."""
        return {
            "score": round(self.score, 1),
            "codes": list(self.codes), "messages": self.messages, "rejected": self.rejected,
            "elapsed_ms": round(self.elapsed_ms, 1),
            "features": {k: round(v, 4) for k, v in self.features.items()},
        }


@lru_cache(maxsize=4)
def load_model(path: Path = MODEL_PATH) -> dict[str, np.ndarray]:
    """The committed model, checked against the feature list this code computes."""
    model = gbt.load(path)
    names = tuple(str(n) for n in model["feature_names"])
    if names != features.MODEL_FEATURES:
        raise ValueError(f"{path}: model was trained on other features; re-run tools/train_fpquality.py")
    return model


def check_geometry(image: np.ndarray) -> None:
    """Raise `ImageFormatError` unless `image` is 8-bit gray in a sensor geometry."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise sensor_image.ImageFormatError(f"expected a 2-D uint8 gray image, got {what}")
    if tuple(image.shape) not in sensor_image.SENSOR_SHAPES:
        raise sensor_image.ImageFormatError(
            f"image is {image.shape[1]}x{image.shape[0]}; the sensor delivers 256x288 or 192x192 "
            "(convert other images with sensor_image.to_sensor first)")


def assess(image: np.ndarray, limits: gates.Limits | None = None, model_path: Path = MODEL_PATH) -> FingerQuality:
    """Judge one sensor image (uint8, 256x288 or 192x192).

    Returns score, feedback codes, whether it is a hard reject, the feature values and the time
    taken. Raises `sensor_image.ImageFormatError` for anything that is not a sensor image.
    """
    check_geometry(image)
    lim = limits or gates.Limits()
    t0 = time.perf_counter()
    feats = features.compute(image)
    codes = gates.check(feats, lim)
    model = load_model(model_path)
    x = np.array([[feats[n] for n in features.MODEL_FEATURES]])
    raw = float(np.clip(gbt.predict(model, x)[0], 0.0, 100.0))
    rejected = bool(codes)
    elapsed = (time.perf_counter() - t0) * 1000
    q = FingerQuality(raw, codes, rejected, feats, elapsed)
    log.info("finger_quality score=%.1f rejected=%s codes=%s minutiae=%d fg=%.2f ms=%.1f",
             q.score, rejected, ",".join(codes) or "-", int(feats["minutiae"]), feats["fg_fraction"], elapsed)
    return q


def checker_from_config(section: Mapping[str, Any] | None = None) -> Callable[[np.ndarray], FingerQuality]:
    """`image -> FingerQuality` using the gate limits of a validated ``[quality_finger]`` section
    (None: the defaults of `firmware.config.models.QualityFingerConfig`)."""
    from firmware.quality.finger import alloc

    lim = gates.Limits.from_config(section)
    load_model()  # fail at start-up, not at the first capture, if the model file is bad
    alloc.tune()  # reuse heap blocks for the per-image temporaries (see alloc.py)

    def check(image: np.ndarray) -> FingerQuality:
        return assess(image, lim)

    return check
