"""The cached training labels are real NFIQ 2 scores: re-score a sample with the reference tool."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import cv2

from firmware.quality.finger import dataset

REPO = Path(__file__).resolve().parents[2]
SAMPLE = 6  # a few images keep this test fast; the trainer's --relabel re-scores them all


def test_label_cache_matches_nfiq2_reference(corpus_dir: Path, shared_dir: Path, tmp_path: Path) -> None:
    tool = shared_dir / "tools" / "nfiq2-reference"
    assert tool.exists(), f"NFIQ 2 reference scorer missing at {tool}"
    with open(REPO / "tools" / "fpquality_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list(dataset.items(corpus_dir))), "label CSV does not cover the dataset"
    picked = rows[:: max(len(rows) // SAMPLE, 1)][:SAMPLE]
    paths = []
    for i, r in enumerate(picked):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), dataset.Item(r["file"], r["finger"], r["spec"]).image(corpus_dir))
        paths.append(str(p))
    out = subprocess.run([str(tool), *paths], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"nfiq2-reference failed (rc {out.returncode}): {out.stderr[-2000:]}"
    got = {Path(ln.split("\t")[0]).name: ln.split("\t")[1] for ln in out.stdout.splitlines()}
    for i, r in enumerate(picked):
        assert got[f"{i}.png"] == r["nfiq2"], f"{r['file']} {r['spec']}: cache {r['nfiq2']}, NFIQ 2 {got[f'{i}.png']}"


def test_labelled_images_are_still_generated_identically(corpus_dir: Path) -> None:
    # The cache stores a hash of every labelled image. If the corpus, the degradations or the
    # simulator's renderer (hw/sensor/synth.py) change, the labels no longer describe the images:
    # re-run tools/train_fpquality.py --relabel. Checked here on a sample of both kinds.
    with open(REPO / "tools" / "fpquality_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    corpus_rows = [r for r in rows if not r["file"].startswith(dataset.SYNTH_PREFIX)][::23]
    synth_rows = [r for r in rows if r["file"].startswith(dataset.SYNTH_PREFIX)][:40]
    assert synth_rows, "no simulator images in the label cache"
    for r in corpus_rows + synth_rows:
        img = dataset.Item(r["file"], r["finger"], r["spec"]).image(corpus_dir)
        assert dataset.image_digest(img) == r["image_sha1"], \
            f"{r['file']} {r['spec']}: image changed since it was labelled; run tools/train_fpquality.py --relabel"
