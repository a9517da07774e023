"""The simulator's template and feature format, its matcher, and the persistence of its flash.

Templates are opaque bytes to the host. This format (documented in docs/sensor.md) carries a magic,
the finger's key digest and a 256-value feature vector (the finger's identity vector plus
per-impression noise); matching scores are the cosine between vectors, scaled to the 0..300 range
of real modules. This is not minutiae matching: it models the outcomes (same finger matches,
different fingers do not, poor impressions score lower).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from hw.sensor import synth

log = logging.getLogger(__name__)

TEMPLATE_MAGIC = b"RKS1"
SECURITY_THRESHOLDS = {1: 30, 2: 40, 3: 50, 4: 65, 5: 80}  # Match/Search score needed per level


def _sum16(b: bytes) -> int:
    return sum(b) & 0xFFFF


def encode_template(key: str, vector: np.ndarray, size: int, kind: int = 2, quality: int = 200) -> bytes:
    """Simulator template: magic, key digest, kind, quality, int8 vector, opaque filler, sum16."""
    if size < 16 + synth.FEATURE_DIM:
        raise ValueError(f"template size {size} too small for the simulator format "
                         f"(>= {16 + synth.FEATURE_DIM})")
    v = np.clip(np.round(vector / (np.abs(vector).max() or 1) * 127), -127, 127).astype(np.int8)
    head = TEMPLATE_MAGIC + hashlib.sha256(key.encode()).digest()[:8] + bytes([kind, quality]) + v.tobytes()
    filler = bytearray()
    seed = hashlib.sha256(head).digest()
    while len(head) + len(filler) < size - 2:
        seed = hashlib.sha256(seed).digest()
        filler += seed
    body = head + bytes(filler[:size - 2 - len(head)])
    return body + struct.pack(">H", _sum16(body))


def decode_template(data: bytes) -> tuple[bytes, np.ndarray] | None:
    """(key digest, unit feature vector) of a simulator template, or None if it is not one."""
    if len(data) < 16 + synth.FEATURE_DIM or data[:4] != TEMPLATE_MAGIC:
        return None
    if struct.unpack(">H", data[-2:])[0] != _sum16(data[:-2]):
        return None
    v = np.frombuffer(data[14:14 + synth.FEATURE_DIM], dtype=np.int8).astype(np.float32)
    n = np.linalg.norm(v)
    return (data[4:12], v / n) if n else None


def match_score(a: bytes | None, b: bytes | None) -> int:
    """0..300 score between two templates (0 if either is not a valid simulator template)."""
    da = decode_template(a) if a else None
    db = decode_template(b) if b else None
    if da is None or db is None:
        return 0
    c = float(np.dot(da[1], db[1]))
    return int(round(max(0.0, c - 0.3) / 0.7 * 300))


def image_quality(img: np.ndarray) -> tuple[float, float]:
    """(fraction of 16x16 blocks with ridges, median ridge contrast of those blocks), from pixels."""
    h, w = img.shape
    bh, bw = h // 16, w // 16
    blocks = img[:bh * 16, :bw * 16].astype(np.float32).reshape(bh, 16, bw, 16).swapaxes(1, 2)
    std = blocks.std(axis=(2, 3))
    mean = blocks.mean(axis=(2, 3))
    fg = (std > 25) & (mean < 215)
    frac = float(fg.mean())
    contrast = float(np.median(std[fg])) if fg.any() else 0.0
    return frac, contrast



def image_key(img: np.ndarray) -> str:
    """Identity of a fixed image (present_image, DownImage): a digest of its pixels."""
    return "image:" + hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()[:16]


def extract_features(image: np.ndarray, key: str, noise: float, frac: float, size: int) -> bytes:
    """Img2Tz: a char file of `size` bytes for an image of finger `key`.

    Identity plus noise that grows as less of the finger is usable (`frac`: fraction of blocks with
    ridges); the jitter is seeded by the pixels, so the same image always gives the same features.
    """
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "big"))
    noise = noise + 0.6 * max(0.0, 0.6 - frac)
    ident = synth.identity_vector(key)
    jitter = rng.standard_normal(synth.FEATURE_DIM).astype(np.float32) / np.sqrt(synth.FEATURE_DIM)
    return encode_template(key, ident + jitter * noise, size, kind=1, quality=int(min(255, frac * 255)))


def merge_templates(a: bytes | None, b: bytes | None, size: int, threshold: int) -> bytes | None:
    """RegModel: one model from two char files of the same finger, or None if they do not match."""
    da = decode_template(a) if a else None
    db = decode_template(b) if b else None
    if da is None or db is None or match_score(a, b) < threshold:
        return None
    merged = encode_template("model", da[1] + db[1], size, kind=2)
    # keep the key digest of the first impression (diagnostics only)
    merged = merged[:4] + a[4:12] + merged[12:-2]  # type: ignore[index]
    return merged + struct.pack(">H", _sum16(merged))


def load_flash(path: Path | None) -> tuple[dict[str, int], dict[int, bytes]] | None:
    """(parameters, library) saved at `path`, or None when there is no (readable) file."""
    if not path or not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        params = {k: int(v) for k, v in doc.get("params", {}).items()}
        library = {int(k): bytes.fromhex(v) for k, v in doc.get("library", {}).items()}
    except (ValueError, OSError) as e:
        log.warning("simulated flash unreadable path=%s error=%s (starting empty)", path, e)
        return None
    return params, library


def save_flash(path: Path | None, params: dict[str, int], library: dict[int, bytes]) -> None:
    """Write parameters and library to `path` atomically (nothing when `path` is None)."""
    if not path:
        return
    doc = {"params": params, "library": {str(k): v.hex() for k, v in sorted(library.items())}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
