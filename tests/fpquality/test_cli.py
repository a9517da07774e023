"""`rekam quality finger` run as a real command on real files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from tests.support import rekam

EN = {"REKAM_LANG": "en"}  # these checks read the English text (the kit speaks Indonesian by default)


def test_text_output_for_corpus_and_sensor_files(corpus_dir: Path, tmp_path: Path) -> None:
    sensor_png = tmp_path / "capture.png"
    cv2.imwrite(str(sensor_png), np.full((288, 256), 255, np.uint8))
    r = rekam("quality", "finger", str(corpus_dir / "fingerprints" / "nbisrs-p1_1.png"), str(sensor_png), env=EN)
    assert r.returncode == 1, r.stderr  # one of them is rejected
    lines = r.stdout.splitlines()
    assert "score" in lines[0] and "converted to 256x288" in lines[0] and "OCL_Bin10_Mean=" in r.stdout
    assert any("no_finger: No finger on the sensor" in ln for ln in lines)
    assert "REJECT" in r.stdout


def test_json_output(corpus_dir: Path) -> None:
    r = rekam("quality", "finger", "--json", str(corpus_dir / "fingerprints" / "sourceafis-probe.png"))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert 0 <= d["score"] <= 100 and d["codes"] == [] and d["converted_to_sensor_format"] is True
    assert d["features"]["minutiae"] >= 12 and "LCS_Bin10_Mean" in d["features"]


def test_unreadable_file_fails_with_a_message(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    r = rekam("quality", "finger", str(bad), env=EN)
    assert r.returncode == 2
    assert "not an image" in r.stderr and str(bad) in r.stderr
