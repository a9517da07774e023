"""Where face-quality time goes outside the networks, and whether running parts at once would help (issue #17).

1. Per stage of one 1920x1080 assessment (the `bench_face.py` kiosk frame), the time outside the model
   invocations: detection (letterbox + post-processing), mesh pass 1 and 2, each eye, the measures, the
   judgement. Rounds interleave the bare invocations as `bench_face.py` does, so caches are as cold as there.
2. Concurrency on this machine: the two iris invocations one after the other (2 threads each, as the pipeline
   runs them) against both at once on two 1-thread interpreters; and photometry (which needs only the mesh)
   after the iris calls against during them.

    .venv/bin/python bench/bench_face_stages.py [--rounds N] [--image PATH]

Medians in ms of `--rounds` rounds (default 100), with the machine load before and after. Figures are from this
machine; on a 4-core Pi the concurrency answer may differ.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    corpus = Path(os.environ.get("REKAM_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--image", default=str(corpus / "faces" / "facerec-biden2.jpg"))
    a = ap.parse_args()

    import cv2
    import numpy as np

    from bench.bench_face import kiosk
    from firmware.quality.face import assess as fa
    from firmware.quality.face import landmarks as lmod
    from firmware.quality.face import measures as ms
    from firmware.quality.face.detect import KP_LEFT_EYE, KP_RIGHT_EYE, letterbox
    from firmware.quality.face.models import TFLiteModel

    src = cv2.imread(a.image)
    if src is None:
        print(f"cannot read {a.image}", file=sys.stderr)
        return 2
    frame = kiosk(src, 1920, 1080)
    assessor = fa.FaceAssessor(fa.FaceThresholds(threads=2))
    lm_model = assessor.landmarker
    models = (assessor.detector.model, lm_model.mesh_model, lm_model.iris_model)
    assert models[2] is not None

    inside = [0.0]  # invocation time since the last reset, by the wrappers below

    def timed(model: Any) -> None:
        interp, outs = model.interpreter, model._out_indices

        def invoke() -> list[np.ndarray]:
            t = time.perf_counter()
            interp.invoke()
            inside[0] += time.perf_counter() - t
            return [interp.get_tensor(i) for i in outs]

        model.invoke = invoke

    for m in models:
        timed(m)
    ready = {m.size: np.random.default_rng(m.size).random((m.size, m.size, 3), dtype=np.float32) for m in models}
    det_in = letterbox(frame, models[0].size)[0]

    def bare() -> None:
        for m, x in ((models[0], det_in), (models[1], ready[models[1].size]), (models[1], ready[models[1].size]),
                     (models[2], ready[models[2].size]), (models[2], ready[models[2].size])):
            m.interpreter.set_tensor(m._in_index, x[np.newaxis])
            m.interpreter.invoke()

    stages: dict[str, list[float]] = {}

    def outside(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        stages.setdefault(name, []).append((t1 - t0 - inside[0]) * 1000)
        inside[0] = 0.0
        return t1

    for _ in range(5):
        bare()
        assessor.assess(frame)
    print(f"1920x1080 frame, image {Path(a.image).name}, rounds {a.rounds}; load before: {load()}")
    for _ in range(a.rounds):
        bare()
        inside[0] = 0.0
        t = time.perf_counter()
        det = assessor.detector.detect(frame)[0]
        t = outside("detection", t)
        kp = det.keypoints
        roi = lmod.roi_from_points(kp, kp[KP_RIGHT_EYE], kp[KP_LEFT_EYE], lmod.FACE_ROI_SCALE, det.box)
        mesh, presence = lm_model._mesh(frame, roi)
        t = outside("mesh pass 1", t)
        roi = lmod.roi_from_points(mesh[:, :2], mesh[lmod.RIGHT_EYE_OUTER, :2], mesh[lmod.LEFT_EYE_OUTER, :2],
                                   lmod.FACE_ROI_SCALE)
        mesh, presence = lm_model._mesh(frame, roi)
        t = outside("mesh pass 2", t)
        lm = lmod.FaceLandmarks(mesh, presence, roi)
        lm.right_eye, lm.right_iris = lm_model._eye(frame, mesh, lmod.RIGHT_EYE_OUTER, lmod.RIGHT_EYE_INNER, False)
        t = outside("right eye", t)
        lm.left_eye, lm.left_iris = lm_model._eye(frame, mesh, lmod.LEFT_EYE_INNER, lmod.LEFT_EYE_OUTER, True)
        t = outside("left eye", t)
        m = ms.measure(frame, 1, det, lm)
        t = outside("measures", t)
        fa.codes_for(m, assessor.t)
        fa.components(m, assessor.t)
        m.as_dict()
        outside("judgement", t)
        stages.setdefault("model invocations", []).append(0.0)
        # the five invocations of this round, measured by the wrappers: one more assessment
        inside[0] = 0.0
        assessor.assess(frame)
        stages["model invocations"][-1] = inside[0] * 1000
        inside[0] = 0.0
    total = 0.0
    for name, v in stages.items():
        med = statistics.median(v)
        total += med if name != "model invocations" else 0.0
        print(f"  {name:18s} {med:6.2f} ms")
    print(f"  {'outside the models':18s} {total:6.2f} ms in all")

    # 2. concurrency
    iris2 = models[2]
    one_a = TFLiteModel.load(iris2.name, assessor.t.models_dir or None, 1)
    one_b = TFLiteModel.load(iris2.name, assessor.t.models_dir or None, 1)
    x, y = ready[iris2.size], np.random.default_rng(7).random(ready[iris2.size].shape, dtype=np.float32)
    same = all(np.array_equal(p, q) for p, q in zip(iris2.run(x), one_a.run(x), strict=True))
    top, bottom = mesh[ms.MIDLINE_TOP, :2].mean(axis=0), mesh[ms.MIDLINE_BOTTOM, :2].mean(axis=0)
    r_eye, l_eye = ms.eye_centres(lm)
    plan = ms._sharpness_plan(frame.shape, r_eye, l_eye)
    pool = ThreadPoolExecutor(1)

    def photometry() -> None:
        ms.photometry(ms.face_gray(frame, mesh, r_eye, l_eye, plan), mesh, top, bottom)

    def eyes() -> None:
        lm_model._eye(frame, mesh, lmod.RIGHT_EYE_OUTER, lmod.RIGHT_EYE_INNER, False)
        lm_model._eye(frame, mesh, lmod.LEFT_EYE_INNER, lmod.LEFT_EYE_OUTER, True)

    def iris_at_once() -> None:
        f = pool.submit(one_b.run, y)
        one_a.run(x)
        f.result()

    def photometry_during_eyes() -> None:
        f = pool.submit(photometry)
        eyes()
        f.result()

    cases: dict[str, Callable[[], Any]] = {
        "iris x2 in a row (2 threads each)": lambda: (iris2.run(x), iris2.run(y)),
        "iris x2 at once (1 thread each)": iris_at_once,
        "eyes, then photometry": lambda: (eyes(), photometry()),
        "photometry during the eyes": photometry_during_eyes,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(10):
        for f in cases.values():
            f()
    for _ in range(a.rounds * 3):  # interleaved
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1000)
    print(f"concurrency (1-thread iris outputs identical to 2-thread: {same}):")
    for k, v in times.items():
        print(f"  {k:36s} {statistics.median(v):6.2f} ms")
    print(f"load after: {load()}")
    pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
