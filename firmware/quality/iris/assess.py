"""Iris quality: ISO/IEC 29794-6 measures (`iris-iqm`), gates with stable codes, a 0-100 score and a verdict.

`IrisAssessor(cfg.iris).assess(gray)` never raises on a bad frame: no iris, a closed eye or a blurred shot come
back as codes so the operator gets a hint and a retake. Every code is a reject (an iris the gates flag is not
usable for matching); the score is iris-iqm's ISO overall quality (0-100). `iris-iqm` (numpy, OpenCV, numba) is
imported on first use; numba compiles its kernels once and caches them next to the package.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from firmware.config.models import IrisConfig
from firmware.system.i18n import N_

log = logging.getLogger(__name__)

#: Iris codes in order of what to fix first -> the hint (English msgid; Bahasa Indonesia in the catalog).
CODES: dict[str, str] = {
    "NO_IRIS": N_("No eye found: look into the iris camera"),
    "OFF_CENTRE": N_("Eye not in the middle: move the camera so the eye is in the centre of the picture"),
    "EYE_OCCLUDED": N_("Eye covered by the eyelid: open the eye wider"),
    "TOO_FAR": N_("Too far: bring the camera closer to the eye"),
    "TOO_CLOSE": N_("Too close: move the camera away from the eye"),
    "BLURRED": N_("Picture blurred: hold the camera still at the right distance"),
    "GAZE_AWAY": N_("Look straight into the camera"),
    "LOW_CONTRAST": N_("Low contrast: check the infrared light and shade the eye from sunlight"),
    "PUPIL_DILATION": N_("Pupil too wide or too narrow: reduce the surrounding light and wait a moment"),
    "MARGIN": N_("Eye too close to the edge of the picture"),
}
#: Codes that follow from a wrong localisation when the eye is at the edge: not reported with OFF_CENTRE.
_UNRELIABLE_OFF_CENTRE = ("TOO_FAR", "TOO_CLOSE", "GAZE_AWAY", "LOW_CONTRAST", "MARGIN", "PUPIL_DILATION")


@dataclass
class IrisAssessment:
    """One frame's verdict: score (ISO overall 0-100), codes, the measures, where the eye is."""

    score: float
    codes: list[str]
    measures: dict[str, float] = field(default_factory=dict)
    position: dict[str, Any] = field(default_factory=dict)
    elapsed_ms: float = 0.0

    @property
    def rejected(self) -> bool:
        return bool(self.codes)

    def summary(self) -> dict[str, Any]:
        """What the record keeps per attempt."""
        return {"score": round(self.score, 2), "codes": list(self.codes), "rejected": self.rejected,
                "measures": {k: round(v, 2) for k, v in self.measures.items()}}


#: iris-iqm result fields kept as the record's measures (ISO/IEC 29794-6 names where the standard has them).
MEASURES = ("usable_iris_area_percent", "iso_iris_sclera_contrast", "iso_iris_pupil_contrast",
            "iso_pupil_boundary_circularity", "iso_iris_pupil_concentricity", "iso_margin_adequacy",
            "iso_sharpness", "iso_greyscale_utilization", "iso_overall_quality", "overall_quality")


class IrisAssessor:
    """The gates of the `[iris]` section over iris-iqm's measures."""

    def __init__(self, cfg: IrisConfig | None = None) -> None:
        self.cfg = cfg or IrisConfig()
        import iris_iqm  # noqa: F401  (fail at start-up, not at the first resident, when it is missing)

    def assess(self, gray: np.ndarray) -> IrisAssessment:
        """Measure and gate one 8-bit grey frame (H, W)."""
        import iris_iqm

        c = self.cfg
        t0 = time.perf_counter()
        r = iris_iqm.evaluate_array(np.ascontiguousarray(gray))
        ms = (time.perf_counter() - t0) * 1000
        f = r.features
        h, w = gray.shape[:2]
        if r.error_code != 0 or f.iris_diameter <= 0:
            log.info("iris not found error=%s message=%s", r.error_code, r.error_message)
            return IrisAssessment(0.0, ["NO_IRIS"], position={"found": False}, elapsed_ms=ms)
        measures = {k: float(getattr(r, k)) for k in MEASURES}
        measures.update(iris_diameter=float(f.iris_diameter), pupil_diameter=float(f.pupil_diameter),
                        pupil_iris_ratio=float(f.iris_pupil_ratio))
        dx, dy = (f.iris_center_x - w / 2) / w, (f.iris_center_y - h / 2) / h
        distance = ("too_far" if f.iris_diameter < c.iris_diameter_min else
                    "too_close" if f.iris_diameter > c.iris_diameter_max else "ok")
        codes = []
        if max(abs(dx), abs(dy)) > c.centre_offset_max:
            codes.append("OFF_CENTRE")
        if r.usable_iris_area_percent < c.usable_area_min or r.iso_pupil_boundary_circularity < c.pupil_circularity_min:
            codes.append("EYE_OCCLUDED")
        if distance == "too_far":
            codes.append("TOO_FAR")
        elif distance == "too_close":
            codes.append("TOO_CLOSE")
        if r.iso_iris_pupil_concentricity < c.concentricity_min:
            codes.append("GAZE_AWAY")
        if r.iso_sharpness < c.sharpness_min:
            codes.append("BLURRED")
        if r.iso_iris_sclera_contrast < c.sclera_contrast_min:
            codes.append("LOW_CONTRAST")
        if not c.dilation_min <= f.iris_pupil_ratio <= c.dilation_max:
            codes.append("PUPIL_DILATION")
        if r.iso_margin_adequacy < c.margin_min:
            codes.append("MARGIN")
        if "BLURRED" in codes and "GAZE_AWAY" in codes:  # blurred boundaries make the concentricity unreliable
            codes.remove("GAZE_AWAY")
        codes.sort(key=list(CODES).index)
        if "OFF_CENTRE" in codes:
            codes = [x for x in codes if x not in _UNRELIABLE_OFF_CENTRE]
        if "EYE_OCCLUDED" in codes:  # a closed eye has no measurable pupil, gaze or sclera: one hint
            codes = [x for x in codes if x in ("OFF_CENTRE", "EYE_OCCLUDED")]
        score = float(r.iso_overall_quality)
        if not codes and score < c.accept_score:
            codes.append("LOW_CONTRAST" if r.iso_iris_sclera_contrast < 2 * c.sclera_contrast_min else "BLURRED")
        position = {"found": True, "dx": round(dx, 3), "dy": round(dy, 3), "distance": distance,
                    "iris_diameter": int(f.iris_diameter)}
        return IrisAssessment(score, codes, measures, position, ms)


def hints(codes: list[str]) -> list[str]:
    """The operator's hints for `codes`, in the current language."""
    from firmware.system.i18n import gettext

    return [gettext(CODES[c]) for c in codes if c in CODES]
