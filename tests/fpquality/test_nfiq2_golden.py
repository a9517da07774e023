"""Golden tests: our NFIQ 2 native measures against NIST's published outputs for SFinGe_Test01..05.

Tolerances, and why:
* Mu, MMB, OCL, LCS, OF: these use only integer arithmetic, means and centred differences, so they
  match to float rounding (|d| <= 1e-3 on means/std; histogram bins exact except LCS, where a
  value sitting on a bin limit may move one count: +-1).
* FDA and RVUP rotate each block with nearest-neighbour sampling; OpenCV's warpAffine rounds the
  sample positions in 1/1024 fixed point (and 4.13 differs from 5.0 on a few pixels per block),
  numpy rounds in floating point. A tie moves one pixel, which can move a block's value across a
  bin limit: means within 0.003 (FDA) / 0.005 (RVUP), std within 0.005, each bin within +-3, and
  the number of RVUP ratios within +-3 of NIST's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.capture import sensor_image
from firmware.quality.finger import nfiq2_features
from tests.fpquality.conftest import golden

TOL = {  # feature: (mean/std tolerance, per-bin tolerance)
    "OCL": (1e-3, 0), "LCS": (1e-3, 1), "OF": (1e-3, 0), "FDA": (3e-3, 3), "RVUP": (5e-3, 3),
}


@pytest.fixture(scope="module", params=[1, 2, 3, 4, 5], ids=lambda k: f"SFinGe_Test0{k}")
def case(request: pytest.FixtureRequest, corpus_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    k = request.param
    img = sensor_image.load_file(corpus_dir / "fingerprints" / f"nfiq2-SFinGe_Test0{k}.pgm")
    assert img.shape == (560, 416)  # full size, as NIST scored it
    return nfiq2_features.as_nist_names(nfiq2_features.compute(img)), golden(corpus_dir, k)


@pytest.mark.parametrize("feature", sorted(TOL))
def test_histogram_feature_matches_nist(case: tuple[dict[str, float], dict[str, float]], feature: str) -> None:
    ours, nist = case
    tol, bin_tol = TOL[feature]
    for stat in ("Mean", "StdDev"):
        key = f"{feature}_Bin10_{stat}"
        assert ours[key] == pytest.approx(nist[key], abs=tol), key
    for i in range(10):
        key = f"{feature}_Bin10_{i}"
        assert abs(ours[key] - nist[key]) <= bin_tol, f"{key}: ours {ours[key]}, NIST {nist[key]}"
    n_ours = sum(ours[f"{feature}_Bin10_{i}"] for i in range(10))
    n_nist = sum(nist[f"{feature}_Bin10_{i}"] for i in range(10))
    assert abs(n_ours - n_nist) <= bin_tol, f"{feature}: {n_ours} values, NIST {n_nist}"


def test_contrast_matches_nist(case: tuple[dict[str, float], dict[str, float]]) -> None:
    ours, nist = case
    # NIST prints 6 significant digits.
    assert ours["Mu"] == pytest.approx(nist["Mu"], abs=1e-3)
    assert ours["MMB"] == pytest.approx(nist["MMB"], abs=1e-3)


def test_near_white_frame_is_removed_like_nfiq2() -> None:
    import numpy as np

    img = np.full((100, 120), 255, np.uint8)
    img[10:60, 20:90] = 100
    out = nfiq2_features.crop_near_white_frame(img)
    assert out.shape == (50, 70)
    assert (out == 100).all()


def test_histogram_bin_rule_is_left_closed() -> None:
    # NFIQ 2: bin i counts limits[i-1] <= v < limits[i]; a value equal to a limit goes up.
    h = nfiq2_features.histogram_features(
        __import__("numpy").array([0.337, 0.336, 0.898, 0.9]), nfiq2_features.OCL_LIMITS)
    assert (h["bin0"], h["bin1"], h["bin9"]) == (1.0, 1.0, 2.0)
