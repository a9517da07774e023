"""Issue #16 deliver 1: what the daemon tells an operator is worded at its source, through the catalog, in
Indonesian first; each reason keeps a stable machine code; a client may ask for English (`X-Rekam-Lang`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.console.conftest import NIK_MALE
from tests.support import REKAMD, rekam, subprocess_env

NO_LANG = {"REKAM_LANG": None}  # the CLI as an operator runs it: the kit's language (Indonesian)


def _fill_sd(d: Any) -> None:
    sd = next(m for m in d.client().get("/api/v1/status").json()["media"] if m["name"] == "sd")
    with open(d.sd / "filler.bin", "wb") as f:
        f.write(b"\0" * max(0, sd["free_bytes"] - sd["reserve_bytes"] - 100_000))


def test_halt_reason_is_indonesian_with_a_code_in_status_enroll_and_cli(make_daemon: Any, tmpfs: Any,
                                                                         tmp_path: Path) -> None:
    tmpfs.mount(tmp_path / "sd", 4 * 1024)  # a real 4 MiB tmpfs as the SD card
    d = make_daemon(max_record_mb=2, fingers=["R1"], dedup=["R1"])
    _fill_sd(d)
    c = d.signin()  # an operator's session, the kit in Indonesian ([kit] language default)
    g = c.get("/api/v1/status").json()["guard"]
    assert g["level"] == "HALT" and g["codes"] == ["sd_full"], g
    assert g["reasons"][0].startswith("sd penuh: sisa ") and "cadangan" in g["reasons"][0], g
    assert "is full" not in " ".join(g["reasons"])
    assert g["actions"] and g["actions"][0].startswith("Yang harus dilakukan: sambungkan kit"), g
    sd = next(m for m in c.get("/api/v1/status").json()["media"] if m["name"] == "sd")
    assert sd["code"] == "sd_full" and sd["params"]["free"] == sd["free_bytes"] and sd["reason"] == g["reasons"][0]
    # The same answer for a client reading English: the text changes, the code does not.
    en = c.get("/api/v1/status", headers={"X-Rekam-Lang": "en"}).json()["guard"]
    assert en["codes"] == ["sd_full"] and en["reasons"][0].startswith("sd is full: "), en
    assert en["actions"][0].startswith("To do: connect the kit"), en
    # A new enrollment is refused with the reason in Indonesian, and the codes.
    r = c.post("/api/v1/enrollment", json={"nik": NIK_MALE})
    assert r.status_code == 507, r.text
    det = r.json()["detail"]
    assert det["code"] == "halted" and det["reasons"] == ["sd_full"]
    assert det["message"].startswith("perekaman dihentikan: sd penuh: "), det
    # `rekam status` (an operator's shell, no REKAM_LANG) shows the Indonesian reason and action, once each.
    out = rekam("status", cfg=d.cfg, env=NO_LANG)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "! sd penuh: sisa " in out.stdout, out.stdout
    assert out.stdout.count("Yang harus dilakukan") == 1 and "is full" not in out.stdout, out.stdout
    # The journal stays English for the technician: the code, not the words.
    d.stop()
    assert "status guard=HALT reasons=sd_full " in d.rekamd.log_text()


def test_api_errors_are_indonesian_with_their_codes(daemon: Any) -> None:
    c = daemon.signin()
    r = c.post("/api/v1/enrollment", json={"nik": "12345"})
    det = r.json()["detail"]
    assert r.status_code == 422 and det["code"] == "nik_length"
    assert det["message"] == "NIK harus 16 digit, yang ini 5 digit", det
    en = c.post("/api/v1/enrollment", json={"nik": "12345"}, headers={"X-Rekam-Lang": "en"}).json()["detail"]
    assert en == {**det, "message": "NIK must have 16 digits, this one has 5"}, en
    r = daemon.anon().post("/api/v1/auth/signin", json={"operator_id": "demo", "pin": "000000"})
    det = r.json()["detail"]
    assert r.status_code == 401 and det["code"] == "bad_pin" and det["tries_left"] == 4
    assert det["message"] == "ID petugas atau PIN salah (sisa 4 kali percobaan sebelum terkunci)", det


def test_bad_config_rekam_prints_indonesian_rekamd_journal_stays_english(tmp_path: Path) -> None:
    bad = tmp_path / "rekam.toml"
    bad.write_text("[store]\nreserve_floor_mb = -1\nbogus = 1\n")
    r = rekam("status", cfg=bad, env=NO_LANG)
    assert r.returncode == 78, r.stdout + r.stderr
    assert f"{bad}: store.reserve_floor_mb = -1: harus >= 0" in r.stderr, r.stderr
    assert f"{bad}: kunci store.bogus tidak dikenal (yang dikenal: " in r.stderr, r.stderr
    d = subprocess.run([*REKAMD, "--config", str(bad), "--sim"], capture_output=True, text=True, timeout=60,
                       env=subprocess_env(NO_LANG), cwd=tmp_path)
    assert d.returncode == 78, d.stdout + d.stderr
    journal = d.stdout + d.stderr
    assert "store.reserve_floor_mb = -1: must be >= 0" in journal and "unknown key store.bogus" in journal, journal
    assert "harus" not in journal
