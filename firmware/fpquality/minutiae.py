"""A small minutiae extractor: binarise, thin (Zhang-Suen), crossing number, then filter.

Not a matcher-grade extractor (the sensor module does its own matching); it only counts reliable
ridge endings and bifurcations so that a print with too few of them is retaken, and it reports
how broken the ridges are (short skeleton fragments), which is the mark of a dry finger.

Steps: 3x3 Gaussian smoothing (removes the 16-level staircase), local-mean binarisation
(ridges darker than the 15x15 mean), a majority filter, Zhang-Suen thinning vectorised in numpy
(opencv-python-headless has no ximgproc), crossing number on the 8-neighbour cycle, then drop
minutiae near the foreground border (false endings where the print stops) and pairs closer than
a ridge period (spurs, bridges, breaks: both members go).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BORDER_MARGIN = 12  # px kept free of minutiae inside the foreground edge (~1.5 ridge periods)
PAIR_MIN_DIST = 10.0  # px: two minutiae closer than this are an artefact pair (~1 ridge period)
SHORT_FRAGMENT = 12  # px: skeleton pieces shorter than this are ridge breaks / noise


@dataclass(frozen=True)
class Minutiae:
    """Filtered minutiae and skeleton statistics."""

    endings: np.ndarray  # (n, 2) int rows, cols
    bifurcations: np.ndarray  # (n, 2)
    skeleton_px: int
    fragments: int  # connected skeleton pieces
    short_fragments: int  # pieces shorter than SHORT_FRAGMENT px

    @property
    def count(self) -> int:
        return int(len(self.endings) + len(self.bifurcations))


def binarise(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Ridge pixels (True) inside `mask`: darker than the local 15x15 mean after smoothing."""
    import cv2

    f = cv2.GaussianBlur(img.astype(np.float32), (5, 5), 1.2)
    local = cv2.boxFilter(f, -1, (15, 15), borderType=cv2.BORDER_REFLECT)
    ridges = ((f < local) & mask).astype(np.float32)
    # Majority filter (5x5): removes specks and fills pinholes and one-pixel ridge breaks.
    return cv2.blur(ridges, (5, 5)) > 0.5


def _neighbours(p: np.ndarray) -> list[np.ndarray]:
    """P2..P9 (clockwise from north) of every interior pixel of a padded 0/1 array."""
    return [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]


def thin(binary: np.ndarray, max_iter: int = 60) -> np.ndarray:
    """Zhang-Suen thinning of a boolean image, vectorised (each sub-iteration is whole-image)."""
    img = np.pad(binary.astype(np.uint8), 1)
    for _ in range(max_iter):
        changed = False
        for step in (0, 1):
            n = _neighbours(img)
            c = img[1:-1, 1:-1]
            b = sum(n)
            seq = n + [n[0]]
            a = sum(((seq[i] == 0) & (seq[i + 1] == 1)).astype(np.uint8) for i in range(8))
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if step == 0:
                cond = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                cond = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            delete = (c == 1) & (b >= 2) & (b <= 6) & (a == 1) & cond
            if delete.any():
                c[delete] = 0
                changed = True
        if not changed:
            break
    return img[1:-1, 1:-1].astype(bool)


def _filter_pairs(points: np.ndarray, min_dist: float) -> np.ndarray:
    """Drop every point that has another point closer than `min_dist` (both members go)."""
    if len(points) < 2:
        return np.ones(len(points), bool)
    d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1) >= min_dist


def extract(img: np.ndarray, mask: np.ndarray) -> Minutiae:
    """Minutiae of an 8-bit gray image within the foreground `mask`."""
    import cv2

    skel = thin(binarise(img, mask))
    # Skeleton pieces shorter than a ridge period are noise, not ridges: drop them first.
    nlab, lab, stats, _ = cv2.connectedComponentsWithStats(skel.astype(np.uint8), connectivity=8)
    sizes = stats[:, cv2.CC_STAT_AREA]
    short = int((sizes[1:] < SHORT_FRAGMENT).sum())
    big = sizes >= SHORT_FRAGMENT
    big[0] = False
    skel = big[lab]
    p = np.pad(skel.astype(np.uint8), 1)
    n = _neighbours(p)
    seq = n + [n[0]]
    cn = sum(np.abs(seq[i].astype(np.int16) - seq[i + 1]) for i in range(8)) // 2
    inner = cv2.erode(mask.astype(np.uint8), np.ones((2 * BORDER_MARGIN + 1,) * 2, np.uint8)).astype(bool)
    end = skel & (cn == 1) & inner
    bif = skel & (cn == 3) & inner
    pts = np.concatenate([np.argwhere(end), np.argwhere(bif)]).astype(np.float64)
    kinds = np.concatenate([np.zeros(int(end.sum()), int), np.ones(int(bif.sum()), int)])
    keep = _filter_pairs(pts, PAIR_MIN_DIST)
    pts, kinds = pts[keep].astype(int), kinds[keep]
    return Minutiae(pts[kinds == 0], pts[kinds == 1], int(skel.sum()), int(nlab - 1), short)
