"""The enrollment workflow through the daemon's HTTP API, against a real `rekamd --sim` process.

The simulator runs on a real pty (wire speed 0), the store writes real files on the SD and the
USB folders, records are opened with the data center's key by `rekam-fleet open`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.console.conftest import NIK_FEMALE, NIK_MALE, OPERATOR, REPO, SUPERVISOR, Daemon, enroll

ALL_FINGERS = ["R1", "R2", "R3", "R4", "R5", "L1", "L2", "L3", "L4", "L5"]


def audit(c: httpx.Client, kind: str) -> list[dict[str, Any]]:
    r = c.get("/api/v1/audit", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return [e for e in r.json() if e["kind"] == kind]


def record_files(d: Daemon) -> tuple[list[Path], list[Path]]:
    return sorted((d.sd / "records").glob("*.rkm")), sorted(d.usb.rglob("*.rkm"))


def fleet_open(path: Path, key: Path, out: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "provisioning.cli", "open", str(path), "--key", str(key),
                        "--out", str(out)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "manifest.json").read_text())


def test_whole_enrollment_ten_fingers_sealed_on_sd_and_usb(make_daemon: Any, dc_keys: dict[str, Any],
                                                           tmp_path: Path) -> None:
    d = make_daemon(fingers=ALL_FINGERS, dedup=["R2", "L2"])
    c = d.signin()
    receipt = enroll(c, NIK_MALE)
    rid = receipt["record_id"]
    assert receipt["mirrored"] is True and receipt["site"] == "test-site"
    sd, usb = record_files(d)
    assert [p.stem for p in sd] == [rid] and [p.stem for p in usb] == [rid]
    assert sd[0].read_bytes() == usb[0].read_bytes()
    manifest = fleet_open(sd[0], dc_keys["key_path"], tmp_path / "opened")
    assert manifest["nik"] == NIK_MALE and manifest["operator_id"] == OPERATOR[0]
    assert [f["finger"] for f in manifest["fingers"]] == ALL_FINGERS
    for f in manifest["fingers"]:
        img = tmp_path / "opened" / f["image"]
        assert img.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f["template"]
    assert (tmp_path / "opened" / "face.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert manifest["duplicate_check"]["matches"] == []
    # The receipt is served for the record: a PNG (QR) and a PDF.
    png = c.get(f"/api/v1/receipts/{rid}.png")
    pdf = c.get(f"/api/v1/receipts/{rid}.pdf")
    assert png.content[:4] == b"\x89PNG" and pdf.content[:5] == b"%PDF-"
    # Listed as stored, and the same NIK now needs an override reason.
    rows = c.get("/api/v1/records").json()
    assert [(r["id"], r["state"]) for r in rows] == [(rid, "stored")]
    r = c.post("/api/v1/enrollment", json={"nik": NIK_MALE})
    assert r.status_code == 409 and r.json()["detail"]["code"] == "nik_enrolled"
    assert r.json()["detail"]["previous"] == [rid]


NIK_CASES = [
    # (nik, expected code, words the operator's message must contain)
    ("12345", "nik_length", "16 digits, this one has 5"),
    ("32010115059000011", "nik_length", "this one has 17"),
    ("3201O11505900001", "nik_not_digits", "only digits"),
    ("9901011505900001", "nik_province", "province code 99"),
    ("3200011505900001", "nik_regency", "regency/city code (digits 3-4)"),
    ("3201003105900001", "nik_district", "district code (digits 5-6)"),
    ("3201013102900001", "nik_birth_date", "is not a real date"),
    ("3201017202900001", "nik_birth_date", "is not a real date"),  # woman, 32 February
    ("3201011505900000", "nik_serial", "digits 13-16"),
]


def test_nik_validation_table(daemon: Daemon) -> None:
    c = daemon.signin()
    c.headers["X-Rekam-Lang"] = "en"  # the words below are English (the kit's own language is Indonesian)
    for nik, code, words in NIK_CASES:
        r = c.post("/api/v1/enrollment", json={"nik": nik})
        assert r.status_code == 422, (nik, r.text)
        det = r.json()["detail"]
        assert det["code"] == code and words in det["message"], (nik, det)
    st = daemon.client().get("/api/v1/status").json()
    assert st["guard"]["enrollments_in_progress"] == 0  # a refused NIK holds no space
    for nik in (NIK_MALE, NIK_FEMALE):  # both valid (the woman's day of birth is + 40)
        r = c.post("/api/v1/enrollment", json={"nik": nik})
        assert r.status_code == 200 and r.json()["nik_masked"] == nik[:6] + "******" + nik[12:], r.text
        assert c.post("/api/v1/enrollment/cancel").status_code == 200


def test_pin_lockout_after_five_wrong(daemon: Daemon) -> None:
    c = daemon.client()
    c.headers["X-Rekam-Lang"] = "en"  # the words below are English
    answers = []
    for _ in range(5):
        r = c.post("/api/v1/auth/signin", json={"operator_id": "demo", "pin": "000000"})
        answers.append((r.status_code, r.json()["detail"]["code"], r.json()["detail"]["message"]))
    assert [a[:2] for a in answers] == [(401, "bad_pin")] * 4 + [(423, "locked")]
    assert "1 tries left" in answers[3][2] and "locked for 15 min" in answers[4][2]
    # Locked: even the right PIN is refused, with the time to wait; another operator is unaffected.
    r = c.post("/api/v1/auth/signin", json={"operator_id": "demo", "pin": OPERATOR[1]})
    assert r.status_code == 423 and r.json()["detail"]["retry_after_s"] > 800
    assert "locked" in r.json()["detail"]["message"]
    r = c.post("/api/v1/auth/signin", json={"operator_id": SUPERVISOR[0], "pin": SUPERVISOR[1]})
    assert r.status_code == 200
    s = daemon.signin(SUPERVISOR)
    assert len(audit(s, "signin_failed")) == 6


def _advance_to(c: httpx.Client, target: str) -> None:
    """Capture until the enrollment's next step is `target`."""
    for _ in range(10):
        step = c.get("/api/v1/enrollment").json()["step"]
        if step == target:
            return
        if step == "face":
            r = c.post("/api/v1/enrollment/face")
        elif step.startswith("finger:"):
            r = c.post(f"/api/v1/enrollment/fingers/{step[7:]}")
        else:
            r = c.post("/api/v1/enrollment/dupcheck")
        assert r.status_code == 200, r.text
    pytest.fail(f"never reached {target}")


def test_cancel_at_each_step_keeps_nothing_and_releases_the_reservation(make_daemon: Any) -> None:
    daemon = make_daemon(fingers=["R1", "R2"], dedup=["R1"])
    c = daemon.signin()
    st = daemon.client()
    steps = ["face", "finger:R1", "finger:R2", "dupcheck", "review"]
    for i, target in enumerate(steps):
        r = c.post("/api/v1/enrollment", json={"nik": NIK_MALE})
        assert r.status_code == 200, r.text
        assert st.get("/api/v1/status").json()["guard"]["enrollments_in_progress"] == 1
        _advance_to(c, target)
        assert c.post("/api/v1/enrollment/cancel").json() == {"active": False, "last_receipt": None}
        status = st.get("/api/v1/status").json()
        assert status["guard"]["enrollments_in_progress"] == 0, target
        assert sum(v["records"] for v in status["records"].values()) == 0
        assert c.get("/api/v1/enrollment/preview/finger-R1.png").status_code == 404  # previews dropped
        cancels = audit(c, "enrollment_cancel")
        assert len(cancels) == i + 1 and cancels[0]["detail"]["step"] == target
    assert record_files(daemon) == ([], [])
    assert audit(c, "nik_override") == []  # never enrolled, so no override was ever needed


def test_halt_mid_day_refuses_new_sessions_but_finishes_the_running_one(make_daemon: Any, tmpfs: Any,
                                                                         tmp_path: Path) -> None:
    # 10 MiB: the 2 MiB reserve, a 2 MiB hold for the enrollment under way and room for one more
    # maximal record (the guard lets a capture start only if a record of max_record_mb fits).
    tmpfs.mount(tmp_path / "sd", 10 * 1024)
    d = make_daemon(max_record_mb=2, fingers=["R1"], dedup=["R1"])  # each enrollment in progress holds 2 MiB
    c = d.signin()
    first = enroll(c, NIK_MALE)  # a normal morning enrollment; the guard now knows the record size
    # An enrollment is under way when the SD fills up (something else wrote a big file).
    assert c.post("/api/v1/enrollment", json={"nik": NIK_FEMALE}).status_code == 200
    sd = next(m for m in d.client().get("/api/v1/status").json()["media"] if m["name"] == "sd")
    assert sd["level"] != "HALT"
    size = sd["free_bytes"] - sd["reserve_bytes"] - 2 * 1024 * 1024 - 20_000
    with open(d.sd / "filler.bin", "wb") as f:
        f.write(b"\0" * size)
    status = d.client().get("/api/v1/status").json()
    assert status["guard"]["level"] == "HALT" and not status["guard"]["capture_allowed"]
    # The running enrollment holds its reservation: it completes and is stored.
    second = enroll(c, NIK_FEMALE, commit=False, start=False)
    r = c.post("/api/v1/enrollment/commit")
    assert r.status_code == 200, r.text
    assert {p.stem for p in record_files(d)[0]} == {first["record_id"], r.json()["record_id"]}
    assert second["step"] == "review"
    # The day goes on until the SD really is full: then a new one is refused with the reason, nothing held.
    sd = next(m for m in d.client().get("/api/v1/status").json()["media"] if m["name"] == "sd")
    with open(d.sd / "filler2.bin", "wb") as f:
        f.write(b"\0" * max(0, sd["free_bytes"] - sd["reserve_bytes"] - 30_000))
    r = c.post("/api/v1/enrollment", json={"nik": "3201014101000001"})
    assert r.status_code == 507
    det = r.json()["detail"]
    assert det["code"] == "halted" and det["reasons"] == ["sd_full"]
    assert det["message"].startswith("perekaman dihentikan: sd penuh: sisa ")  # the kit's language: Indonesian
    assert d.client().get("/api/v1/status").json()["guard"]["enrollments_in_progress"] == 0
    assert audit(c, "start_refused")[0]["detail"]["reason"] == "sd_full"  # the journal keeps the code


def test_duplicate_check_flags_the_same_fingers_under_another_nik(make_daemon: Any) -> None:
    daemon = make_daemon(fingers=["R2"], dedup=["R2"])  # one finger per resident keeps five enrollments quick
    c = daemon.signin()
    a = enroll(c, NIK_MALE)["record_id"]
    # A different person passes the check.
    other = enroll(c, "3201011203850007")
    assert other["record_id"] != a
    # The first resident comes back with another NIK: flagged, the supervisor rejects it.
    nik_b, nik_c = "3578011111800004", "3578016112900005"
    for nik in (nik_b, nik_c):
        r = daemon.client().post("/api/v1/sim/alias", json={"nik": nik, "same_person_as": NIK_MALE})
        assert r.status_code == 200
    state = enroll(c, nik_b, commit=False)
    assert state["step"] == "supervisor"
    assert [(h["finger"], h["record_id"]) for h in state["duplicates"]] == [("R2", a)]
    assert c.post("/api/v1/enrollment/commit").json()["detail"]["code"] == "not_ready"
    # A wrong supervisor PIN and an operator without the role are refused.
    bad = c.post("/api/v1/enrollment/supervisor", json={"supervisor_id": "spv", "pin": "111111",
                                                        "decision": "accept", "reason": "x"})
    assert bad.status_code == 403 and bad.json()["detail"]["code"] == "supervisor_auth"
    bad = c.post("/api/v1/enrollment/supervisor", json={"supervisor_id": "demo", "pin": OPERATOR[1],
                                                        "decision": "accept", "reason": "x"})
    assert bad.status_code == 403 and "demo bukan supervisor" in bad.json()["detail"]["message"]  # Indonesian
    r = c.post("/api/v1/enrollment/supervisor", json={"supervisor_id": "spv", "pin": SUPERVISOR[1],
                                                      "decision": "reject", "reason": "same person as " + a})
    assert r.status_code == 200 and r.json()["active"] is False
    # Accepted after review (e.g. a data error): stored with the decision in the record.
    state = enroll(c, nik_c, commit=False)
    assert state["step"] == "supervisor"
    r = c.post("/api/v1/enrollment/supervisor", json={"supervisor_id": "spv", "pin": SUPERVISOR[1],
                                                      "decision": "accept", "reason": "checked the KK: twins"})
    assert r.status_code == 200 and r.json()["step"] == "review"
    accepted = c.post("/api/v1/enrollment/commit").json()["record_id"]
    decisions = audit(c, "supervisor_decision")
    assert [(e["actor"], e["detail"]["decision"], e["detail"]["reason"]) for e in decisions] == [
        ("spv", "accept", "checked the KK: twins"), ("spv", "reject", "same person as " + a)]
    flagged = audit(c, "duplicate_flagged")
    assert len(flagged) == 2 and all(e["detail"]["records"] == [a] for e in flagged)
    ids = {r["id"] for r in c.get("/api/v1/records").json()}
    assert ids == {a, other["record_id"], accepted}


def test_face_models_that_do_not_load_are_named_not_called_a_missing_camera(make_daemon: Any,
                                                                           tmp_path: Path) -> None:
    """The camera works but the face models did not load (here: an empty model folder): the status says which
    check is unavailable and why (the update self-test reads it), a face attempt is refused as the check that
    does not work, in Indonesian, and the operator can still go on with a face exception."""
    empty = tmp_path / "no-models"
    empty.mkdir()
    d = make_daemon(extra=f'[quality_face]\nmodels_dir = "{empty}"\n')
    st = d.client().get("/api/v1/status").json()
    assert st["quality"]["face"]["state"] == "unavailable" and "face_detection" in st["quality"]["face"]["error"]
    assert st["quality"]["finger"] == {"state": "ready"}, st["quality"]
    c = d.signin()
    assert c.post("/api/v1/enrollment", json={"nik": NIK_MALE, "override_reason": ""}).status_code == 200
    r = c.post("/api/v1/enrollment/face")
    assert r.status_code == 503 and r.json()["detail"]["code"] == "no_face_quality", r.text
    assert r.json()["detail"]["message"] == "pemeriksaan mutu foto wajah tidak berfungsi di kit ini"
    r = c.post("/api/v1/enrollment/face/exception", json={"reason": "model wajah rusak, teknisi dipanggil"})
    assert r.status_code == 200, r.text
    assert c.get("/api/v1/enrollment").json()["step"] != "face"
