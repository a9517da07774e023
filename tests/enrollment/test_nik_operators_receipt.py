"""NIK validation, operator PINs and lockout, and the receipt, without hardware."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from firmware.enrollment import nik, receipt
from firmware.enrollment.operators import Operator, Operators, SignInError, check_pin, hash_pin
from firmware.system.i18n import use_language

TODAY = dt.date(2026, 11, 29)


@pytest.mark.parametrize(("value", "female", "born"), [
    ("3273011508900001", False, dt.date(1990, 8, 15)),   # male, Kota Bandung
    ("3273015508900002", True, dt.date(1990, 8, 15)),    # female: day + 40
    ("9101010101010001", False, dt.date(2001, 1, 1)),     # Papua (2022 code)
    (" 3273 0115 0890 0001 ", False, dt.date(1990, 8, 15)),  # spaces are tolerated
])
def test_valid_niks(value: str, female: bool, born: dt.date) -> None:
    n = nik.parse(value, TODAY)
    assert n.female is female and n.birth_date == born and n.province == value.strip()[:2]


@pytest.mark.parametrize(("value", "code"), [
    ("327301150890001", "length"),
    ("32730115089000011", "length"),
    ("32730115089O0001", "not_digits"),
    ("３２７３０１１５０８９０００１", "not_digits"),  # full-width digits are not ASCII digits
    ("2073011508900001", "province"),
    ("3200011508900001", "regency"),
    ("3273001508900001", "district"),
    ("3273013202900001", "birth_date"),   # 32 February
    ("3273017213900001", "birth_date"),   # female day 32
    ("3273011508900000", "serial"),
])
def test_invalid_niks_each_have_their_own_code(value: str, code: str) -> None:
    with pytest.raises(nik.NikError) as e:
        nik.parse(value, TODAY)
    assert e.value.code == code and str(e.value)


def test_two_digit_year_never_lands_in_the_future() -> None:
    assert nik.parse("3273011508300001", TODAY).birth_date.year == 1930
    assert nik.parse("3273011508250001", TODAY).birth_date.year == 2025


def test_pin_hash_round_trip_and_refusals() -> None:
    h = hash_pin("482913")
    assert check_pin("482913", h) and not check_pin("482914", h) and not check_pin("482913", "garbage")
    with pytest.raises(ValueError):
        hash_pin("12")


def test_lockout_after_five_failures_and_expiry() -> None:
    now = [1000.0]
    ops = Operators([Operator("siti", "Siti", hash_pin("1234"))], max_failures=5, lockout_s=900,
                    clock=lambda: now[0])
    for i in range(4):
        with use_language("en"), pytest.raises(SignInError) as e:
            ops.authenticate("siti", "9999")
        assert e.value.code == "bad_pin" and f"{4 - i} tries left" in str(e.value)
    with pytest.raises(SignInError) as e:
        ops.authenticate("siti", "9999")
    assert e.value.code == "locked"
    with pytest.raises(SignInError) as e:
        ops.authenticate("siti", "1234")  # even the right PIN is refused while locked
    assert e.value.code == "locked"
    now[0] += 901
    assert ops.authenticate("siti", "1234").id == "siti"
    with pytest.raises(SignInError) as e:
        ops.authenticate("nobody", "1234")
    assert e.value.code == "bad_pin"


def test_receipt_png_and_pdf() -> None:
    info = {"record_id": "rk-abcdefghjk-00000007-20261129T040312Z", "sha256": "ab" * 32,
            "created": "2026-11-29T04:03:12Z", "clock_synced": False, "kit_id": "rk-abcdefghjk", "site": "Kec. Coblong",
            "biometrics": {"face": {"captured": 1, "exception": 0}, "iris": {"captured": 1, "exception": 1},
                           "fingers": {"captured": 9, "exception": 1}, "signature": {"captured": 0, "exception": 1}}}
    text = receipt.lines(info)
    # What was recorded of the resident, Indonesian first; exceptions named, not left out.
    assert "Wajah / Face: 1 direkam / captured" in text
    assert "Iris: 1 direkam / captured, 1 pengecualian / exception" in text
    assert "Sidik jari / Fingers: 9 direkam / captured, 1 pengecualian / exception" in text
    assert "Tanda tangan / Signature: 0 direkam / captured, 1 pengecualian / exception" in text
    assert all(t.isascii() for t in text)  # the PDF's Helvetica and the PNG's Hershey font
    png = receipt.png(info)
    assert png.startswith(b"\x89PNG")
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    text, _, _ = cv2.QRCodeDetector().detectAndDecode(img)
    assert json.loads(text) == {"r": info["record_id"], "h": info["sha256"]}
    pdf = receipt.pdf(info)
    assert pdf.startswith(b"%PDF-1.4") and pdf.rstrip().endswith(b"%%EOF")
    # Every xref offset points at its object: a reader can open the file.
    xref = int(pdf.rsplit(b"startxref", 1)[1].split()[0])
    entries = pdf[xref:].split(b"\n")[3:8]
    for n, e in enumerate(entries, 1):
        off = int(e.split()[0])
        assert pdf[off:].startswith(f"{n} 0 obj".encode())
    assert b"rk-abcdefghjk-00000007-20261129T040312Z" in pdf


def test_concurrent_wrong_pins_are_checked_at_most_max_failures_times(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    import threading

    from firmware.enrollment import operators as mod

    checks = []
    real = mod.check_pin
    monkeypatch.setattr(mod, "check_pin", lambda pin, stored: checks.append(pin) or real(pin, stored))
    db = tmp_path / "lockout.sqlite"
    ops = Operators([Operator("siti", "Siti", hash_pin("1234"))], max_failures=5, lockout_s=900, db_path=db)
    barrier = threading.Barrier(40)
    codes: list[str] = []

    def attempt() -> None:
        barrier.wait(10)
        try:
            ops.authenticate("siti", "9999")
        except SignInError as e:
            codes.append(e.code)

    threads = [threading.Thread(target=attempt) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(codes) == 40 and len(checks) <= 5, (len(checks), codes)
    assert ops.locked_for("siti") > 0
    ops.close()
    # a new process (a restart) reads the lock from the file
    again = Operators([Operator("siti", "Siti", hash_pin("1234"))], max_failures=5, lockout_s=900, db_path=db)
    with pytest.raises(SignInError) as e:
        again.authenticate("siti", "1234")
    assert e.value.code == "locked"
