"""The simulated sensor's bad fingers reach the real enrollment (rekamd --sim): retake, kept-best and first-time
accept paths, each from `[simulation] finger_conditions`, deterministic (seeded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.console.conftest import NIK_MALE, OPERATOR, Daemon, _operators_block
from tests.support import write_daemon_config


def _daemon(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path, rekamd_factory, rates: dict[str, float]
            ) -> Daemon:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir, _operators_block(),
                              kit={"state_dir": str(tmp_path / "sd"), "site": "test-site"},
                              simulation={"sensor_wire_speed": 0, "finger_conditions": rates},
                              camera={"backend": "sim"}, enrollment={"fingers": ["R1", "R2"], "dedup_fingers": []})
    return Daemon(rekamd_factory(cfg), tmp_path)


def _fingers(d: Daemon) -> list[list[dict[str, Any]]]:
    """Every attempt's answer, per finger, for one enrollment driven through the API."""
    c = d.signin(OPERATOR)
    assert c.post("/api/v1/enrollment", json={"nik": NIK_MALE}).status_code == 200
    assert c.post("/api/v1/enrollment/face").status_code == 200
    out = []
    for code in ("R1", "R2"):
        answers = []
        for _ in range(5):
            r = c.post(f"/api/v1/enrollment/fingers/{code}")
            assert r.status_code == 200, r.text
            answers.append(r.json())
            if r.json()["done"]:
                break
        out.append(answers)
    return out


def test_dry_fingers_are_retaken_then_the_best_is_kept(tmp_path: Path, dc_keys, corpus_dir: Path,
                                                        rekamd_factory) -> None:
    d = _daemon(tmp_path, dc_keys, corpus_dir, rekamd_factory, {"dry": 1.0})
    for answers in _fingers(d):
        assert len(answers) == 3, answers  # every impression dry: three attempts (max_attempts)
        assert all(a["message"].startswith("retake") for a in answers[:2]), answers
        assert answers[-1]["forced"] and answers[-1]["message"].startswith("kept the best of 3"), answers[-1]


def test_moved_fingers_are_rejected_with_a_reason(tmp_path: Path, dc_keys, corpus_dir: Path, rekamd_factory) -> None:
    d = _daemon(tmp_path, dc_keys, corpus_dir, rekamd_factory, {"moved": 1.0})
    first = _fingers(d)[0][0]
    assert not first["accepted"] and first["codes"] and first["hints"], first


def test_good_fingers_pass_first_time(tmp_path: Path, dc_keys, corpus_dir: Path, rekamd_factory) -> None:
    d = _daemon(tmp_path, dc_keys, corpus_dir, rekamd_factory, {})
    for answers in _fingers(d):
        assert len(answers) == 1 and answers[0]["accepted"], answers
