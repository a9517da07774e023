"""BlazeFace post-processing and the corpus face counts."""

from __future__ import annotations

import numpy as np
import pytest

from firmware.quality.face.detect import FaceDetector, ssd_anchors, weighted_nms


def test_anchor_grids_match_the_models() -> None:
    assert ssd_anchors(192, [(4, 1)]).shape == (2304, 2)
    short = ssd_anchors(128, [(8, 2), (16, 6)])
    assert short.shape == (896, 2)
    assert np.allclose(short[0], [0.5 / 16, 0.5 / 16]) and np.allclose(short[1], short[0])
    assert np.allclose(short[2], [1.5 / 16, 0.5 / 16])  # x varies fastest


def test_weighted_nms_merges_overlaps_and_keeps_separate_faces() -> None:
    def row(x0: float, y0: float, x1: float, y1: float, kx: float) -> list[float]:
        return [x0, y0, x1, y1] + [kx, 0.0] * 6
    data = np.array([row(0, 0, 10, 10, 2), row(1, 0, 11, 10, 4), row(50, 50, 60, 60, 55)], np.float32)
    scores = np.array([0.9, 0.6, 0.8], np.float32)
    out = weighted_nms(data, scores)
    assert [round(s, 2) for _, s in out] == [0.9, 0.8]
    merged = out[0][0]
    assert merged[0] == pytest.approx((0 * 0.9 + 1 * 0.6) / 1.5)  # score-weighted mean
    assert merged[4] == pytest.approx((2 * 0.9 + 4 * 0.6) / 1.5)


@pytest.mark.parametrize("name,count", [
    ("facerec-two_people.jpg", 2), ("nbisrs-landscape.jpg", 0), ("facerec-obama.jpg", 1),
    ("facerec-biden2.jpg", 1), ("facerec-obama-240p.jpg", 1), ("facerec-32bit.png", 1),
])
def test_corpus_face_counts(assessor, load, name: str, count: int) -> None:
    assert len(assessor.detector.detect(load(name))) == count


def test_detection_box_and_eyes_land_on_the_face(assessor, load) -> None:
    # obama_partial_face2 = columns 0-550 of obama.jpg: same face, same pixel coordinates.
    full = assessor.detector.detect(load("facerec-obama.jpg"))[0]
    part = assessor.detector.detect(load("facerec-obama_partial_face2.jpg"))[0]
    assert np.abs(np.array(full.box) - np.array(part.box)).max() < 12
    assert full.keypoints[0, 0] < full.keypoints[1, 0]  # keypoint 0 is the image-left eye


def test_short_range_variant_also_finds_a_close_face(load) -> None:
    det = FaceDetector("short")
    faces = det.detect(load("facerec-biden2.jpg"))
    assert len(faces) == 1 and faces[0].width > 300
    with pytest.raises(ValueError, match="detector variant"):
        FaceDetector("medium")
