"""`rekam enroll` on a kit that captures irises and the signature (real rekamd --sim): the terminal captures both
eyes, and stops at the signature (drawn on the console's touch screen) with the reason, in Bahasa Indonesia."""

from __future__ import annotations

from tests.console.conftest import NIK_MALE
from tests.iris.conftest import IRIS_TOML
from tests.support import rekam


def test_terminal_captures_the_irises_and_leaves_the_signature_to_the_console(make_daemon) -> None:
    d = make_daemon(extra=IRIS_TOML)
    r = rekam("enroll", "--auto", "--operator", "demo", "--nik", NIK_MALE, cfg=d.cfg, input="123456\n")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Iris, mata kiri: pegang kamera iris" in r.stdout and "Iris, mata kanan" in r.stdout, r.stdout
    assert "rekam enroll: tanda tangan dibuat di layar sentuh konsol" in r.stderr, r.stderr
    state = d.signin().get("/api/v1/enrollment").json()
    assert state["step"] == "signature" and all(i["done"] for i in state["irises"])  # kept for the console
