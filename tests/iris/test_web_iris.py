"""The console's iris and signature steps in a real headless Chromium against a real `rekamd --sim`: live view
with the eye's position, an iris captured, an eye excepted, the signature drawn with synthetic pointer strokes
(a single line refused first), the review showing both, stored."""

from __future__ import annotations

from typing import Any

from tests.console.conftest import NIK_MALE, OPERATOR
from tests.iris.conftest import IRIS_TOML


def _draw(page: Any, strokes: list[list[tuple[float, float]]]) -> None:
    """Pointer strokes on the pad, in pad-relative units (0..1)."""
    box = page.locator("#sign-pad").bounding_box()
    for s in strokes:
        x, y = s[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in s[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=3)
        page.mouse.up()


def _tap_until_step_leaves(page: Any, title: str) -> None:
    for _ in range(4):
        if page.is_hidden("#capture") or title not in page.inner_text("#capture-title"):
            return
        page.click("#capture-go")
        page.wait_for_function("() => !document.getElementById('capture-go').disabled "
                               "|| document.getElementById('capture').hidden", timeout=30_000)
    raise AssertionError(f"{title}: still the current step after 4 captures")


def test_iris_and_signature_steps_in_the_console(make_daemon: Any, browser: Any) -> None:
    d = make_daemon(extra=IRIS_TOML)
    ctx = browser.new_context(viewport={"width": 800, "height": 600}, has_touch=True)
    ctx.add_init_script("try { localStorage.setItem('rekam.lang', 'en'); } catch (e) {}")
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(d.url + "/")
    page.fill("#signin-id", OPERATOR[0])
    page.fill("#signin-pin", OPERATOR[1])
    page.click("#signin-form button[type=submit]")
    page.fill("#nik", NIK_MALE)
    page.click("#nik-start")
    page.wait_for_selector("#enroll-active:not([hidden])")
    page.click("#capture-go")  # face
    page.wait_for_selector("#capture-title:has-text('Iris, left eye')")
    assert "Iris L" in page.inner_text("#steps") and "Sign" in page.inner_text("#steps")
    # Live view: a frame from the iris camera and where the eye is.
    page.click("#iris-live")
    page.wait_for_selector("#iris-pos:not([hidden])", timeout=20_000)
    assert any(w in page.inner_text("#iris-pos") for w in ("distance good", "too far", "too close", "No eye"))
    page.click("#iris-live")  # stop
    _tap_until_step_leaves(page, "left eye")
    page.wait_for_selector("#capture-title:has-text('Iris, right eye')")
    page.click("#capture-exc")
    page.select_option("#exc-select", "prosthesis")
    page.click("#exc-form button[type=submit]")
    page.wait_for_selector("#capture-title:has-text('R1')")
    for code in ("R1", "R2"):
        page.wait_for_selector(f"#capture-title:has-text('{code}')")
        _tap_until_step_leaves(page, code)
    page.wait_for_selector("#sign:not([hidden])")
    _draw(page, [[(0.1, 0.5), (0.9, 0.5)]])  # a single line
    assert "1 stroke" in page.inner_text("#sign-count")
    page.click("#sign-save")
    page.wait_for_selector("#sign-hints li:has-text('single line')")
    page.click("#sign-clear")
    _draw(page, [[(0.1, 0.6), (0.2, 0.2), (0.3, 0.7), (0.4, 0.3), (0.5, 0.6)],
                 [(0.55, 0.4), (0.7, 0.2), (0.75, 0.6), (0.6, 0.5)], [(0.1, 0.85), (0.8, 0.8)]])
    page.click("#sign-save")
    page.wait_for_selector("#review:not([hidden])", timeout=30_000)
    table = page.inner_text("#review-table")
    assert "Iris, left eye" in table and "prosthesis" in table and "Signature" in table
    page.wait_for_function("() => { const i = document.querySelector('#review-signature img');"
                           " return i && i.complete && i.naturalWidth > 50; }", timeout=10_000)
    page.click("#commit")
    page.wait_for_selector("#receipt:not([hidden])")
    assert not errors, errors
    assert len(list((d.sd / "records").glob("*.rkm"))) == 1
