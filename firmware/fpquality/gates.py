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

MESSAGES: dict[str, str] = {
    "no_finger": "No finger on the sensor",
    "press_flatter": "Press the finger flatter: the contact area is too small",
    "centre_finger": "Centre the finger on the sensor",
    "too_wet": "Finger too wet or pressed too hard: wipe it and press lightly",
    "clean_glass": "Clean the sensor glass: smear or residue on the image",
    "too_dry": "Finger too dry or touching too lightly: moisten it slightly and press firmly",
    "few_minutiae": "Too little ridge detail: place the centre of the fingertip on the glass",
}
#: Order in which codes are reported (the first is the one to act on first).
ORDER = tuple(MESSAGES)


@dataclass(frozen=True)
class Limits:
    """Gate limits (see the config keys of the same names in ``[quality_finger]``)."""

    no_finger_area: float = 0.10  # foreground fraction below which there is no finger at all
    no_finger_std: float = 6.0  # gray std of the whole image below which it is blank
    min_area: float = 0.40  # foreground fraction below which the finger must be pressed flatter
    max_centre_offset: float = 0.20  # centroid farther than this (fraction of width/height) from the centre
    wet_mean_max: float = 95.0  # foreground mean gray darker than this = wet / over-pressed
    wet_lcs_max: float = 0.45  # ... together with local clarity below this (ridges merged)
    smear_ocl_max: float = 0.45  # foreground with orientation certainty below this = smeared glass
    smear_blocks_min: float = 0.30  # ... over at least this fraction of the blocks
    dry_mean_min: float = 215.0  # foreground mean gray lighter than this = dry / light touch
    dry_contrast_max: float = 85.0  # foreground p95-p5 below this (16-level: 5 steps) = too faint
    dry_fragments_max: float = 0.55  # share of skeleton pieces that are short breaks above this = dry
    min_minutiae: int = 12

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Limits:
        """Limits from a validated ``[quality_finger]`` section (keys not given keep defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: section[k] for k in section if k in names})


def check(f: Mapping[str, float], lim: Limits) -> list[str]:
    """Codes of every gate that fires, in `ORDER`; an empty list means no hard reject."""
    codes: set[str] = set()
    if f["fg_fraction"] < lim.no_finger_area or f["gray_std"] < lim.no_finger_std:
        return ["no_finger"]  # nothing else is meaningful without a finger
    if f["fg_fraction"] < lim.min_area:
        codes.add("press_flatter")
    if max(abs(f["fg_cx"] - 0.5), abs(f["fg_cy"] - 0.5)) > lim.max_centre_offset:
        codes.add("centre_finger")
    if f["fg_mean"] < lim.wet_mean_max and f["LCS_Bin10_Mean"] < lim.wet_lcs_max:
        codes.add("too_wet")
    blocks = max(f["blocks"], 1.0)
    low_ocl = sum(f[f"OCL_Bin10_{i}"] for i in range(2))  # OCL < 0.479
    if low_ocl / max(sum(f[f"OCL_Bin10_{i}"] for i in range(10)), 1.0) > lim.smear_blocks_min \
            and f["OCL_Bin10_Mean"] < lim.smear_ocl_max + 0.2:
        codes.add("clean_glass")
    del blocks
    frag_share = f["short_fragments"] / max(f["fragments"], 1.0)
    if f["fg_mean"] > lim.dry_mean_min or f["fg_contrast"] < lim.dry_contrast_max \
            or frag_share > lim.dry_fragments_max:
        codes.add("too_dry")
    if f["minutiae"] < lim.min_minutiae:
        codes.add("few_minutiae")
    return [c for c in ORDER if c in codes]
