"""The training/evaluation set: corpus prints in sensor format plus named degradations.

Shared by `tools/train_fpquality.py`, `bench/bench_fpquality.py` and the tests, so that all three
see the same images. Not used on the capture path. Every item is (corpus file, finger id, spec);
the image is regenerated from the read-only corpus (never copied into the repository).
"""

from __future__ import annotations

import csv
import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from firmware.capture import sensor_image
from firmware.quality.finger import degrade

#: Degradations applied to every corpus print (ladders of increasing strength, then mixtures).
SPECS: tuple[str, ...] = (
    "none",
    "blur:1", "blur:2", "blur:3", "blur:4.5",
    "noise:8", "noise:16", "noise:28", "noise:45",
    "wet:1", "wet:2", "wet:3",
    "dry:1", "dry:2", "dry:3",
    "partial:0.7", "partial:0.5", "partial:0.3",
    "rotate:-20", "rotate:15", "rotate:35",
    "shift:-70,0", "shift:60,0", "shift:0,-80", "shift:0,70", "shift:-40,-40",
    "faint:0.5", "faint:0.3", "faint:0.15",
    "smudge:0.5", "smudge:0.9",
    "blur:1.5+noise:12", "wet:1+blur:1", "dry:1+noise:10", "faint:0.5+blur:1",
    "rotate:10+shift:30,20", "partial:0.6+noise:8",
    # Intermediate levels near the cliffs, where NFIQ 2 collapses to 0.
    "blur:2.5", "blur:3.5", "noise:35", "wet:1.5", "wet:2.5", "dry:1.5", "dry:2.5",
    "partial:0.6", "partial:0.4", "faint:0.2", "faint:0.1", "smudge:0.7", "rotate:-40", "rotate:25",
    # Other parts of the same print (the large images hold more than one sensor window).
    "shift:-30,0+blur:1", "shift:30,-30+noise:10", "shift:0,40+wet:1", "shift:0,-40+dry:1",
    "shift:50,50", "shift:-90,0", "shift:0,-110", "shift:100,0",
    "wet:2+noise:10", "dry:2+blur:1", "blur:2.5+noise:20", "faint:0.2+noise:8", "smudge:0.7+blur:1",
    "partial:0.5+rotate:20", "wet:1+shift:-50,0", "dry:1+partial:0.7", "blur:2+faint:0.5",
    "noise:20+rotate:-15",
)

#: Corpus prints of the same finger share a finger id (held-out evaluation splits by finger).
FINGER_OF = {
    "nbisrs-p1_1.png": "nbisrs-p1", "nbisrs-p1_2.png": "nbisrs-p1", "nbisrs-p1_3.png": "nbisrs-p1",
    "nbisrs-p2_1.png": "nbisrs-p2", "nbisrs-p2_2.png": "nbisrs-p2", "nbisrs-p2_3.png": "nbisrs-p2",
    "sourceafis-probe.png": "sourceafis-A", "sourceafis-matching.png": "sourceafis-A",
    "sourceafis-nonmatching.png": "sourceafis-B",
}


#: Synthetic fingers from the sensor simulator (hw/sensor/synth.py, SFinGe method): how many, and
#: the impressions rendered of each (simulator skin condition : impression number).
SYNTH_FINGERS = 40
SYNTH_SPECS: tuple[str, ...] = ("good:1", "good:2", "dry:1", "wet:1", "partial:1")
SYNTH_PREFIX = "synth:"


@lru_cache(maxsize=8)
def _synth_master(key: str) -> np.ndarray:
    from hw.sensor import synth

    return synth.grow_master(key)


@dataclass(frozen=True)
class Item:
    """One image of the set, regenerated on demand."""

    file: str  # name under corpus/fingerprints, or synth:<finger key> for a simulator finger
    finger: str
    spec: str

    def image(self, corpus_dir: Path) -> np.ndarray:
        """The sensor-format image (16 levels, 256x288)."""
        if self.file.startswith(SYNTH_PREFIX):
            from hw.sensor import synth

            key = self.file[len(SYNTH_PREFIX):]
            quality, _, _ = self.spec.partition(":")
            rng = np.random.default_rng(zlib.crc32(f"{key}/{self.spec}".encode()))
            return sensor_image.to_sensor(synth.render_synthetic(_synth_master(key), rng, quality))
        gray = sensor_image.load_file(corpus_dir / "fingerprints" / self.file)
        return sensor_image.to_sensor(degrade.apply(gray, self.spec))


def fold_of(finger: str) -> str:
    """Cross-validation fold of a finger: each real finger alone; simulator fingers in 4 groups of
    10 (all impressions of a finger always stay in the same fold)."""
    if finger.startswith("synth-"):
        return f"synth-group-{int(finger.split('-')[1]) % 4}"
    return finger


def image_digest(img: np.ndarray) -> str:
    """Short content hash, stored with each label so that a changed generator is noticed."""
    return hashlib.sha1(img.tobytes()).hexdigest()[:12]


def corpus_prints(corpus_dir: Path) -> list[str]:
    """Fingerprint files of the corpus (kind fingerprint or fingerprint-synthetic), by MANIFEST."""
    with open(corpus_dir / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return sorted(Path(r["file"]).name for r in rows if r["kind"] in ("fingerprint", "fingerprint-synthetic"))


def items(corpus_dir: Path, specs: tuple[str, ...] = SPECS, synthetic: bool = True) -> Iterator[Item]:
    """Every (corpus print, degradation) pair, then the simulator's synthetic impressions."""
    for name in corpus_prints(corpus_dir):
        finger = FINGER_OF.get(name, Path(name).stem)
        for spec in specs:
            yield Item(name, finger, spec)
    if synthetic:
        for k in range(SYNTH_FINGERS):
            key = f"fpq-train-{k:03d}/0"
            for spec in SYNTH_SPECS:
                yield Item(SYNTH_PREFIX + key, f"synth-{k:03d}", spec)


def default_corpus(repo: Path) -> Path:
    """$REKAM_CORPUS, else ../shared/corpus next to the checkout."""
    import os

    env = os.environ.get("REKAM_CORPUS")
    return Path(env) if env else (repo.parent / "shared" / "corpus").resolve()
