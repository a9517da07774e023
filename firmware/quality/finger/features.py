"""The feature vector the quality model and the hard-reject gates read, for one sensor image.

Everything is computed on the image exactly as the sensor delivers it (16 gray levels, 256x288
or 192x192): the NFIQ 2 native measures (`nfiq2_features`), the foreground (`foreground`) and
the minutiae count (`minutiae`), plus a few cheap contrast figures used by the gates.
"""

from __future__ import annotations

import numpy as np

from firmware.quality.finger import foreground, minutiae, nfiq2_features

#: Order of the model's inputs (the model file stores it too and is checked against it).
MODEL_FEATURES: tuple[str, ...] = (
    *(f"OCL_Bin10_{i}" for i in range(10)), "OCL_Bin10_Mean", "OCL_Bin10_StdDev",
    *(f"LCS_Bin10_{i}" for i in range(10)), "LCS_Bin10_Mean", "LCS_Bin10_StdDev",
    *(f"FDA_Bin10_{i}" for i in range(10)), "FDA_Bin10_Mean", "FDA_Bin10_StdDev",
    *(f"RVUP_Bin10_{i}" for i in range(10)), "RVUP_Bin10_Mean", "RVUP_Bin10_StdDev",
    *(f"OF_Bin10_{i}" for i in range(10)), "OF_Bin10_Mean", "OF_Bin10_StdDev",
    "Mu", "MMB", "blocks",
    "fg_fraction", "fg_cx", "fg_cy", "fg_border_contact",
    "fg_mean", "fg_contrast", "minutiae", "endings", "bifurcations",
    "skeleton_px", "fragments", "short_fragments",
    "coherence_sum", "coherence_rel", "minutiae_com200", "minutiae_ocl80", "minutiae_contrast",
)


def compute(img: np.ndarray) -> dict[str, float]:
    """All features of one 8-bit gray sensor image, by name (see `MODEL_FEATURES`)."""
    native = nfiq2_features.compute(img)
    out = nfiq2_features.as_nist_names(native)
    for k in ("blocks", "coherence_sum", "coherence_rel"):
        out[k] = float(native[k])  # type: ignore[arg-type]
    fg = foreground.segment(img)
    out["fg_fraction"] = fg.fraction
    out["fg_cx"] = fg.centroid_x
    out["fg_cy"] = fg.centroid_y
    out["fg_border_contact"] = float(fg.border_contact)
    hist = np.bincount(img[fg.mask], minlength=256) if fg.fraction > 0 else np.zeros(256, np.int64)
    if hist.sum():
        # Percentiles from the histogram (the sensor has 16 levels; sorting pixels is wasteful).
        cdf = np.cumsum(hist) / hist.sum()
        p5, p95 = int(np.searchsorted(cdf, 0.05)), int(np.searchsorted(cdf, 0.95))
        levels = np.arange(256)
        out["fg_mean"] = float((hist * levels).sum() / hist.sum())
        out["fg_contrast"] = float(p95 - p5)
        fg_std = float(np.sqrt((hist * (levels - out["fg_mean"]) ** 2).sum() / hist.sum()))
    else:
        out["fg_mean"] = float(img.mean())
        out["fg_contrast"] = 0.0
        fg_std = 0.0
    m = minutiae.extract(img, fg.mask)
    out["minutiae"] = float(m.count)
    out["endings"] = float(len(m.endings))
    out["bifurcations"] = float(len(m.bifurcations))
    out["skeleton_px"] = float(m.skeleton_px)
    out["fragments"] = float(m.fragments)
    out["short_fragments"] = float(m.short_fragments)
    out["gray_std"] = float(img.std())
    out["haze_fraction"] = _haze_fraction(img)
    out.update(_minutiae_quality(img, fg_std, np.concatenate([m.endings, m.bifurcations]).reshape(-1, 2)))
    return out


def _haze_fraction(img: np.ndarray, blk: int = 16) -> float:
    """Share of 16x16 blocks that are flat mid-gray: neither clean white glass, nor ridges, nor a
    dark wet contact. Latent residue or a smear on the glass looks like this."""
    h, w = img.shape
    nr, nc = h // blk, w // blk
    b = img[: nr * blk, : nc * blk].astype(np.float32)
    n = float(blk * blk)

    def block_mean(a: np.ndarray) -> np.ndarray:  # rows first (contiguous), then columns
        return a.reshape(nr, blk, nc * blk).sum(axis=1).reshape(nr, nc, blk).sum(axis=2) / n

    mean = block_mean(b)
    std = np.sqrt(np.maximum(block_mean(b * b) - mean * mean, 0))
    return float(((std < 12.0) & (mean >= 90.0) & (mean < 235.0)).mean())


def _minutiae_quality(img: np.ndarray, fg_std: float, pts: np.ndarray) -> dict[str, float]:
    """Minutiae-based figures after NFIQ 2's FJFX measures: count within the 200x200 box around
    their centre of mass, and the fractions whose 32x32 neighbourhood has OCL >= 0.8 or a gray
    std at least `fg_std` (that of the whole foreground). Window sums come from integral images
    sampled at the minutiae only."""
    import cv2

    if len(pts) == 0:
        return {"minutiae_com200": 0.0, "minutiae_ocl80": 0.0, "minutiae_contrast": 0.0}
    com = pts.mean(axis=0)
    in_box = (np.abs(pts - com) <= 100).all(axis=1)
    h, w = img.shape
    # float32 is exact here (gradients are k/2 for integer k, their products below 2^16 in quarters), and
    # cv2.integral sums them in float64 as before: the same values as a float64 pipeline, at half the memory.
    gy, gx = np.gradient(img.astype(np.float32))
    r0, r1 = np.clip(pts[:, 0] - 16, 0, h), np.clip(pts[:, 0] + 16, 0, h)
    c0, c1 = np.clip(pts[:, 1] - 16, 0, w), np.clip(pts[:, 1] + 16, 0, w)
    area = (r1 - r0) * (c1 - c0)

    def window_mean(ii: np.ndarray) -> np.ndarray:
        return (ii[r1, c1] - ii[r0, c1] - ii[r1, c0] + ii[r0, c0]) / area

    def integral(a: np.ndarray) -> np.ndarray:
        return cv2.integral(a, sdepth=cv2.CV_64F)

    a, b, c = window_mean(integral(gx * gx)), window_mean(integral(gy * gy)), window_mean(integral(gx * gy))
    root = np.sqrt((a - b) ** 2 + 4 * c * c)
    emax = (a + b + root) / 2
    ocl = np.divide(emax - (a + b - root) / 2, emax, out=np.zeros_like(emax), where=emax > 0)
    s1, s2 = cv2.integral2(img, sdepth=cv2.CV_64F, sqdepth=cv2.CV_64F)  # sums of f and f^2: exact integers
    std = np.sqrt(np.maximum(window_mean(s2) - window_mean(s1) ** 2, 0))
    return {"minutiae_com200": float(in_box.sum()), "minutiae_ocl80": float((ocl >= 0.8).mean()),
            "minutiae_contrast": float((std >= fg_std).mean())}
