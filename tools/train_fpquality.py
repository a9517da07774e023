#!/usr/bin/env python3
"""Train the on-device fingerprint quality model (a distilled NFIQ 2) and report held-out figures.

    .venv/bin/python tools/train_fpquality.py            # features + fit + evaluation, writes the model
    .venv/bin/python tools/train_fpquality.py --relabel  # first re-score every image with real NFIQ 2
    .venv/bin/python tools/train_fpquality.py --check    # fit again and compare with the committed model
    .venv/bin/python tools/train_fpquality.py --calibrate  # also print the gate and threshold tables

Data: every corpus print converted to the sensor format (8-bit gray, centre crop / white pad to
256x288, 16 levels) and its named degradations (`firmware.quality.finger.dataset.SPECS`), plus 40
synthetic fingers of the sensor simulator (hw/sensor/synth.py: good x2, dry, wet, partial). Labels are
real NFIQ 2.3 scores from ../shared/tools/nfiq2-reference (x86-64 only), cached in
`tools/fpquality_labels.csv` so that training is reproducible without NFIQ 2.

Model: gradient-boosted regression trees (depth 4, 250 trees) on `features.MODEL_FEATURES`, written as plain
numpy arrays to `firmware/quality/finger/data/fpquality_model.npz` (no pickle). Deterministic: the
fit uses no randomness, so the same labels and features give the same file bit for bit.

Evaluation: held out by finger (all images of a finger, including its other impressions and all
their degradations, are held out together; `dataset.fold_of`), Spearman rho and MAE against NFIQ 2.
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

from firmware.quality.finger import dataset, features, gates, gbt  # noqa: E402

LABELS = REPO / "tools" / "fpquality_labels.csv"
MODEL = REPO / "firmware" / "quality" / "finger" / "data" / "fpquality_model.npz"
PARAMS = gbt.TRAIN_PARAMS


def nfiq2_tool(corpus: Path) -> Path:
    return corpus.parent / "tools" / "nfiq2-reference"


def relabel(corpus: Path, jobs: int = 2) -> None:
    """Score every dataset image with the real NFIQ 2 and write the label CSV."""
    import cv2

    tool = nfiq2_tool(corpus)
    its = list(dataset.items(corpus))
    with tempfile.TemporaryDirectory(prefix="fpq-labels-") as tmp:
        paths, digests = [], []
        for i, it in enumerate(its):
            p = Path(tmp) / f"{i:05d}.png"
            img = it.image(corpus)
            cv2.imwrite(str(p), img)
            paths.append(p)
            digests.append(dataset.image_digest(img))
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
        w.writerow(["file", "finger", "spec", "nfiq2", "image_sha1"])
        for i, it in enumerate(its):
            w.writerow([it.file, it.finger, it.spec, scores.get(f"{i:05d}.png", "NA"), digests[i]])


def load_labels() -> list[tuple[dataset.Item, float, str]]:
    """(item, NFIQ 2 score, image digest) per labelled image; NA rows (NFIQ 2 refused them) skipped."""
    out = []
    with open(LABELS, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["nfiq2"] != "NA":
                out.append((dataset.Item(r["file"], r["finger"], r["spec"]), float(r["nfiq2"]), r["image_sha1"]))
    return out


def feature_dicts(corpus: Path, its: list[dataset.Item], digests: list[str]) -> list[dict[str, float]]:
    """Features of every image; stops if an image no longer matches the one that was labelled."""
    out = []
    for it, d in zip(its, digests, strict=True):
        img = it.image(corpus)
        if dataset.image_digest(img) != d:
            raise SystemExit(f"{it.file} {it.spec}: image differs from the labelled one (the corpus or "
                             "a generator changed): run with --relabel")
        out.append(features.compute(img))
    return out


def feature_matrix(feats: list[dict[str, float]]) -> np.ndarray:
    return np.asarray([[f[n] for n in features.MODEL_FEATURES] for f in feats], np.float64)


def calibration_tables(its: list[dataset.Item], feats: list[dict[str, float]], y: np.ndarray,
                       pred: np.ndarray) -> None:
    """Print what the gates and the accept threshold do on the data (held-out predictions)."""
    lim = gates.Limits()
    codes = [gates.check(f, lim) for f in feats]
    rejected = np.array([bool(c) for c in codes])
    print("\nHard rejects per degradation (median NFIQ 2, share rejected, codes):")
    names = [("simulator " if it.file.startswith(dataset.SYNTH_PREFIX) else "") + it.spec for it in its]
    for spec in dict.fromkeys(names):
        m = np.array([n == spec for n in names])
        counts: dict[str, int] = {}
        for k in np.flatnonzero(m):
            for c in codes[k]:
                counts[c] = counts.get(c, 0) + 1
        top = ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"  {spec:26} NFIQ2 {np.median(y[m]):4.0f}  rejected {rejected[m].sum():2d}/{m.sum():2d}  {top}")
    for lo, hi, what in ((0, 0, "NFIQ 2 = 0"), (1, 29, "NFIQ 2 1-29"), (30, 44, "NFIQ 2 30-44"),
                         (45, 100, "NFIQ 2 >= 45")):
        m = (y >= lo) & (y <= hi)
        print(f"  {what:14} n={m.sum():4d} hard-rejected {100 * rejected[m].mean():5.1f} %")
    score = np.where(rejected, -1.0, np.clip(pred, 0, 100))  # a hard reject is never accepted
    print("\nAccept threshold on the held-out score, hard rejects never accepted (share accepted at the "
          "first impression):")
    print("  threshold  NFIQ2>=45  NFIQ2 30-44  NFIQ2 1-29  NFIQ2=0   clean corpus prints")
    clean = np.array([it.spec == "none" for it in its])
    for t in (30, 35, 40, 45, 50):
        acc = score >= t
        cells = [100 * acc[(y >= lo) & (y <= hi)].mean() for lo, hi in ((45, 100), (30, 44), (1, 29), (0, 0))]
        print(f"  {t:9d}  " + "  ".join(f"{c:8.1f} %" for c in cells) + f"  {acc[clean].sum():2d}/{clean.sum()}")


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
    ap.add_argument("--calibrate", action="store_true", help="print gate and threshold tables")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    if a.relabel:
        relabel(a.corpus, a.jobs)
    labelled = load_labels()
    its = [it for it, _, _ in labelled]
    y = np.array([s for _, s, _ in labelled])
    t0 = time.perf_counter()
    feats = feature_dicts(a.corpus, its, [d for _, _, d in labelled])
    x = feature_matrix(feats)
    print(f"features: {len(its)} images in {time.perf_counter() - t0:.1f} s")
    fingers = np.array([it.finger for it in its])

    # Held-out evaluation by finger: each real finger is a fold (with all its impressions and
    # variants); the 40 simulator fingers form 4 folds of 10 fingers.
    folds = np.array([dataset.fold_of(f) for f in fingers])
    pred = np.zeros_like(y)
    for fold in sorted(set(folds)):
        test = folds == fold
        m = gbt.fit(x[~test], y[~test], **PARAMS)
        pred[test] = gbt.predict(m, x[test])
    rho = spearman(pred, y)
    mae = float(np.abs(pred - y).mean())
    nz = y > 0
    sim = np.char.startswith(fingers.astype(str), "synth-")
    print(f"held out by finger ({len(set(fingers))} fingers in {len(set(folds))} folds), {len(y)} images: "
          f"Spearman {rho:.3f}, MAE {mae:.2f} NFIQ 2 points")
    print(f"  images with NFIQ 2 > 0 ({nz.sum()}): Spearman {spearman(pred[nz], y[nz]):.3f}; corpus prints and "
          f"variants ({(~sim).sum()}): {spearman(pred[~sim], y[~sim]):.3f}; simulator prints ({sim.sum()}): "
          f"{spearman(pred[sim], y[sim]):.3f}")
    for fg in sorted(set(fingers[~sim])):
        t = fingers == fg
        print(f"  {fg:28} n={t.sum():3d} rho={spearman(pred[t], y[t]):.3f} MAE={np.abs(pred[t] - y[t]).mean():.2f}")

    if a.calibrate:
        calibration_tables(its, feats, y, pred)
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
