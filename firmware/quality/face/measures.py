"""Raw geometric and photometric face measures (OFIQ / ISO/IEC 29794-5 definitions where they exist).

All functions take frame pixels and landmarks from `landmarks.FaceLandmarks`; none applies a
threshold (that is `assess.py`'s job). Names follow OFIQ: T is the distance from the eye
midpoint to the chin (mesh 152), IED the distance between the eye centres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

from firmware.quality.face.detect import Detection
from firmware.quality.face.landmarks import FaceLandmarks

CHIN = 152
FOREHEAD = 10
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14
# Face oval of the canonical mesh (MediaPipe FACEMESH_FACE_OVAL), in order around the face.
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
# Symmetric (subject-right, subject-left) mesh pairs that define the head's left-right axis:
# outer and inner eye corners, mouth corners, cheek contour at eye level, jaw angle.
SYMMETRIC_PAIRS = [(33, 263), (133, 362), (61, 291), (234, 454), (172, 397), (70, 300)]
_PAIR_A, _PAIR_B = [a for a, _ in SYMMETRIC_PAIRS], [b for _, b in SYMMETRIC_PAIRS]
# Midline points, forehead to chin, that define the head's vertical axis.
MIDLINE_TOP, MIDLINE_BOTTOM = [10, 151, 9, 8, 168], [0, 17, 18, 200, 199, 175, 152]
SHARPNESS_IED = 64.0  # face crop rescaled so the eyes are this far apart before the Laplacian
SHARPNESS_READ = 1.8  # IED: the crop's corners lie within hypot(0.9, 1.4) = 1.66 IED of the eye midpoint
DARK_LEVEL, BRIGHT_LEVEL = 10, 245  # 8-bit luminance counted as clipped (about 4 % from each end)


@dataclass
class FaceMeasures:
    """Raw values for one face; see docs/face-quality.md for each definition."""

    faces: int
    face_score: float
    ied_px: float
    t_px: float
    head_size: float  # T / image height (OFIQ HeadSize raw)
    margin_left: float  # image-left eye x / IED (OFIQ LeftwardCrop)
    margin_right: float  # (W - image-right eye x) / IED (OFIQ RightwardCrop)
    margin_above: float  # eye-midpoint y / T (OFIQ MarginAbove)
    margin_below: float  # (H - eye-midpoint y) / T (OFIQ MarginBelow)
    centre_offset: float  # |eye-midpoint x - W/2| / W
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    eye_open_right: float  # max lid opening / eye width (corner to corner)
    eye_open_left: float
    eye_open_ofiq: float  # min over both eyes of max lid opening / T (OFIQ EyesOpen raw)
    mouth_open: float  # inner-lip gap / T (OFIQ MouthClosed raw)
    luminance_mean: float  # 0-1, face region
    dark_fraction: float  # share of face pixels <= DARK_LEVEL
    bright_fraction: float  # share of face pixels >= BRIGHT_LEVEL
    dynamic_range_bits: float  # entropy of the face luminance histogram
    illumination_balance: float  # histogram intersection of left and right face halves (OFIQ raw)
    left_right_ratio: float  # darker half mean / brighter half mean
    sharpness: float  # min over x/y of var(2nd derivative) / var(luminance) at SHARPNESS_IED
    sharpness_isotropic: float  # var(Laplacian) / var(luminance) at SHARPNESS_IED (reported only)

    def as_dict(self) -> dict[str, float]:
        # Flat dataclass of numbers: a field loop gives what asdict() gives, without its deep copy.
        return {f.name: (round(v, 4) if isinstance(v := getattr(self, f.name), float) else v)
                for f in fields(self)}


def eye_centres(lm: FaceLandmarks) -> tuple[np.ndarray, np.ndarray]:
    """(subject-right, subject-left) eye centres: iris centres when refined, else contour means."""
    if lm.right_iris is not None and lm.left_iris is not None:
        return lm.right_iris[0].astype(np.float64), lm.left_iris[0].astype(np.float64)
    return lm.eye_contour("right").mean(axis=0), lm.eye_contour("left").mean(axis=0)


def head_pose(mesh: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the 3D mesh (x right, y down, z away from the camera).

    The head's left-right axis is the mean of symmetric landmark pairs, its vertical axis the
    forehead-to-chin midline made orthogonal to it. Yaw > 0: the subject's left cheek turns away
    (face turns to the image left); pitch > 0: chin towards the chest; roll > 0: the eye line
    goes down to the image right. FaceMesh z is scaled like x (weak perspective).
    """
    p = mesh.astype(np.float64)
    xa = (p[_PAIR_B] - p[_PAIR_A]).sum(axis=0)  # rows added in order, as sum() over the pairs did
    xa /= np.linalg.norm(xa)
    ya = p[MIDLINE_BOTTOM].mean(axis=0) - p[MIDLINE_TOP].mean(axis=0)
    ya -= xa * float(ya @ xa)
    ya /= np.linalg.norm(ya)
    yaw = math.degrees(math.atan2(xa[2], math.hypot(xa[0], xa[1])))
    roll = math.degrees(math.atan2(xa[1], xa[0]))
    pitch = math.degrees(math.atan2(ya[2], math.hypot(ya[0], ya[1])))
    return yaw, pitch, roll


def eye_opening(contour: np.ndarray) -> tuple[float, float]:
    """(max lid opening px, eye width px) of a 16-point contour (lower 0-8, upper 9-15)."""
    a, b = contour[0], contour[8]
    width = float(np.linalg.norm(b - a))
    if width <= 0:
        return 0.0, 0.0
    normal = np.array([-(b - a)[1], (b - a)[0]]) / width  # perpendicular to the eye axis
    gaps = (contour[1:8] - contour[9:16]) @ normal  # lower lid minus upper lid, column by column
    return float(max(0.0, np.abs(gaps).max())), width


def face_mask(shape: tuple[int, ...], mesh: np.ndarray) -> np.ndarray:
    """uint8 mask (255 inside) of the face oval polygon."""
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(mesh[FACE_OVAL, :2]).astype(np.int32)], 255)
    return mask


def photometry(gray: np.ndarray, mesh: np.ndarray, mid_a: np.ndarray, mid_b: np.ndarray
               ) -> tuple[float, float, float, float, float, float]:
    """(mean, dark, bright, entropy bits, left/right histogram intersection, left/right mean ratio).

    The face region is the mesh's face oval; the two halves are split by the line through the
    midline points `mid_a` (forehead) and `mid_b` (chin), so roll does not mix them.
    """
    # work inside the face's bounding box only: a full-HD mask costs more than the rest together
    h, w = gray.shape[:2]
    oval = mesh[FACE_OVAL, :2]
    x0, y0, x1, y1 = _oval_box(oval, w, h)
    shift = np.array([x0, y0, 0.0])
    region = np.ascontiguousarray(gray[y0:y1, x0:x1])
    mask = face_mask(region.shape, mesh - shift)
    mid_a, mid_b = mid_a - shift[:2], mid_b - shift[:2]
    # Histograms with the mask (no list of face pixels): every figure below is a function of
    # the integer counts, so they equal the per-pixel computation exactly.
    d = mid_b - mid_a
    # Pixel (x, y) is on the left when (x - a0) d1 - (y - a1) d0 > 0, i.e. when the first
    # product exceeds the second (IEEE subtraction is > 0 exactly when a > b): one row of x
    # terms against one column of y terms instead of a value per pixel.
    xs = (np.arange(region.shape[1]) - mid_a[0]) * d[1]
    ys = (np.arange(region.shape[0]) - mid_a[1]) * d[0]
    # A column whose x term beats every row's y term is left on every row, one that none beats is right on
    # every row; xs is linear in x, so each is a run of columns at one end, and only the band between them (where
    # the midline crosses) takes the per-pixel test: the two halves cost one pass over the region, not three.
    all_left, all_right = xs > ys.max(), xs <= ys.min()
    (l0, l1), (r0, r1), (b0, b1) = _run(all_left), _run(all_right), _run(~(all_left | all_right))
    left, right = _hist(region, mask, l0, l1), _hist(region, mask, r0, r1)
    if b1 > b0:
        band_left = (xs[None, b0:b1] > ys[:, None]).view(np.uint8) & mask[:, b0:b1]  # nonzero = left face pixel
        band = _hist(region, mask, b0, b1)
        in_left = _hist(region[:, b0:b1], band_left, 0, b1 - b0)
        left, right = left + in_left, right + (band - in_left)
    counts = left + right
    n = counts.sum()
    if n < 50:
        return 0.0, 1.0, 0.0, 0.0, 0.0, 0.0
    levels = np.arange(256, dtype=np.float64)
    h256 = counts / n
    nz = h256[h256 > 0]
    entropy = float(-(nz * np.log2(nz)).sum())
    n_l, n_r = left.sum(), right.sum()
    if n_l < 25 or n_r < 25:
        inter, ratio = 0.0, 0.0
    else:
        # 32 bins: OFIQ's 256-bin intersection is dominated by sensor noise on small faces
        inter = float(np.minimum(_bins32(left), _bins32(right)).sum())
        ml, mr = float((left * levels).sum() / n_l), float((right * levels).sum() / n_r)
        ratio = min(ml, mr) / max(ml, mr) if max(ml, mr) > 0 else 0.0
    return (float((counts * levels).sum() / n) / 255.0, float(counts[:DARK_LEVEL + 1].sum() / n),
            float(counts[BRIGHT_LEVEL:].sum() / n), entropy, inter, ratio)


def _run(cols: np.ndarray) -> tuple[int, int]:
    """(first, last + 1) of the True entries of `cols` (a run), (0, 0) if none."""
    idx = np.flatnonzero(cols)
    return (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)


def _hist(region: np.ndarray, mask: np.ndarray, c0: int, c1: int) -> np.ndarray:
    """256-level counts (float64) of the masked pixels in columns c0..c1-1 of `region`."""
    if c1 <= c0:
        return np.zeros(256)
    return cv2.calcHist([region[:, c0:c1]], [0], mask[:, c0:c1], [256], [0, 256]).ravel().astype(np.float64)


def _bins32(counts: np.ndarray) -> np.ndarray:
    """256 gray-level counts -> normalised 32-bin histogram (8 levels per bin)."""
    h = counts.reshape(32, -1).sum(axis=1)
    s = h.sum()
    return h / s if s else h


def _oval_box(oval: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of the face oval, clipped to a w x h frame."""
    x0, y0 = (int(max(0, min(np.floor(oval.min(axis=0)[i]), lim - 1))) for i, lim in ((0, w), (1, h)))
    x1, y1 = (int(min(lim, max(np.ceil(oval.max(axis=0)[i]) + 1, 1))) for i, lim in ((0, w), (1, h)))
    return x0, y0, x1, y1


def _area_taps_xy(xs: tuple[int, int, int], ys: tuple[int, int, int], scale: float
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """OpenCV's INTER_AREA weights (`computeResizeAreaTab`: same values, rounded to float32, same order) of
    output pixels lo..hi-1 of a resize by `scale` source pixels per output, for both axes, each given as
    (source size, lo, hi) (one set of array operations for both: half the call overhead). Each axis comes back
    as (source index, weight) arrays of shape (hi - lo, taps) in increasing source order; unused taps weigh 0
    (adding 0 changes no float sum)."""
    (sw, x0, x1), (sh, y0, y1) = xs, ys
    nx = x1 - x0
    f1 = np.concatenate([np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64)]) * scale
    ssize = np.concatenate([np.full(nx, float(sw)), np.full(y1 - y0, float(sh))])
    f2 = f1 + scale
    cell = np.minimum(scale, ssize - f1)
    s2 = np.minimum(np.floor(f2), ssize - 1)
    s1 = np.minimum(np.ceil(f1), s2)
    taps = int(math.ceil(scale)) + 2
    src = (s1 - 1)[:, None] + np.arange(taps)[None, :]  # s1 - 1 (left part), s1 .. s2 - 1 (whole), s2 (right)
    w = np.where((src >= s1[:, None]) & (src < s2[:, None]), 1.0 / cell[:, None], 0.0)
    w[:, 0] = np.where(s1 - f1 > 1e-3, (s1 - f1) / cell, 0.0)
    right = np.where(f2 - s2 > 1e-3, np.minimum(np.minimum(f2 - s2, 1.0), cell) / cell, 0.0)
    w = np.where(src == s2[:, None], right[:, None], w)
    src = np.clip(src, 0, (ssize - 1)[:, None]).astype(np.intp)
    w = w.astype(np.float32)
    return (src[:nx], w[:nx]), (src[nx:], w[nx:])


def area_window(img: np.ndarray, k: float, want: tuple[int, int, int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The window `want` (x0, y0, x1, y1, clipped) of ``cv2.resize(img, None, fx=k, fy=k, INTER_AREA)`` (uint8,
    k < 1), computed without the rest: the same separable float32 sums in the same order, rounded the same
    way (to nearest, ties to even), so it equals OpenCV's pixels. Returns (window, its origin)."""
    sh, sw = img.shape[:2]
    dw, dh = round(sw * k), round(sh * k)
    if (dw, dh) == (sw, sh):  # OpenCV copies when the size does not change
        out = img
    else:
        x0, y0 = max(0, want[0]), max(0, want[1])
        x1, y1 = min(dw, want[2]), min(dh, want[3])
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0), np.uint8), (0, 0)
        (xi, xw), (yi, yw) = _area_taps_xy((sw, x0, x1), (sh, y0, y1), 1.0 / k)
        c0, r0 = xi.min(), yi.min()
        # Transposed, so that every gather below takes whole contiguous rows (OpenCV transposes uint8 4x faster
        # than a strided numpy copy; the float32 values are the same).
        cols = cv2.transpose(img[r0:yi.max() + 1, c0:xi.max() + 1]).astype(np.float32)
        xi, yi = xi - c0, yi - r0
        hsum_t = cols[xi[:, 0]] * xw[:, 0, None]  # per source row: buf[dx] += S[si] * alpha, tap by tap
        for t in np.flatnonzero(xw[:, 1:].any(axis=0)) + 1:  # a tap weighing 0 everywhere adds nothing: skipped
            hsum_t += cols[xi[:, t]] * xw[:, t, None]
        hsum = cv2.transpose(hsum_t)
        acc = hsum[yi[:, 0]] * yw[:, 0, None]
        for t in np.flatnonzero(yw[:, 1:].any(axis=0)) + 1:  # per output row: sum = beta * buf, then += beta * buf
            acc += hsum[yi[:, t]] * yw[:, t, None]
        return np.clip(np.rint(acc), 0, 255).astype(np.uint8), (x0, y0)
    x0, y0 = max(0, want[0]), max(0, want[1])
    return out[y0:min(sh, want[3]), x0:min(sw, want[2])], (x0, y0)


SHARPNESS_CROP = (int(1.8 * SHARPNESS_IED), int(1.9 * SHARPNESS_IED))  # (w, h) of the crop at SHARPNESS_IED


def _crop_reach(mid: np.ndarray, c: float, s: float, k: float, pad: float) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1), unclipped, around the sharpness crop's rectangle mapped back to an image at scale
    1 / k of the crop (eye midpoint `mid`, roll (cos, sin) = (c, s)), `pad` pixels wider on every side."""
    w, h = SHARPNESS_CROP
    u = np.array([0.0, w, 0.0, w]) - w / 2
    v = np.array([0.0, 0.0, h, h]) - 0.5 * SHARPNESS_IED
    # inverse of dst = k R(-roll) (src - mid) + offset: src = mid + R(roll) (dst - offset) / k
    xs, ys = mid[0] + (c * u - s * v) / k, mid[1] + (s * u + c * v) / k
    return (int(np.floor(xs.min() - pad)), int(np.floor(ys.min() - pad)),
            int(np.ceil(xs.max() + pad)) + 1, int(np.ceil(ys.max() + pad)) + 1)


def _sharpness_plan(shape: tuple[int, ...], right_eye: np.ndarray, left_eye: np.ndarray) -> Any:
    """What `sharpness` computes from: (k, cos, sin, eye midpoint, area box or None, window of the resized box)
    in frame pixels; None for a degenerate face. With a box (IED > SHARPNESS_IED), the midpoint and the window
    are in the resized box's pixels."""
    d = left_eye - right_eye
    ied = float(np.linalg.norm(d))
    if ied < 2:
        return None
    k, c, s = SHARPNESS_IED / ied, d[0] / ied, d[1] / ied
    mid = (right_eye + left_eye) / 2
    if k >= 1:
        return k, c, s, mid, None, None
    gh, gw = shape[:2]
    x0, y0 = int(max(0, mid[0] - 2.5 * ied)), int(max(0, mid[1] - 2.5 * ied))
    x1, y1 = int(min(gw, mid[0] + 2.5 * ied)), int(min(gh, mid[1] + 2.5 * ied))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    # The crop reads the box only up to 1.7 IED past the midpoint, so its far sides are cut at 1.8 IED: with
    # fx/fy given, INTER_AREA's cells start at the box origin and keep their size, so every pixel the crop
    # reads is the same as with the whole box.
    x1, y1 = min(x1, int(mid[0] + 1.8 * ied) + 2), min(y1, int(mid[1] + 1.8 * ied) + 2)
    mid = (mid - (x0, y0)) * k
    # where the crop reads the resized box: its rectangle (roll included) and a margin for the bilinear warp,
    # and past the box's edges the mirrored pixels inside (BORDER_REFLECT)
    wx0, wy0, wx1, wy1 = _mirrored(_crop_reach(mid, c, s, 1.0, 2.0), round((x1 - x0) * k), round((y1 - y0) * k))
    return k, c, s, mid, (x0, y0, x1, y1), (wx0, wy0, wx1, wy1)


def _mirrored(box: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int]:
    """`box` widened by what BORDER_REFLECT reads inside a w x h image for its parts outside, then clipped."""
    x0, y0, x1, y1 = box
    if x0 < 0:
        x1 = max(x1, -x0)
    if x1 > w:
        x0 = min(x0, 2 * w - x1)
    if y0 < 0:
        y1 = max(y1, -y0)
    if y1 > h:
        y0 = min(y0, 2 * h - y1)
    return max(0, x0), max(0, y0), min(w, max(x1, 1)), min(h, max(y1, 1))


def sharpness_reads(shape: tuple[int, ...], right_eye: np.ndarray, left_eye: np.ndarray,
                    plan: Any = None) -> tuple[int, int, int, int]:
    """Frame box (x0, y0, x1, y1), clipped, holding every pixel `sharpness` reads (`face_gray` converts it);
    `plan` is `_sharpness_plan(shape, right_eye, left_eye)` when the caller has it already."""
    gh, gw = shape[:2]
    if plan is None:
        plan = _sharpness_plan(shape, right_eye, left_eye)
    if plan is None:
        return 0, 0, 0, 0
    k, c, s, mid, box, want = plan
    if box is None:
        # the warp reads the frame itself; past an edge BORDER_REFLECT reads the mirrored pixels inside it
        x0, y0, x1, y1 = _mirrored(_crop_reach(mid, c, s, k, 2.0), gw, gh)
    else:
        bx0, by0, bx1, by1 = box
        bw, bh = bx1 - bx0, by1 - by0
        if (round(bw * k), round(bh * k)) == (bw, bh):  # area_window copies: the window itself is read
            x0, y0, x1, y1 = bx0 + want[0], by0 + want[1], bx0 + want[2], by0 + want[3]
        else:  # output pixel j averages source pixels floor(j / k) .. ceil((j + 1) / k)
            x0, y0 = bx0 + math.floor(max(0, want[0]) / k) - 1, by0 + math.floor(max(0, want[1]) / k) - 1
            x1, y1 = bx0 + math.ceil(want[2] / k) + 2, by0 + math.ceil(want[3] / k) + 2
        x0, y0, x1, y1 = max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1)
    return max(0, x0), max(0, y0), min(gw, x1), min(gh, y1)


def sharpness(gray: np.ndarray, right_eye: np.ndarray, left_eye: np.ndarray, plan: Any = None) -> tuple[float, float]:
    """(directional, isotropic) sharpness of the inner face, rescaled to SHARPNESS_IED.

    The crop (eye-levelled) spans 0.9 IED either side of the eye midpoint and 0.5 IED above to
    1.4 IED below it: eyes, nose and mouth without background. Rescaling to a fixed eye
    distance makes the values independent of resolution; dividing by the luminance variance
    makes them independent of contrast and exposure (those have their own measures).
    directional = min over x and y of var(second derivative) / var(luminance): motion blur
    removes detail along one direction only, which the isotropic Laplacian ratio hides.
    `plan` is `_sharpness_plan(gray.shape, right_eye, left_eye)` when the caller has it already.
    """
    if plan is None:
        plan = _sharpness_plan(gray.shape, right_eye, left_eye)
    if plan is None:
        return 0.0, 0.0
    k, c, s, mid, box, want = plan
    w, h = SHARPNESS_CROP
    if box is not None:
        # Downscale with area averaging first: warpAffine only interpolates, and aliasing would add false
        # detail to high-resolution faces. The area resize is that of a 2.5 IED box around the eyes (its origin
        # fixes the resampling grid), but only the window of it the crop reads is computed (`area_window`).
        x0, y0, x1, y1 = box
        gray, (wx0, wy0) = area_window(gray[y0:y1, x0:x1], k, want)
        mid = mid - (wx0, wy0)
        k = 1.0
    # dst = k * R(-roll) (src - mid) + (w/2, 0.5*SHARPNESS_IED)
    m = np.array([[k * c, k * s, 0.0], [-k * s, k * c, 0.0]])
    m[:, 2] = np.array([w / 2, 0.5 * SHARPNESS_IED]) - m[:, :2] @ mid
    crop = cv2.warpAffine(gray, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    crop = crop.astype(np.float32)
    var = float(crop.var())
    if var < 1e-6:
        return 0.0, 0.0
    dxx = float(cv2.Sobel(crop, cv2.CV_32F, 2, 0, ksize=3).var())
    dyy = float(cv2.Sobel(crop, cv2.CV_32F, 0, 2, ksize=3).var())
    lap = float(cv2.Laplacian(crop, cv2.CV_32F, ksize=3).var())
    return min(dxx, dyy) / var, lap / var


def face_gray(bgr: np.ndarray, mesh: np.ndarray, right_eye: np.ndarray, left_eye: np.ndarray,
              plan: Any = None, oval: bool = True) -> np.ndarray:
    """Frame-sized gray image converted only where the measures read it: the face oval's box (photometry;
    left out when not `oval`) and `sharpness_reads` (the sharpness crop's footprint; `plan` =
    `_sharpness_plan`, if already made). The rest is left as allocated (np.empty: no frame-sized memset) and
    is never read, so the measures equal those on a fully converted frame (tests fill it with noise); a 1080p
    frame then costs a face-sized conversion, not a frame-sized one."""
    h, w = bgr.shape[:2]
    ox0, oy0, ox1, oy1 = _oval_box(mesh[FACE_OVAL, :2], w, h)
    sx0, sy0, sx1, sy1 = sharpness_reads(bgr.shape, right_eye, left_eye, plan)
    if sx1 <= sx0 or sy1 <= sy0:  # sharpness reads nothing
        sx0, sy0, sx1, sy1 = ox0, oy0, ox1, oy1
    if oval:
        return _gray_in(bgr, (min(ox0, sx0), min(oy0, sy0), max(ox1, sx1), max(oy1, sy1)))
    return _gray_in(bgr, (sx0, sy0, sx1, sy1))


def _gray_in(bgr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Frame-sized gray image converted inside `box` (x0, y0, x1, y1) only; the rest as allocated."""
    x0, y0, x1, y1 = box
    gray = np.empty(bgr.shape[:2], np.uint8)
    if x1 > x0 and y1 > y0:
        gray[y0:y1, x0:x1] = cv2.cvtColor(bgr[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY)
    return gray


Photometry = tuple[float, float, float, float, float, float]


def mesh_photometry(bgr: np.ndarray, mesh: np.ndarray) -> Photometry:
    """`photometry` of the face oval from the BGR frame and the mesh alone (no eye landmarks needed: it can run
    while the iris model does); the gray pixels are the same conversion `face_gray` makes."""
    h, w = bgr.shape[:2]
    gray = _gray_in(bgr, _oval_box(mesh[FACE_OVAL, :2], w, h))
    return photometry(gray, mesh, mesh[MIDLINE_TOP, :2].mean(axis=0), mesh[MIDLINE_BOTTOM, :2].mean(axis=0))


def measure(bgr: np.ndarray, faces: int, det: Detection, lm: FaceLandmarks,
            photo: Photometry | None = None) -> FaceMeasures:
    """Every raw measure of face `det` (with landmarks `lm`) in the BGR frame; `photo` is
    `mesh_photometry(bgr, lm.mesh)` when the caller has it already (computed while the eyes were refined)."""
    h, w = bgr.shape[:2]
    mesh = lm.mesh
    r_eye, l_eye = eye_centres(lm)
    ied = float(np.linalg.norm(l_eye - r_eye))
    plan = _sharpness_plan(bgr.shape, r_eye, l_eye)  # made once: face_gray and sharpness both need it
    gray = face_gray(bgr, mesh, r_eye, l_eye, plan, oval=False)  # photometry has its own conversion
    mid = (r_eye + l_eye) / 2
    t = float(np.linalg.norm(mesh[CHIN, :2] - mid)) or 1.0
    img_left_x, img_right_x = min(r_eye[0], l_eye[0]), max(r_eye[0], l_eye[0])
    yaw, pitch, roll = head_pose(mesh)
    (or_, wr), (ol, wl) = eye_opening(lm.eye_contour("right")), eye_opening(lm.eye_contour("left"))
    mouth = float(np.linalg.norm(mesh[LOWER_LIP_INNER, :2] - mesh[UPPER_LIP_INNER, :2])) / t
    lum, dark, bright, ent, inter, ratio = photo if photo is not None else mesh_photometry(bgr, mesh)
    sharp, sharp_iso = sharpness(gray, r_eye, l_eye, plan)
    return FaceMeasures(
        faces=faces, face_score=det.score, ied_px=ied, t_px=t, head_size=t / h,
        margin_left=img_left_x / max(ied, 1e-6), margin_right=(w - img_right_x) / max(ied, 1e-6),
        margin_above=float(mid[1]) / t, margin_below=(h - float(mid[1])) / t,
        centre_offset=abs(float(mid[0]) - w / 2) / w,
        yaw_deg=yaw, pitch_deg=pitch, roll_deg=roll,
        eye_open_right=or_ / wr if wr else 0.0, eye_open_left=ol / wl if wl else 0.0,
        eye_open_ofiq=min(or_, ol) / t, mouth_open=mouth,
        luminance_mean=lum, dark_fraction=dark, bright_fraction=bright, dynamic_range_bits=ent,
        illumination_balance=inter, left_right_ratio=ratio,
        sharpness=sharp, sharpness_isotropic=sharp_iso,
    )
