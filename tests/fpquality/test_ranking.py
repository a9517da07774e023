"""Ranking: for every corpus print, progressively degraded versions score strictly lower.

Ladders use steps that also lower NFIQ 2 (mild blur or faintness *raise* NFIQ 2 on 16-level
images, since they hide the quantisation steps, and some prints shrug off mild wetness under
NFIQ 2 too, so those would not be fair ladders). "Lower" is the capture policy's order: a hard
reject ranks below any accepted impression, then by score. Once both steps are at the floor
(score < 10: unusable, where NFIQ 2 mostly gives exactly 0) the order among them is not meaningful.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.quality.finger import dataset, quality

FLOOR = 10.0


def key(q: quality.FingerQuality) -> float:
    """Policy order as one number: rejected impressions rank below every accepted one."""
    return q.score - (1000.0 if q.rejected else 0.0)

LADDERS = {
    "wet": ("none", "wet:2.5", "wet:3.5"),
    "dry": ("none", "dry:1.5", "dry:2.5"),
    "blur": ("none", "blur:4", "blur:6"),
    "partial": ("none", "partial:0.45", "partial:0.3"),
    "faint": ("none", "faint:0.12", "faint:0.06"),
}


@pytest.mark.parametrize("ladder", sorted(LADDERS))
def test_degradation_ladder_scores_decrease(corpus_dir: Path, prints: list[str], ladder: str) -> None:
    for name in prints:
        qs = [quality.assess(dataset.Item(name, "x", s).image(corpus_dir)) for s in LADDERS[ladder]]
        steps = LADDERS[ladder]
        trace = [(s, round(q.score, 1), q.rejected) for s, q in zip(steps, qs, strict=True)]
        for a, b in zip(qs, qs[1:], strict=False):
            assert key(b) < key(a) or (a.score < FLOOR and b.score < FLOOR), f"{name}: {trace}"
        assert qs[-1].rejected or qs[-1].score < qs[0].score - 10, f"{name}: {trace}"
