"""Fingers for the simulator: synthetic prints (SFinGe method) and real prints from the corpus.

Synthetic master finger, seeded by (resident, finger):
  1. class (loop / whorl / arch / tented arch) and core/delta positions drawn from the seed;
  2. orientation field from the singular points (Sherlock-Monro zero-pole model) plus a smooth
     random perturbation; ridge period ~8-10 px (500 ppi) varying smoothly;
  3. ridges grown from random seeds by iterated Gabor filtering tuned to the local orientation
     and frequency (Cappelli, Maio, Maltoni: SFinGe), one filter per orientation bin.
Masters are cached (about 0.3 s to grow); an impression is cheap (~20 ms): elastic distortion,
shift and rotation, pressure (ridge thickness, contact area), skin condition (dry: broken light
ridges; wet: merged dark ridges; partial: part of the contact missing), noise, blur, then the
sensor geometry and its 16 gray levels.

Real prints: ``corpus:<name>`` fingers map to the corpus files (`<corpus>/fingerprints`);
several files of the same finger are impressions of it, and get the same kind of variation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hw.sensor.image import Geometry, to_gray, to_sensor_image

log = logging.getLogger(__name__)

QUALITIES = ("good", "dry", "wet", "partial")
CANVAS = (400, 360)  # master size (h, w): larger than 256x288 so impressions can shift and rotate
N_BINS = 16
FEATURE_DIM = 256

# Real fingers in the corpus: name -> files that are impressions of that finger.
CORPUS_FINGERS: dict[str, tuple[str, ...]] = {
    "nbisrs-p1": ("nbisrs-p1_1.png", "nbisrs-p1_2.png", "nbisrs-p1_3.png"),
    "nbisrs-p2": ("nbisrs-p2_1.png", "nbisrs-p2_2.png", "nbisrs-p2_3.png"),
    "sourceafis-a": ("sourceafis-probe.png", "sourceafis-matching.png"),
    "sourceafis-b": ("sourceafis-nonmatching.png",),
    "sfinge-1": ("nfiq2-SFinGe_Test01.pgm",),
    "sfinge-2": ("nfiq2-SFinGe_Test02.pgm",),
    "sfinge-3": ("nfiq2-SFinGe_Test03.pgm",),
    "sfinge-4": ("nfiq2-SFinGe_Test04.pgm",),
    "sfinge-5": ("nfiq2-SFinGe_Test05.pgm",),
    "fpenhance-1": ("fpenhance-1.jpg",),
    "fpenhance-2": ("fpenhance-2.jpg",),
}
CORPUS_PREFIX = "corpus:"


def finger_key(resident_id: str, finger: int) -> str:
    """The identity of a finger: ``<resident>/<finger 0..9>`` (corpus fingers: ``corpus:<name>``)."""
    if not isinstance(resident_id, str) or not resident_id:
        raise ValueError(f"resident id must be a non-empty string, got {resident_id!r}")
    if not isinstance(finger, int) or not 0 <= finger <= 9:
        raise ValueError(f"finger must be 0..9 (ISO thumb..little, right then left), got {finger!r}")
    if resident_id.startswith(CORPUS_PREFIX):
        name = resident_id[len(CORPUS_PREFIX):]
        if name not in CORPUS_FINGERS:
            raise ValueError(f"unknown corpus finger {name!r} (known: {', '.join(CORPUS_FINGERS)})")
        return resident_id
    return f"{resident_id}/{finger}"


def _seed(*parts: object) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big")


def identity_vector(key: str) -> np.ndarray:
    """The finger's ideal feature vector (unit length, deterministic in its key)."""
    v = np.random.default_rng(_seed("identity", key)).standard_normal(FEATURE_DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


@dataclass(frozen=True)
class Impression:
    """One simulated capture: the image as the sensor stores it, and what the simulator knows."""

    image: np.ndarray  # uint8, sensor geometry, 16 gray levels
    key: str  # finger identity
    quality: str
    noise: float  # how far its features stray from the finger's identity vector


# --- synthetic master fingers --------------------------------------------------------------


def _orientation_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Ridge orientation (radians, mod pi) from cores/deltas, Sherlock-Monro zero-pole model."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    z = xx + 1j * yy
    cx, cy = w / 2 + rng.uniform(-25, 25), h * 0.45 + rng.uniform(-25, 25)
    kind = rng.choice(["loop_l", "loop_r", "whorl", "arch", "tented"], p=[0.33, 0.32, 0.27, 0.04, 0.04])
    cores: list[complex] = []
    deltas: list[complex] = []
    if kind in ("loop_l", "loop_r"):
        s = -1 if kind == "loop_l" else 1
        cores.append(complex(cx, cy))
        deltas.append(complex(cx + s * rng.uniform(70, 110), cy + rng.uniform(90, 140)))
    elif kind == "whorl":
        d = rng.uniform(10, 30)
        a = rng.uniform(-0.6, 0.6)
        cores += [complex(cx - d * np.sin(a), cy - d * np.cos(a)),
                  complex(cx + d * np.sin(a), cy + d * np.cos(a))]
        deltas += [complex(cx - rng.uniform(90, 130), cy + rng.uniform(100, 140)),
                   complex(cx + rng.uniform(90, 130), cy + rng.uniform(100, 140))]
    elif kind == "tented":
        cores.append(complex(cx, cy))
        deltas.append(complex(cx + rng.uniform(-8, 8), cy + rng.uniform(45, 70)))
    else:  # plain arch: a core/delta pair far below the finger bends the ridges into an arch
        cores.append(complex(cx, h * 1.6))
        deltas.append(complex(cx, h * 2.2))
    theta = np.zeros((h, w), np.float32)
    for d in deltas:
        theta += np.angle(z - d).astype(np.float32)
    for c in cores:
        theta -= np.angle(z - c).astype(np.float32)
    theta *= 0.5
    # smooth random perturbation, a few degrees, so no two fingers of a class are identical
    small = rng.standard_normal((5, 5)).astype(np.float32) * 0.12
    theta += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.mod(-theta, np.pi)  # image rows grow downwards: mirror the angle


def grow_master(key: str) -> np.ndarray:
    """Ridge pattern of a synthetic finger in [-1, 1] (float32, CANVAS), deterministic in `key`."""
    rng = np.random.default_rng(_seed("master", key))
    h, w = CANVAS
    theta = _orientation_field(rng, h, w)
    period = rng.uniform(8.3, 9.8)
    bins = np.round(theta / np.pi * N_BINS).astype(np.int32) % N_BINS
    kernels = [cv2.getGaborKernel((17, 17), period * 0.45, b * np.pi / N_BINS + np.pi / 2, period, 1.0, 0)
               for b in range(N_BINS)]
    kernels = [(k - k.mean()).astype(np.float32) for k in kernels]
    img = np.zeros((h, w), np.float32)
    seeds = rng.random((h, w)) < 0.002
    img[seeds] = rng.choice([-1.0, 1.0], size=int(seeds.sum()))
    masks = [bins == b for b in range(N_BINS)]
    for _ in range(10):
        out = np.zeros_like(img)
        for b, k in enumerate(kernels):
            resp = cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT)
            out[masks[b]] = resp[masks[b]]
        s = np.percentile(np.abs(out), 95) or 1.0
        img = np.tanh(2.5 * out / s).astype(np.float32)
    return img


def _finger_mask(rng: np.random.Generator, shape: tuple[int, int], center: tuple[float, float],
                 axes: tuple[float, float], angle: float) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, (int(center[0]), int(center[1])), (int(axes[0]), int(axes[1])), angle, 0, 360, 255, -1)
    return cv2.GaussianBlur(m, (0, 0), 4).astype(np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _warp(rng: np.random.Generator, img: np.ndarray, max_shift: float, max_rot: float,
          elastic: float, border: float) -> np.ndarray:
    """Rotation, shift and a smooth elastic distortion (skin is not rigid)."""
    h, w = img.shape
    ang = rng.uniform(-max_rot, max_rot)
    tx, ty = rng.uniform(-max_shift, max_shift, 2)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), ang, 1.0)
    m[:, 2] += (tx, ty)
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=border)
    if elastic > 0:
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        dx = _smooth_noise(rng, (h, w), 4) * elastic
        dy = _smooth_noise(rng, (h, w), 4) * elastic
        out = cv2.remap(out, gx + dx, gy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=border)
    return out


def _partial_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Only part of the finger touches: a soft half-plane through the contact area."""
    h, w = shape
    a = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = (xx - w / 2) * np.cos(a) + (yy - h / 2) * np.sin(a) - rng.uniform(-10, 40)
    return np.clip(d / 12 + 0.5, 0, 1)


def render_synthetic(master: np.ndarray, rng: np.random.Generator, quality: str) -> np.ndarray:
    """One 8-bit impression (CANVAS size) of a master ridge pattern."""
    h, w = master.shape
    ridges = _warp(rng, master, 18, 9, 2.5, -1.0)
    pressure = rng.uniform(0.85, 1.15)
    contact = _finger_mask(rng, (h, w), (w / 2 + rng.uniform(-10, 10), h / 2 + rng.uniform(-10, 10)),
                           (118 * pressure, 165 * pressure), rng.uniform(-8, 8))
    thr = 0.05 - 0.25 * (pressure - 1.0)  # more pressure: wider ridges
    darkness = 0.85
    if quality == "dry":
        # thin, faint ridges broken into fragments (cracked skin does not touch the glass)
        thr += 0.45
        darkness = 0.5
        breaks = _smooth_noise(rng, (h, w), 90) > rng.uniform(-0.1, 0.3)
        contact = contact * np.where(breaks, 1.0, 0.1).astype(np.float32)
    elif quality == "wet":
        thr -= 0.8
        darkness = 1.0
    if quality == "partial":
        contact = contact * _partial_mask(rng, (h, w))
    ink = 1.0 / (1.0 + np.exp(-(ridges + thr) * 6.0))  # 1 on ridges, 0 in valleys
    if quality == "wet":
        # water fills the valleys: merged ridges everywhere, solid dark smudges in patches
        ink = cv2.GaussianBlur(ink, (0, 0), 2.2)
        ink = np.clip(ink * 1.3 + 0.2, 0, 1)
        smudge = np.clip((_smooth_noise(rng, (h, w), 8) - rng.uniform(-0.2, 0.4)) * 2.0, 0, 1)
        ink = np.maximum(ink, smudge)
    uneven = 1.0 + 0.12 * _smooth_noise(rng, (h, w), 3)
    gray = 245.0 - 235.0 * darkness * ink * contact * uneven
    gray += rng.normal(0, 7.0, (h, w)).astype(np.float32)
    gray = cv2.GaussianBlur(gray.astype(np.float32), (3, 3), 0.7)
    return np.clip(gray, 0, 255).astype(np.uint8)


def render_real(gray: np.ndarray, rng: np.random.Generator, quality: str) -> np.ndarray:
    """One impression of a real corpus print: the same kinds of variation applied to the image."""
    img = gray.astype(np.float32) / 255.0
    img = _warp(rng, img, 10, 6, 1.2, 1.0)
    h, w = img.shape
    pressure = rng.uniform(0.85, 1.15)
    k = np.ones((3, 3), np.uint8)
    # pressure: blend towards grown (eroded) or thinned (dilated) ridges; full strength when wet/dry
    if quality == "wet":
        img = cv2.erode(img, k)
    elif quality == "dry":
        img = cv2.dilate(img, k)
    else:
        wt = min(1.0, abs(pressure - 1.0) / 0.15) * 0.5
        img = (1 - wt) * img + wt * (cv2.erode(img, k) if pressure > 1.0 else cv2.dilate(img, k))
    if quality == "dry":
        breaks = _smooth_noise(rng, (h, w), 30) > rng.uniform(-0.2, 0.3)
        img = np.where(breaks, img, 1.0 - (1.0 - img) * 0.2)
        img = 1.0 - (1.0 - img) * 0.6
    elif quality == "wet":
        img = cv2.GaussianBlur(img, (0, 0), 1.5) * 0.8
    if quality == "partial":
        m = _partial_mask(rng, (h, w))
        img = img * m + (1.0 - m)
    img = img * 255.0 + rng.normal(0, 5.0, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


#: A folder where simulators keep the masters they grew, shared by every process that sets it (a test session: each
#: `rekamd --sim` grows the same residents' fingers, ~0.35 s each). Unset: masters are kept in memory only.
DISK_CACHE_ENV = "REKAM_SIM_FINGER_CACHE"
# Masters on disk are named after this module's source too: a changed renderer never reads an old file.
_SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class FingerBank:
    """Deterministic fingers for a simulated population; thread-safe, caches masters (in memory, and in
    `disk_cache` if given, default ``$REKAM_SIM_FINGER_CACHE``)."""

    def __init__(self, corpus_dir: str | Path | None = None, cache_size: int = 64,
                 disk_cache: str | Path | None = None) -> None:
        self.corpus_dir = Path(corpus_dir) if corpus_dir else None
        folder = disk_cache if disk_cache is not None else os.environ.get(DISK_CACHE_ENV)
        self.disk_cache = Path(folder) if folder else None
        self._masters: OrderedDict[str, np.ndarray] = OrderedDict()
        self._corpus: dict[str, list[np.ndarray]] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def corpus_fingers(self) -> list[str]:
        """Keys of the corpus fingers available (``corpus:<name>``), empty without a corpus."""
        if not self.corpus_dir or not (self.corpus_dir / "fingerprints").is_dir():
            return []
        return [CORPUS_PREFIX + n for n, files in CORPUS_FINGERS.items()
                if all((self.corpus_dir / "fingerprints" / f).exists() for f in files)]

    def has_master(self, key: str) -> bool:
        """Whether a finger's master is ready (corpus fingers need none)."""
        with self._lock:
            return key.startswith(CORPUS_PREFIX) or key in self._masters

    def master(self, key: str) -> np.ndarray:
        """The cached synthetic master of a finger key."""
        with self._lock:
            m = self._masters.get(key)
            if m is not None:
                self._masters.move_to_end(key)
                return m
        m = self._load(key)
        if m is None:
            m = grow_master(key)
            self._save(key, m)
        with self._lock:
            self._masters[key] = m
            while len(self._masters) > self._cache_size:
                self._masters.popitem(last=False)
        return m

    def _disk_path(self, key: str) -> Path | None:
        if self.disk_cache is None:
            return None
        return self.disk_cache / (hashlib.sha256(f"{_SOURCE_DIGEST}\0{key}".encode()).hexdigest()[:32] + ".npy")

    def _load(self, key: str) -> np.ndarray | None:
        p = self._disk_path(key)
        if p is None:
            return None
        try:
            m = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None  # absent, or torn by a writer killed mid-way: grown again
        return m if m.shape == CANVAS and m.dtype == np.float32 else None

    def _save(self, key: str, m: np.ndarray) -> None:
        p = self._disk_path(key)
        if p is None:
            return
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}")
            with open(tmp, "wb") as f:
                np.save(f, m, allow_pickle=False)
            os.replace(tmp, p)  # whole or absent, whichever process reads it
        except OSError as e:
            log.debug("finger master not cached path=%s error=%s", p, e)

    def _corpus_images(self, key: str) -> list[np.ndarray]:
        name = key[len(CORPUS_PREFIX):]
        with self._lock:
            if name in self._corpus:
                return self._corpus[name]
        if not self.corpus_dir:
            raise ValueError(f"finger {key!r} needs the corpus, but no corpus folder was given")
        imgs = []
        for f in CORPUS_FINGERS[name]:
            p = self.corpus_dir / "fingerprints" / f
            a = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if a is None:
                raise ValueError(f"cannot read corpus fingerprint {p}")
            imgs.append(to_gray(a))
        with self._lock:
            self._corpus[name] = imgs
        return imgs

    def impression(self, key: str, geometry: Geometry, quality: str = "good",
                   rng: np.random.Generator | None = None) -> Impression:
        """Render one impression of finger `key` as the sensor would deliver it."""
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
        rng = rng or np.random.default_rng()
        if key.startswith(CORPUS_PREFIX):
            imgs = self._corpus_images(key)
            gray = render_real(imgs[int(rng.integers(len(imgs)))], rng, quality)
        else:
            gray = render_synthetic(self.master(key), rng, quality)
        img = to_sensor_image(gray, geometry)
        noise = {"good": 0.30, "dry": 0.55, "wet": 0.55, "partial": 0.65}[quality] + rng.uniform(0, 0.1)
        return Impression(img, key, quality, noise)
