"""Reproducible degradations of a fingerprint image, for training, tests and the benchmark.

Not on the capture path. Each variant is named by a spec string ``kind:param`` (e.g. ``blur:2.0``,
``wet:2``, ``shift:-60,0``) so that the label CSV can name every training image and
`tools/train_fpquality.py` can regenerate it bit for bit from the corpus file. Degradations apply
to the full-size 8-bit gray image *before* the sensor conversion, as a real finger would be
degraded before the sensor quantises it. Random parts (noise, dry breaks) use a seed derived from
the spec, so the same spec always gives the same image.
"""

from __future__ import annotations

import zlib

import numpy as np

KINDS = ("none", "blur", "noise", "wet", "dry", "partial", "rotate", "shift", "faint", "smudge")


def _rng(spec: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(spec.encode()))


def apply(gray: np.ndarray, spec: str) -> np.ndarray:
    """Apply one or more degradations (``a:1+b:2`` applies `a` then `b`) to an 8-bit gray image."""
    import cv2

    out = gray
    for part in spec.split("+"):
        kind, _, arg = part.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown degradation {kind!r} in {spec!r} (known: {', '.join(KINDS)})")
        f = out.astype(np.float32)
        h, w = out.shape
        if kind == "none":
            continue
        if kind == "blur":  # defocus / moving finger
            res = cv2.GaussianBlur(f, (0, 0), float(arg))
        elif kind == "noise":  # sensor noise
            res = f + _rng(spec).normal(0, float(arg), f.shape)
        elif kind == "wet":  # heavy pressure / wet: dark ridges spread into valleys, image darkens
            n = float(arg)
            r = int(np.ceil(n))
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            res = cv2.erode(f, k) * max(1.0 - 0.12 * n, 0.2)
        elif kind == "dry":  # dry skin: thin faint ridges with breaks
            n = float(arg)
            r = int(np.ceil(n))
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            res = 255 - (255 - cv2.dilate(f, k)) * max(1.0 - 0.15 * n, 0.1)
            holes = _rng(spec).random((h // 6 + 1, w // 6 + 1)) < 0.12 * n
            holes = cv2.resize(holes.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            res = np.where(holes, 255 - (255 - res) * 0.2, res)
        elif kind == "partial":  # only part of the finger touches: keep a fraction from the top
            frac = float(arg)
            res = f.copy()
            res[int(h * frac):, :] = 255
        elif kind == "rotate":
            m = cv2.getRotationMatrix2D((w / 2, h / 2), float(arg), 1.0)
            res = cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=255)
        elif kind == "shift":  # finger placed off-centre
            dx, dy = (float(v) for v in arg.split(","))
            m = np.float32([[1, 0, dx], [0, 1, dy]])
            res = cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=255)
        elif kind == "faint":  # light touch: low contrast towards white
            res = 255 - (255 - f) * float(arg)
        else:  # smudge: latent residue on the glass, a gray haze over a region
            level = float(arg)
            yy, xx = np.mgrid[0:h, 0:w]
            r = _rng(spec)
            cy, cx = r.uniform(0.3, 0.7) * h, r.uniform(0.3, 0.7) * w
            blob = np.exp(-(((yy - cy) / (0.35 * h)) ** 2 + ((xx - cx) / (0.35 * w)) ** 2))
            haze = cv2.GaussianBlur(f, (0, 0), 4.0)
            res = f * (1 - level * blob) + (haze * 0.5) * level * blob
        out = np.clip(np.rint(res), 0, 255).astype(np.uint8)
    return out
