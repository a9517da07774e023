"""Every `rekam` command group speaks Bahasa Indonesia by default and English with REKAM_LANG=en: help texts,
argparse's own words, report lines and errors (real `rekam` subprocesses; the sensor on the in-process
simulator, the camera on the simulated backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import rekam, write_daemon_config

ID = {"REKAM_LANG": None}  # no override: the CLI's default language, Indonesian
EN = {"REKAM_LANG": "en"}


@pytest.mark.parametrize(("args", "indonesian", "english"), [
    (("sensor", "--help"), "tunggu jari lalu simpan gambarnya sebagai PNG", "wait for a finger and save its image"),
    (("camera", "capture", "--help"), "tempat menyimpan berkas JPEG", "where to write the JPEG"),
    (("identity", "--help"), "buat identitas perangkat bila belum ada", "create the kit identity if missing"),
    (("provision", "--help"), "daftarkan perangkat ini sekarang", "claim this kit now"),
    (("quality", "--help"), "mutu foto wajah (JPEG/PNG)", "quality of face photos (JPEG/PNG)"),
    (("--help",), "perintah untuk petugas dan teknisi", "operator and technician CLI"),
])
def test_help_is_indonesian_first(args: tuple[str, ...], indonesian: str, english: str) -> None:
    r = rekam(*args, env=ID)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("penggunaan: rekam") and "pilihan:" in r.stdout, r.stdout  # argparse's own words
    assert indonesian in r.stdout and english not in r.stdout, r.stdout
    en = rekam(*args, env=EN)
    assert en.stdout.startswith("usage: rekam") and english in en.stdout, en.stdout


def test_argparse_errors_are_indonesian() -> None:
    r = rekam("sensor", "info", "--bogus", env=ID)
    assert r.returncode == 2 and "rekam: kesalahan: argumen tidak dikenal: --bogus" in r.stderr, r.stderr
    r = rekam("sensor", "capture", "--sim", env=ID)
    assert r.returncode == 2 and "argumen berikut wajib diisi: --out" in r.stderr, r.stderr
    en = rekam("sensor", "info", "--bogus", env=EN)
    assert "rekam: error: unrecognized arguments: --bogus" in en.stderr, en.stderr


def test_sensor_info_and_capture_on_the_simulator(tmp_path: Path) -> None:
    r = rekam("sensor", "info", "--sim", "--profile", "r503", env=ID)
    assert r.returncode == 0, r.stderr
    assert "kapasitas:" in r.stdout and "ukuran paket:" in r.stdout and "capacity:" not in r.stdout, r.stdout
    en = rekam("sensor", "info", "--sim", "--profile", "r503", env=EN)
    assert "capacity:" in en.stdout and "packet size:" in en.stdout, en.stdout
    out = tmp_path / "f.png"
    r = rekam("sensor", "capture", "--sim", "--profile", "r503", "--out", str(out), "--timeout", "10", env=ID)
    assert r.returncode == 0, r.stderr
    assert "letakkan jari di sensor" in r.stderr and " detik" in r.stdout and out.is_file(), r.stdout + r.stderr


def test_sensor_error_names_the_kind_in_indonesian(tmp_path: Path) -> None:
    r = rekam("sensor", "info", "--port", str(tmp_path / "nothing"), env=ID)
    assert r.returncode == 1 and "rekam sensor: kesalahan sensor (SensorUnavailable)" in r.stderr, r.stderr


def test_camera_capture_reports_in_indonesian(tmp_path: Path) -> None:
    out = tmp_path / "shot.jpg"
    r = rekam("camera", "capture", "--backend", "sim", "--out", str(out), env=ID)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"tersimpan di {out}") and "(kamera sim)" in r.stdout, r.stdout
    en = rekam("camera", "capture", "--backend", "sim", "--out", str(out), env=EN)
    assert en.stdout.startswith(f"wrote {out}"), en.stdout


def test_identity_and_provision_in_indonesian(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path) -> None:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    r = rekam("identity", "show", cfg=cfg, env=ID)
    assert r.returncode == 1 and "belum ada identitas perangkat" in r.stderr, r.stderr
    r = rekam("identity", "init", cfg=cfg, env=ID)
    assert r.returncode == 0 and r.stdout.startswith("perangkat rk-") and "(identitas baru dibuat)" in r.stdout
    assert "kunci publik" in r.stdout and "terdaftar" in r.stdout, r.stdout
    r = rekam("identity", "show", "--json", cfg=cfg, env=ID)  # machine-readable: the same in every language
    assert json.loads(r.stdout)["kit_id"].startswith("rk-")
    r = rekam("provision", "status", cfg=cfg, env=ID)
    assert r.returncode == 0 and "BELUM terdaftar" in r.stdout and "konfigurasi berjalan v0" in r.stdout, r.stdout
    en = rekam("provision", "status", cfg=cfg, env=EN)
    assert "NOT claimed" in en.stdout and "config      running v0" in en.stdout, en.stdout


def test_quality_face_in_indonesian(tmp_path: Path, corpus_dir: Path) -> None:
    good = corpus_dir / "faces" / "facerec-biden2.jpg"
    r = rekam("quality", "face", str(good), str(tmp_path / "missing.png"), env=ID)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{good}: DITERIMA skor=" in r.stdout and "missing.png: berkas tidak ada" in r.stderr, r.stdout + r.stderr
    en = rekam("quality", "face", str(good), env=EN)
    assert f"{good}: ACCEPT score=" in en.stdout, en.stdout


def test_error_handler_frames_kit_errors_in_indonesian() -> None:
    import io

    from firmware.cli.main import report_error
    from firmware.errors import ApiError, CaptureHalted
    from firmware.system.i18n import use_language

    for lang, want in (("id", "rekam: daemon menolak permintaan (HTTP 409): x\n"), ("en", "rekam: HTTP 409: x\n")):
        out = io.StringIO()
        with use_language(lang):
            assert report_error(ApiError(409, "x"), out) == 1
        assert out.getvalue() == want
    out = io.StringIO()
    with use_language("id"):
        assert report_error(CaptureHalted("sd_full"), out) == 2  # the exit codes do not depend on the language
    assert out.getvalue().startswith("rekam: gagal: ")


def test_argparse_translations_keep_their_placeholders() -> None:
    """argparse fills its own ``%`` templates: each translation must keep the same placeholders (the brace check
    of tests/system/test_i18n.py does not see them)."""
    import re

    from firmware.system import i18n

    pct = re.compile(r"%(?:\(\w+\))?[sr]")
    cat = i18n.catalog("id", "cli")
    templates = {k: v for k, v in cat.items() if isinstance(v, str) and pct.search(k)}
    assert len(templates) >= 10 and "usage: " in cat, sorted(templates)
    for msgid, text in templates.items():
        assert sorted(pct.findall(msgid)) == sorted(pct.findall(text)), msgid
    assert cat["usage: "].endswith(" ")  # argparse puts the program name right after it


def test_quality_finger_verdict_and_reason_in_indonesian(tmp_path: Path, corpus_dir: Path) -> None:
    import cv2

    from firmware.quality.finger import degrade

    g = cv2.imread(str(corpus_dir / "fingerprints" / "nbisrs-p1_1.png"), cv2.IMREAD_GRAYSCALE)
    blurred = tmp_path / "blurred.png"
    cv2.imwrite(str(blurred), degrade.apply(g, "blur:8"))
    r = rekam("quality", "finger", str(blurred), env=ID)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{blurred}: DITOLAK skor" in r.stdout and "ditolak mutlak" in r.stdout, r.stdout
    assert "blurred: Gambar kabur" in r.stdout, r.stdout
    r = rekam("quality", "finger", "--json", str(blurred), env=ID)  # machine-readable: English codes
    assert json.loads(r.stdout)["verdict"] == "REJECT"


def test_fleet_errors_are_indonesian_on_screen_and_english_in_str(tmp_path: Path, capsys, monkeypatch) -> None:
    """A registry error reaches data-center staff in Indonesian; `str(e)` (logs, scripts) stays English."""
    from firmware.errors import FleetError
    from provisioning import cli as fleet_cli
    from provisioning.registry import Fleet

    with pytest.raises(FleetError) as err:
        Fleet(tmp_path / "nothing")
    assert str(err.value).startswith(f"{tmp_path / 'nothing'} is not a fleet folder")
    monkeypatch.delenv("REKAM_LANG", raising=False)
    assert fleet_cli.main(["kits", "list", "--data", str(tmp_path / "nothing")]) == 1
    assert "rekam-fleet: gagal: " in (err_text := capsys.readouterr().err) and "bukan folder pusat armada" in err_text
    monkeypatch.setenv("REKAM_LANG", "en")
    assert fleet_cli.main(["kits", "list", "--data", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.startswith(f"rekam-fleet: {tmp_path / 'nothing'} is not a fleet folder")
