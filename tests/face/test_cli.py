"""`rekam quality face` and `rekam camera capture` through the real CLI entry point."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from firmware.cli.main import main
from firmware.system import i18n


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.delenv("REKAM_CONFIG", raising=False)
    monkeypatch.setenv("REKAM_LANG", "en")  # these checks read the English text (Indonesian is the default)
    monkeypatch.setattr("firmware.config.DEFAULT_PATH", tmp_path / "absent.toml")
    yield
    i18n.set_language(i18n.DEFAULT_LANGUAGE)  # main() set the process's language: leave the default behind


def test_quality_face_json_and_exit_status(faces_dir: Path, capsys) -> None:
    files = [str(faces_dir / "facerec-biden2.jpg"), str(faces_dir / "facerec-two_people.jpg")]
    assert main(["quality", "face", "--json", *files]) == 1  # one rejected
    out = json.loads(capsys.readouterr().out)
    assert [r["accepted"] for r in out] == [True, False]
    assert out[1]["codes"] == ["MULTIPLE_FACES"] and out[0]["measures"]["ied_px"] > 150
    assert main(["quality", "face", files[0]]) == 0
    text = capsys.readouterr().out
    assert "ACCEPT" in text and "ied=" in text


def test_quality_face_unreadable_file_is_named(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    assert main(["quality", "face", str(bad), str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg: not an image" in err and "missing.png: no such file" in err


def test_quality_face_uses_config_thresholds(tmp_path: Path, faces_dir: Path, capsys) -> None:
    cfg = tmp_path / "rekam.toml"
    cfg.write_text("[quality_face]\nied_min_px = 500.0\nied_warn_px = 600.0\n")
    assert main(["--config", str(cfg), "quality", "face", "--json", str(faces_dir / "facerec-biden2.jpg")]) == 1
    assert "FACE_TOO_SMALL" in json.loads(capsys.readouterr().out)[0]["codes"]
    cfg.write_text("[quality_face]\nroll_max_deg = -1.0\n")
    assert main(["--config", str(cfg), "quality", "face", str(faces_dir / "facerec-biden2.jpg")]) == 78
    assert "quality_face.roll_max_deg = -1.0" in capsys.readouterr().err
    cfg.write_text("[quality_face]\nied_min_px = 100.0\nied_warn_px = 90.0\n")
    assert main(["--config", str(cfg), "quality", "face", str(faces_dir / "facerec-biden2.jpg")]) == 78
    assert "ied_warn_px = 90.0: must be >= ied_min_px" in capsys.readouterr().err


def test_camera_capture_frame_and_portrait(tmp_path: Path, faces_dir: Path, capsys) -> None:
    out = tmp_path / "frame.jpg"
    assert main(["camera", "capture", "--backend", "sim", "--sim-folder", str(faces_dir), "--out", str(out)]) == 0
    assert cv2.imread(str(out)).shape == (1200, 1200, 3)
    capsys.readouterr()
    portrait = tmp_path / "portrait.jpg"
    assert main(["camera", "capture", "--backend", "sim", "--sim-folder", str(faces_dir), "--portrait",
                 "--json", "--out", str(portrait)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["forced"] is False and res["camera"]["backend"] == "sim"
    assert cv2.imread(str(portrait)).shape == (531, 413, 3)


def test_camera_capture_reports_a_missing_camera(tmp_path: Path, capsys) -> None:
    assert main(["camera", "capture", "--backend", "sim", "--sim-folder", str(tmp_path / "x"),
                 "--out", str(tmp_path / "o.jpg")]) == 1
    assert "folder not found" in capsys.readouterr().err
