"""NFIQ 2 native quality measures, re-implemented in numpy and vectorised over blocks.

Definitions follow NIST NFIQ 2.3 (usnistgov/NFIQ2, ISO/IEC 29794-4): the near-white frame is
removed first, then orientation certainty (OCL), local clarity (LCS), frequency-domain analysis
(FDA), ridge-valley uniformity (RVUP), orientation flow (OF) and contrast (Mu, MMB) are computed
on 32x32 blocks (OF on 16x16) with the reference's block grids, segmentation mask
(`ridgesegment`, threshold 0.1 on the normalised block std), centred-difference gradients,
nearest-neighbour block rotation and histogram limits. Each feature yields the same 10-bin
histogram, mean and (population) standard deviation as NFIQ 2's ``<NAME>_Bin10_*`` measures.

Where the reference has a quirk it is kept on purpose (e.g. the orientation formula uses ``c``,
not ``2c``; OF angle differences do not wrap), because the goal is to *track* NFIQ 2.
Known difference: OpenCV's warpAffine rounds nearest-neighbour coordinates in 1/1024 fixed point;
here they are rounded in floating point, which can move single pixels on exact ties.
"""

from __future__ import annotations

import numpy as np

FDA_LIMITS = (0.268, 0.304, 0.33, 0.355, 0.38, 0.407, 0.44, 0.50, 1.0)
LCS_LIMITS = (0.0, 0.70, 0.74, 0.77, 0.79, 0.81, 0.83, 0.85, 0.87)
OCL_LIMITS = (0.337, 0.479, 0.579, 0.655, 0.716, 0.766, 0.81, 0.852, 0.898)
OF_LIMITS = (0.01715, 0.035, 0.0557, 0.081, 0.115, 0.1718, 0.2569, 0.4758, 0.748)
RVUP_LIMITS = (0.5, 0.667, 0.8, 1.0, 1.25, 1.5, 2.0, 24.0, 30.0)

NEAR_WHITE = 250.0  # rows/columns whose mean is above this are frame, not print
SEG_THRESHOLD = 0.1  # ridgesegment: block std of the normalised image
BLK = 32
SLANT_X, SLANT_Y = 32, 16
OF_BLK = 32  # NFIQ 2.3 (older releases used 16)
OF_ANGLE_MIN_DEG = 4.0


# --- helpers ---------------------------------------------------------------------------------


def crop_near_white_frame(img: np.ndarray) -> np.ndarray:
    """Drop outer rows/columns whose mean gray is > 250 (NFIQ 2 `copyRemovingNearWhiteFrame`).

    Column means are taken over the full height, as in the reference. An all-white image is
    returned unchanged (the caller's gates reject it).
    """
    rows = np.flatnonzero(img.mean(axis=1) <= NEAR_WHITE)
    cols = np.flatnonzero(img.mean(axis=0) <= NEAR_WHITE)
    if rows.size < 2 or cols.size < 2:
        return img
    return img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def histogram_features(values: np.ndarray, limits: tuple[float, ...]) -> dict[str, float]:
    """10-bin histogram with NFIQ 2's bin rule (bin i counts limits[i-1] <= v < limits[i]), mean, std."""
    v = np.asarray(values, np.float64)
    bins = np.bincount(np.searchsorted(np.asarray(limits), v, side="right"), minlength=10)[:10]
    out = {f"bin{i}": float(bins[i]) for i in range(10)}
    out["mean"] = float(v.mean()) if v.size else 0.0
    out["std"] = float(v.std()) if v.size else 0.0
    return out


def ridge_mask(img: np.ndarray, blk: int, thresh: float = SEG_THRESHOLD) -> np.ndarray:
    """Pixel mask of ridge-like blocks (NFIQ 2 `ridgesegment`): blocks on a grid from (0, 0),
    partial blocks included, whose std on the globally normalised image exceeds `thresh`."""
    h, w = img.shape
    f = img.astype(np.float64)
    sd = f.std()
    if sd == 0:
        return np.zeros((h, w), bool)
    nb_r, nb_c = -(-h // blk), -(-w // blk)
    z = (f - f.mean()) / sd
    # Per-block mean and std with partial edge blocks: zero-padded sums divided by true counts.
    pad = np.zeros((nb_r * blk, nb_c * blk))
    pad[:h, :w] = z
    rows = np.minimum(blk, h - np.arange(nb_r) * blk)
    cols = np.minimum(blk, w - np.arange(nb_c) * blk)
    cnt = np.outer(rows, cols).astype(np.float64)
    blocks = pad.reshape(nb_r, blk, nb_c, blk)
    mean = _block_sums(pad, nb_r, blk, nb_c, blk) / cnt
    dev = blocks - mean[:, None, :, None]
    var = _block_sums((dev * dev).reshape(nb_r * blk, nb_c * blk), nb_r, blk, nb_c, blk)
    # Padding cells contributed (0 - mean)^2 each: remove them.
    var -= (blk * blk - cnt) * mean * mean
    bstd = np.sqrt(np.maximum(var / cnt, 0))
    return np.repeat(np.repeat(bstd > thresh, blk, 0), blk, 1)[:h, :w]


def _windows(img: np.ndarray, r0: np.ndarray, c0: np.ndarray, size: int) -> np.ndarray:
    """Stack of square windows (n, size, size) whose top-left corners are (r0[i], c0[i])."""
    win = np.lib.stride_tricks.sliding_window_view(img, (size, size))
    return win[r0, c0]


def _grid(rows: int, cols: int, blk: int, offset: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Top-left corners of the reference's bordered block grid (loop `r = off; r < rows-(blk+off-1)`)."""
    rs = np.arange(offset, rows - (blk + offset - 1), blk)
    cs = np.arange(offset, cols - (blk + offset - 1), blk)
    rr, cc = np.meshgrid(rs, cs, indexing="ij")
    return rr.ravel(), cc.ravel(), len(rs), len(cs)


def _block_sums(a: np.ndarray, nr: int, br: int, nc: int, bc: int) -> np.ndarray:
    """(nr, nc) sums of the br x bc blocks of `a` (nr*br rows, nc*bc columns): rows added first
    (contiguous), then each block's columns. numpy's reduction over axes (1, 3) of the 4-D view
    gives the same sums to rounding but strides through memory, and cost 3x more here."""
    return a.reshape(nr, br, nc * bc).sum(axis=1).reshape(nr, nc, bc).sum(axis=2)


def _grid_covariance(f: np.ndarray, off: int, blk: int, nr: int, nc: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_covariance` of every block of an adjacent grid (top-left (off, off), nr x nc blocks of
    blk px) at once: whole-image central differences, one-sided on each block's own edges,
    which equals differentiating every block separately.

    `f` is the 8-bit image: the differences, their products and the row sums of 32 products are exact in
    float32 (quarters below 2^22), and the column sums run in float64 as they always did, so the result
    equals a float64 computation bit for bit at half the memory traffic."""
    sub = f[off:off + nr * blk, off:off + nc * blk].astype(np.float32)
    gx = np.empty_like(sub)
    gy = np.empty_like(sub)
    gx[:, 1:-1] = (sub[:, 2:] - sub[:, :-2]) / 2.0
    gy[1:-1, :] = (sub[2:, :] - sub[:-2, :]) / 2.0
    first, last = np.arange(0, nc * blk, blk), np.arange(blk - 1, nc * blk, blk)
    gx[:, first] = sub[:, first + 1] - sub[:, first]
    gx[:, last] = sub[:, last] - sub[:, last - 1]
    first, last = np.arange(0, nr * blk, blk), np.arange(blk - 1, nr * blk, blk)
    gy[first, :] = sub[first + 1, :] - sub[first, :]
    gy[last, :] = sub[last, :] - sub[last - 1, :]

    def bmean(a: np.ndarray) -> np.ndarray:
        rows = a.reshape(nr, blk, nc * blk).sum(axis=1).astype(np.float64)  # as _block_sums, rows in float32
        return (rows.reshape(nr, nc, blk).sum(axis=2) / (blk * blk)).ravel()

    return bmean(gx * gx), bmean(gy * gy), bmean(gx * gy)


def _ridge_orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    # Reference `ridgeorient`: atan2(c, a-b)/2 (sic: c, not 2c; kept to track NFIQ 2).
    denom = c * c + (a - b) ** 2 + np.finfo(float).eps
    return np.arctan2(c / denom, (a - b) / denom) / 2.0


def _rotated_crop(src: np.ndarray, angles: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """Nearest-neighbour rotation of each window by its angle (radians, OpenCV sense) about the
    window centre, then the crop ``[rows, cols]`` of the output; pixels that map outside read 0,
    like warpAffine with a constant border.

    For the reference's "padded" blocks, `src` is the 40x40 neighbourhood: NFIQ 2 pads the 36x36
    block with `copyMakeBorder`, which on an OpenCV ROI takes the real image pixels around it."""
    n, ss = src.shape[0], src.shape[1]
    ctr = ss / 2.0
    ca = np.cos(angles)[:, None, None]
    sa = np.sin(angles)[:, None, None]
    # x offsets along a row and y offsets down a column: the products are per row / per column (the same values
    # a full grid would give), and only the sums below are per sample.
    dx = (np.arange(cols.start, cols.stop) - ctr)[None, None, :]
    dy = (np.arange(rows.start, rows.stop) - ctr)[None, :, None]
    # floor(ca*dx - sa*dy + ctr + 0.5), in place and in the same order of operations.
    sx = ca * dx - sa * dy
    sx += ctr
    sx += 0.5
    np.floor(sx, out=sx)
    sy = sa * dx + ca * dy
    sy += ctr
    sy += 0.5
    np.floor(sy, out=sy)
    ix, iy = sx.astype(np.intp), sy.astype(np.intp)
    # Inside the window when 0 <= ix, iy < ss (one unsigned compare each); samples outside read a 0 appended
    # after the windows (one flat gather, no padded copy of them).
    inside = (ix.view(np.uintp) < ss) & (iy.view(np.uintp) < ss)
    iy *= ss
    iy += ix
    iy += (np.arange(n) * (ss * ss))[:, None, None]
    flat = np.where(inside, iy, n * ss * ss)
    pixels = np.concatenate([np.ascontiguousarray(src).reshape(-1), np.zeros(1, src.dtype)])
    return pixels[flat].astype(np.float64, copy=False)


def _ridge_valley(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block: column-mean profile ``v`` (n, L) -> (ridge flags, linear trend `dt`), as
    `getRidgeValleyStructure` (least-squares line on x = 1..L, coefficients rounded to 1e-10)."""
    n, length = v.shape
    x = np.arange(1, length + 1, dtype=np.float64)
    xm = x.mean()
    slope = ((x - xm) * (v - v.mean(axis=1, keepdims=True))).sum(axis=1) / ((x - xm) ** 2).sum()
    icpt = v.mean(axis=1) - slope * xm
    slope = np.round(slope * 1e10) / 1e10
    icpt = np.round(icpt * 1e10) / 1e10
    dt = x[None] * slope[:, None] + icpt[:, None]
    return v < dt, dt


# --- the measures ----------------------------------------------------------------------------


def ocl_values(img: np.ndarray) -> np.ndarray:
    """Orientation certainty 1 - lmin/lmax of each full 32x32 block on a grid from (0, 0)."""
    h, w = img.shape
    nr, nc = h // BLK, w // BLK
    if nr == 0 or nc == 0:
        return np.zeros(0)
    a, b, c = _grid_covariance(img, 0, BLK, nr, nc)
    root = np.sqrt((a - b) ** 2 + 4 * c * c)
    emax, emin = (a + b + root) / 2, (a + b - root) / 2
    ok = emax != 0
    return 1.0 - emin[ok] / emax[ok]


def _slanted_blocks(img: np.ndarray, mask: np.ndarray):
    """Common part of LCS/FDA/RVUP/OF: bordered 32-px grid, block orientation, 36x36 and 40x40
    windows, foreground flag per block, grid shape."""
    diff = int(np.ceil(np.sqrt(SLANT_X ** 2 + SLANT_Y ** 2))) - BLK  # 36 - 32
    off = int(np.ceil(diff / 2))
    r0, c0, nr, nc = _grid(*img.shape, BLK, off)
    if r0.size == 0:
        return None
    a, b, c = _grid_covariance(img, off, BLK, nr, nc)
    orient = _ridge_orient(a, b, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        coh = np.where(a + b > 0, np.sqrt((a - b) ** 2 + 4 * c * c) / (a + b), 0.0)
    # Windows of the 8-bit image (`_rotated_crop` converts what it gathers): an eighth of the copying.
    wins = _windows(img, r0 - off, c0 - off, BLK + 2 * off)
    # 2 px more on each side, zero outside the image (copyMakeBorder on an ROI, see _rotated_crop).
    fp = np.zeros((img.shape[0] + 4, img.shape[1] + 4), img.dtype)
    fp[2:-2, 2:-2] = img
    wide = _windows(fp, r0 - off, c0 - off, BLK + 2 * off + 4)
    inmask = _windows(mask, r0, c0, BLK).all(axis=(1, 2))
    return orient, wins, wide, inmask, (nr, nc), coh


def lcs_values(v2: np.ndarray, ridval: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """Local clarity per block from the rotated 16x32 crop (reference `loclar`, 500 ppi), vectorised."""
    scale = (500 / 125.0) * 5.0
    nwr_min, nwr_max, nwv_min, nwv_max = 3.0 / scale, 10.0 / scale, 2.0 / scale, 10.0 / scale
    n, length = ridval.shape
    if n == 0:
        return np.zeros(0)
    # Change positions i-1 (i >= 1 where ridval[i] != ridval[i-1]); sorted first in each row.
    change = ridval[:, 1:] != ridval[:, :-1]
    pos = np.where(change, np.arange(length - 1)[None, :], np.iinfo(np.int64).max)
    pos.sort(axis=1)
    count = change.sum(axis=1)
    valid = np.arange(length - 1)[None, :] < count[:, None]
    posf = np.where(valid, pos, 0).astype(np.float64)
    widths = np.diff(posf, axis=1, prepend=0.0) * valid  # Wrv: first change index, then differences
    even = (np.arange(length - 1) % 2 == 0)[None, :]
    # Normalise each width first and sum left to right (cumsum), as cv::mean does: the clarity
    # test compares these means with limits they can equal exactly, so the last bit matters.
    nw = widths / scale
    s_even, n_even = np.cumsum(nw * even, axis=1)[:, -1], (valid & even).sum(1)
    s_odd, n_odd = np.cumsum(nw * ~even, axis=1)[:, -1], (valid & ~even).sum(1)
    m_even = np.divide(s_even, n_even, out=np.zeros(n), where=n_even > 0)
    m_odd = np.divide(s_odd, n_odd, out=np.zeros(n), where=n_odd > 0)
    beg = ridval[:, 0]
    mr, mv = np.where(beg, m_even, m_odd), np.where(beg, m_odd, m_even)
    clear = (count > 0) & (mr >= nwr_min) & (mr <= nwr_max) & (mv >= nwv_min) & (mv <= nwv_max)
    below = v2 < dt[:, None, :]
    rows = v2.shape[1]
    n_r, n_v = ridval.sum(1) * rows, (~ridval).sum(1) * rows
    beta = (~below & ridval[:, None, :]).sum(axis=(1, 2)) / np.maximum(n_r, 1)
    alpha = (below & ~ridval[:, None, :]).sum(axis=(1, 2)) / np.maximum(n_v, 1)
    return np.where(clear & (n_r > 0) & (n_v > 0), 1.0 - (alpha + beta) / 2.0, 0.0)


def rvup_values(ridval: np.ndarray) -> np.ndarray:
    """Ridge/valley width ratios of complete ridges and valleys (reference `rvuhist`), vectorised
    over blocks; values come out in the reference's order (block by block, last width first)."""
    n, length = ridval.shape
    if n == 0 or length < 3:
        return np.zeros(0)
    rv = ridval.astype(bool)
    # Change j: rv[j+1] != rv[j] for j = 0..L-3 (the reference skips the wrap-around at j = L-2).
    chg = rv[:, 1:length - 1] != rv[:, :length - 2]
    m = chg.shape[1]
    cols = np.arange(m)
    pos = np.where(chg, cols[None, :], m)
    pos.sort(axis=1)
    count = chg.sum(axis=1)
    # Widths between consecutive changes, without the first (incomplete) one: d[k] = pos[k+1] - pos[k].
    d = np.diff(pos, axis=1).astype(np.float64)
    # Ratio k (k = 0..count-4) pairs the widths at count-2-k and count-3-k (the reversed list).
    k = np.arange(max(m - 3, 0))
    valid = k[None, :] < (count - 3)[:, None]
    ia = np.clip(count[:, None] - 2 - k[None, :], 0, max(m - 2, 0))
    a = np.take_along_axis(d, ia, axis=1)
    b = np.take_along_axis(d, np.clip(ia - 1, 0, None), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = a / b
        begrid = np.take_along_axis(rv, np.clip(pos[:, :1] + 1, 0, length - 1), axis=1)
        flip = (k[None, :] % 2) == begrid.astype(int)
        ratio = np.where(flip, 1.0 / ratio, ratio)
    return ratio[valid]


def fda_values(wide: np.ndarray, orient: np.ndarray) -> np.ndarray:
    """Frequency-domain analysis: dominance of the ridge frequency in the 1-D signature."""
    bc = _rotated_crop(wide, orient + np.pi / 2, slice(2, 34), slice(10, 26))
    t = bc.mean(axis=2)  # (n, 32) row means
    amp = np.abs(np.fft.fft(t, axis=1))[:, 1:]
    m = amp.argmax(axis=1)
    mval = amp[np.arange(len(amp)), m]
    denom = amp[:, : amp.shape[1] // 2].sum(axis=1)
    edge = (m == 0) | (m + 1 >= amp.shape[1])
    mi = np.clip(m, 1, amp.shape[1] - 2)
    idx = np.arange(len(amp))
    with np.errstate(divide="ignore", invalid="ignore"):
        val = (mval + 0.3 * (amp[idx, mi - 1] + amp[idx, mi + 1])) / denom
    return np.where(edge, 1.0, val)


def of_values(orient: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Orientation flow: mean absolute orientation change to the 8 neighbours (zero padded, no
    angle wrap, as the reference), on the block map `orient` with foreground map `seg`."""
    nr, nc = orient.shape
    po = np.pad(orient, 1)
    ps = np.pad(seg, 1)
    loq = np.zeros((nr, nc))
    allseg = np.ones((nr, nc), bool)
    for dr in range(3):
        for dc in range(3):
            loq += np.abs(po[dr:dr + nr, dc:dc + nc] - orient)
            allseg &= ps[dr:dr + nr, dc:dc + nc]
    loq /= 8.0
    amin = np.deg2rad(OF_ANGLE_MIN_DEG)
    adiff = np.deg2rad(90.0 - OF_ANGLE_MIN_DEG)
    sel = (loq > amin) & allseg
    return (loq[sel] - amin) / adiff


def compute(img: np.ndarray) -> dict[str, dict[str, float] | float]:
    """All NFIQ 2-style measures of an 8-bit gray image (any size).

    Returns ``{"OCL": {...}, "LCS": {...}, "FDA": {...}, "RVUP": {...}, "OF": {...}, "Mu": x,
    "MMB": x, "blocks": n, "coherence_sum": x, "coherence_rel": x}`` where each histogram dict has
    ``bin0..bin9``, ``mean``, ``std`` (``blocks`` and the coherence figures are not NFIQ 2 outputs).
    """
    img = crop_near_white_frame(np.ascontiguousarray(img))
    f = img.astype(np.float64)
    h, w = img.shape
    # Contrast: mean, and mean of block means on a 32-px grid from (0, 0) including partial blocks.
    sums = np.add.reduceat(np.add.reduceat(f, np.arange(0, h, BLK), 0), np.arange(0, w, BLK), 1)
    counts = np.outer(np.diff(np.append(np.arange(0, h, BLK), h)), np.diff(np.append(np.arange(0, w, BLK), w)))
    out: dict[str, dict[str, float] | float] = {"Mu": float(f.mean()), "MMB": float((sums / counts).mean())}

    out["OCL"] = histogram_features(ocl_values(img), OCL_LIMITS)
    mask = ridge_mask(img, BLK)
    sb = _slanted_blocks(img, mask)
    if sb is None:
        empty = histogram_features(np.zeros(0), LCS_LIMITS)
        out["LCS"] = out["FDA"] = out["RVUP"] = out["OF"] = empty
        out["blocks"] = out["coherence_sum"] = out["coherence_rel"] = 0.0
    else:
        orient, wins, wide, inmask, shape, coh = sb
        out["blocks"] = float(inmask.sum())
        # Gradient coherence of the foreground blocks (after NFIQ 2's OrientationMap_ROIFilter_Coherence*).
        out["coherence_sum"] = float(coh[inmask].sum())
        out["coherence_rel"] = float(coh[inmask].mean()) if inmask.any() else 0.0
        lw, lo, ww = wins[inmask], orient[inmask], wide[inmask]
        # LCS: rotate by the orientation, no padding, 16 rows x 32 columns from the centre.
        v2 = _rotated_crop(lw, lo, slice(10, 26), slice(2, 34))
        ridval, dt = _ridge_valley(v2.mean(axis=1))
        out["LCS"] = histogram_features(lcs_values(v2, ridval, dt), LCS_LIMITS)
        out["FDA"] = histogram_features(fda_values(ww, lo), FDA_LIMITS)
        v2p = _rotated_crop(ww, lo, slice(10, 26), slice(2, 34))
        ridval_p, _ = _ridge_valley(v2p.mean(axis=1))
        out["RVUP"] = histogram_features(rvup_values(ridval_p), RVUP_LIMITS)
        # OF (NFIQ 2.3: 32-px blocks, same bordered grid, same orientation and mask as above).
        out["OF"] = histogram_features(of_values(orient.reshape(shape), inmask.reshape(shape)), OF_LIMITS)
    return out


def as_nist_names(feats: dict[str, dict[str, float] | float]) -> dict[str, float]:
    """Flatten `compute` output to NFIQ 2's feature names (``OCL_Bin10_3``, ``LCS_Bin10_Mean``, ``Mu``...)."""
    flat: dict[str, float] = {}
    for key in ("FDA", "LCS", "OCL", "OF", "RVUP"):
        hist = feats[key]
        assert isinstance(hist, dict)
        for i in range(10):
            flat[f"{key}_Bin10_{i}"] = hist[f"bin{i}"]
        flat[f"{key}_Bin10_Mean"] = hist["mean"]
        flat[f"{key}_Bin10_StdDev"] = hist["std"]
    flat["Mu"] = float(feats["Mu"])  # type: ignore[arg-type]
    flat["MMB"] = float(feats["MMB"])  # type: ignore[arg-type]
    return flat
