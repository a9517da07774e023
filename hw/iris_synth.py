"""Synthetic near-infrared eye images for the simulated iris camera and the tests.

A 640x480 8-bit grey frame like an ISO/IEC 19794-6 "K_VGA" capture: skin, an almond-shaped opening between
two lids, sclera, an iris with a radial fibre texture and crypts that depend on the resident and the eye
(the same resident's left eye is always the same texture), a pupil, eyelashes, a specular highlight of the
850 nm illuminator and camera noise. Per impression, deterministic from (resident, eye, impression): pupil
dilation, small gaze and position jitter. Defects are explicit parameters (`EyeParams`): closed or half-closed
lids, gaze off axis, defocus blur, off-centre, too far / too close, glasses reflections.

What it does NOT model (say so wherever it is used): real iris texture statistics (the fibres are a sum of
sinusoids, not collarette/furrow anatomy), the NIR reflectance of real skin and sclera, motion blur, contact
lenses, the cornea's refraction (gaze is a foreshortened disc with a shifted pupil, nothing finer),
interlacing and sensor noise spectra. It exercises the quality measures and the data path, not matching.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

WIDTH, HEIGHT = 640, 480
#: Iris radius at the nominal capture distance, px (ISO/IEC 29794-6: >= 120 px diameter is "good"; 200+ typical).
NOMINAL_IRIS_RADIUS = 110


@dataclass(frozen=True)
class EyeParams:
    """How one impression is taken. Defaults: a good, centred, open eye at the nominal distance."""

    openness: float = 1.0  # lid opening: 1 fully open, 0 closed
    gaze_x: float = 0.0  # iris offset inside the opening, share of the iris radius (looking aside)
    gaze_y: float = 0.0
    blur: float = 0.0  # Gaussian sigma, px (defocus)
    offset_x: float = 0.0  # whole eye moved, share of the frame width (off-centre)
    offset_y: float = 0.0
    scale: float = 1.0  # 1 nominal distance; < 1 too far, > 1 too close
    dilation: float | None = None  # pupil/iris radius ratio; None: drawn per impression (0.35-0.5)
    glasses: bool = False  # two large reflections of the illuminator on spectacle lenses
    noise: float = 3.0  # camera noise sigma, grey levels


GOOD = EyeParams()
CLOSED = EyeParams(openness=0.08)
OFF_GAZE = EyeParams(gaze_x=0.9)
BLURRED = EyeParams(blur=6.0)
OFF_CENTRE = EyeParams(offset_x=0.36)
TOO_FAR = EyeParams(scale=0.45)
#: Named defects for tests, the simulator's `serve()` and `rekam sim`: name -> parameters.
DEFECTS = {"good": GOOD, "closed": CLOSED, "off_gaze": OFF_GAZE, "blurred": BLURRED, "off_centre": OFF_CENTRE,
           "too_far": TOO_FAR}


def _rng(*parts: object) -> np.random.Generator:
    seed = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()[:8]
    return np.random.default_rng(int.from_bytes(seed, "big"))


def _texture(resident: str, eye: str, n: int = 256) -> np.ndarray:
    """The iris pattern of one eye in polar form (radius x angle, values about -1..1), fixed per identity."""
    rng = _rng("iris-texture", resident, eye)
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)[None, :]
    rho = np.linspace(0, 1, 64)[:, None]
    tex = np.zeros((64, n))
    for _ in range(24):  # radial fibres: angular harmonics whose phase drifts with the radius
        k = rng.integers(8, 60)
        tex += rng.uniform(0.2, 1.0) * np.sin(k * theta + rng.uniform(0, 2 * np.pi) + rng.uniform(-3, 3) * rho)
    for _ in range(14):  # crypts: dark blobs
        r0, t0 = rng.uniform(0.15, 0.85), rng.uniform(0, 2 * np.pi)
        d = (rho - r0) ** 2 / 0.004 + (np.angle(np.exp(1j * (theta - t0)))) ** 2 / 0.02
        tex -= 3.0 * np.exp(-d)
    collarette = 1.5 * np.exp(-((rho - 0.32) ** 2) / 0.002)  # a brighter ring a third of the way out
    tex = tex / (np.abs(tex).max() + 1e-9) + collarette
    return tex


def synth_eye(resident: str, eye: str, impression: int = 0, params: EyeParams = GOOD) -> np.ndarray:
    """One NIR frame (HEIGHT x WIDTH, uint8) of `eye` ("left"/"right") of `resident`, impression number
    `impression`, taken as `params` says. The same arguments give the same pixels."""
    import cv2

    rng = _rng("impression", resident, eye, impression)
    p = params
    dil = p.dilation if p.dilation is not None else float(rng.uniform(0.35, 0.5))
    s = p.scale
    ri = NOMINAL_IRIS_RADIUS * s
    rp = ri * dil
    cx = WIDTH / 2 + p.offset_x * WIDTH + rng.normal(0, 4)
    cy = HEIGHT / 2 + p.offset_y * HEIGHT + rng.normal(0, 3)
    icx = cx + p.gaze_x * ri + rng.normal(0, 1.5)
    icy = cy + p.gaze_y * ri + rng.normal(0, 1.5)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    skin_rng = _rng("skin", resident)
    img = np.full((HEIGHT, WIDTH), 150 + skin_rng.uniform(-15, 15), np.float32)
    img += 10 * np.sin(xx / 47 + skin_rng.uniform(0, 6)) * np.cos(yy / 61)  # skin shading
    # The opening: between two parabolic lids, half width 2.1 ri, half height ~1.05 ri when open.
    half_w = 2.1 * ri
    u = (xx - cx) / half_w
    inside_w = np.abs(u) < 1
    open_h = 1.05 * ri * max(p.openness, 0.0)
    upper = cy - open_h * (1 - u ** 2)
    lower = cy + 0.85 * ri * max(p.openness, 0.02) * (1 - u ** 2) if p.openness > 0.15 else cy + 0.0 * u
    opening = inside_w & (yy > upper) & (yy < np.maximum(lower, upper + 0.5))
    img[opening] = 205  # sclera (bright in NIR)
    # Iris with its texture, pupil, specular highlight.
    # Off-axis gaze foreshortens the iris disc along the gaze (cos of the angle) and, the pupil lying behind
    # the cornea, shifts the pupil against the limbus: what ISO/IEC 29794-6's concentricity measures.
    ax, ay = np.clip(p.gaze_x, -1, 1) * 0.7, np.clip(p.gaze_y, -1, 1) * 0.7  # about 40 degrees at 1
    dx, dy = (xx - icx) / np.cos(ax), (yy - icy) / np.cos(ay)
    r = np.hypot(dx, dy)
    pdx, pdy = dx - 0.45 * ri * np.sin(ax), dy - 0.45 * ri * np.sin(ay)
    rpu = np.hypot(pdx, pdy)
    tex = _texture(resident, eye)
    theta = (np.arctan2(dy, dx) % (2 * np.pi)) / (2 * np.pi) * tex.shape[1]
    rho = np.clip((r - rp) / max(ri - rp, 1), 0, 0.999) * tex.shape[0]
    t = tex[rho.astype(int), theta.astype(int) % tex.shape[1]]
    iris_level = 105 + _rng("iris-level", resident, eye).uniform(-10, 10)
    iris = opening & (r < ri)
    img[iris] = (iris_level + 28 * t)[iris]
    limbus = opening & (r >= ri - 3) & (r < ri + 2)
    img[limbus] = 80
    pupil = opening & (rpu < rp)
    img[pupil] = 18
    pcx, pcy = icx + 0.45 * ri * np.sin(ax), icy + 0.45 * ri * np.sin(ay)
    hl = (xx - (pcx + 0.35 * rp)) ** 2 + (yy - (pcy - 0.35 * rp)) ** 2 < (0.16 * rp) ** 2
    img[hl & opening] = 250
    # Eyelashes along the upper lid, and the lid margin.
    lash_rng = _rng("lashes", resident, eye)
    for _ in range(45):
        ux = lash_rng.uniform(-0.9, 0.9)
        x0 = cx + ux * half_w
        y0 = cy - open_h * (1 - ux ** 2)
        length = lash_rng.uniform(0.15, 0.35) * ri
        ang = -np.pi / 2 + ux * 0.9 + lash_rng.normal(0, 0.15)
        cv2.line(img, (int(x0), int(y0)), (int(x0 + length * np.cos(ang)), int(y0 + length * np.sin(ang))), 35,
                 max(1, int(round(1.5 * s))), cv2.LINE_AA)
    margin = inside_w & (np.abs(yy - upper) < 2.5 * s + 1)
    img[margin] = 60
    if p.glasses:
        for gx, gy in ((-0.9, -0.5), (0.7, 0.4)):
            cv2.ellipse(img, (int(cx + gx * ri), int(cy + gy * ri)), (int(0.5 * ri), int(0.22 * ri)), 20, 0, 360,
                        252, -1, cv2.LINE_AA)
    if p.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), p.blur)
    else:
        img = cv2.GaussianBlur(img, (0, 0), 0.7)  # the optics are never perfect
    img += rng.normal(0, p.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def with_defect(name: str, **overrides: float) -> EyeParams:
    """The parameters of a named defect (`DEFECTS`), with fields overridden."""
    return replace(DEFECTS[name], **overrides)
