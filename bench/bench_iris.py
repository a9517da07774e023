"""Iris-quality benchmark (issue #20).

1. Per-image time of the full assessment (`IrisAssessor.assess`: iris-iqm's ISO/IEC 29794-6 measures and the
   kit's gates) on a 640x480 synthetic NIR frame, against the bare image read (PNG decode of the same frame with
   OpenCV), interleaved in the same run; the ratio is what the quality check costs per shot over reading it.
   Also the synthesiser's own time per frame (the simulator's cost in `rekamd --sim`).
2. Process memory: iris-iqm (numba and llvmlite) runs in the assessor's helper process, so the caller's resident
   set after numpy/OpenCV (baseline), after creating the assessor and its peak after the runs are printed beside
   the helper's own resident set after the runs.

    .venv/bin/python bench/bench_iris.py [--rounds N]

Figures are from this machine (x86-64); a Raspberry Pi 4 is expected to be several times slower. The first call
of a fresh install compiles numba kernels (about 12 s here) and caches them: timed separately as "first call".
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
    """Current resident set size, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    import cv2
    import numpy as np  # noqa: F401

    base = rss_mb()
    print(f"load before {os.getloadavg()[0]:.2f}")
    from hw.iris_synth import DEFECTS, synth_eye

    t = time.perf_counter()
    from firmware.quality.iris.assess import IrisAssessor

    assessor = IrisAssessor()
    imported = rss_mb()
    frames = [synth_eye("bench", eye, n, DEFECTS[d]) for n, (eye, d) in
              enumerate((e, d) for e in ("left", "right") for d in DEFECTS)]
    pngs = [cv2.imencode(".png", f)[1].tobytes() for f in frames]
    t = time.perf_counter()
    assessor.assess(frames[0])
    first = time.perf_counter() - t
    read, assess, synth = [], [], []
    for r in range(a.rounds):
        for k, data in enumerate(pngs):
            t = time.perf_counter()
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            read.append(time.perf_counter() - t)
            t = time.perf_counter()
            assessor.assess(img)
            assess.append(time.perf_counter() - t)
            if k == 0:
                t = time.perf_counter()
                synth_eye("bench", "left", 100 + r)
                synth.append(time.perf_counter() - t)
    mr, ma, ms = (statistics.median(x) * 1000 for x in (read, assess, synth))
    print(f"first call (helper start: numba cache load or compile): {first * 1000:.0f} ms")
    print(f"640x480 NIR frame: read {mr:.2f} ms, assess {ma:.1f} ms (median of {len(assess)}), "
          f"ratio assess/read {ma / mr:.0f}x")
    print(f"synthetic eye: {ms:.1f} ms per frame")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    helper = float("nan")
    if assessor.worker.pid is not None:
        with open(f"/proc/{assessor.worker.pid}/status") as f:
            helper = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    print(f"memory (caller): numpy+OpenCV {base:.0f} MiB, with the assessor {imported:.0f} MiB, peak {peak:.0f} MiB; "
          f"iris-iqm helper process {helper:.0f} MiB")
    assessor.close()
    print(f"load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
