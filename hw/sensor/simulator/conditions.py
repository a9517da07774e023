"""How the simulated finger lies on the glass: good, or dry, wet, partial (part of the pad) or moved (it slid).

Every placement draws its condition from `rates` (probability per condition, the rest is good), seeded by the
simulator's seed, the finger and the placement's number, so a run is repeatable: the same fingers placed in
the same order give the same conditions, whatever the timing. Whether a placement then fails is decided by
the kit's real quality check, as on a real sensor (a slightly dry finger may still pass).

Default rates (`DEFAULT_RATES`, 23 % of placements not good) are drawn from field figures:

* attended capture under the US-VISIT criteria accepted only 55-63 % of four-finger slaps first time
  (Stanton et al. 2012, as quoted in Tullis & Albert, *Measuring the User Experience*, 2nd ed., ch. 10.2): a
  single flat finger on a small optical sensor with an operator watching fails less; we take about a quarter;
* e-KTP field staff report scanner errors most with dry skin, heat and elderly residents, fixed with alcohol
  on the glass and lotion on the fingers (hariansemarangbanget.blogspot.com, 2012, "Sering error fingerprint,
  minta alkohol"; /work/shared/reference/enrollment-systems.md): dry is the commonest condition, then partial
  placement and wet (sweat in a hot room), then a finger that moves;
* 1-2 % of a population need exception handling for worn prints (World Bank via integratedbiometrics.com):
  the exception path, not a rate here.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np

CONDITIONS = ("dry", "wet", "partial", "moved")
DEFAULT_RATES: dict[str, float] = {"dry": 0.08, "wet": 0.05, "partial": 0.06, "moved": 0.04}
NONE: dict[str, float] = {}  # every placement good (unit tests of the protocol)


def check_rates(rates: Mapping[str, float]) -> dict[str, float]:
    """`rates` as a plain dict; ValueError for an unknown condition, a rate outside 0..1 or a sum above 1."""
    out = {}
    for k, v in rates.items():
        if k not in CONDITIONS:
            raise ValueError(f"unknown finger condition {k!r}; known: {', '.join(CONDITIONS)}")
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"rate of {k} must be within 0..1, got {v}")
        out[k] = float(v)
    if sum(out.values()) > 1.0 + 1e-9:
        raise ValueError(f"finger condition rates add up to {sum(out.values()):.2f} > 1")
    return out


def draw(rates: Mapping[str, float], seed: int, key: str, placement: int) -> str:
    """The condition of placement number `placement` of finger `key`: "good" or one of `CONDITIONS`."""
    u = zlib.crc32(f"{seed}:{key}:{placement}".encode()) / 2**32
    acc = 0.0
    for c in CONDITIONS:
        acc += rates.get(c, 0.0)
        if u < acc:
            return c
    return "good"


def moved(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The finger slid while the sensor took the image: a smear 31-41 px long in a random direction (a shorter
    one still passes the kit's check: its ridges stay sharp across the slide)."""
    import cv2

    n = int(rng.integers(31, 42))
    k = np.zeros((n, n), np.float32)
    k[n // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), float(rng.uniform(0, 180)), 1.0)
    k = cv2.warpAffine(k, rot, (n, n))
    k /= max(float(k.sum()), 1e-6)
    out = cv2.filter2D(img.astype(np.float32), -1, k, borderType=cv2.BORDER_REPLICATE)
    # The skin rolls as it slides: ridges along the slide are smeared too (without this a slide along the
    # ridges left them sharp enough to pass).
    out = cv2.GaussianBlur(out, (0, 0), 2.0)
    return np.clip(out, 0, 255).astype(np.uint8)
