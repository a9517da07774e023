"""The faster face measures (issue #17) give exactly what the per-pixel definitions give.

`photometry` now works from masked histograms and `measure` converts to gray only the face box
that photometry and sharpness read; both must leave every value unchanged. Large frames are
detected on a pre-decimated copy (`detect.letterbox`); the detection must still find the face
where a full area resize finds it.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from firmware.quality.face import detect, measures

NAMES = ("facerec-biden2.jpg", "facerec-obama.jpg", "facerec-obama-1080p.jpg", "facerec-obama_partial_face.jpg")


def photometry_reference(gray: np.ndarray, mesh: np.ndarray, mid_a: np.ndarray, mid_b: np.ndarray):
    """Per-pixel definition: list the face pixels, split them by the midline, histogram each."""
    mask = measures.face_mask(gray.shape, mesh)
    ys, xs = np.nonzero(mask)
    if ys.size < 50:
        return 0.0, 1.0, 0.0, 0.0, 0.0, 0.0
    vals = gray[ys, xs]

    def hist(v: np.ndarray, bins: int = 256) -> np.ndarray:
        h = np.bincount(v.ravel(), minlength=256).astype(np.float64).reshape(bins, -1).sum(axis=1)
        return h / h.sum() if h.sum() else h

    h = hist(vals)
    nz = h[h > 0]
    d = mid_b - mid_a
    side = (xs - mid_a[0]) * d[1] - (ys - mid_a[1]) * d[0]
    left, right = vals[side > 0], vals[side <= 0]
    if left.size < 25 or right.size < 25:
        inter, ratio = 0.0, 0.0
    else:
        inter = float(np.minimum(hist(left, 32), hist(right, 32)).sum())
        ml, mr = float(left.mean()), float(right.mean())
        ratio = min(ml, mr) / max(ml, mr)
    return (float(vals.mean()) / 255.0, float((vals <= measures.DARK_LEVEL).mean()),
            float((vals >= measures.BRIGHT_LEVEL).mean()), float(-(nz * np.log2(nz)).sum()), inter, ratio)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("roll", [0.0, 12.0])
def test_photometry_and_face_gray_match_the_per_pixel_definition(assessor, load, name: str, roll: float) -> None:
    img = load(name)
    if roll:
        h, w = img.shape[:2]
        img = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), roll, 1.0), (w, h))
    r = assessor.assess(img)
    lm = r.landmarks
    assert lm is not None, r.codes
    full = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    top = lm.mesh[measures.MIDLINE_TOP, :2].mean(axis=0)
    bottom = lm.mesh[measures.MIDLINE_BOTTOM, :2].mean(axis=0)
    assert measures.photometry(full, lm.mesh, top, bottom) == photometry_reference(full, lm.mesh, top, bottom)
    r_eye, l_eye = measures.eye_centres(lm)
    part = measures.face_gray(img, lm.mesh, r_eye, l_eye)
    assert measures.photometry(part, lm.mesh, top, bottom) == measures.photometry(full, lm.mesh, top, bottom)
    assert measures.sharpness(part, r_eye, l_eye) == measures.sharpness(full, r_eye, l_eye)
    # The assessor's split: photometry from the mesh alone (run while the eyes are refined), then the gray of the
    # sharpness crop only; every measure equals the one-pass computation.
    photo = measures.mesh_photometry(img, lm.mesh)
    assert photo == measures.photometry(full, lm.mesh, top, bottom)
    sharp_only = measures.face_gray(img, lm.mesh, r_eye, l_eye, oval=False)
    assert measures.sharpness(sharp_only, r_eye, l_eye) == measures.sharpness(full, r_eye, l_eye)
    assert measures.measure(img, 1, r.detection, lm, photo) == measures.measure(img, 1, r.detection, lm)
    assert r.measures == measures.measure(img, 1, r.detection, lm).as_dict()


def test_large_frames_are_detected_on_a_downscaled_copy(assessor, load, monkeypatch) -> None:
    img = load("facerec-obama-1080p.jpg")
    assert max(img.shape[:2]) > detect.PREDECIMATE_ABOVE * 192  # the cheap path is the one taken
    fast, scale, px, py = detect.letterbox(img, 192)
    h, w = img.shape[:2]
    nw, nh, x0, y0 = round(w * scale), round(h * scale), int(px), int(py)
    area = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32)
    got = (fast[y0:y0 + nh, x0:x0 + nw][..., ::-1] + 1.0) * 127.5  # back to BGR 0-255
    assert np.abs(got - area).mean() < 2.0  # as smooth as a full area resize, not aliased
    quick = assessor.detector.detect(img)
    monkeypatch.setattr(detect, "PREDECIMATE_ABOVE", 10 ** 6)  # force the full area resize
    full = assessor.detector.detect(img)
    assert len(quick) == len(full) == 1
    width = full[0].width
    assert np.abs(np.subtract(quick[0].box, full[0].box)).max() < 0.03 * width
    assert np.abs(quick[0].keypoints - full[0].keypoints).max() < 0.03 * width


def test_area_window_equals_opencvs_area_resize() -> None:
    # sharpness computes only the window of the area downscale that its crop reads (issue #17): every pixel of it
    # must be OpenCV's own (same weights, float32 sums in the same order, same rounding), at any scale and window
    rng = np.random.default_rng(17)
    for trial in range(60):
        sh, sw = (int(v) for v in rng.integers(20, 400, 2))
        img = rng.integers(0, 256, (sh, sw), dtype=np.uint8)
        if trial % 2:  # smooth content too (ties in the rounding are likelier)
            img = cv2.GaussianBlur(img, (0, 0), 3)
        k = float(rng.uniform(0.15, 0.999))
        ref = cv2.resize(img, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
        dh, dw = ref.shape
        x0, y0 = int(rng.integers(-3, max(1, dw // 2))), int(rng.integers(-3, max(1, dh // 2)))
        want = (x0, y0, x0 + int(rng.integers(1, dw + 5)), y0 + int(rng.integers(1, dh + 5)))
        got, origin = measures.area_window(img, k, want)
        assert origin == (max(0, want[0]), max(0, want[1]))
        assert np.array_equal(got, ref[origin[1]:want[3], origin[0]:want[2]]), (sh, sw, k, want)


def test_sharpness_reads_only_its_box() -> None:
    # face_gray converts only `sharpness_reads` (plus the oval): whatever the frame holds outside that box must not
    # change the sharpness, at any eye distance (below and above the normalised one), roll and frame edge
    rng = np.random.default_rng(5)
    img = cv2.GaussianBlur(rng.integers(0, 256, (700, 900), dtype=np.uint8), (0, 0), 1.2)
    for _ in range(80):
        ied = float(rng.uniform(20, 260))
        roll = float(rng.uniform(-0.6, 0.6))
        mid = np.array([rng.uniform(-50, 950), rng.uniform(-50, 750)])
        d = np.array([np.cos(roll), np.sin(roll)]) * ied / 2
        r_eye, l_eye = mid - d, mid + d
        x0, y0, x1, y1 = measures.sharpness_reads(img.shape, r_eye, l_eye)
        # noise outside the box, not zeros: face_gray leaves it as allocated (np.empty), and a pixel read with
        # some weight would change the result with noise where with zeros it might not
        part = rng.integers(0, 256, img.shape, dtype=np.uint8)
        part[y0:y1, x0:x1] = img[y0:y1, x0:x1]
        assert measures.sharpness(part, r_eye, l_eye) == measures.sharpness(img, r_eye, l_eye), (ied, roll, mid)


def test_photometry_halves_match_the_per_pixel_split_on_any_midline() -> None:
    # photometry tests only the band of columns the midline crosses pixel by pixel (issue #17); the halves must
    # be the per-pixel ones for any slant, either direction, a horizontal or vertical midline, and a midline
    # that misses the face
    rng = np.random.default_rng(29)
    gray = cv2.GaussianBlur(rng.integers(0, 256, (300, 400), dtype=np.uint8), (0, 0), 1.5)
    t = np.linspace(0, 2 * np.pi, len(measures.FACE_OVAL), endpoint=False)
    for trial in range(40):
        mesh = np.zeros((468, 3))
        cx, cy, rx, ry, a = (rng.uniform(120, 280), rng.uniform(90, 210), rng.uniform(30, 110), rng.uniform(30, 90),
                             rng.uniform(-0.5, 0.5))
        x, y = rx * np.cos(t), ry * np.sin(t)
        mesh[measures.FACE_OVAL, 0] = cx + x * np.cos(a) - y * np.sin(a)
        mesh[measures.FACE_OVAL, 1] = cy + x * np.sin(a) + y * np.cos(a)
        mid_a = np.array([cx, cy]) + rng.uniform(-60, 60, 2) * (trial % 4 != 3) + 200 * (trial % 8 == 7)
        angle = [np.pi / 2, -np.pi / 2, 0.0, np.pi][trial % 4] if trial < 8 else rng.uniform(-np.pi, np.pi)
        mid_b = mid_a + 100 * np.array([np.cos(angle), np.sin(angle)])
        assert measures.photometry(gray, mesh, mid_a, mid_b) == photometry_reference(gray, mesh, mid_a, mid_b), trial


@pytest.mark.parametrize("size", [(1920, 1080), (2880, 1620), (5760, 3240), (2000, 1125)])
def test_letterbox_of_a_large_frame_is_the_bilinear_predecimation(size: tuple[int, int]) -> None:
    # at an odd whole ratio (1920x1080 -> 384x216) the pre-decimation picks pixels (nearest-exact, issue #17);
    # the tensor must be the one the bilinear resize gives, at odd ratios and at the others
    rng = np.random.default_rng(3)
    w, h = size
    img = cv2.resize(cv2.GaussianBlur(rng.integers(0, 256, (270, 480, 3), dtype=np.uint8), (0, 0), 1.0), (w, h))
    img[::7] ^= 0x5A  # row and column detail a wrong sampling phase would show
    img[:, ::5] ^= 0x33
    tensor, scale, px, py = detect.letterbox(img, 192)
    nw, nh = round(w * scale), round(h * scale)
    half = cv2.resize(img, (2 * nw, 2 * nh), interpolation=cv2.INTER_LINEAR)
    small = cv2.resize(half, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((192, 192, 3), np.uint8)
    canvas[int(py):int(py) + nh, int(px):int(px) + nw] = small
    ref = np.multiply(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB), np.float32(2.0 / 255.0), dtype=np.float32) - 1
    assert np.array_equal(tensor, ref)
