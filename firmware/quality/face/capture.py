"""The face capture loop: shoot, assess, retake up to N times, keep the best, build the portrait.

Uses the shared retake policy (`firmware.quality.policy`): the first acceptable shot ends the
loop; otherwise the best one is kept after the last attempt with ``forced=True``. Every
attempt's measures and codes go into the summary for the record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from firmware.quality.face.assess import CODES, FaceAssessment, FaceAssessor
from firmware.quality.face.portrait import PortraitSpec, centre_portrait, encode_jpeg, make_portrait
from firmware.quality.policy import Attempt, CapturePolicy

log = logging.getLogger(__name__)


class FrameSource(Protocol):
    """Anything with `capture() -> BGR uint8 ndarray` (every `hw.camera` backend)."""

    def capture(self) -> np.ndarray: ...


@dataclass
class FaceCaptureResult:
    """What enrollment stores: the portrait JPEG, optionally the full frame, and the summary."""

    portrait_jpeg: bytes
    full_frame_jpeg: bytes | None
    forced: bool
    accepted: FaceAssessment
    summary: dict[str, Any] = field(default_factory=dict)


def capture_face(camera: FrameSource, assessor: FaceAssessor, *, max_attempts: int | None = None,
                 accept_score: float | None = None, portrait: PortraitSpec | None = None,
                 store_full_frame: bool = False, jpeg_quality: int = 90,
                 on_attempt: Callable[[int, FaceAssessment], None] | None = None) -> FaceCaptureResult:
    """Run the retake loop on `camera` and return the kept shot as a portrait.

    `max_attempts`/`accept_score` default to the assessor's `[quality_face]` values.
    `on_attempt(index, assessment)` is called after every shot (operator feedback); camera
    errors propagate (the caller decides whether the kit can go on without a camera).
    """
    t = assessor.t
    policy = CapturePolicy(accept_score if accept_score is not None else t.accept_score,
                           max_attempts if max_attempts is not None else t.max_attempts)
    spec = portrait or PortraitSpec()
    while True:
        frame = camera.capture()
        a = assessor.assess(frame)
        index = len(policy.attempts)
        if on_attempt is not None:
            on_attempt(index, a)
        outcome = policy.add(Attempt(a.score, list(a.codes), rejected=bool(a.rejects), data=(frame, a)))
        if outcome.done:
            break
        log.info("face retake attempt=%d score=%.1f codes=%s", index + 1, a.score, ",".join(a.codes) or "-")
    kept = outcome.accepted
    assert kept is not None  # the policy always keeps one attempt when done
    frame, best = kept.data
    fill = None
    if best.landmarks is not None:
        img, fill = make_portrait(frame, best.landmarks, spec)
    else:
        img = centre_portrait(frame, spec)  # no usable face in any attempt: keep the frame centre
    summary = outcome.summary()
    summary["attempts"] = [dict(att.summary(), **att.data[1].summary()) for att in outcome.attempts]
    summary.update({
        "portrait": {"width": spec.width, "height": spec.height, "head_height_ratio": spec.head_height_ratio,
                     "from_face": fill is not None, "filled_fraction": None if fill is None else round(fill, 4)},
        "hints": [CODES[c][1] for c in best.codes],
    })
    log.info("face captured attempts=%d kept=%s forced=%s score=%.1f codes=%s", len(outcome.attempts),
             summary["kept"], outcome.forced, best.score, ",".join(best.codes) or "-")
    return FaceCaptureResult(
        portrait_jpeg=encode_jpeg(img, jpeg_quality),
        full_frame_jpeg=encode_jpeg(frame, jpeg_quality) if store_full_frame else None,
        forced=outcome.forced, accepted=best, summary=summary)
