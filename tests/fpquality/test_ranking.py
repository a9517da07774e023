"""Ranking: for every corpus print, progressively degraded versions score strictly lower.

Ladders use steps that also lower NFIQ 2 (mild blur or faintness *raise* NFIQ 2 on 16-level
images, since they hide the quantisation steps, so they would not be a fair ladder). A score may
stay at 0 once the print is hard-rejected; otherwise each step must score strictly lower.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.fpquality import dataset, quality

LADDERS = {
    "wet": ("none", "wet:1.5", "wet:2.5", "wet:3.5"),
    "dry": ("none", "dry:1.5", "dry:2.5"),
    "blur": ("none", "blur:4", "blur:6"),
    "partial": ("none", "partial:0.45", "partial:0.3"),
    "faint": ("none", "faint:0.12", "faint:0.06"),
}


@pytest.mark.parametrize("ladder", sorted(LADDERS))
def test_degradation_ladder_scores_decrease(corpus_dir: Path, prints: list[str], ladder: str) -> None:
    for name in prints:
        scores = [quality.assess(dataset.Item(name, "x", s).image(corpus_dir)).score for s in LADDERS[ladder]]
        steps = LADDERS[ladder]
        for k in range(len(steps) - 1):
            a, b = scores[k], scores[k + 1]
            assert b < a or a == b == 0, f"{name}: {steps[k]} -> {steps[k + 1]} scored {a:.1f} -> {b:.1f} ({scores})"
        assert scores[-1] < scores[0] - 10, f"{name} {ladder}: {scores}"
