"""`rekam identity init|show`: what rekam-firstboot.service runs."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from firmware.cli.identity import fingerprint
from firmware.seal import identity
from tests.support import rekam
from tests.system.conftest import write_kit_config

EN = {"REKAM_LANG": "en"}  # these checks read the English text (the kit speaks Indonesian by default)


def test_init_creates_once_then_show(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = write_kit_config(tmp_path, corpus_dir)
    r = rekam("identity", "show", cfg=cfg, env=EN)
    assert r.returncode == 1 and "rekam identity init" in r.stderr
    r = rekam("identity", "init", "--json", cfg=cfg, env=EN)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["created_now"] is True and first["kit_id"].startswith("rk-")
    assert first["claim"] == {"claimed": False, "control_enabled": False}
    key = tmp_path / "sd" / "identity" / "kit.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ident = identity.load(tmp_path / "sd")
    assert first["public_key"] == ident.public_key_b64
    assert first["fingerprint"] == fingerprint(ident.public_key_raw)
    # Every later boot: same identity, not recreated.
    r = rekam("identity", "init", cfg=cfg, env=EN)
    assert r.returncode == 0 and "not claimed yet" in r.stdout and "created now" not in r.stdout
    assert first["kit_id"] in r.stdout
    r = rekam("identity", "show", "--json", cfg=cfg, env=EN)
    assert json.loads(r.stdout)["kit_id"] == first["kit_id"]
    # Claimed (the files firmware.control.claim writes at the end of a claim): show reports it.
    control = tmp_path / "sd" / "control"
    control.mkdir()
    for name in ("kit.crt", "tls.key", "fleet.pub"):
        (control / name).write_text("x")
    (control / "claim.json").write_text('{"claimed_at": 1767225600}')
    r = rekam("identity", "show", cfg=cfg, env=EN)
    assert "claimed     yes (claimed_at=1767225600)" in r.stdout


def test_broken_identity_is_reported(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = write_kit_config(tmp_path, corpus_dir)
    assert rekam("identity", "init", cfg=cfg, env=EN).returncode == 0
    (tmp_path / "sd" / "identity" / "kit.json").unlink()
    r = rekam("identity", "init", cfg=cfg, env=EN)
    assert r.returncode == 1 and "incomplete identity" in r.stderr


def test_fingerprint_format() -> None:
    # sha256 of 32 zero bytes starts 66687aadf862bd77...
    assert fingerprint(b"\x00" * 32) == "6668-7aad-f862-bd77"


def test_init_works_before_the_datacenter_key_is_installed(tmp_path: Path, corpus_dir: Path) -> None:
    """A fresh kit: /etc/rekam/datacenter.pub not copied yet; first boot still creates the identity."""
    cfg = write_kit_config(tmp_path, corpus_dir)
    (tmp_path / "dc.pub").unlink()
    r = rekam("identity", "init", cfg=cfg, env=EN)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sd" / "identity" / "kit.json").exists()
    # Other config errors still stop it with 78 and name the key.
    cfg.write_text(cfg.read_text().replace("port = 0", "port = 99999"))
    r = rekam("identity", "init", cfg=cfg, env=EN)
    assert r.returncode == 78 and "api.port" in r.stderr
