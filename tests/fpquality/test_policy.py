"""Capture policy for fingers: accept at the threshold, retake, keep the best with `forced`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from firmware import config
from firmware.quality.finger import dataset, policy, quality


def section(**over: object) -> dict[str, object]:
    return dict(config.defaults(quality_finger=over).quality_finger)


def test_good_print_is_accepted_at_once(sensor_prints: dict[str, np.ndarray]) -> None:
    cap = policy.FingerCapture(section(), quality.assess, "R2")
    q, out = cap.add(sensor_prints["nbisrs-p1_1.png"])
    assert q.score >= 40 and out.done and not out.forced
    rec = cap.record()
    assert rec["finger"] == "R2" and rec["kept"] == 0 and rec["forced"] is False
    assert rec["attempts"][0]["score"] == round(q.score, 2) and rec["attempts"][0]["codes"] == []
    assert cap.kept_image is sensor_prints["nbisrs-p1_1.png"]


def test_bad_impressions_are_retaken_then_the_best_is_forced(corpus_dir: Path) -> None:
    imgs = [dataset.Item("nbisrs-p2_1.png", "x", s).image(corpus_dir) for s in ("wet:3.5", "wet:1", "partial:0.3")]
    cap = policy.FingerCapture(section(threshold=60.0, max_attempts=3), quality.assess, "L1")
    outs = [cap.add(im)[1] for im in imgs]
    assert [o.done for o in outs] == [False, False, True]
    rec = cap.record()
    assert rec["forced"] is True and len(rec["attempts"]) == 3
    scores = [a["score"] for a in rec["attempts"]]
    assert [a["rejected"] for a in rec["attempts"]] == [True, False, True], rec
    assert rec["kept"] == 1 and scores[1] < 60, rec  # the one usable impression, below threshold: forced
    assert "too_wet" in rec["attempts"][0]["codes"] and "press_flatter" in rec["attempts"][2]["codes"]
    assert rec["attempts"][0]["messages"][0].startswith("Finger too wet")
    assert cap.kept_image is imgs[rec["kept"]]


def test_per_finger_threshold_override(sensor_prints: dict[str, np.ndarray]) -> None:
    sec = section(threshold=90.0, finger_thresholds={"L5": 20.0})
    assert policy.threshold_for(sec, "L5") == 20.0 and policy.threshold_for(sec, "R1") == 90.0
    img = sensor_prints["sourceafis-probe.png"]
    little = policy.FingerCapture(sec, quality.assess, "L5")
    thumb = policy.FingerCapture(sec, quality.assess, "R1")
    assert little.add(img)[1].done is True
    assert thumb.add(img)[1].done is False


def test_checker_from_config_applies_gate_limits() -> None:
    yy, xx = np.mgrid[0:288, 0:256]
    stripes = ((128 + 100 * np.cos(2 * np.pi * (xx + 0.15 * yy) / 9.0)).astype(np.uint8) >> 4) * 17
    strict = quality.checker_from_config(section())
    lax = quality.checker_from_config(section(min_minutiae=0))
    assert strict(stripes.astype(np.uint8)).codes == ["few_minutiae"]
    assert lax(stripes.astype(np.uint8)).codes == []
