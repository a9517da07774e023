"""Face-quality benchmark (issue #5: camera and face-image quality).

1. Per-image time of the full assessment (BlazeFace detection + FaceMesh (2 passes) + iris x2 +
   every measure) at 640x480 and 1920x1080, against the bare model inference of the same models,
   interleaved in the same run: the ratio is the cost of our pre/post-processing and measures on
   top of the networks. Three baselines: "in-call" is the time of the model invocations
   (invoke; the pipeline writes the inputs straight into the models' buffers, before issue #17 it
   was set_tensor + invoke) inside the very assessment calls timed, i.e. the same inputs in the same
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
    .venv/bin/python bench/bench_face.py --verdicts OUT.json [--compare OTHER.json]

`--verdicts` instead writes every assessment of the face corpus (15 photos x 11 views: as stored,
in a 1920x1080 and a 640x480 kiosk frame, rotated +-12 degrees, mirrored, blurred, dark, bright,
half and 1.5x size = 165) as JSON: codes, score, components and every measure at full precision;
`--compare` then counts the verdicts, codes and values that differ from an earlier dump (e.g. one
written by the base tree: a speed-up must leave them unchanged).

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
    ap.add_argument("--verdicts", metavar="OUT.json", help="dump every corpus assessment and exit")
    ap.add_argument("--compare", metavar="OTHER.json", help="with --verdicts: compare with an earlier dump")
    a = ap.parse_args()
    if a.verdicts:
        return verdicts(corpus / "faces", a.threads, Path(a.verdicts), a.compare and Path(a.compare))

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
        # the pipeline fills each model's input buffer in place and calls invoke(): time the invocation
        interp, outs = model.interpreter, model._out_indices  # type: ignore[attr-defined]

        def invoke() -> list[np.ndarray]:
            t = time.perf_counter()
            interp.invoke()
            in_call[0] += time.perf_counter() - t
            return [interp.get_tensor(i) for i in outs]

        model.invoke = invoke  # type: ignore[attr-defined]

    for model in (det, mesh, iris):
        timed(model)

    def net(model: object, x: np.ndarray) -> list[np.ndarray]:
        # one bare invocation on a ready tensor, as every baseline since issue #5 ran it
        interp = model.interpreter  # type: ignore[attr-defined]
        interp.set_tensor(model._in_index, x[np.newaxis].astype(np.float32, copy=False))  # type: ignore[attr-defined]
        interp.invoke()
        return [interp.get_tensor(i).copy() for i in model._out_indices]  # type: ignore[attr-defined]

    def bare(tensor: np.ndarray) -> None:
        # the networks alone: one detector call, two mesh passes, two iris calls, on ready tensors
        net(det, tensor)
        net(mesh, t_mesh)
        net(mesh, t_mesh)
        net(iris, t_iris)
        net(iris, t_iris)

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


def kiosk(img: object, w: int, h: int) -> object:
    """`img` scaled to 90 % of a w x h frame's height, centred on gray (a kiosk camera's view)."""
    import cv2
    import numpy as np

    s = min(h * 0.9 / img.shape[0], w / img.shape[1])  # type: ignore[attr-defined]
    small = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    out = np.full((h, w, 3), 128, np.uint8)
    y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    return out


def views(img: object) -> dict[str, object]:
    """The 11 views of one corpus photo that `--verdicts` assesses."""
    import cv2
    import numpy as np

    h, w = img.shape[:2]  # type: ignore[attr-defined]

    def rot(deg: float) -> object:
        return cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0), (w, h),
                              borderMode=cv2.BORDER_REPLICATE)

    return {
        "as-is": img, "kiosk-1080p": kiosk(img, 1920, 1080), "kiosk-480p": kiosk(img, 640, 480),
        "rot+12": rot(12.0), "rot-12": rot(-12.0), "mirror": np.ascontiguousarray(img[:, ::-1]),  # type: ignore[index]
        "blur": cv2.GaussianBlur(img, (0, 0), 3.0),
        "dark": np.clip(img * 0.3, 0, 255).astype(np.uint8),  # type: ignore[operator]
        "bright": np.clip(img * 1.8 + 40, 0, 255).astype(np.uint8),  # type: ignore[operator]
        "half": cv2.resize(img, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
        "x1.5": cv2.resize(img, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR),
    }


def verdicts(faces: Path, threads: int, out: Path, other: Path | None) -> int:
    """Write every corpus assessment to `out`; with `other`, report what differs from it."""
    import json

    from firmware.quality import load_image
    from firmware.quality.face.assess import FaceAssessor, FaceThresholds
    assessor = FaceAssessor(FaceThresholds(threads=threads))
    got: dict[str, dict] = {}
    for path in sorted(faces.iterdir()):
        if path.suffix.lower() not in (".jpg", ".png"):
            continue
        for view, img in views(load_image(path)).items():
            r = assessor.assess(img)  # type: ignore[arg-type]
            raw = {}
            if r.raw is not None and r.landmarks is not None and r.detection is not None:
                raw = {f: float(getattr(r.raw, f)) for f in r.measures}  # the measures unrounded, the landmarks
                raw["mesh_sum"] = float(r.landmarks.mesh.sum())
                raw["box_sum"] = float(sum(r.detection.box))
            got[f"{path.name}:{view}"] = {"accepted": r.accepted, "score": r.score, "codes": r.codes,
                                          "faces": r.faces, "components": r.components, "measures": raw}
    out.write_text(json.dumps(got, indent=1, sort_keys=True))
    print(f"{len(got)} assessments written to {out}")
    if not other:
        return 0
    ref = json.loads(other.read_text())
    verdict = sum(ref[k]["accepted"] != got[k]["accepted"] for k in got)
    codes = sum(ref[k]["codes"] != got[k]["codes"] for k in got)
    same = sum(ref[k] == json.loads(json.dumps(got[k])) for k in got)
    worst: dict[str, float] = {}
    for k in got:
        for name, v in got[k]["measures"].items():
            d = abs(float(v) - float(ref[k]["measures"].get(name, v)))
            worst[name] = max(worst.get(name, 0.0), d)
    print(f"compared with {other} ({len(ref)} assessments): {len(got)} here, {verdict} verdicts and {codes} code "
          f"lists differ, {same} identical in every value (unrounded measures, mesh and box sums included)")
    diffs = {n: d for n, d in worst.items() if d}
    print("largest measure differences:", ", ".join(f"{n} {d:.3g}" for n, d in sorted(diffs.items())) or "none")
    return 0 if (verdict, codes) == (0, 0) and set(ref) == set(got) else 1


if __name__ == "__main__":
    sys.exit(main())
