"""Issue #16 in the console: Bahasa Indonesia first, and the defects a new user hit, in a real headless Chromium
against a real `rekamd --sim`, at the kiosk (800x480), a laptop (1280x800) and a phone (390x844).

Each test names the item of issue #16 it covers. Screenshots for docs/operator-guide.md are written to docs/img/
when REKAM_DOC_SHOTS=1 (small PNGs; the pictures never go stale because these tests make them).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

import pytest

from firmware.enrollment.operators import hash_pin
from firmware.system import i18n
from tests.console.conftest import NIK_FEMALE, NIK_MALE, OPERATOR, SUPERVISOR, Daemon, enroll, write_config
from tests.console.test_web_console import english

REPO = Path(__file__).resolve().parents[2]
SIZES = [(800, 480), (1280, 800), (390, 844)]
SECOND = ("ani", "246810")  # a second operator (role operator)
DOC_SHOTS = os.environ.get("REKAM_DOC_SHOTS") == "1"


def shot(page: Any, name: str) -> None:
    """A screenshot for the operator guide (only with REKAM_DOC_SHOTS=1)."""
    if DOC_SHOTS:
        out = REPO / "docs" / "img" / f"{name}.png"
        out.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(out))


def signin(page: Any, who: tuple[str, str] = OPERATOR) -> None:
    page.fill("#signin-id", who[0])
    page.fill("#signin-pin", who[1])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#view-enroll:not([hidden])")


def no_sideways_scroll(page: Any) -> None:
    width = page.evaluate("() => document.documentElement.scrollWidth")
    view = page.evaluate("() => window.innerWidth")
    assert width <= view, f"the page scrolls sideways ({width} > {view})"


@pytest.fixture
def two_operators(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path, rekamd_factory: Any) -> Daemon:
    """A daemon with the demo operator, the demo supervisor and a second operator `ani`."""
    cfg = write_config(tmp_path, dc_keys["pub_path"], corpus_dir, fingers=["R1"], dedup=["R1"])
    text = cfg.read_text()
    entry = (f'  {{ id = "{SECOND[0]}", name = "Ani Operator", pin_hash = "{hash_pin(SECOND[1])}", '
             'role = "operator" },\n')
    cfg.write_text(text.replace("list = [\n", "list = [\n" + entry, 1))
    return Daemon(rekamd_factory(cfg), tmp_path)


def test_console_is_indonesian_first_switchable_and_persisted(make_daemon: Any, browser: Any) -> None:
    """Deliver 1: <html lang="id">, every static text from the catalog, a language switch kept per browser."""
    d = make_daemon()
    for w, h in SIZES:
        ctx = browser.new_context(viewport={"width": w, "height": h})
        page = ctx.new_page()
        page.goto(d.url + "/")
        page.wait_for_selector("#view-signin:not([hidden])")
        assert page.evaluate("() => document.documentElement.lang") == "id"
        assert page.inner_text("#view-signin h1") == "Masuk petugas"
        assert page.inner_text("#signin-form button[type=submit]") == "Masuk"
        # Every data-i18n element shows its Indonesian text (none left in English).
        texts = page.eval_on_selector_all("[data-i18n]", "els => els.map(e => [e.dataset.i18n, e.textContent])")
        cat = i18n.catalog("id", "console")
        assert texts and all(text == cat[msgid] for msgid, text in texts), texts
        if (w, h) == (800, 480):
            shot(page, "masuk")
        no_sideways_scroll(page)
        page.click("#lang")
        page.wait_for_selector("#view-signin h1:has-text('Operator sign-in')")
        page.reload()
        page.wait_for_selector("#view-signin h1:has-text('Operator sign-in')")  # kept in this browser
        assert page.evaluate("() => document.documentElement.lang") == "en"
        ctx.close()
    # The catalog is served with the static console (no session needed for the sign-in page's texts).
    r = d.anon().get("/api/v1/i18n/id")
    assert r.status_code == 200 and r.json()["messages"]["Sign in"] == "Masuk" and r.json()["default"] == "id"


def test_the_configured_language_is_the_default(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path,
                                                rekamd_factory: Any, browser: Any) -> None:
    cfg = write_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    cfg.write_text(cfg.read_text().replace("[kit]\n", '[kit]\nlanguage = "en"\n', 1))
    d = Daemon(rekamd_factory(cfg), tmp_path)
    assert d.anon().get("/api/v1/i18n").json()["lang"] == "en"
    page = browser.new_page(viewport={"width": 800, "height": 480})
    page.goto(d.url + "/")
    page.wait_for_selector("#view-signin h1:has-text('Operator sign-in')")
    assert page.evaluate("() => document.documentElement.lang") == "en"
    page.close()


def test_pin_messages_lockout_once_and_plural(daemon: Daemon, browser: Any) -> None:
    """Items 6 and 7: the tries left with the right plural, the lockout's wait said once, the console's own
    words for a short PIN or an empty NIK, and no stale counter beside them."""
    page = browser.new_page(viewport={"width": 800, "height": 480})
    page.goto(daemon.url + "/")
    page.wait_for_selector("#view-signin:not([hidden])")
    page.click("#lang")  # English: the plural has two forms there
    page.wait_for_selector("#view-signin h1:has-text('Operator sign-in')")
    page.fill("#signin-id", OPERATOR[0])
    page.fill("#signin-pin", "12")  # too short: the console says so, the browser's bubble does not
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-msg:has-text('The PIN has 4 to 12 digits.')")
    msgs = []
    for _ in range(4):
        page.fill("#signin-pin", "999999")
        page.click("#signin-form button[type=submit]")
        page.wait_for_function("(prev) => document.getElementById('signin-msg').textContent !== prev "
                               "&& document.getElementById('signin-msg').textContent !== ''",
                               arg=msgs[-1] if msgs else "The PIN has 4 to 12 digits.")
        msgs.append(page.inner_text("#signin-msg"))
    assert msgs[0] == "Wrong operator id or PIN. 4 tries left before the lockout."
    assert msgs[3] == "Wrong operator id or PIN. 1 try left before the lockout."  # not "1 tries"
    page.fill("#signin-pin", "12")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-msg:has-text('The PIN has 4 to 12 digits.')")
    assert "tries left" not in page.inner_text("#signin-msg") and "try left" not in page.inner_text("#signin-msg")
    page.fill("#signin-pin", "999999")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-msg:has-text('locked')")
    text = page.inner_text("#signin-msg")
    assert text.count("Try again in") == 1 and text.count("min") == 1, text
    assert re.fullmatch(r"Too many wrong PINs: this operator is locked\. Try again in 15 min\.", text), text
    # Indonesian: one form, and the same once-only wait.
    page.click("#lang")
    page.fill("#signin-pin", "999999")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-msg:has-text('Coba lagi dalam')")
    assert page.inner_text("#signin-msg").count("Coba lagi") == 1
    page.close()

    # The NIK form: empty -> the console's words, not the validator's "String should have at least 1 character".
    page = english(browser.new_context(viewport={"width": 800, "height": 480})).new_page()
    page.goto(daemon.url + "/")
    signin(page, SUPERVISOR)
    page.click("#nik-start")
    page.wait_for_selector("#nik-msg:has-text(\"Type the resident's 16-digit NIK.\")")
    page.fill("#nik", "12345")
    page.click("#nik-start")
    page.wait_for_selector("#nik-msg:has-text('The NIK has 16 digits')")
    assert "String should" not in page.inner_text("#nik-msg")
    page.close()


def test_api_docs_are_not_on_the_console_port_and_nothing_loads_from_outside(daemon: Daemon) -> None:
    """Item 3: no Swagger UI / ReDoc (they need a CDN; a field kit is offline): 404 even signed in; one strict
    CSP on every response; the console page names no outside host."""
    c = daemon.signin()
    for path in ("/api/v1/docs", "/api/v1/redoc", "/docs", "/redoc"):
        r = c.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert "default-src 'self'" in r.headers.get("content-security-policy", "")
    assert c.get("/api/v1/openapi.json").status_code == 200  # the schema stays, behind a credential
    assert daemon.anon().get("/api/v1/openapi.json").status_code == 401
    for name in ("index.html", "app.js", "style.css"):
        text = (REPO / "firmware" / "console" / "web" / name).read_text()
        assert not re.search(r"(src|href)=\"https?://|url\(https?://|fetch\(\"https?://", text), name


def test_another_operators_enrollment_shows_whose_and_only_owner_or_supervisor_acts(two_operators: Daemon,
                                                                                    browser: Any) -> None:
    """Item 10: signing in shows whose half-done enrollment it is; another operator may not continue or cancel
    it; a supervisor may."""
    d = two_operators
    demo = d.signin(OPERATOR)
    enroll(demo, NIK_MALE, commit=False)
    ani = d.signin(SECOND)
    state = ani.get("/api/v1/enrollment").json()
    assert state["operator_id"] == "demo" and state["operator_name"] == "Demo Operator"
    for path in ("/api/v1/enrollment/cancel", "/api/v1/enrollment/commit"):
        r = ani.post(path)
        assert r.status_code == 403 and r.json()["detail"]["code"] == "not_owner", r.text
    assert demo.get("/api/v1/enrollment").json()["active"] is True  # still there
    for w, h in SIZES:
        page = english(browser.new_context(viewport={"width": w, "height": h})).new_page()
        page.goto(d.url + "/")
        signin(page, SECOND)
        page.wait_for_selector("#owner-note:not([hidden])")
        assert "started by Demo Operator (demo)" in page.inner_text("#owner-note")
        assert page.is_hidden("#cancel") and page.is_hidden("#review") and page.is_hidden("#capture")
        assert "Wait for Demo Operator" in page.inner_text("#prompt")
        no_sideways_scroll(page)
        page.close()
    spv = d.signin(SUPERVISOR)
    assert spv.post("/api/v1/enrollment/cancel").status_code == 200  # a supervisor may
    audit = [e for e in demo.get("/api/v1/audit").json() if e["kind"] == "not_owner"]
    assert {e["actor"] for e in audit} == {"ani"}


def test_exception_form_face_reasons_confirmation_and_fit(make_daemon: Any, browser: Any) -> None:
    """Item 11: the face offers face reasons (no "amputated"); a finger offers finger reasons; a recorded
    exception is confirmed; the form's button is above the fold at each size."""
    d = make_daemon(fingers=["R1"], dedup=["R1"])
    for i, (w, h) in enumerate(SIZES):
        page = english(browser.new_context(viewport={"width": w, "height": h}, has_touch=True)).new_page()
        page.goto(d.url + "/")
        signin(page)
        page.fill("#nik", ["3201011505900001", "3201011505900002", "3201011505900003"][i])
        page.click("#nik-start")
        page.wait_for_selector("#capture-title:has-text('Face photo')")
        page.click("#capture-exc")
        face = page.eval_on_selector_all("#exc-select option", "os => os.map(o => o.value)")
        assert "missing" not in face and "bandaged" not in face and "camera unavailable" in face
        box = page.locator("#exc-form button[type=submit]").bounding_box()
        assert box is not None and box["y"] + box["height"] <= h, (w, h, box)
        if (w, h) == (800, 480) and DOC_SHOTS:  # the guide's picture in Bahasa Indonesia, then back
            page.click("#lang")
            page.wait_for_selector("#exc-form button[type=submit]:has-text('Catat pengecualian')")
            shot(page, "pengecualian")
            page.click("#lang")
            page.wait_for_selector("#exc-form button[type=submit]:has-text('Record exception')")
        page.select_option("#exc-select", "camera unavailable")
        page.click("#exc-form button[type=submit]")
        page.wait_for_selector("#enroll-msg:has-text('Exception recorded for Face photo: camera unavailable')")
        page.wait_for_selector("#capture-title:has-text('R1')")
        assert "Exception recorded" in page.inner_text("#done-note")
        page.click("#capture-exc")
        finger = page.eval_on_selector_all("#exc-select option", "os => os.map(o => o.value)")
        assert "missing" in finger and "camera unavailable" not in finger
        page.fill("#exc-text", "")
        page.select_option("#exc-select", "bandaged")
        page.click("#exc-form button[type=submit]")
        page.wait_for_selector("#review:not([hidden])", timeout=30_000)
        no_sideways_scroll(page)
        page.on("dialog", lambda dlg: dlg.accept())
        page.click("#cancel")
        page.wait_for_selector("#enroll-start:not([hidden])")
        page.close()
    kinds = [e["kind"] for e in d.signin().get("/api/v1/audit").json()]
    assert kinds.count("face_exception") == 3 and kinds.count("finger_exception") == 3


def test_daemon_gone_mid_capture_leaves_no_busy_prompt(make_daemon: Any, browser: Any) -> None:
    """Item 12: the kit stops answering during a capture: the prompt says so and the buttons come back."""
    d = make_daemon(fingers=["R1"], dedup=["R1"])
    page = english(browser.new_context(viewport={"width": 800, "height": 480})).new_page()
    page.goto(d.url + "/")
    signin(page)
    page.fill("#nik", NIK_MALE)
    page.click("#nik-start")
    page.wait_for_selector("#capture-title:has-text('Face photo')")
    d.proc.kill()  # SIGKILL: as a crash, no answer to anything after this
    d.proc.wait(10)
    page.click("#capture-go")
    page.wait_for_selector("#prompt:has-text('The kit did not answer')", timeout=20_000)
    assert "Taking the photo" not in page.inner_text("#prompt")
    assert page.is_enabled("#capture-go") and page.is_enabled("#capture-exc")
    page.close()


def test_review_full_nik_birth_date_and_thumbnails(make_daemon: Any, browser: Any) -> None:
    """Item 19 / deliver 4: the review shows the whole NIK, the birth date its digits hold spelled out (and the
    sex: a woman's day is +40), and a thumbnail of the face and each finger."""
    d = make_daemon(fingers=["R1", "R2"], dedup=["R1"])
    c = d.signin()
    enroll(c, NIK_FEMALE, commit=False)  # the console then opens the same enrollment at review
    for lang, born, sex in (("id", "15 Mei 1990", "perempuan"), ("en", "May 15, 1990", "woman")):
        for w, h in SIZES:
            ctx = browser.new_context(viewport={"width": w, "height": h})
            if lang == "en":
                english(ctx)
            page = ctx.new_page()
            page.goto(d.url + "/")
            signin(page)
            page.wait_for_selector("#review:not([hidden])")
            assert page.inner_text("#review-nik td").replace(" ", "") == NIK_FEMALE
            assert page.inner_text("#review-birth td") == f"{born} · {sex}"
            assert born == i18n.format_date(dt.date(1990, 5, 15), lang=lang)  # the server's rule, the same text
            page.wait_for_function("() => { const i = [...document.querySelectorAll('#review-table img.thumb')];"
                                   " return i.length === 3 && i.every(x => x.complete && x.naturalWidth > 20); }",
                                   timeout=10_000)
            if (lang, w) == ("id", 800):
                shot(page, "periksa")
            no_sideways_scroll(page)
            ctx.close()
    # Before review the NIK stays masked in the API's answer.
    c.post("/api/v1/enrollment/cancel")
    r = c.post("/api/v1/enrollment", json={"nik": NIK_MALE, "override_reason": ""}).json()
    assert "nik" not in r and r["nik_masked"] == "320101******0001"


def test_status_and_records_say_delivered_and_formats_match_the_server(daemon: Daemon, browser: Any) -> None:
    """Item 18 and deliver 3: the status page counts delivered records; the records page never calls a
    delivered record "purged"; counts, sizes and dates in the browser are the server's (firmware.system.i18n)."""
    c = daemon.signin()
    rid = enroll(c, NIK_MALE)["record_id"]
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(daemon.url + "/")
    signin(page)
    page.click("button[data-view=status]")
    page.wait_for_selector("#st-delivered")
    assert page.inner_text("#st-delivered th") == "Terkirim ke pusat data"
    assert re.fullmatch(r"0 \(0 masih di perangkat, 0 sudah dihapus dari perangkat\)",
                        page.inner_text("#st-delivered td"))
    assert re.search(r"\d+,\d (KiB|MiB|GiB) kosong dari \d+,\d (KiB|MiB|GiB)", page.inner_text("#st-media"))
    shot(page, "status")
    page.click("button[data-view=records]")
    page.wait_for_selector(f"#rec-body td:has-text('{rid}')")
    assert "tersimpan, belum dikirim" in page.inner_text("#rec-body")
    assert page.inner_text("#rec-summary").startswith("1 data hari ini")
    for lang in ("id", "en"):
        if page.evaluate("() => window.rekamFormat.lang()") != lang:
            page.click("#lang")
            page.wait_for_function("(l) => window.rekamFormat.lang() === l", arg=lang)
        for state in ("acked", "purged"):
            label = page.evaluate("(s) => window.rekamFormat.state(s)", state)
            assert "purged" not in label and ("terkirim" in label if lang == "id" else "delivered" in label), label
        for n in (0, 7, 1234, 205569, 12345678):
            assert page.evaluate("(n) => window.rekamFormat.count(n)", n) == i18n.format_count(n, lang=lang)
        for b in (0, 512, 1023, 1024, 347 * 1024, 5 * 2**20 + 12345, int(73.5 * 2**30), 252 * 2**30, 3 * 2**40):
            assert page.evaluate("(b) => window.rekamFormat.size(b)", b) == i18n.format_size(b, lang=lang), (lang, b)
        for day in (dt.date(1990, 5, 15), dt.date(2001, 12, 1), dt.date(1975, 8, 17)):
            js = page.evaluate("(d) => window.rekamFormat.date(d)", day.isoformat())
            assert js == i18n.format_date(day, lang=lang), (lang, js)
    page.close()


def test_receipt_is_indonesian_first() -> None:
    from firmware.enrollment import receipt

    info = {"record_id": "rk-abc-00000001-20261201T200000Z", "sha256": "ab" * 32, "created": "2026-12-01T20:00:00Z",
            "clock_synced": False, "kit_id": "rk-abc", "site": "Kec. Cibinong"}
    lines = receipt.lines(info)
    assert lines[0].startswith("Bukti Perekaman")
    assert lines[1] == "Data / Record: rk-abc-00000001-20261201T200000Z"
    assert lines[2].startswith("Tanggal / Date: ") and "jam perangkat belum disinkronkan / kit clock" in lines[2]
    assert lines[3] == "Perangkat / Kit: rk-abc  Lokasi / Site: Kec. Cibinong"
    assert receipt.pdf(info).startswith(b"%PDF-") and b"Tanggal / Date" in receipt.pdf(info)


def test_retake_reason_is_said_once(daemon: Daemon, browser: Any) -> None:
    """Item 8: a face retake's reason appears once (as a tip under the result), not in the prompt, the message
    and the bullet. The kit's answer to the one photo is fixed (the simulator's faces pass): the console's
    rendering is what is tested; everything else is the real daemon."""
    import json

    hint = "head turned (yaw): look straight into the camera"
    translated = "kepala menoleh: tatap lurus ke kamera"
    # The kit words the hints in the console's language (X-Rekam-Lang: id), from the codes.
    answer = {"status": "captured", "score": 31.0, "codes": ["HEAD_TURNED"], "hints": [translated], "accepted": False,
              "forced": False, "done": False, "attempt": 1, "message": "ulangi: " + translated}
    page = browser.new_page(viewport={"width": 800, "height": 480})
    page.goto(daemon.url + "/")
    signin(page)
    page.fill("#nik", NIK_MALE)
    page.click("#nik-start")
    page.wait_for_selector("#capture-title:has-text('Foto wajah')")
    page.route("**/api/v1/enrollment/face", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(answer)))
    page.click("#capture-go")
    page.wait_for_selector("#fb-badge:has-text('ULANGI')")
    text = page.inner_text("#view-enroll")
    assert text.count(translated) == 1, text
    assert hint not in text and "Ulangi: ikuti petunjuk di bawah" in page.inner_text("#prompt")
    page.close()
