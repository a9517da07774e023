"""The vectorised fast paths give exactly what the straightforward definitions give.

Thinning (bounding box, in-place OpenCV ops), the minutiae pair filter (integer distances), the
rotated block crops (one gather, no padded copy) and RVUP (vectorised over blocks) were rewritten
for speed (issue #17); the committed model depends on every bit of these features, so each is
compared with a plain reference implementation written here from the definition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from firmware.quality.finger import dataset, foreground, minutiae, nfiq2_features

SPECS = ("none", "wet:2", "dry:1.5", "partial:0.4", "rotate:25", "blur:3", "shift:100,0", "faint:0.1")


def thin_reference(binary: np.ndarray, max_iter: int = 60) -> np.ndarray:
    """Zhang-Suen over the whole image, one neighbour code per pixel per sub-iteration."""
    img = np.pad(binary.astype(np.uint8), 1)
    for _ in range(max_iter):
        changed = False
        for table in (minutiae._DEL1, minutiae._DEL2):
            code = np.zeros(img.shape, np.int64)
            for bit, (dr, dc) in enumerate(minutiae._OFFSETS):
                code += np.roll(img, (-dr, -dc), axis=(0, 1)).astype(np.int64) << bit
            delete = table[code] & (img == 1)
            if delete.any():
                img[delete] = 0
                changed = True
        if not changed:
            break
    return img[1:-1, 1:-1].astype(bool)


def pairs_reference(points: np.ndarray, min_dist: float) -> np.ndarray:
    keep = np.ones(len(points), bool)
    for i in range(len(points)):
        for j in range(len(points)):
            if i != j and np.hypot(*(points[i] - points[j]).astype(float)) < min_dist:
                keep[i] = False
    return keep


def rvup_reference(ridval: np.ndarray) -> np.ndarray:
    """NFIQ 2 `rvuhist`, block by block as the reference loops."""
    res: list[float] = []
    for rv in ridval.astype(np.int64):
        n = rv.size
        change = rv[: n - 1] != np.concatenate(([rv[n - 1]], rv[: n - 2]))
        ci = np.flatnonzero(change[1:])
        if ci.size == 0 or rv[ci[0] + 1: ci[-1]].size == 0:
            continue
        begrid = int(rv[ci[0] + 1])
        cic = ci[1:] - ci[0]
        if cic.size <= 1:
            continue
        widths = (cic[1:] - cic[:-1])[::-1].astype(np.float64)
        ratios = widths[:-1] / widths[1:]
        ratios[begrid::2] = 1.0 / ratios[begrid::2]
        res.extend(ratios.tolist())
    return np.asarray(res)


def rotated_crop_reference(src: np.ndarray, angles: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    out = []
    ss = src.shape[1]
    ctr = ss / 2.0
    ys, xs = np.mgrid[rows, cols]
    for win, a in zip(src, angles, strict=True):
        sx = np.floor(np.cos(a) * (xs - ctr) - np.sin(a) * (ys - ctr) + ctr + 0.5).astype(int)
        sy = np.floor(np.sin(a) * (xs - ctr) + np.cos(a) * (ys - ctr) + ctr + 0.5).astype(int)
        inside = (sx >= 0) & (sx < ss) & (sy >= 0) & (sy < ss)
        out.append(np.where(inside, win[np.clip(sy, 0, ss - 1), np.clip(sx, 0, ss - 1)], 0.0))
    return np.asarray(out, np.float64)


@pytest.mark.parametrize("spec", SPECS)
def test_thinning_and_minutiae_match_the_reference(corpus_dir: Path, prints: list[str], spec: str) -> None:
    img = dataset.Item(prints[0], "x", spec).image(corpus_dir)
    mask = foreground.segment(img).mask
    binary = minutiae.binarise(img, mask)
    assert np.array_equal(minutiae.thin(binary), thin_reference(binary))
    m = minutiae.extract(img, mask)
    pts = np.concatenate([m.endings, m.bifurcations]).reshape(-1, 2)
    assert len(pts) == m.count and (len(pts) == 0 or minutiae.thin(binary)[pts[:, 0], pts[:, 1]].all())


def test_thinning_of_blank_and_full_images() -> None:
    assert not minutiae.thin(np.zeros((40, 30), bool)).any()
    full = np.ones((40, 30), bool)
    assert np.array_equal(minutiae.thin(full), thin_reference(full))


def test_pair_filter_matches_the_reference() -> None:
    r = np.random.default_rng(3)
    for n in (0, 1, 2, 40, 150):
        pts = r.integers(0, 120, size=(n, 2))
        pts[: n // 4] = pts[n // 4: 2 * (n // 4)] + r.integers(-10, 11, size=(n // 4, 2))  # near pairs, exact 10s
        assert np.array_equal(minutiae._filter_pairs(pts, 10.0), pairs_reference(pts, 10.0))


def test_rvup_and_rotated_crops_match_the_reference() -> None:
    r = np.random.default_rng(5)
    for length in (3, 4, 5, 8, 32):
        for p in (0.05, 0.3, 0.6):
            ridval = np.cumsum(r.random((200, length)) < p, axis=1) % 2 == 1
            fast, ref = nfiq2_features.rvup_values(ridval), rvup_reference(ridval)
            assert fast.shape == ref.shape and np.array_equal(fast, ref), (length, p)
    for side, rows, cols in ((36, slice(10, 26), slice(2, 34)), (40, slice(2, 34), slice(10, 26))):
        src = r.random((30, side, side))
        angles = r.uniform(-np.pi, np.pi, 30)
        assert np.array_equal(nfiq2_features._rotated_crop(src, angles, rows, cols),
                              rotated_crop_reference(src, angles, rows, cols))
