"""Turn raw face measures into feedback codes, OFIQ-style 0-100 component scores and a verdict.

`FaceAssessor` owns the models (loaded once, hash-checked) and the thresholds of the
`[quality_face]` config section. `assess(bgr)` never raises on a bad photo: no face, several
faces or a failed mesh come back as reject codes so the operator gets feedback and a retake.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from firmware.config.models import QualityFaceConfig
from firmware.quality.face.detect import Detection, FaceDetector
from firmware.quality.face.landmarks import FaceLandmarks, LandmarkModel
from firmware.quality.face.measures import FaceMeasures, measure, mesh_photometry
from firmware.system.i18n import N_

log = logging.getLogger(__name__)

# code -> (severity, operator hint). "reject" codes make the shot unacceptable; "warn" codes are
# recorded and shown but do not block.
#: Face codes: (severity, explanation); the explanations are English msgids (`N_`), worded where shown.
CODES: dict[str, tuple[str, str]] = {
    "NO_FACE": ("reject", N_("no face found: face the camera")),
    "MULTIPLE_FACES": ("reject", N_("more than one face in the frame: only the applicant may be visible")),
    "LANDMARKS_FAILED": ("reject", N_("face found but its features could not be located: retake")),
    "FACE_TOO_SMALL": ("reject", N_("face too small (eye distance): move closer or zoom in")),
    "FACE_SMALL": ("warn", N_("eye distance below the ICAO recommendation: move closer if possible")),
    "CROPPED_LEFT": ("reject", N_("head too close to the left edge of the picture")),
    "CROPPED_RIGHT": ("reject", N_("head too close to the right edge of the picture")),
    "CROPPED_TOP": ("reject", N_("top of the head cut off: lower the camera or step back")),
    "CROPPED_BOTTOM": ("reject", N_("chin too close to the bottom edge: raise the camera or step back")),
    "OFF_CENTRE": ("reject", N_("face not centred: move to the middle of the picture")),
    "HEAD_TURNED": ("reject", N_("head turned (yaw): look straight into the camera")),
    "HEAD_TILTED_UP_DOWN": ("reject", N_("head tilted up or down (pitch): keep the chin level")),
    "HEAD_ROLLED": ("reject", N_("head tilted sideways (roll): keep the head upright")),
    "EYES_CLOSED": ("reject", N_("eyes closed or nearly closed: keep the eyes open")),
    "MOUTH_OPEN": ("reject", N_("mouth open: close the mouth, neutral expression")),
    "TOO_DARK": ("reject", N_("face too dark: add light or move to a brighter spot")),
    "TOO_BRIGHT": ("reject", N_("face too bright: reduce light or move out of direct sun")),
    "DARK_CLIPPING": ("reject", N_("parts of the face are black (shadows): light the face evenly")),
    "BRIGHT_CLIPPING": ("reject", N_("parts of the face are burnt out (glare): reduce direct light")),
    "UNEVEN_LIGHTING": ("reject", N_("one side of the face darker than the other: light both sides")),
    "BLURRED": ("reject", N_("picture blurred: hold still and check focus")),
}


_DEFAULTS = QualityFaceConfig()  # the defaults live once, in the config model


@dataclass(frozen=True)
class FaceThresholds:
    """Thresholds of the `[quality_face]` config section; defaults and meaning: `QualityFaceConfig`."""

    detector: str = _DEFAULTS.detector
    min_detection_score: float = _DEFAULTS.min_detection_score
    secondary_face_ratio: float = _DEFAULTS.secondary_face_ratio
    ied_min_px: float = _DEFAULTS.ied_min_px
    ied_warn_px: float = _DEFAULTS.ied_warn_px
    margin_side_min: float = _DEFAULTS.margin_side_min
    margin_above_min: float = _DEFAULTS.margin_above_min
    margin_below_min: float = _DEFAULTS.margin_below_min
    centre_offset_max: float = _DEFAULTS.centre_offset_max
    yaw_max_deg: float = _DEFAULTS.yaw_max_deg
    pitch_max_deg: float = _DEFAULTS.pitch_max_deg
    roll_max_deg: float = _DEFAULTS.roll_max_deg
    eye_open_min: float = _DEFAULTS.eye_open_min
    mouth_open_max: float = _DEFAULTS.mouth_open_max
    luminance_min: float = _DEFAULTS.luminance_min
    luminance_max: float = _DEFAULTS.luminance_max
    clip_max_fraction: float = _DEFAULTS.clip_max_fraction
    illumination_min: float = _DEFAULTS.illumination_min
    sharpness_min: float = _DEFAULTS.sharpness_min
    accept_score: float = _DEFAULTS.accept_score
    max_attempts: int = _DEFAULTS.max_attempts
    iris: bool = _DEFAULTS.iris
    threads: int = _DEFAULTS.threads
    models_dir: str = _DEFAULTS.models_dir

    def __post_init__(self) -> None:
        # rules between keys; single-key ranges are checked by the config schema
        if self.ied_warn_px < self.ied_min_px:
            raise ValueError(f"quality_face.ied_warn_px = {self.ied_warn_px}: must be >= ied_min_px "
                             f"({self.ied_min_px})")
        if self.luminance_min >= self.luminance_max:
            raise ValueError(f"quality_face.luminance_min = {self.luminance_min}: must be < luminance_max "
                             f"({self.luminance_max})")
        if self.max_attempts < 1:
            raise ValueError(f"quality_face.max_attempts = {self.max_attempts}: must be >= 1")

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> FaceThresholds:
        """Build from a config section (a `QualityFaceConfig` or a plain mapping; unknown keys are
        ignored, missing ones keep defaults)."""
        if not section:
            return cls()
        names = {f.name for f in fields(cls)}
        return cls(**{k: section[k] for k in section if k in names})


def _sig(x: float, x0: float, w: float) -> float:
    """OFIQ's sigmoid 1 / (1 + e^((x0 - x) / w)), overflow-safe."""
    z = (x0 - x) / w
    return 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))


def components(m: FaceMeasures, t: FaceThresholds) -> dict[str, float]:
    """OFIQ-style 0-100 component scores; the sigmoid centres sit on the configured thresholds
    (OFIQ's own centres where it defines one, e.g. IED x0=70 px w=20, pose cos^2)."""
    c = {
        "resolution": 100 * _sig(m.ied_px, 70.0, 20.0),
        "margins": 100 * min(_sig(m.margin_left, t.margin_side_min, 0.1),
                             _sig(m.margin_right, t.margin_side_min, 0.1),
                             _sig(m.margin_above, t.margin_above_min, 0.1),
                             _sig(m.margin_below, t.margin_below_min, 0.1)),
        "centring": 100 * (1 - _sig(m.centre_offset, t.centre_offset_max, 0.05)),
        "yaw": 100 * max(0.0, math.cos(math.radians(m.yaw_deg))) ** 2,
        "pitch": 100 * max(0.0, math.cos(math.radians(m.pitch_deg))) ** 2,
        "roll": 100 * max(0.0, math.cos(math.radians(m.roll_deg))) ** 2,
        "eyes_open": 100 * _sig(min(m.eye_open_right, m.eye_open_left), t.eye_open_min, 0.03),
        "mouth_closed": 100 * (1 - _sig(m.mouth_open, t.mouth_open_max, 0.04)),
        "luminance": 100 * _sig(m.luminance_mean, t.luminance_min, 0.05)
        * (1 - _sig(m.luminance_mean, t.luminance_max, 0.05)),
        "clipping": 100 * (1 - _sig(max(m.dark_fraction, m.bright_fraction), t.clip_max_fraction,
                                    t.clip_max_fraction / 4)),
        "illumination": 100 * max(0.0, m.illumination_balance) ** 0.3,
        "sharpness": 100 * _sig(math.log(max(m.sharpness, 1e-6) / t.sharpness_min), 0.0, 0.4),
    }
    return {k: round(v, 1) for k, v in c.items()}


def codes_for(m: FaceMeasures, t: FaceThresholds) -> list[str]:
    """Feedback codes (reject and warn) for one face's measures."""
    out = []
    if m.ied_px < t.ied_min_px:
        out.append("FACE_TOO_SMALL")
    elif m.ied_px < t.ied_warn_px:
        out.append("FACE_SMALL")
    if m.margin_left < t.margin_side_min:
        out.append("CROPPED_LEFT")
    if m.margin_right < t.margin_side_min:
        out.append("CROPPED_RIGHT")
    if m.margin_above < t.margin_above_min:
        out.append("CROPPED_TOP")
    if m.margin_below < t.margin_below_min:
        out.append("CROPPED_BOTTOM")
    if m.centre_offset > t.centre_offset_max:
        out.append("OFF_CENTRE")
    if abs(m.yaw_deg) > t.yaw_max_deg:
        out.append("HEAD_TURNED")
    if abs(m.pitch_deg) > t.pitch_max_deg:
        out.append("HEAD_TILTED_UP_DOWN")
    if abs(m.roll_deg) > t.roll_max_deg:
        out.append("HEAD_ROLLED")
    if min(m.eye_open_right, m.eye_open_left) < t.eye_open_min:
        out.append("EYES_CLOSED")
    if m.mouth_open > t.mouth_open_max:
        out.append("MOUTH_OPEN")
    if m.luminance_mean < t.luminance_min:
        out.append("TOO_DARK")
    if m.luminance_mean > t.luminance_max:
        out.append("TOO_BRIGHT")
    if m.dark_fraction > t.clip_max_fraction:
        out.append("DARK_CLIPPING")
    if m.bright_fraction > t.clip_max_fraction:
        out.append("BRIGHT_CLIPPING")
    if m.illumination_balance < t.illumination_min:
        out.append("UNEVEN_LIGHTING")
    if m.sharpness < t.sharpness_min:
        out.append("BLURRED")
    return out


@dataclass
class FaceAssessment:
    """The verdict on one photo. `score` is 0-100: the geometric mean of the component scores,
    halved for every reject code. `accepted` means no reject code and score >= accept_score.
    `detection`/`landmarks` are kept for the portrait crop."""

    accepted: bool
    score: float
    codes: list[str]
    faces: int
    width: int
    height: int
    measures: dict[str, Any] = field(default_factory=dict)
    components: dict[str, float] = field(default_factory=dict)
    detection: Detection | None = None
    landmarks: FaceLandmarks | None = None
    elapsed_ms: float = 0.0
    raw: FaceMeasures | None = field(default=None, repr=False)  # `measures` unrounded

    @property
    def rejects(self) -> list[str]:
        """The codes that block acceptance."""
        return [c for c in self.codes if CODES[c][0] == "reject"]

    def summary(self) -> dict[str, Any]:
        """JSON-ready record of this assessment (no image or landmark data)."""
        return {"accepted": self.accepted, "score": round(self.score, 1), "codes": list(self.codes),
                "faces": self.faces, "size": [self.width, self.height], "measures": self.measures,
                "components": self.components, "elapsed_ms": round(self.elapsed_ms, 1)}


def summary_score(comp: Mapping[str, float]) -> float:
    """Geometric mean of the component scores: one very poor component pulls the total down."""
    vals = np.clip(np.array(list(comp.values()), dtype=np.float64), 1.0, 100.0)
    return float(np.exp(np.log(vals).mean()))


class FaceAssessor:
    """Loads the models once; `assess(bgr)` judges one BGR uint8 photo."""

    def __init__(self, thresholds: FaceThresholds | None = None) -> None:
        self.t = thresholds or FaceThresholds()
        folder = self.t.models_dir or None
        self.detector = FaceDetector(self.t.detector, self.t.min_detection_score, folder, self.t.threads)
        self.landmarker = LandmarkModel(folder, self.t.threads, iris=self.t.iris)
        # Photometry needs only the mesh: one worker runs it while the iris model refines the eyes (the frame
        # is cold in cache after each model call; measured in bench/bench_face_stages.py).
        self._photometry = ThreadPoolExecutor(1, thread_name_prefix="face-photometry")

    def assess(self, bgr: np.ndarray) -> FaceAssessment:
        """Detect, locate landmarks, measure and judge; never raises for a bad photo."""
        if not isinstance(bgr, np.ndarray) or bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
            raise ValueError(f"expected a BGR uint8 image (H, W, 3), got "
                             f"{getattr(bgr, 'dtype', type(bgr))} {getattr(bgr, 'shape', '')}")
        t0 = time.perf_counter()
        h, w = bgr.shape[:2]
        dets = self.detector.detect(bgr)
        result = FaceAssessment(False, 0.0, [], 0, w, h)
        if dets:
            main = dets[0]
            result.faces = sum(1 for d in dets if d.area >= self.t.secondary_face_ratio * main.area)
            result.detection = main
        if not dets:
            result.codes = ["NO_FACE"]
        elif result.faces > 1:
            result.codes = ["MULTIPLE_FACES"]
        else:
            lm = self.landmarker.face_mesh(bgr, dets[0])
            if lm is None:
                result.codes = ["LANDMARKS_FAILED"]
            else:
                photo = self._photometry.submit(mesh_photometry, bgr, lm.mesh)
                try:
                    self.landmarker.refine_eyes(bgr, lm)
                finally:
                    got = photo.result()  # also when the eyes failed: no work left behind on the frame
                m = measure(bgr, result.faces, dets[0], lm, got)
                result.landmarks = lm
                result.measures, result.raw = m.as_dict(), m
                result.components = components(m, self.t)
                result.codes = codes_for(m, self.t)
                # each reject code halves the summary, so a rejected shot scores below a clean one
                # and, among rejected shots, the one with fewer problems is kept
                result.score = summary_score(result.components) * 0.5 ** len(result.rejects)
        result.accepted = not result.rejects and result.score >= self.t.accept_score
        result.elapsed_ms = (time.perf_counter() - t0) * 1000
        log.info("face assessed size=%dx%d faces=%d score=%.1f accepted=%s codes=%s ms=%.1f",
                 w, h, result.faces, result.score, result.accepted, ",".join(result.codes) or "-",
                 result.elapsed_ms)
        return result
