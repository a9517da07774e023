"""Face-quality benchmark (issue #5: camera and face-image quality).

1. Per-image time of the full assessment (BlazeFace detection + FaceMesh (2 passes) + iris x2 +
   every measure) at 640x480 and 1920x1080, against the bare model inference of the same models,
   interleaved in the same run: the ratio is the cost of our pre/post-processing and measures on
   top of the networks. Three baselines: "in-call" is the time of the model invocations
   (set_tensor + invoke) inside the very assessment calls timed, i.e. the same inputs in the same
   cache state; "bare" is the five invocations alone in a tight loop on ready tensors (detector
   192x192, mesh 192x192 x2, iris 64x64 x2; the same at every frame size), which runs faster
   than the same calls in the pipeline (warm caches); "bare+lb" adds the detector's letterbox
   of the frame (the baseline of the figures before issue #17).
   Each size is measured in `--runs` runs (default 3) of `--rounds` interleaved rounds; every
   run's medians give one ratio and the median of the run ratios is the figure. The machine
   load (/proc/loadavg) is printed before and after.
2. Process memory: resident set after importing numpy/OpenCV (baseline), after loading and
   hash-checking the four models (before any inference), and the peak after the runs above.

    .venv/bin/python bench/bench_face.py [--rounds N] [--threads T] [--image PATH]

Figures are from this machine (x86-64); a Raspberry Pi 4 is expected to be several times slower.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    """Current resident set size, MiB (from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    corpus = Path(os.environ.get("REKAM_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", default=str(corpus / "faces" / "facerec-biden2.jpg"))
    a = ap.parse_args()

    import cv2
    import numpy as np

    base_rss = rss_mb()
    from firmware.quality.face.assess import FaceAssessor, FaceThresholds
    from firmware.quality.face.detect import letterbox

    src = cv2.imread(a.image)
    if src is None:
        print(f"cannot read {a.image}", file=sys.stderr)
        return 2
    assessor = FaceAssessor(FaceThresholds(threads=a.threads))
    det, mesh, iris = assessor.detector.model, assessor.landmarker.mesh_model, assessor.landmarker.iris_model
    assert iris is not None

    def frame(w: int, h: int) -> np.ndarray:
        # the portrait scaled to fill the frame height, centred on a gray background (a kiosk view)
        s = h / src.shape[0] * 0.9
        small = cv2.resize(src, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        out = np.full((h, w, 3), 128, np.uint8)
        y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
        out[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
        return out

    t_mesh = np.random.default_rng(0).random((mesh.size, mesh.size, 3), dtype=np.float32)
    t_iris = np.random.default_rng(1).random((iris.size, iris.size, 3), dtype=np.float32)

    in_call = [0.0]  # invocation time spent inside assess(), accumulated by the wrapper below

    def timed(model: object) -> None:
        interp, index = model.interpreter, model._in_index  # type: ignore[attr-defined]
        outs = model._out_indices  # type: ignore[attr-defined]

        def run(x: np.ndarray) -> list[np.ndarray]:
            t = time.perf_counter()
            interp.set_tensor(index, x[np.newaxis].astype(np.float32, copy=False))
            interp.invoke()
            in_call[0] += time.perf_counter() - t
            return [interp.get_tensor(i).copy() for i in outs]

        model.run = run  # type: ignore[attr-defined]

    for model in (det, mesh, iris):
        timed(model)

    def bare(tensor: np.ndarray) -> None:
        # the networks alone: one detector call, two mesh passes, two iris calls, on ready tensors
        det.run(tensor)
        mesh.run(t_mesh)
        mesh.run(t_mesh)
        iris.run(t_iris)
        iris.run(t_iris)

    def load() -> str:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])

    after_load_rss = rss_mb()
    print(f"models: threads={a.threads} image={Path(a.image).name} rounds={a.rounds} runs={a.runs}")
    print(f"load before: {load()}")
    print(f"{'size':>10} {'run':>3} {'full ms':>8} {'in-call':>8} {'ratio':>6} {'bare ms':>8} {'ratio':>6} "
          f"{'bare+lb':>8} {'ratio':>6} {'p90 full':>8}  verdict")
    for w, h in ((640, 480), (1920, 1080)):
        img = frame(w, h)
        tensor = letterbox(img, det.size)[0]
        for _ in range(3):  # warm-up: XNNPACK packs weights on the first call
            bare(tensor)
            assessor.assess(img)
        ratios, ratios_lb, ratios_in = [], [], []
        for run in range(a.runs):
            full, raw, raw_lb, inside = [], [], [], []
            for _ in range(a.rounds):  # interleaved so drift affects all of them equally
                t0 = time.perf_counter()
                bare(tensor)
                t1 = time.perf_counter()
                in_call[0] = 0.0
                r = assessor.assess(img)
                t2 = time.perf_counter()
                inside.append(in_call[0] * 1000)
                bare(letterbox(img, det.size)[0])
                t3 = time.perf_counter()
                raw.append((t1 - t0) * 1000)
                full.append((t2 - t1) * 1000)
                raw_lb.append((t3 - t2) * 1000)
            mf, mb, ml = statistics.median(full), statistics.median(raw), statistics.median(raw_lb)
            mi = statistics.median(f / i for f, i in zip(full, inside, strict=True))  # per call
            ratios.append(mf / mb)
            ratios_lb.append(mf / ml)
            ratios_in.append(mi)
            p90 = statistics.quantiles(full, n=10)[-1]
            verdict = f"accepted={r.accepted} ied={r.measures.get('ied_px', 0):.0f}px"
            print(f"{w}x{h:<5} {run + 1:3d} {mf:8.2f} {statistics.median(inside):8.2f} {mi:6.2f} {mb:8.2f} "
                  f"{mf / mb:6.2f} {ml:8.2f} {mf / ml:6.2f} {p90:8.2f}  {verdict}")
        print(f"{w}x{h:<5} median of {a.runs} runs: full / in-call {statistics.median(ratios_in):.2f} "
              f"(runs {min(ratios_in):.2f}-{max(ratios_in):.2f}); full / bare {statistics.median(ratios):.2f} "
              f"(runs {min(ratios):.2f}-{max(ratios):.2f}); full / bare+lb {statistics.median(ratios_lb):.2f}")
    print(f"load after: {load()}")
    peak = peak_mb()
    print(f"memory MiB: numpy+cv2 baseline {base_rss:.1f}; models loaded {after_load_rss:.1f} "
          f"(+{after_load_rss - base_rss:.1f}); peak after 1080p assessments {peak:.1f} "
          f"(+{peak - base_rss:.1f}); peak / models-loaded ratio {peak / after_load_rss:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
