"""Per-finger capture policy: up to N impressions, accept at the threshold, else keep the best.

Glue between `quality.assess` and the shared `firmware.quality.policy.CapturePolicy`, configured
from ``[quality_finger]`` (threshold, max_attempts, per-finger threshold overrides). Every
impression's score and feedback codes go into the record via `FingerCapture.record()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from firmware.quality.finger.quality import FingerQuality
from firmware.quality.policy import Attempt, CapturePolicy, Outcome

log = logging.getLogger(__name__)


def threshold_for(section: Mapping[str, Any], finger: str | None) -> float:
    """The accept threshold for `finger` (e.g. "R2"): its override if configured, else the default."""
    overrides = section.get("finger_thresholds", {}) or {}
    if finger is not None and finger in overrides:
        return float(overrides[finger])
    return float(section["threshold"])


class FingerCapture:
    """Drive the impressions of one finger: `add(image)` after each capture until `outcome.done`."""

    def __init__(self, section: Mapping[str, Any], check: Callable[[np.ndarray], FingerQuality],
                 finger: str | None = None) -> None:
        self.finger = finger
        self.check = check
        self.policy = CapturePolicy(threshold_for(section, finger), int(section["max_attempts"]))
        self.qualities: list[FingerQuality] = []
        self.outcome: Outcome | None = None

    def add(self, image: np.ndarray) -> tuple[FingerQuality, Outcome]:
        """Judge one impression and record it; returns its quality and the policy's verdict."""
        q = self.check(image)
        self.qualities.append(q)
        self.outcome = self.policy.add(Attempt(q.score, list(q.codes), q.rejected, image))
        n = len(self.qualities)
        log.info("finger_attempt finger=%s attempt=%d score=%.1f codes=%s done=%s forced=%s",
                 self.finger or "-", n, q.score, ",".join(q.codes) or "-", self.outcome.done, self.outcome.forced)
        return q, self.outcome

    @property
    def kept_image(self) -> np.ndarray | None:
        """The accepted (or best, when forced) impression once the policy is done."""
        if self.outcome is None or not self.outcome.done or self.outcome.accepted is None:
            return None
        return self.outcome.accepted.data

    def record(self) -> dict[str, Any]:
        """What goes into the enrollment record: every attempt's score and codes, kept index, forced."""
        if self.outcome is None:
            return {"finger": self.finger, "threshold": self.policy.threshold, "attempts": [], "kept": None,
                    "forced": False}
        out = self.outcome.summary()
        out["finger"] = self.finger
        out["threshold"] = self.policy.threshold
        for a, q in zip(out["attempts"], self.qualities, strict=True):
            a["messages"] = q.messages
        return out
