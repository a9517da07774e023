"""Hard rejects: conditions an operator can fix at once, with stable codes and plain messages.

Each gate reads the feature dict of `features.compute`. The codes are stable strings stored in
the enrollment record; the messages are what the console shows. Limits come from the
``[quality_finger]`` config section (`Limits.from_config`); the defaults were calibrated on the
corpus in sensor format and its degradations (docs/fingerprint-quality.md, "Calibration").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from firmware.config.models import QualityFingerConfig
from firmware.system.i18n import N_

#: Feedback per code, English msgids (`N_`): the enrollment words them in the operator's language.
MESSAGES: dict[str, str] = {
    "no_finger": N_("No finger on the sensor"),
    "blurred": N_("Image blurred: the finger moved or slid; hold it still and press again"),
    "press_flatter": N_("Press the finger flatter: the contact area is too small"),
    "centre_finger": N_("Centre the finger on the sensor"),
    "too_wet": N_("Finger too wet or pressed too hard: wipe it and press lightly"),
    "clean_glass": N_("Clean the sensor glass: smear or residue on the image"),
    "too_dry": N_("Finger too dry or touching too lightly: moisten it slightly and press firmly"),
    "few_minutiae": N_("Too little ridge detail: place the centre of the fingertip on the glass"),
}
#: Order in which codes are reported (the first is the one to act on first).
ORDER = tuple(MESSAGES)


_DEFAULTS = QualityFingerConfig()  # the defaults live once, in the config model

#: Foreground p95-p5 spread at or above which the little ridge area found is sharp (a partial contact),
#: below which it is blurred. Calibrated on the corpus: `partial:0.25` gives 170-255, `blur:5`/`blur:8` 0-119.
SHARP_RIDGES_CONTRAST = 150.0


@dataclass(frozen=True)
class Limits:
    """Gate limits: the keys of the same names in ``[quality_finger]`` (meaning and defaults:
    `firmware.config.models.QualityFingerConfig`)."""

    no_finger_area: float = _DEFAULTS.no_finger_area  # no finger at all below this foreground fraction
    no_finger_std: float = _DEFAULTS.no_finger_std  # gray std of the whole image below which it is blank
    min_area: float = _DEFAULTS.min_area  # foreground fraction below which the finger must be pressed flatter
    max_centre_offset: float = _DEFAULTS.max_centre_offset  # centroid this far (share of width/height) off centre
    wet_mean_max: float = _DEFAULTS.wet_mean_max  # foreground mean darker than this = wet / over-pressed
    haze_max: float = _DEFAULTS.haze_max  # share of flat mid-gray 16x16 blocks above which the glass is smeared
    dry_lcs_max: float = _DEFAULTS.dry_lcs_max  # local clarity (LCS mean) below which ridges are broken = dry
    dry_contrast_max: float = _DEFAULTS.dry_contrast_max  # foreground p95-p5 below this = too faint
    dry_mean_min: float = _DEFAULTS.dry_mean_min  # foreground mean lighter than this = almost no ridge contact
    min_minutiae: int = _DEFAULTS.min_minutiae

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None = None) -> Limits:
        """Limits from a validated ``[quality_finger]`` section or a plain mapping (keys not given keep
        defaults); None: the defaults."""
        if section is None:
            return cls()
        names = {f.name for f in fields(cls)}
        return cls(**{k: section[k] for k in section if k in names})


def check(f: Mapping[str, float], lim: Limits) -> list[str]:
    """Codes of every gate that fires, in `ORDER`; an empty list means no hard reject."""
    if f["gray_std"] < lim.no_finger_std:
        return ["no_finger"]  # blank glass: nothing else is meaningful without a finger
    if f["fg_fraction"] < lim.no_finger_area:
        # Something dark is on the glass but hardly any ridge area: sharp ridges on a sliver of the
        # window are a partial contact; no sharp ridges at all is a finger that moved (blur).
        if f["fg_contrast"] < SHARP_RIDGES_CONTRAST:
            return ["blurred"]
        off = max(abs(f["fg_cx"] - 0.5), abs(f["fg_cy"] - 0.5)) > lim.max_centre_offset
        return ["press_flatter", "centre_finger"] if off else ["press_flatter"]
    codes: set[str] = set()
    if f["fg_fraction"] < lim.min_area:
        codes.add("press_flatter")
    if max(abs(f["fg_cx"] - 0.5), abs(f["fg_cy"] - 0.5)) > lim.max_centre_offset:
        codes.add("centre_finger")
    if f["fg_mean"] < lim.wet_mean_max:
        codes.add("too_wet")
    if f["haze_fraction"] > lim.haze_max:
        codes.add("clean_glass")
    if f["LCS_Bin10_Mean"] < lim.dry_lcs_max or f["fg_contrast"] < lim.dry_contrast_max \
            or f["fg_mean"] > lim.dry_mean_min:
        codes.add("too_dry")
    if f["minutiae"] < lim.min_minutiae:
        codes.add("few_minutiae")
    return [c for c in ORDER if c in codes]
