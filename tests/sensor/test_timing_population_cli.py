"""Real wire timing (one test), the simulated population's identities, and the `rekam sensor` CLI."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from hw.sensor.image import R307_GEOMETRY, R503_GEOMETRY
from hw.sensor.protocol import wire_bytes_for_bulk
from hw.sensor.simulator import SECURITY_THRESHOLDS, encode_template, match_score
from hw.sensor.synth import FEATURE_DIM, FingerBank, identity_vector
from tests.support import REKAM, REPO, rekam, subprocess_env

pytestmark = pytest.mark.timeout(60)  # nothing here may hang


def test_real_wire_timing_and_baud_mismatch(make_sim, make_fp) -> None:
    """With wire_speed=1 a transfer takes its line time at the configured baud, not less."""
    sim = make_sim("r503", wire_speed=1.0, time_scale=1.0)
    fp = make_fp(sim.port, target_baud=None)
    assert fp.baud == 57600
    sim.present_finger("kim", 5)
    assert fp.capture_image()
    fp.image_to_template(1)
    t0 = time.monotonic()
    tpl = fp.upload_template(1)
    took = time.monotonic() - t0
    line = (12 + 12 + wire_bytes_for_bulk(len(tpl), 128)) * 10 / 57600
    assert len(tpl) == 1536
    assert line * 0.97 < took < line * 1.5 + 0.1


def test_population_fingers_are_distinct_and_stable() -> None:
    """Hundreds of residents x ten fingers: no two fingers' ideal templates reach the match threshold."""
    keys = [f"res{r:03d}/{f}" for r in range(150) for f in range(10)]
    v = np.stack([identity_vector(k) for k in keys])
    assert v.shape == (1500, FEATURE_DIM)
    cos = v @ v.T
    np.fill_diagonal(cos, -1)
    worst = float(cos.max())
    score = int(round(max(0.0, worst - 0.3) / 0.7 * 300))
    assert score < SECURITY_THRESHOLDS[1]  # even the most lenient level keeps them apart
    assert np.array_equal(identity_vector("res007/3"), identity_vector("res007/3"))
    a = encode_template("res007/3", identity_vector("res007/3"), 512)
    b = encode_template("res007/3", identity_vector("res007/3"), 1536)
    assert match_score(a, b) >= 290 and match_score(a, b"\x00" * 512) == 0


def test_same_finger_same_ridges_other_finger_not(bank: FingerBank) -> None:
    m1, m2, m3 = bank.master("lee/1"), bank.master("lee/1"), bank.master("lee/2")
    assert m1 is m2  # cached
    assert abs(np.corrcoef(m1.ravel(), m3.ravel())[0, 1]) < 0.2
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    imps = [bank.impression("lee/1", R307_GEOMETRY, "good", rng) for _ in range(10)]
    per = (time.perf_counter() - t0) / 10
    assert per < 0.5, f"impression took {per:.3f} s"
    assert not np.array_equal(imps[0].image, imps[1].image)  # impressions vary
    r503 = bank.impression("lee/1", R503_GEOMETRY, "good", rng).image
    assert r503.shape == (192, 192) and set(np.unique(r503)) <= {v * 17 for v in range(16)}


def test_corpus_fingers_available(bank: FingerBank) -> None:
    keys = bank.corpus_fingers()
    assert len(keys) == 11
    img = bank.impression("corpus:nbisrs-p1", R307_GEOMETRY, "good").image
    assert img.shape == (288, 256)


def test_cli_simulate_info_capture(tmp_path: Path, corpus_dir: Path) -> None:
    link = tmp_path / "fp"
    # A long-running CLI command read line by line: a Popen, with rekam()'s environment.
    proc = subprocess.Popen([*REKAM, "sensor", "simulate", "--profile", "r503", "--link", str(link), "--corpus",
                             str(corpus_dir), "--wire-speed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    try:
        port = proc.stdout.readline().strip()
        assert port.startswith("/dev/pts/") and os.path.realpath(link) == port
        r = rekam("sensor", "info", "--port", str(link), "--json")
        assert r.returncode == 0, r.stderr
        assert '"model": "R503"' in r.stdout and '"capacity": 200' in r.stdout
        out = tmp_path / "f.png"
        r = rekam("sensor", "capture", "--port", str(link), "--out", str(out), "--timeout", "10")
        assert r.returncode == 0, r.stderr
        img = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)
        assert img.shape == (192, 192)
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # SIGTERM is a clean stop
    assert not link.exists()


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    r = rekam("sensor", "info", "--port", str(tmp_path / "nothing"))
    assert r.returncode == 1
    assert "SensorUnavailable" in r.stderr and "nothing" in r.stderr
