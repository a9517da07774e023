"""The iris-iqm helper process: ``python -m firmware.quality.iris.worker``, spoken to by `assess.IrisAssessor`.

iris-iqm pulls numba and LLVM (about 60 MB resident once imported, most of it llvmlite's library). In the daemon's
own process they would stay for good; in this helper they live only while irises are being captured (the assessor
starts it when an enrollment begins and stops it after a few idle minutes), a crash or a hang inside a compiled
kernel costs one answer instead of the daemon, and a frame that takes too long can be cut off by killing it.

Protocol on stdin/stdout, one exchange at a time:

* at start the helper imports iris-iqm, runs one synthetic eye through it (numba loads or compiles its kernels
  then, not at the first resident), and writes a ``ready`` reply;
* request: ``b"RQ"``, height and width (big-endian uint16 each, 1..`MAX_SIDE`), then height x width bytes of
  8-bit gray;
* reply: a big-endian uint32 length, then that many bytes of JSON: ``{"ok": true, "result": {...}}`` with the
  fields `FIELDS` and `FEATURES` name, or ``{"ok": false, "error": "..."}`` for a frame iris-iqm raised on.

End of input (the daemon closed the pipe, or died) ends the helper. Anything malformed ends it too, with a line on
stderr: the parent then starts a fresh one.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from typing import Any, BinaryIO

MAGIC = b"RQ"
HEADER = struct.Struct("!2sHH")
REPLY = struct.Struct("!I")
MAX_SIDE = 4096
#: iris-iqm result attributes sent back (the assessor's MEASURES and what it gates on).
FIELDS = ("error_code", "error_message", "usable_iris_area_percent", "iso_iris_sclera_contrast",
          "iso_iris_pupil_contrast", "iso_pupil_boundary_circularity", "iso_iris_pupil_concentricity",
          "iso_margin_adequacy", "iso_sharpness", "iso_greyscale_utilization", "iso_overall_quality",
          "overall_quality")
#: iris-iqm `features` attributes sent back.
FEATURES = ("iris_diameter", "pupil_diameter", "iris_pupil_ratio", "iris_center_x", "iris_center_y")


def _plain(v: Any) -> Any:
    """A JSON-ready copy of one result value (numpy scalars to Python numbers; NaN stays NaN, as in-process)."""
    if v is None or isinstance(v, str):
        return v if v is None else v[:500]
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    if isinstance(v, int) or type(v).__name__.startswith(("int", "uint")):
        return int(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)[:500]


def evaluate(gray: Any) -> dict[str, Any]:
    """iris-iqm's verdict on one frame, as the plain dictionary a reply carries."""
    import iris_iqm

    r = iris_iqm.evaluate_array(gray)
    out = {k: _plain(getattr(r, k, None)) for k in FIELDS}
    out["features"] = {k: _plain(getattr(r.features, k, None)) for k in FEATURES}
    return out


def warm_up() -> float:
    """Run a drawn eye (grey sclera, darker iris, black pupil) through iris-iqm once; returns the seconds taken."""
    import cv2
    import numpy as np

    t0 = time.perf_counter()
    eye = np.full((480, 640), 170, np.uint8)
    cv2.circle(eye, (320, 240), 110, 90, -1)
    cv2.circle(eye, (320, 240), 45, 15, -1)
    evaluate(eye)
    return time.perf_counter() - t0


def _read_exact(src: BinaryIO, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = src.read(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


def _reply(dst: BinaryIO, obj: dict[str, Any]) -> None:
    body = json.dumps(obj).encode()  # NaN as NaN: both ends are Python
    dst.write(REPLY.pack(len(body)) + body)
    dst.flush()


def serve(src: BinaryIO, dst: BinaryIO) -> int:
    """Answer requests from `src` on `dst` until end of input (0) or a malformed request (2)."""
    import numpy as np

    _reply(dst, {"ok": True, "ready": True, "warm_up_s": round(warm_up(), 3)})
    while True:
        head = _read_exact(src, HEADER.size)
        if head is None:
            return 0
        magic, h, w = HEADER.unpack(head)
        if magic != MAGIC or not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
            print(f"iris worker: malformed request header {head!r}", file=sys.stderr)
            return 2
        data = _read_exact(src, h * w)
        if data is None:
            return 0
        gray = np.frombuffer(data, np.uint8).reshape(h, w)
        try:
            _reply(dst, {"ok": True, "result": evaluate(gray)})
        except Exception as e:  # iris-iqm raising on a frame: this frame's answer, not the helper's end
            _reply(dst, {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})


def main() -> int:
    """Entry point of the helper process. Replies go to a private copy of stdout; fd 1 itself is pointed at stderr,
    so nothing a library prints can corrupt the protocol."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    sys.exit(main())
