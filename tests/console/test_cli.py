"""`rekam enroll` and `rekam usb export` as real processes against a real `rekamd --sim`."""

from __future__ import annotations

import re
from pathlib import Path

from tests.console.conftest import NIK_FEMALE, Daemon
from tests.support import rekam, wait_for

EN = {"REKAM_LANG": "en"}  # checks that read the English text (the kit speaks Indonesian by default)


def test_rekam_enroll_in_the_terminal(daemon: Daemon, tmp_path: Path) -> None:
    # Operator id, PIN (stdin is not a terminal: read as a line), a mistyped NIK, the right one, then Enter
    # for every capture (retakes included) and for "Store this enrollment? [Y/n]".
    script = "demo\n123456\n12345\n" + NIK_FEMALE + "\n" + "\n" * 12
    r = rekam("enroll", "--receipt-dir", str(tmp_path / "receipts"), cfg=daemon.cfg, input=script, env=EN)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "Signed in: Demo Operator (demo, operator)" in out
    assert "! NIK must have 16 digits, this one has 5" in out
    assert "started for NIK 357801******0002" in out
    assert "face: score" in out and "R1 right thumb: score" in out and "R2 right index: score" in out
    assert "no match" in out
    rid = out.split("STORED record ")[1].split()[0]
    assert (daemon.sd / "records" / f"{rid}.rkm").exists()
    assert "copied to the USB stick" in out
    assert (tmp_path / "receipts" / f"{rid}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "receipts" / f"{rid}.pdf").read_bytes()[:5] == b"%PDF-"


def test_rekam_enroll_cancel_and_wrong_pin(daemon: Daemon) -> None:
    r = rekam("enroll", "--operator", "demo", cfg=daemon.cfg, input="111111\n222222\n333333\n")
    assert r.returncode == 1 and r.stdout.count("! gagal masuk: ID petugas atau PIN salah") == 3, r.stdout
    assert "gagal masuk tiga kali" in r.stderr
    r = rekam("enroll", "--operator", "demo", "--nik", NIK_FEMALE, cfg=daemon.cfg, input="123456\nc\n", env=EN)
    assert r.returncode == 1 and "cancelled by the operator; nothing was kept" in r.stderr
    st = daemon.client().get("/api/v1/status").json()
    assert st["guard"]["enrollments_in_progress"] == 0 and st["records"]["stored"]["records"] == 0


def test_rekam_usb_export_copies_what_the_stick_lacks(daemon: Daemon) -> None:
    r = rekam("sim", "commit", "4", cfg=daemon.cfg)
    assert r.returncode == 0, r.stderr
    on_stick = sorted(daemon.usb.rglob("*.rkm"))
    assert len(on_stick) == 4
    for p in on_stick[:3]:  # lost from the stick (e.g. it was wiped on a PC)
        p.unlink()
    r = rekam("usb", "export", "--batch", "2", cfg=daemon.cfg, env=EN)
    assert r.returncode == 0, r.stderr
    # Progress ends at n/n (n = 3 unless the daemon's own USB poll copied one meanwhile).
    assert re.search(r"\] ([1-3])/\1\n", r.stdout) and "all 4 records are on it" in r.stdout, r.stdout
    assert sorted(daemon.usb.rglob("*.rkm")) == on_stick
    for p in on_stick:
        assert p.read_bytes() == (daemon.sd / "records" / p.name).read_bytes()
    # Without a stick: a clear refusal.
    daemon.usb.rename(daemon.root / "usb-pulled")
    wait_for(lambda: not daemon.client().get("/api/v1/status").json()["stick"]["present"], 10,
             "the daemon to see the stick gone", step=0.1)
    r = rekam("usb", "export", cfg=daemon.cfg)
    assert r.returncode == 1 and "no USB stick is mounted" in r.stderr
