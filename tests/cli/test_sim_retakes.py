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
    c.headers["X-Rekam-Lang"] = "en"  # the answers' words are asserted in English (the kit's language is id)
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


def test_retake_hints_are_worded_in_indonesian_by_the_kit(tmp_path: Path, dc_keys, corpus_dir: Path,
                                                          rekamd_factory) -> None:
    """Issue #16: the hints come from the codes through the catalog, in the kit's language (no English left
    for the console to match); the codes stay as they are."""
    from firmware.quality.finger import gates
    from firmware.system.i18n import gettext, use_language

    d = _daemon(tmp_path, dc_keys, corpus_dir, rekamd_factory, {"moved": 1.0})
    c = d.signin(OPERATOR)  # no X-Rekam-Lang: the kit's language, Indonesian
    assert c.post("/api/v1/enrollment", json={"nik": NIK_MALE}).status_code == 200
    assert c.post("/api/v1/enrollment/face").status_code == 200
    first = c.post("/api/v1/enrollment/fingers/R1").json()
    assert not first["accepted"] and first["codes"], first
    with use_language("id"):
        want = [gettext(gates.MESSAGES[code]) for code in first["codes"] if code in gates.MESSAGES]
    assert want and first["hints"] == want, first
    assert not set(want) & set(gates.MESSAGES.values())  # really translated, not the English text
    assert first["message"].startswith("ulangi: " + want[0]), first
