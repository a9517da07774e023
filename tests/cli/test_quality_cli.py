"""`rekam quality finger`: the kit's own verdict (threshold included), its exit status, and reasons that name
what is wrong with a blurred or a partial print (real command, real corpus images and real degradations)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from firmware.quality.finger import degrade
from tests.support import rekam

EN = {"REKAM_LANG": "en"}  # checks that read the English text (the kit speaks Indonesian by default)


def _degraded(corpus_dir: Path, tmp_path: Path, spec: str, name: str = "nbisrs-p1_1.png") -> Path:
    g = cv2.imread(str(corpus_dir / "fingerprints" / name), cv2.IMREAD_GRAYSCALE)
    out = tmp_path / f"{spec.replace(':', '_')}.png"
    cv2.imwrite(str(out), degrade.apply(g, spec))
    return out


def test_below_threshold_is_a_retake_and_fails(corpus_dir: Path, tmp_path: Path) -> None:
    good = corpus_dir / "fingerprints" / "nbisrs-p1_1.png"
    r = rekam("quality", "finger", "--json", str(good))
    score = json.loads(r.stdout)["score"]
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "ACCEPT", r.stdout
    # The same image against a config whose threshold is above its score: the kit would retake it.
    cfg = tmp_path / "rekam.toml"
    cfg.write_text(f"[quality_finger]\nthreshold = {min(100, int(score) + 3)}\n")
    r = rekam("quality", "finger", str(good), cfg=cfg, env=EN)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"RETAKE score {score:.0f} (below the threshold {min(100, int(score) + 3)}" in r.stdout, r.stdout
    assert "ok" not in r.stdout.split("(")[1].split(";")[0]


def test_reject_exits_non_zero_and_names_blur_and_partial_contact(corpus_dir: Path, tmp_path: Path) -> None:
    blurred = _degraded(corpus_dir, tmp_path, "blur:8")
    partial = _degraded(corpus_dir, tmp_path, "partial:0.25")
    r = rekam("quality", "finger", "--json", str(blurred), str(partial))
    assert r.returncode == 1, r.stdout + r.stderr
    b, p = json.loads(r.stdout)
    assert b["verdict"] == "REJECT" and b["codes"] == ["blurred"], b["codes"]
    assert p["verdict"] == "REJECT" and p["codes"][0] == "press_flatter", p["codes"]
    r = rekam("quality", "finger", str(blurred), env=EN)
    assert r.returncode == 1 and "REJECT" in r.stdout and "blurred" in r.stdout.lower()
    assert "No finger on the sensor" not in r.stdout
