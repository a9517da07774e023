"""The iris and signature steps through a real `rekamd --sim` (synthetic NIR eyes through the iris camera seam,
the console API), to a sealed record opened with the data center's key."""

from __future__ import annotations

import io
import json

from PIL import Image

from firmware.wire import record_format as rf
from tests.console.conftest import NIK_FEMALE, NIK_MALE
from tests.iris.conftest import IRIS_TOML, drive, signature_strokes


def _open(d, dc_keys, record_id: str) -> tuple[dict, dict[str, rf.Attachment]]:
    data = (d.sd / "records" / f"{record_id}.rkm").read_bytes()
    _, plain = rf.open_record(data, dc_keys["sk"])
    p = rf.Payload.decode(plain)
    return p.manifest, {a.name: a for a in p.attachments}


def test_face_irises_fingers_signature_to_a_sealed_v3_record(make_daemon, dc_keys) -> None:
    d = make_daemon(extra=IRIS_TOML)
    c = d.signin()
    r = c.post("/api/v1/enrollment", json={"nik": NIK_MALE, "override_reason": ""})
    assert r.status_code == 200, r.text
    assert r.json()["step"] == "face"
    c.post("/api/v1/enrollment/face")
    assert c.get("/api/v1/enrollment").json()["step"] == "iris:left"  # the operator guide's order: left first
    live = c.get("/api/v1/enrollment/iris/left/live").json()
    assert live["position"]["distance"] in ("ok", "too_far", "too_close") and live["preview"] == "iris-live.jpg"
    assert c.get("/api/v1/enrollment/preview/iris-live.jpg").headers["content-type"] == "image/jpeg"
    state = drive(c, NIK_MALE)
    assert state["step"] == "review"
    assert [i["eye"] for i in state["irises"]] == ["left", "right"] and all(i["done"] for i in state["irises"])
    assert state["signature"]["done"] and state["signature"]["preview"] == "signature.png"
    receipt = c.post("/api/v1/enrollment/commit").json()
    m, atts = _open(d, dc_keys, receipt["record_id"])
    assert m["schema"] == "rekam.enrollment/3"
    for doc in m["irises"]:
        im = Image.open(io.BytesIO(atts[doc["image"]].data))
        assert im.mode == "L" and im.size == (doc["width"], doc["height"]) == (640, 480)
        assert len(doc["attempts"]) >= 1 and doc["kept"] is not None
        assert {"usable_iris_area_percent", "iso_sharpness"} <= set(doc["attempt_details"][0]["measures"])
    sig = m["signature"]
    im = Image.open(io.BytesIO(atts[sig["image"]].data))
    assert im.mode == "L" and im.size == (sig["width"], sig["height"]) and im.width < 600  # trimmed
    strokes = json.loads(atts[sig["strokes"]].data)["strokes"]
    assert len(strokes) == sig["stroke_count"] == 3


def test_eye_exception_forced_capture_and_signature_exception(make_daemon, dc_keys) -> None:
    d = make_daemon(extra=IRIS_TOML + "sim_retake_rate = 1.0\n")  # every synthetic shot has a defect
    c = d.signin()
    c.post("/api/v1/enrollment", json={"nik": NIK_FEMALE, "override_reason": ""})
    c.post("/api/v1/enrollment/face")
    r = c.post("/api/v1/enrollment/iris/left/exception", json={"reason": "prostesis (mata palsu)"})
    assert r.status_code == 200 and r.json()["step"] == "iris:right"
    answers = [c.post("/api/v1/enrollment/iris/right").json() for _ in range(3)]
    assert [a["done"] for a in answers] == [False, False, True], answers
    assert all(a["codes"] and a["hints"] for a in answers) and answers[-1]["forced"] and not answers[-1]["accepted"]
    assert answers[0]["message"].startswith("ulangi: ")  # the kit speaks Bahasa Indonesia first
    # A signature before the fingers is refused; an empty pad and a single line are rejected with their codes.
    r = c.post("/api/v1/enrollment/signature", json={"strokes": signature_strokes(), "width": 600, "height": 200})
    assert r.status_code == 409 or r.json()["detail"]["code"] == "fingers_pending", r.text
    state = drive(c, NIK_FEMALE, sign=False)
    assert state["step"] == "signature"
    r = c.post("/api/v1/enrollment/signature", json={"strokes": [], "width": 600, "height": 200}).json()
    assert not r["accepted"] and r["codes"] == ["SIGNATURE_EMPTY"]
    line = [[[50 + 5 * t, 100.0, 0.5, 10.0 * t] for t in range(80)]]
    r = c.post("/api/v1/enrollment/signature", json={"strokes": line, "width": 600, "height": 200}).json()
    assert not r["accepted"] and "SIGNATURE_LINE" in r["codes"] and r["hints"]
    r = c.post("/api/v1/enrollment/signature/exception", json={"reason": "tidak bisa menulis; cap jempol"})
    assert r.status_code == 200 and r.json()["step"] == "dupcheck"
    state = drive(c, NIK_FEMALE)
    receipt = c.post("/api/v1/enrollment/commit").json()
    m, atts = _open(d, dc_keys, receipt["record_id"])
    assert m["irises"][0] == {"eye": "left", "exception": "prostesis (mata palsu)"}
    assert m["irises"][1]["image"] == "iris-right.png" and "iris-left.png" not in atts
    right = m["irises"][1]
    assert right["forced"] and len(right["attempts"]) == 3 and all(a["rejected"] for a in right["attempts"])
    assert right["attempts"][right["kept"]]["score"] == max(a["score"] for a in right["attempts"])
    assert m["signature"] == {"exception": "tidak bisa menulis; cap jempol", "attempts": 2}
    assert "signature.png" not in atts
    # The receipt says what was recorded of the resident, exceptions included.
    bio = receipt["biometrics"]
    assert bio["iris"] == {"captured": 1, "exception": 1} and bio["signature"] == {"captured": 0, "exception": 1}
    assert bio["fingers"]["captured"] + bio["fingers"]["exception"] == len(m["fingers"])
