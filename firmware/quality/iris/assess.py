"""Iris quality: ISO/IEC 29794-6 measures (`iris-iqm`), gates with stable codes, a 0-100 score and a verdict.

`IrisAssessor(cfg.iris).assess(gray)` never raises on a bad frame: no iris, a closed eye or a blurred shot come
back as codes so the operator gets a hint and a retake. Every code is a reject (an iris the gates flag is not
usable for matching); the score is iris-iqm's ISO overall quality (0-100).

`iris-iqm` (numpy, OpenCV, numba) runs in a helper process (`worker`, `IrisWorker`), never in the caller's:
numba and LLVM take about 60 MB once imported, so the daemon starts the helper when an enrollment begins
(`prepare`) and it stops after `IrisWorker.IDLE_STOP_S` without a frame; a hang or crash inside a compiled kernel
costs one answer (`QualityError`), not the daemon. numba compiles its kernels once and caches them next to the
package; the helper loads them before it says it is ready.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from firmware.config.models import IrisConfig
from firmware.errors import ImageFormatError, QualityError
from firmware.quality.iris import worker as proto
from firmware.system.i18n import N_

log = logging.getLogger(__name__)

#: Iris codes in order of what to fix first -> the hint (English msgid; Bahasa Indonesia in the catalog).
CODES: dict[str, str] = {
    "NO_IRIS": N_("No eye found: look into the iris camera"),
    "OFF_CENTRE": N_("Eye not in the middle: move the camera so the eye is in the centre of the picture"),
    "EYE_OCCLUDED": N_("Eye covered by the eyelid: open the eye wider"),
    "TOO_FAR": N_("Too far: bring the camera closer to the eye"),
    "TOO_CLOSE": N_("Too close: move the camera away from the eye"),
    "BLURRED": N_("Picture blurred: hold the camera still at the right distance"),
    "GAZE_AWAY": N_("Look straight into the camera"),
    "LOW_CONTRAST": N_("Low contrast: check the infrared light and shade the eye from sunlight"),
    "PUPIL_DILATION": N_("Pupil too wide or too narrow: reduce the surrounding light and wait a moment"),
    "MARGIN": N_("Eye too close to the edge of the picture"),
}
#: Codes that follow from a wrong localisation when the eye is at the edge: not reported with OFF_CENTRE.
_UNRELIABLE_OFF_CENTRE = ("TOO_FAR", "TOO_CLOSE", "GAZE_AWAY", "LOW_CONTRAST", "MARGIN", "PUPIL_DILATION")


@dataclass
class IrisAssessment:
    """One frame's verdict: score (ISO overall 0-100), codes, the measures, where the eye is."""

    score: float
    codes: list[str]
    measures: dict[str, float] = field(default_factory=dict)
    position: dict[str, Any] = field(default_factory=dict)
    elapsed_ms: float = 0.0

    @property
    def rejected(self) -> bool:
        return bool(self.codes)

    def summary(self) -> dict[str, Any]:
        """What the record keeps per attempt."""
        return {"score": round(self.score, 2), "codes": list(self.codes), "rejected": self.rejected,
                "measures": {k: round(v, 2) for k, v in self.measures.items()}}


#: iris-iqm result fields kept as the record's measures (ISO/IEC 29794-6 names where the standard has them).
MEASURES = ("usable_iris_area_percent", "iso_iris_sclera_contrast", "iso_iris_pupil_contrast",
            "iso_pupil_boundary_circularity", "iso_iris_pupil_concentricity", "iso_margin_adequacy",
            "iso_sharpness", "iso_greyscale_utilization", "iso_overall_quality", "overall_quality")


class IrisWorker:
    """The iris-iqm helper process (`firmware.quality.iris.worker`): started on demand, one frame at a time,
    stopped after `IDLE_STOP_S` without one, or by `close`. Thread-safe."""

    #: The first start after an install compiles numba's kernels (about 12 s on x86, minutes on a Pi).
    START_TIMEOUT_S = 600.0
    CALL_TIMEOUT_S = 30.0  # one 640x480 frame takes well under a second even on a Pi
    IDLE_STOP_S = 300.0
    MAX_REPLY = 1 << 20

    def __init__(self, idle_stop_s: float | None = None) -> None:
        self.idle_stop_s = self.IDLE_STOP_S if idle_stop_s is None else idle_stop_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._wake = threading.Event()  # set by a stop: the idle watcher of that process leaves
        self._last = 0.0
        self.starts = 0  # helper processes started (status and tests)

    @property
    def pid(self) -> int | None:
        """The running helper's pid, or None."""
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def prepare(self) -> None:
        """Start the helper in the background (an enrollment began: irises come in a minute or two)."""
        if self.pid is None:
            threading.Thread(target=self._prepare, name="iris-worker-start", daemon=True).start()

    def _prepare(self) -> None:
        try:
            with self._lock:
                self._ensure()
        except QualityError as e:
            log.error("iris worker start failed error=%s", e)

    def evaluate(self, gray: np.ndarray) -> dict[str, Any]:
        """iris-iqm's result for one 8-bit gray frame, as `worker.evaluate` returns it; raises `QualityError` when
        the helper fails (it is killed then, and the next call starts a new one)."""
        h, w = gray.shape
        with self._lock:
            proc = self._ensure()
            try:
                deadline = time.monotonic() + self.CALL_TIMEOUT_S
                self._send(proc, proto.HEADER.pack(proto.MAGIC, h, w) + np.ascontiguousarray(gray).tobytes(),
                           deadline)
                reply = self._read_reply(proc, deadline - time.monotonic())
            except (OSError, ValueError, QualityError) as e:
                self._stop(f"failed: {e}", kill=True)
                raise QualityError(f"iris quality helper failed: {e}") from None
            self._last = time.monotonic()
        if not reply.get("ok"):
            raise ValueError(str(reply.get("error", "iris-iqm failed"))[:500])
        result = reply.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("features"), dict):
            raise QualityError("iris quality helper sent a reply without a result")
        return result

    def close(self) -> None:
        """Stop the helper (idempotent); the next `evaluate` starts a new one."""
        with self._lock:
            self._stop("closed")

    def _ensure(self) -> subprocess.Popen[bytes]:
        """The running helper, started (and waited for until ready) if there is none; call with the lock held."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:
            self._stop(f"exited with status {self._proc.returncode}")
        root = str(Path(__file__).resolve().parents[3])  # the folder holding `firmware`
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "firmware.quality.iris.worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, bufsize=0)
        except OSError as e:
            raise QualityError(f"cannot start the iris quality helper: {e}") from None
        self._proc, self._wake = proc, threading.Event()
        try:
            ready = self._read_reply(proc, self.START_TIMEOUT_S)
        except QualityError as e:
            self._stop(f"failed to start: {e}", kill=True)
            raise
        if not ready.get("ready"):
            self._stop("failed to start: no ready reply", kill=True)
            raise QualityError("iris quality helper did not say it is ready")
        self.starts += 1
        self._last = time.monotonic()
        log.info("iris worker started pid=%d warm_up_s=%s start_s=%.1f", proc.pid, ready.get("warm_up_s"),
                 time.monotonic() - t0)
        threading.Thread(target=self._watch_idle, args=(proc, self._wake), name="iris-worker-idle",
                         daemon=True).start()
        return proc

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], data: bytes, deadline: float) -> None:
        """Write `data` to the helper before `deadline` (a stopped helper fills the pipe: never block on it)."""
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        os.set_blocking(fd, False)
        view = memoryview(data)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_WRITE)
            while view:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise QualityError("the helper takes no input (hung?)")
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue

    def _read_reply(self, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        """One length-prefixed JSON reply from `proc`, within `timeout` seconds."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = bytearray()
        need = proto.REPLY.size
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while len(buf) < need:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise QualityError(f"no answer within {timeout:.0f} s")
                part = os.read(fd, need - len(buf))
                if not part:
                    raise QualityError(f"the helper exited (status {proc.wait(5)})")
                buf += part
                if need == proto.REPLY.size and len(buf) == need:
                    n = proto.REPLY.unpack(buf)[0]
                    if n > self.MAX_REPLY:
                        raise QualityError(f"reply of {n} bytes (limit {self.MAX_REPLY})")
                    need += n
        try:
            reply = json.loads(bytes(buf[proto.REPLY.size:]))
        except ValueError as e:
            raise QualityError(f"unreadable reply: {e}") from None
        if not isinstance(reply, dict):
            raise QualityError("unreadable reply: not an object")
        return reply

    def _stop(self, why: str, kill: bool = False) -> None:
        """End the helper (call with the lock held): end of input and a short wait, else (or with `kill`) SIGKILL."""
        proc, self._proc = self._proc, None
        self._wake.set()
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            if kill:
                proc.kill()
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        (log.warning if kill else log.info)("iris worker stopped pid=%d why=%s", proc.pid, why)

    def _watch_idle(self, proc: subprocess.Popen[bytes], wake: threading.Event) -> None:
        """Stop `proc` once it has had no frame for `idle_stop_s`; leaves when it is stopped otherwise."""
        while not wake.wait(max(0.05, self._last + self.idle_stop_s - time.monotonic())):
            if time.monotonic() - self._last < self.idle_stop_s or not self._lock.acquire(timeout=1):
                continue
            try:
                if self._proc is proc and time.monotonic() - self._last >= self.idle_stop_s:
                    self._stop(f"idle for {self.idle_stop_s:.0f} s")
                    return
            finally:
                self._lock.release()


class IrisAssessor:
    """The gates of the `[iris]` section over iris-iqm's measures (computed in the helper process)."""

    def __init__(self, cfg: IrisConfig | None = None, worker: IrisWorker | None = None) -> None:
        self.cfg = cfg or IrisConfig()
        if importlib.util.find_spec("iris_iqm") is None:  # fail at start-up, not at the first resident
            raise ModuleNotFoundError("No module named 'iris_iqm'", name="iris_iqm")
        self.worker = worker or IrisWorker()

    def prepare(self) -> None:
        """Start the helper in the background, so the first eye does not wait for it."""
        self.worker.prepare()

    def close(self) -> None:
        """Stop the helper (the daemon's stop; it also ends when this process does)."""
        self.worker.close()

    def assess(self, gray: np.ndarray) -> IrisAssessment:
        """Measure and gate one 8-bit grey frame (H, W). A frame iris-iqm cannot read is NO_IRIS; a failing
        helper raises `QualityError`."""
        if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8 or \
                not (min(gray.shape) > 0 and max(gray.shape) <= proto.MAX_SIDE):
            what = f"{gray.dtype} {gray.shape}" if isinstance(gray, np.ndarray) else type(gray).__name__
            raise ImageFormatError(f"expected an 8-bit gray frame (H, W) of at most {proto.MAX_SIDE} px, got {what}")
        c = self.cfg
        t0 = time.perf_counter()
        try:
            res = self.worker.evaluate(gray)
        except ValueError as e:  # iris-iqm raised on this frame
            log.warning("iris frame not readable error=%s", e)
            return IrisAssessment(0.0, ["NO_IRIS"], position={"found": False},
                                  elapsed_ms=(time.perf_counter() - t0) * 1000)
        ms = (time.perf_counter() - t0) * 1000
        r = SimpleNamespace(**{k: res.get(k) for k in proto.FIELDS})
        f = SimpleNamespace(**{k: res["features"].get(k) for k in proto.FEATURES})
        h, w = gray.shape[:2]
        if r.error_code != 0 or not f.iris_diameter or f.iris_diameter <= 0:
            log.info("iris not found error=%s message=%s", r.error_code, r.error_message)
            return IrisAssessment(0.0, ["NO_IRIS"], position={"found": False}, elapsed_ms=ms)
        measures = {k: float(getattr(r, k)) for k in MEASURES}
        measures.update(iris_diameter=float(f.iris_diameter), pupil_diameter=float(f.pupil_diameter),
                        pupil_iris_ratio=float(f.iris_pupil_ratio))
        dx, dy = (f.iris_center_x - w / 2) / w, (f.iris_center_y - h / 2) / h
        distance = ("too_far" if f.iris_diameter < c.iris_diameter_min else
                    "too_close" if f.iris_diameter > c.iris_diameter_max else "ok")
        codes = []
        if max(abs(dx), abs(dy)) > c.centre_offset_max:
            codes.append("OFF_CENTRE")
        if r.usable_iris_area_percent < c.usable_area_min or r.iso_pupil_boundary_circularity < c.pupil_circularity_min:
            codes.append("EYE_OCCLUDED")
        if distance == "too_far":
            codes.append("TOO_FAR")
        elif distance == "too_close":
            codes.append("TOO_CLOSE")
        if r.iso_iris_pupil_concentricity < c.concentricity_min:
            codes.append("GAZE_AWAY")
        if r.iso_sharpness < c.sharpness_min:
            codes.append("BLURRED")
        if r.iso_iris_sclera_contrast < c.sclera_contrast_min:
            codes.append("LOW_CONTRAST")
        if not c.dilation_min <= f.iris_pupil_ratio <= c.dilation_max:
            codes.append("PUPIL_DILATION")
        if r.iso_margin_adequacy < c.margin_min:
            codes.append("MARGIN")
        if "BLURRED" in codes and "GAZE_AWAY" in codes:  # blurred boundaries make the concentricity unreliable
            codes.remove("GAZE_AWAY")
        codes.sort(key=list(CODES).index)
        if "OFF_CENTRE" in codes:
            codes = [x for x in codes if x not in _UNRELIABLE_OFF_CENTRE]
        if "EYE_OCCLUDED" in codes:  # a closed eye has no measurable pupil, gaze or sclera: one hint
            codes = [x for x in codes if x in ("OFF_CENTRE", "EYE_OCCLUDED")]
        score = float(r.iso_overall_quality)
        if not codes and score < c.accept_score:
            codes.append("LOW_CONTRAST" if r.iso_iris_sclera_contrast < 2 * c.sclera_contrast_min else "BLURRED")
        position = {"found": True, "dx": round(dx, 3), "dy": round(dy, 3), "distance": distance,
                    "iris_diameter": int(f.iris_diameter)}
        return IrisAssessment(score, codes, measures, position, ms)


def hints(codes: list[str]) -> list[str]:
    """The operator's hints for `codes`, in the current language."""
    from firmware.system.i18n import gettext

    return [gettext(CODES[c]) for c in codes if c in CODES]
