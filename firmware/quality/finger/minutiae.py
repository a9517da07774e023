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


# Neighbour code: bit k-2 set when P_k is set, P2..P9 clockwise from north (Zhang-Suen naming).
_OFFSETS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
_KERNEL = np.zeros((3, 3), np.float32)  # applied to uint8 0/1 images
for _bit, (_dr, _dc) in enumerate(_OFFSETS):
    _KERNEL[_dr + 1, _dc + 1] = 1 << _bit


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 8-neighbour code: Zhang-Suen deletable in sub-iteration 1, in 2, and the crossing number."""
    codes = np.arange(256)
    p = [(codes >> k) & 1 for k in range(8)]  # p[0] = P2 ... p[7] = P9
    b = sum(p)
    a = sum(((p[k] == 0) & (p[(k + 1) % 8] == 1)).astype(int) for k in range(8))
    p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
    base = (b >= 2) & (b <= 6) & (a == 1)
    first = base & (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
    second = base & (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
    return first, second, a.astype(np.uint8)  # crossing number = number of 0->1 transitions


_DEL1, _DEL2, _CROSSING = _tables()
_LUT1, _LUT2 = _DEL1.astype(np.uint8), _DEL2.astype(np.uint8)


def _codes(img: np.ndarray) -> np.ndarray:
    """8-neighbour code of every pixel of a 0/1 uint8 image (weights sum to 255: no saturation)."""
    import cv2

    return cv2.filter2D(img, -1, _KERNEL, borderType=cv2.BORDER_CONSTANT)


#: Thinning switches from whole-image sub-iterations to the rows near the last deletions once a
#: sub-iteration deletes fewer pixels than this (see `thin`).
SPARSE_BELOW = 1500
_RUN_GAP = 6  # dirty row runs closer than this are processed as one slice


def _dirty_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) runs of True in `rows`, runs closer than _RUN_GAP merged."""
    idx = np.flatnonzero(rows)
    if idx.size == 0:
        return []
    cut = np.flatnonzero(np.diff(idx) > _RUN_GAP)
    starts = np.concatenate(([idx[0]], idx[cut + 1]))
    stops = np.concatenate((idx[cut], [idx[-1]])) + 1
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def thin(binary: np.ndarray, max_iter: int = 60) -> np.ndarray:
    """Zhang-Suen thinning of a boolean image.

    Each sub-iteration is one 3x3 filter (the 8-neighbour code) and a 256-entry lookup table over
    the image. Only the bounding box of the set pixels (plus a 1-px zero frame) is processed. Once
    few pixels go (the long tail: a handful per pass for a dozen passes), only the rows within one
    row of a pixel deleted in the last two sub-iterations are evaluated again: every other pixel
    has the same neighbourhood as when this sub-iteration's table last kept it, so it would be
    kept again. The result is the whole-image loop's, pixel for pixel."""
    import cv2

    out = np.zeros(binary.shape, bool)
    rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
    if rows.size == 0:
        return out
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    img = np.zeros((r1 - r0 + 2, c1 - c0 + 2), np.uint8)
    img[1:-1, 1:-1] = binary[r0:r1, c0:c1]
    height = img.shape[0]
    delete = np.empty_like(img)
    # Rows holding a deletion in each of the last two sub-iterations (None: not tracked).
    recent: list[np.ndarray | None] = [None, None]
    for _ in range(max_iter):
        changed = False
        for table in (_LUT1, _LUT2):
            if recent[0] is not None and recent[1] is not None:
                touched = recent[0] | recent[1]
                dirty = touched.copy()
                dirty[1:] |= touched[:-1]
                dirty[:-1] |= touched[1:]
                gone_rows = np.zeros(height, bool)
                pending = []
                for a, b in _dirty_runs(dirty):
                    g0, g1 = max(a - 1, 0), min(b + 1, height)  # one ghost row each side
                    code = _codes(img[g0:g1])[a - g0: b - g0]
                    d = cv2.bitwise_and(cv2.LUT(code, table), img[a:b])
                    if cv2.countNonZero(d):
                        pending.append((a, b, d))
                        gone_rows[a:b] = d.any(axis=1)
                for a, b, d in pending:  # all deletions of a sub-iteration at once
                    cv2.subtract(img[a:b], d, dst=img[a:b])
                n_gone = len(pending)
            else:
                cv2.bitwise_and(cv2.LUT(_codes(img), table), img, dst=delete)
                n_gone = cv2.countNonZero(delete)
                gone_rows = delete.any(axis=1) if n_gone < SPARSE_BELOW else None
                if n_gone:
                    cv2.subtract(img, delete, dst=img)
            recent = [recent[1], gone_rows]
            changed = changed or n_gone > 0
        if not changed:
            break
    out[r0:r1, c0:c1] = img[1:-1, 1:-1].view(bool)
    return out


def crossing_number(skel: np.ndarray) -> np.ndarray:
    """Crossing number of every pixel (1: ridge ending, 3: bifurcation on a skeleton pixel)."""
    return _CROSSING[_codes(skel.astype(np.uint8))]


def _filter_pairs(points: np.ndarray, min_dist: float) -> np.ndarray:
    """Drop every point that has another point closer than `min_dist` (both members go).

    Points are integer pixel positions, so squared distances are compared exactly in integers
    (sqrt(d2) >= m iff d2 >= m*m for an integer d2 and m = 10)."""
    if len(points) < 2:
        return np.ones(len(points), bool)
    p = points.astype(np.int32)
    dr = p[:, None, 0] - p[None, :, 0]
    dc = p[:, None, 1] - p[None, :, 1]
    d2 = dr * dr + dc * dc
    np.fill_diagonal(d2, np.iinfo(np.int32).max)
    return d2.min(axis=1) >= min_dist * min_dist


def extract(img: np.ndarray, mask: np.ndarray) -> Minutiae:
    """Minutiae of an 8-bit gray image within the foreground `mask`."""
    import cv2

    skel = thin(binarise(img, mask))
    # Skeleton pieces shorter than a ridge period are noise, not ridges: drop them first. Sizes
    # from a bincount of the labels on the skeleton (connectedComponentsWithStats also computes
    # bounding boxes and centroids, and costs several times more).
    nlab, lab = cv2.connectedComponents(skel.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    sizes = np.bincount(lab[skel], minlength=nlab)
    short = int((sizes[1:] < SHORT_FRAGMENT).sum())
    big = sizes >= SHORT_FRAGMENT
    big[0] = False
    skel = np.take(big, lab)
    m8 = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    inner = cv2.erode(m8, np.ones((2 * BORDER_MARGIN + 1,) * 2, np.uint8)).view(bool)
    # Crossing number only where it is used: skeleton pixels inside the margin, row-major order.
    idx = np.flatnonzero(skel & inner)
    cn = _CROSSING[_codes(skel.view(np.uint8)).ravel()[idx]]
    w = skel.shape[1]
    end, bif = idx[cn == 1], idx[cn == 3]
    pts = np.stack(np.divmod(np.concatenate([end, bif]), w), axis=1)
    kinds = np.concatenate([np.zeros(len(end), int), np.ones(len(bif), int)])
    keep = _filter_pairs(pts, PAIR_MIN_DIST)
    pts, kinds = pts[keep].astype(int), kinds[keep]
    return Minutiae(pts[kinds == 0], pts[kinds == 1], int(skel.sum()), int(nlab - 1), short)
