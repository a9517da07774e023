"""The iris-iqm helper process (`firmware.quality.iris.worker`, `assess.IrisWorker`): iris-iqm and numba never
load in the caller's process, the helper stops when idle and comes back on the next frame, and a helper that
dies, hangs or talks nonsense costs one answer (`QualityError`), not the caller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from firmware.config.models import IrisConfig
from firmware.errors import ImageFormatError, QualityError
from firmware.quality.iris import worker as proto
from firmware.quality.iris.assess import IrisAssessor, IrisWorker
from hw.iris_synth import synth_eye
from tests.support import REPO, subprocess_env


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_iris_iqm_and_numba_load_only_in_the_helper_which_stops_when_idle() -> None:
    # A fresh interpreter, so that nothing another test imported counts: the caller's process must never import
    # iris_iqm, numba or llvmlite, and the helper must go away after its idle time and come back on the next frame.
    code = """
import sys, time
from firmware.quality.iris.assess import IrisAssessor, IrisWorker
from hw.iris_synth import synth_eye
a = IrisAssessor(worker=IrisWorker(idle_stop_s=1.0))
assert a.assess(synth_eye("3201011505900001", "left", 2)).codes == []
pid = a.worker.pid
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("iris_iqm", "numba", "llvmlite"))
time.sleep(2.5)
idle_pid = a.worker.pid
assert a.assess(synth_eye("3201011505900001", "left", 2)).codes == []
print(pid, idle_pid, a.worker.pid, a.worker.starts, heavy)
a.close()
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    pid, idle_pid, again, starts, heavy = out.stdout.split(maxsplit=4)
    assert heavy.strip() == "[]", heavy  # not one iris-iqm/numba/llvmlite module in the caller
    assert pid != "None" and idle_pid == "None" and again not in ("None", pid) and starts == "2"


@pytest.fixture()
def worker() -> IrisWorker:
    w = IrisWorker()
    yield w
    w.close()


def test_a_killed_or_hung_helper_costs_one_answer_and_the_next_frame_gets_a_new_one(worker: IrisWorker) -> None:
    a = IrisAssessor(IrisConfig(), worker=worker)
    good = synth_eye("3201011505900001", "left", 2)
    assert a.assess(good).codes == []
    first = worker.pid
    assert first is not None and _rss_kib(first) > 0
    os.kill(first, signal.SIGKILL)
    time.sleep(0.2)
    assert a.assess(good).codes == []  # a dead helper between frames: restarted, the frame answered
    second = worker.pid
    assert second not in (None, first) and worker.starts == 2
    os.kill(second, signal.SIGSTOP)  # hangs: the call gives up after its timeout and kills it
    worker.CALL_TIMEOUT_S = 1.0
    t0 = time.monotonic()
    with pytest.raises(QualityError, match="no answer within|takes no input"):
        a.assess(good)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(second, 0)
    assert worker.pid is None
    worker.CALL_TIMEOUT_S = IrisWorker.CALL_TIMEOUT_S  # one frame takes about a second here
    assert a.assess(good).codes == [] and worker.starts == 3


def test_frames_are_checked_before_they_reach_the_helper(worker: IrisWorker) -> None:
    a = IrisAssessor(IrisConfig(), worker=worker)
    for bad in (np.zeros((480, 640, 3), np.uint8), np.zeros((480, 640), np.float32), np.zeros((0, 5), np.uint8),
                np.zeros((proto.MAX_SIDE + 1, 4), np.uint8), "frame"):
        with pytest.raises(ImageFormatError):
            a.assess(bad)  # type: ignore[arg-type]
    assert worker.starts == 0  # none of them started a helper


def test_the_helper_ends_on_a_malformed_request_and_on_end_of_input() -> None:
    env = subprocess_env()
    for request in (b"XX" + b"\x00\x01\x00\x01" + b"\x00", proto.HEADER.pack(proto.MAGIC, 0, 10),
                    proto.HEADER.pack(proto.MAGIC, 5000, 5000), b""):
        p = subprocess.run([sys.executable, "-m", "firmware.quality.iris.worker"], input=request, cwd=REPO,
                           env=env, capture_output=True, timeout=120)
        ready_len = proto.REPLY.unpack(p.stdout[:4])[0]
        assert b'"ready": true' in p.stdout[4:4 + ready_len]
        assert p.stdout[4 + ready_len:] == b""  # nothing answered to a bad request
        assert p.returncode == (0 if request == b"" else 2), (request, p.returncode, p.stderr[-500:])
