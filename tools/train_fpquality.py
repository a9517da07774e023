#!/usr/bin/env python3
"""Train the on-device fingerprint quality model (a distilled NFIQ 2) and report held-out figures.

    .venv/bin/python tools/train_fpquality.py            # features + fit + evaluation, writes the model
    .venv/bin/python tools/train_fpquality.py --relabel  # first re-score every image with real NFIQ 2
    .venv/bin/python tools/train_fpquality.py --check    # fit again and compare with the committed model

Data: every corpus print converted to the sensor format (8-bit gray, centre crop / white pad to
256x288, 16 levels) and its named degradations (`firmware.fpquality.dataset.SPECS`). Labels are
real NFIQ 2.3 scores from ../shared/tools/nfiq2-reference (x86-64 only), cached in
`tools/fpquality_labels.csv` so that training is reproducible without NFIQ 2.

Model: gradient-boosted regression trees (depth 3) on `features.MODEL_FEATURES`, written as plain
numpy arrays to `firmware/fpquality/data/fpquality_model.npz` (no pickle). Deterministic: the
fit uses no randomness, so the same labels and features give the same file bit for bit.

Evaluation: leave-one-finger-out (all images of a finger, including its other impressions and
all their degradations, are held out together), Spearman rho and MAE against NFIQ 2.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from firmware.fpquality import dataset, features, gbt  # noqa: E402

LABELS = REPO / "tools" / "fpquality_labels.csv"
MODEL = REPO / "firmware" / "fpquality" / "data" / "fpquality_model.npz"
PARAMS = {"n_trees": 150, "depth": 3, "learning_rate": 0.08, "min_leaf": 8, "n_bins": 32}


def nfiq2_tool(corpus: Path) -> Path:
    return corpus.parent / "tools" / "nfiq2-reference"


def relabel(corpus: Path, jobs: int = 2) -> None:
    """Score every dataset image with the real NFIQ 2 and write the label CSV."""
    import cv2

    tool = nfiq2_tool(corpus)
    its = list(dataset.items(corpus))
    with tempfile.TemporaryDirectory(prefix="fpq-labels-") as tmp:
        paths = []
        for i, it in enumerate(its):
            p = Path(tmp) / f"{i:05d}.png"
            cv2.imwrite(str(p), it.image(corpus))
            paths.append(p)
        chunks = [paths[k::jobs] for k in range(jobs)]
        t0 = time.perf_counter()
        procs = [subprocess.Popen([str(tool), *map(str, c)], stdout=subprocess.PIPE, text=True) for c in chunks]
        scores: dict[str, str] = {}
        for pr in procs:
            out, _ = pr.communicate()
            for line in out.splitlines():
                path, _, score = line.partition("\t")
                scores[Path(path).name] = score
        print(f"NFIQ 2 scored {len(scores)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    with open(LABELS, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "finger", "spec", "nfiq2"])
        for i, it in enumerate(its):
            w.writerow([it.file, it.finger, it.spec, scores.get(f"{i:05d}.png", "NA")])


def load_labels() -> list[tuple[dataset.Item, float]]:
    """(item, NFIQ 2 score) for every labelled image; NA rows (NFIQ 2 refused them) are skipped."""
    out = []
    with open(LABELS, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["nfiq2"] != "NA":
                out.append((dataset.Item(r["file"], r["finger"], r["spec"]), float(r["nfiq2"])))
    return out


def feature_matrix(corpus: Path, its: list[dataset.Item]) -> np.ndarray:
    rows = []
    for it in its:
        f = features.compute(it.image(corpus))
        rows.append([f[n] for n in features.MODEL_FEATURES])
    return np.asarray(rows, np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def rank(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            m = x == v
            r[m] = r[m].mean()
        return r
    ra, rb = rank(np.asarray(a, float)), rank(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=dataset.default_corpus(REPO))
    ap.add_argument("--relabel", action="store_true", help="re-score all images with the NFIQ 2 reference")
    ap.add_argument("--check", action="store_true", help="do not write; compare with the committed model")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    if a.relabel:
        relabel(a.corpus, a.jobs)
    labelled = load_labels()
    its = [it for it, _ in labelled]
    y = np.array([s for _, s in labelled])
    t0 = time.perf_counter()
    x = feature_matrix(a.corpus, its)
    print(f"features: {len(its)} images in {time.perf_counter() - t0:.1f} s")
    fingers = np.array([it.finger for it in its])

    # Held-out evaluation: leave one finger out.
    pred = np.zeros_like(y)
    for fg in sorted(set(fingers)):
        test = fingers == fg
        m = gbt.fit(x[~test], y[~test], **PARAMS)
        pred[test] = gbt.predict(m, x[test])
    rho = spearman(pred, y)
    mae = float(np.abs(pred - y).mean())
    print(f"leave-one-finger-out over {len(set(fingers))} fingers, {len(y)} images: "
          f"Spearman {rho:.3f}, MAE {mae:.2f} NFIQ 2 points")
    for fg in sorted(set(fingers)):
        t = fingers == fg
        print(f"  {fg:28} n={t.sum():3d} rho={spearman(pred[t], y[t]):.3f} MAE={np.abs(pred[t] - y[t]).mean():.2f}")

    model = gbt.fit(x, y, **PARAMS)
    model["feature_names"] = np.array(features.MODEL_FEATURES)
    model["cv_spearman"] = np.array(rho)
    model["cv_mae"] = np.array(mae)
    if a.check:
        old = gbt.load(MODEL)
        d = float(np.abs(gbt.predict(old, x) - gbt.predict(model, x)).max())
        print(f"max |committed - refit| prediction difference: {d:.6f}")
        return 0 if d < 1e-6 else 1
    MODEL.parent.mkdir(parents=True, exist_ok=True)
    gbt.save(model, MODEL)
    print(f"wrote {MODEL.relative_to(REPO)} ({MODEL.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
