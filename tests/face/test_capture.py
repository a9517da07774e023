"""The retake loop with the real sim camera, and the ICAO portrait it stores."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware.quality.face.capture import capture_face
from firmware.quality.face.portrait import PortraitSpec, make_portrait
from hw.camera.sim import SimCamera

from .conftest import rotate


def _decode(jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def test_good_first_shot_is_accepted_at_once(assessor, faces_dir: Path) -> None:
    cam = SimCamera(faces_dir)
    cam.serve("facerec-biden2.jpg", "facerec-two_people.jpg")
    seen = []
    res = capture_face(cam, assessor, on_attempt=lambda i, a: seen.append((i, a.accepted)))
    assert seen == [(0, True)] and cam.pending() == 1
    assert not res.forced and res.summary["kept"] == 0 and len(res.summary["attempts"]) == 1
    assert res.full_frame_jpeg is None
    assert _decode(res.portrait_jpeg).shape == (531, 413, 3)


def test_retakes_until_acceptable(assessor, faces_dir: Path) -> None:
    cam = SimCamera(faces_dir)
    cam.serve("nbisrs-landscape.jpg", "facerec-two_people.jpg", "facerec-biden2.jpg")
    res = capture_face(cam, assessor, store_full_frame=True)
    att = res.summary["attempts"]
    assert [a["codes"] for a in att[:2]] == [["NO_FACE"], ["MULTIPLE_FACES"]]
    assert att[2]["accepted"] and res.summary["kept"] == 2 and not res.forced
    assert "measures" in att[2] and att[2]["measures"]["ied_px"] > 150
    assert _decode(res.full_frame_jpeg).shape == (1200, 1200, 3)


def test_after_the_last_shot_the_best_is_kept_as_forced(assessor, faces_dir: Path) -> None:
    cam = SimCamera(faces_dir)
    cam.serve("nbisrs-landscape.jpg", "facerec-obama.jpg", "facerec-obama-240p.jpg")
    res = capture_face(cam, assessor, max_attempts=3)
    assert res.forced and res.summary["forced"]
    # obama.jpg (only MOUTH_OPEN) beats the 240p copy (too small, blurred) and the landscape
    assert res.summary["kept"] == 1 and res.accepted.codes == ["MOUTH_OPEN"]
    assert res.summary["hints"] and res.summary["portrait"]["from_face"]
    assert cam.pending() == 0


def test_no_face_in_any_shot_still_returns_a_flagged_photo(assessor, faces_dir: Path) -> None:
    cam = SimCamera(faces_dir, files=["nbisrs-landscape.jpg"])
    res = capture_face(cam, assessor, max_attempts=2)
    assert res.forced and res.summary["portrait"]["from_face"] is False
    assert _decode(res.portrait_jpeg).shape == (531, 413, 3)


@pytest.mark.parametrize("angle", [0, 12])
def test_portrait_is_icao_proportioned_and_level(assessor, load, angle: float) -> None:
    img = rotate(load("facerec-biden2.jpg"), angle, (600, 500))
    a = assessor.assess(img)
    spec = PortraitSpec(413, 531, 0.75)
    portrait, filled = make_portrait(img, a.landmarks, spec)
    assert portrait.shape == (531, 413, 3) and 0 <= filled < 0.15
    p = assessor.assess(portrait).measures
    assert abs(p["roll_deg"] - assessor.assess(load("facerec-biden2.jpg")).measures["roll_deg"]) < 2.5
    # head (2 T) fills 75 % of the height; eyes 52.5 % up from the bottom; centred
    assert 2 * p["t_px"] / 531 == pytest.approx(0.75, abs=0.04)
    assert p["margin_above"] * p["t_px"] / 531 == pytest.approx(0.475, abs=0.03)
    assert p["centre_offset"] < 0.03


def test_portrait_spec_validation() -> None:
    with pytest.raises(ValueError, match="head_height_ratio"):
        PortraitSpec(413, 531, 1.5)
    with pytest.raises(ValueError, match=">= 16 px"):
        PortraitSpec(8, 531)


def test_camera_failure_mid_loop_propagates(assessor, faces_dir: Path, tmp_path: Path) -> None:
    from hw.camera import CameraError

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    cam = SimCamera(tmp_path, files=["broken.jpg"])
    cam.serve(faces_dir / "nbisrs-landscape.jpg")  # first shot fine (no face), second one fails
    seen: list[int] = []
    with pytest.raises(CameraError, match="cannot read image"):
        capture_face(cam, assessor, on_attempt=lambda i, a: seen.append(i))
    assert seen == [0] and cam.health()["errors"] == 1
