"""The web console in a real headless Chromium (Playwright) against a real `rekamd --sim`.

Screenshots of each main view at the kiosk size (800x480) and one at a phone size (360x640) go to
a temp folder (path printed; kept by pytest's tmp_path) for a human look at the layout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from tests.console.conftest import NIK_MALE, OPERATOR, Daemon


def english(ctx: Any) -> Any:
    """This browser chose English in the console (the choice persists per browser, in localStorage)."""
    ctx.add_init_script("try { localStorage.setItem('rekam.lang', 'en'); } catch (e) {}")
    return ctx


def capture_once(page: Any) -> None:
    """Tap the capture button and wait for the answer."""
    page.click("#capture-go")
    page.wait_for_function("() => !document.getElementById('capture-go').disabled "
                           "|| document.getElementById('capture').hidden", timeout=30_000)


def test_enrollment_through_the_console(daemon: Daemon, browser: Any, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots in {shots}")
    ctx = english(browser.new_context(viewport={"width": 800, "height": 480}, has_touch=True))
    page = ctx.new_page()
    problems: list[str] = []
    # HTTP errors the test provokes (wrong PIN, bad NIK, no session yet) are logged as failed loads: expected.
    page.on("console", lambda m: problems.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: d.accept())
    resp = page.goto(daemon.url + "/")
    assert resp is not None and resp.status == 200
    assert "default-src 'self'" in resp.headers["content-security-policy"]

    # Sign-in: a wrong PIN shows the API's message, the right one opens the enrollment view.
    page.fill("#signin-id", OPERATOR[0])
    page.fill("#signin-pin", "999999")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-msg:has-text('Wrong operator id or PIN')")
    page.screenshot(path=str(shots / "1-signin.png"))
    page.fill("#signin-pin", OPERATOR[1])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#view-enroll:not([hidden])")
    assert "Demo Operator" in page.inner_text("#who")
    expect(page.locator("#prompt")).to_contain_text("NIK")  # waits: the prompt follows GET /enrollment

    # A bad NIK: the console's own words for the API's code (nik_serial).
    page.fill("#nik", "3201011505900000")
    page.click("#nik-start")
    page.wait_for_selector("#nik-msg:has-text('Digits 13-16 of the NIK must not be 0000')")
    page.screenshot(path=str(shots / "2-nik-error.png"))

    page.fill("#nik", NIK_MALE)
    page.click("#nik-start")
    page.wait_for_selector("#enroll-active:not([hidden])")
    assert page.inner_text("#enroll-nik") == "NIK 320101******0001"
    expect(page.locator("#prompt")).to_contain_text("camera")
    page.click("#capture-go")  # face
    page.wait_for_selector("#capture-title:has-text('R1')")
    page.screenshot(path=str(shots / "3-face-done-next-finger.png"))
    expect(page.locator("#prompt")).to_contain_text("RIGHT THUMB")
    # The face's result is not shown under the R1 heading (#16 item 9): it is named as the previous step's.
    assert page.is_hidden("#feedback") and page.is_hidden("#preview")
    assert re.match(r"Done: Face photo — (accepted|kept the best attempt) \(score \d+\)", page.inner_text("#done-note"))
    for code in ("R1", "R2"):
        page.wait_for_selector(f"#capture-title:has-text('{code}')")
        capture_once(page)
        if code == "R1":
            if "R1" in page.inner_text("#capture-title"):  # a retake: this finger's feedback and preview
                page.wait_for_selector("#preview:not([hidden])")
                assert re.search(r"R1 score \d+ · attempt 1", page.inner_text("#fb-score"))
                # The preview is really served (cookie session) and decoded by the browser.
                page.wait_for_function("() => document.getElementById('preview').complete "
                                       "&& document.getElementById('preview').naturalWidth > 100", timeout=10_000)
            else:  # accepted: the next finger's screen names R1's result as the previous step's
                assert page.is_hidden("#preview")
                assert "Done: right thumb" in page.inner_text("#done-note")
            page.screenshot(path=str(shots / "4-finger-feedback.png"))
        for _ in range(3):  # retakes (the policy keeps the best of 3): the prompt says why, tap again
            if code not in page.inner_text("#capture-title") or page.is_hidden("#capture"):
                break
            assert "Retake" in page.inner_text("#prompt") or "no finger" in page.inner_text("#prompt").lower()
            capture_once(page)
    # Duplicate check runs by itself, then the review.
    page.wait_for_selector("#review:not([hidden])", timeout=30_000)
    assert "No match" in page.inner_text("#dup-result") or page.is_hidden("#dup")
    table = page.inner_text("#review-table")
    assert "right thumb" in table and "right index" in table
    # Thumbnails of the face and each finger, served by the kit and decoded by the browser (#16 deliver 4).
    page.wait_for_function("() => { const i = [...document.querySelectorAll('#review-table img.thumb')];"
                           " return i.length === 3 && i.every(x => x.complete && x.naturalWidth > 20); }",
                           timeout=10_000)
    page.screenshot(path=str(shots / "5-review.png"))
    page.click("#commit")
    page.wait_for_selector("#receipt:not([hidden])")
    rid = page.inner_text("#rc-id")
    assert re.fullmatch(r"rk-[a-z0-9]+-\d{8}-\d{8}T\d{6}Z", rid)
    assert "USB stick" in page.inner_text("#rc-mirror")
    page.wait_for_function("() => document.getElementById('rc-qr').complete "
                           "&& document.getElementById('rc-qr').naturalWidth > 50")
    assert page.get_attribute("#rc-pdf", "href") == f"/api/v1/receipts/{rid}.pdf"
    pdf = ctx.request.get(daemon.url + f"/api/v1/receipts/{rid}.pdf")
    assert pdf.ok and pdf.body()[:5] == b"%PDF-"
    page.screenshot(path=str(shots / "6-receipt.png"))
    assert [p.stem for p in (daemon.sd / "records").glob("*.rkm")] == [rid]

    # Status: a capacity bar per medium, guard, uplink, backlog.
    page.click("button[data-view=status]")
    page.wait_for_selector("#st-media .bar")
    assert page.locator("#st-media .medium").count() == 2
    text = page.inner_text("#view-status")
    assert "Capture: OK" in text and "Uplink" in text and "Oldest unconfirmed" in text
    page.screenshot(path=str(shots / "7-status.png"), full_page=True)

    # Today's records.
    page.click("button[data-view=records]")
    page.wait_for_selector(f"#rec-body td:has-text('{rid}')")
    assert "1 record today" in page.inner_text("#rec-summary")
    page.screenshot(path=str(shots / "8-records.png"))

    page.click("button[data-view=enroll]")
    page.click("#rc-next")
    expect(page.locator("#prompt")).to_contain_text("NIK")  # waits: the prompt follows GET /enrollment
    # Alerts: the stick is pulled (its folder goes away) -> the banner says so at the next status poll.
    daemon.usb.rename(daemon.root / "usb-pulled")
    page.wait_for_selector("#alerts .banner:has-text('USB stick missing')", timeout=15_000)
    page.screenshot(path=str(shots / "8b-alert.png"))

    # Phone size: the same console, one column.
    phone = english(browser.new_context(viewport={"width": 360, "height": 640}, has_touch=True, is_mobile=True))
    pp = phone.new_page()
    pp.goto(daemon.url + "/")
    pp.wait_for_selector("#view-signin:not([hidden])")
    pp.screenshot(path=str(shots / "9-phone-signin.png"))
    pp.fill("#signin-id", OPERATOR[0])
    pp.fill("#signin-pin", OPERATOR[1])
    pp.click("#signin-form button[type=submit]")
    pp.wait_for_selector("#enroll-start:not([hidden])")
    pp.screenshot(path=str(shots / "10-phone-enroll.png"))
    width = pp.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 360, f"the phone layout scrolls sideways ({width}px)"
    box = pp.locator("#nik-start").bounding_box()
    assert box is not None and box["height"] >= 44 and box["width"] >= 300  # a thumb-sized, full-width button
    phone.close()
    ctx.close()
    assert problems == [], problems  # no CSP violations, no script errors


def test_console_text_escaping_cancel_and_supervisor(make_daemon: Any, browser: Any, tmp_path: Path) -> None:
    d = make_daemon(fingers=["R1"], dedup=["R1"])
    c = d.signin()
    page = english(browser.new_context(viewport={"width": 800, "height": 480})).new_page()
    page.goto(d.url + "/")
    page.fill("#signin-id", OPERATOR[0])
    page.fill("#signin-pin", OPERATOR[1])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#view-enroll:not([hidden])")
    # Operator-typed text is shown as text: an override reason with markup stays literal.
    from tests.console.conftest import enroll

    enroll(c, NIK_MALE)
    hostile = '<img src=x onerror="window.pwned=1">again'
    page.fill("#nik", NIK_MALE)
    page.click("#nik-start")
    page.wait_for_selector("#override:not([hidden])")
    assert "already enrolled on this kit" in page.inner_text("#nik-msg")
    page.fill("#override-reason", hostile)
    page.click("#nik-start")
    page.wait_for_selector("#enroll-active:not([hidden])")
    for _ in range(10):  # face, R1 (and any retakes)
        if page.is_hidden("#capture"):
            break
        capture_once(page)
    page.wait_for_selector("#review:not([hidden])", timeout=30_000)
    assert hostile in page.inner_text("#review-table")
    # The review's only images are the capture thumbnails (served by the kit), never the typed markup.
    srcs = page.eval_on_selector_all("#review-table img", "els => els.map(e => e.getAttribute('src'))")
    assert srcs and all(s.startswith("/api/v1/enrollment/preview/") for s in srcs), srcs
    assert page.evaluate("() => window.pwned") is None
    # Cancel (after the confirmation dialog): nothing kept.
    page.on("dialog", lambda dlg: dlg.accept())
    page.click("#cancel")
    page.wait_for_selector("#nik-msg:has-text('nothing was kept')")
    assert d.client().get("/api/v1/status").json()["guard"]["enrollments_in_progress"] == 0

    # The first resident again under another NIK: flagged, the supervisor form, a rejection.
    nik_b = "3578011111800004"
    assert d.client().post("/api/v1/sim/alias", json={"nik": nik_b, "same_person_as": NIK_MALE}).status_code == 200
    page.fill("#nik", nik_b)
    page.click("#nik-start")
    page.wait_for_selector("#enroll-active:not([hidden])")
    for _ in range(10):
        if page.is_hidden("#capture"):
            break
        capture_once(page)
    page.wait_for_selector("#sup:not([hidden])", timeout=30_000)
    assert "double enrollment" in page.inner_text("#prompt") and "R1" in page.inner_text("#sup-matches")
    page.screenshot(path=str(tmp_path / "supervisor.png"))
    print(f"screenshot {tmp_path / 'supervisor.png'}")
    page.fill("#sup-id", "spv")
    page.fill("#sup-pin", "000000")
    page.fill("#sup-reason", "same fingers as an earlier record")
    page.click("#sup-form button[type=submit]")
    page.wait_for_selector("#sup-msg:has-text(\"The supervisor's id or PIN is wrong\")")
    page.fill("#sup-pin", "654321")
    page.fill("#sup-reason", "same fingers as an earlier record")
    page.click("#sup-form button[type=submit]")
    page.wait_for_selector("#nik-msg:has-text('Rejected by the supervisor')")
    events = [e for e in c.get("/api/v1/audit").json() if e["kind"] == "supervisor_decision"]
    assert [(e["actor"], e["detail"]["decision"]) for e in events] == [("spv", "reject")]
    assert len(c.get("/api/v1/records").json()) == 1
    page.close()


def test_console_shows_the_halt(make_daemon: Any, browser: Any, tmpfs: Any, tmp_path: Path) -> None:
    tmpfs.mount(tmp_path / "sd", 4 * 1024)
    d = make_daemon(max_record_mb=2, fingers=["R1"], dedup=["R1"])
    sd = next(m for m in d.client().get("/api/v1/status").json()["media"] if m["name"] == "sd")
    with open(d.sd / "filler.bin", "wb") as f:
        f.write(b"\0" * max(0, sd["free_bytes"] - sd["reserve_bytes"] - 100_000))
    page = english(browser.new_context(viewport={"width": 800, "height": 480})).new_page()
    page.goto(d.url + "/")
    # The kit's status is shown to signed-in operators only (issue #13): nothing before the sign-in.
    page.wait_for_selector("#signin-form")
    assert page.inner_text("#alerts") == ""
    page.fill("#signin-id", OPERATOR[0])
    page.fill("#signin-pin", OPERATOR[1])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#alerts .banner.halt:has-text('CAPTURE HALTED')")
    assert "sd is full" in page.inner_text("#alerts")
    page.wait_for_selector("#prompt.halt")
    # The reason is in the banner once; the prompt says what it means, not the reason again (#16 item 8).
    assert "Capture is halted" in page.inner_text("#prompt") and "sd is full" not in page.inner_text("#prompt")
    page.fill("#nik", NIK_MALE)
    page.click("#nik-start")
    page.wait_for_selector("#nik-msg:has-text('Capture is halted')")
    page.screenshot(path=str(tmp_path / "halt.png"))
    print(f"screenshot {tmp_path / 'halt.png'}")
    page.close()


def test_console_idle_warning_and_signout(daemon: Daemon, browser: Any) -> None:
    """The console's side of the idle sign-out: it polls /auth/me every 15 s (timers fast-forwarded with
    Playwright's clock) and shows what the kit answers. The kit's answers are fixed here because the
    real warning needs >= 10 min of idling (`[operators] idle_warning_s`, minimum 30 s)."""
    import json

    page = english(browser.new_context(viewport={"width": 800, "height": 480})).new_page()
    page.clock.install()
    page.goto(daemon.url + "/")
    page.fill("#signin-id", OPERATOR[0])
    page.fill("#signin-pin", OPERATOR[1])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#view-enroll:not([hidden])")
    real_me = page.evaluate("() => fetch('/api/v1/auth/me').then(r => r.json())")
    assert real_me["signed_in"] is True and real_me["warn"] is False and real_me["signout_in_s"] > 800
    answer = {"signed_in": True, "operator_id": "demo", "name": "Demo Operator", "role": "operator",
              "signout_in_s": 42, "warn": True}
    page.route("**/api/v1/auth/me", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                body=json.dumps(answer)))
    page.clock.run_for(16_000)
    page.wait_for_selector("#idle:not([hidden])")
    assert "signed out in 42 s" in page.inner_text("#idle-text")
    page.click("#idle-stay")  # touches the session on the kit (GET /enrollment) and hides the bar
    page.wait_for_selector("#idle", state="hidden")
    answer = {"signed_in": False}
    page.clock.run_for(16_000)
    page.wait_for_selector("#view-signin:not([hidden])")
    assert "Signed out after inactivity" in page.inner_text("#signin-msg")
    assert page.is_hidden("#nav")
    page.close()


def test_status_page_shows_the_https_fingerprint_and_its_qr(make_daemon: Any, browser: Any) -> None:
    import hashlib
    import json
    import ssl

    d = make_daemon(api={"https_bind": "127.0.0.1", "https_port": 0})
    info = json.loads((d.sd / "api.json").read_text())
    host, port = info["https_url"].removeprefix("https://").rsplit(":", 1)
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, int(port))))
    fingerprint = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    page = english(browser.new_context(viewport={"width": 800, "height": 900})).new_page()
    page.goto(d.url + "/")  # the kiosk: plain HTTP on loopback
    page.fill("#signin-id", OPERATOR[0])
    page.fill("#signin-pin", OPERATOR[1])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#prompt")
    page.click("button[data-view=status]")
    page.wait_for_selector("#st-tls code")
    assert page.inner_text("#st-tls code") == fingerprint  # what the phone's browser shows for the kit
    page.wait_for_function("() => document.getElementById('st-tls-qr').naturalWidth > 0")
    page.close()
