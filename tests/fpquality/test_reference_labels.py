"""The cached training labels are real NFIQ 2 scores: re-score a sample with the reference tool."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import cv2

from firmware.fpquality import dataset

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
