"""Config validation: every bad value is named with what is allowed; rekamd exits 78."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware import config


@pytest.mark.parametrize(("section", "key", "value", "expect"), [
    ("store", "reserve_floor_mb", -1, "store.reserve_floor_mb = -1: must be >= 0"),
    ("store", "max_record_mb", "big", "store.max_record_mb = 'big': must be an integer"),
    ("store", "verify_readback", 1, "store.verify_readback = 1: must be true or false"),
    ("usb", "poll_seconds", 0.0, "usb.poll_seconds = 0.0: must be between 0.1 and 60"),
    ("usb", "mount_point", "", "usb.mount_point = '': must be not empty"),
    ("daemon", "log_level", "loud", "daemon.log_level = 'loud': must be one of 'debug'"),
    ("api", "bind", "localhost:80", "api.bind = 'localhost:80': must be an IP address"),
    ("api", "port", 70000, "api.port = 70000: must be between 0 and 65535"),
    ("gpio", "buzzer", 40, "gpio.buzzer = 40: must be between 0 and 27"),
    ("datacenter", "public_key_files", "k.pub", "datacenter.public_key_files = 'k.pub': must be a list"),
])
def test_bad_values_are_named(section: str, key: str, value: Any, expect: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.validate({section: {key: value}})
    assert any(p.startswith(expect) for p in e.value.problems), e.value.problems


def test_unknown_key_and_section() -> None:
    with pytest.raises(config.ConfigError) as e:
        config.validate({"store": {"reserv_mb": 1}, "stor": {}})
    text = " | ".join(e.value.problems)
    assert "unknown key store.reserv_mb" in text and "unknown section [stor]" in text


def test_cross_check_and_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.validate({"store": {"resume_records": 60, "warn_records": 50},
                         "datacenter": {"public_key_files": [str(tmp_path / "nope.pub")]}})
    text = " | ".join(e.value.problems)
    assert "store.resume_records = 60: must be <= store.warn_records" in text
    assert "file not found" in text
    (tmp_path / "bad.pub").write_text("hello")
    with pytest.raises(config.ConfigError, match="not an X25519 public key"):
        config.validate({"datacenter": {"public_key_files": [str(tmp_path / "bad.pub")]}})


def test_defaults_are_valid_and_documented() -> None:
    cfg = config.validate({})
    assert cfg.store.reserve_records == 2 and cfg.usb.required is False
    md = config.markdown()
    for section, keys in config.SCHEMA.items():
        for k in keys:
            assert f"`{k}`" in md, f"{section}.{k} missing from the reference"


def test_docs_configuration_md_is_current() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == config.markdown() + "\n", "regenerate: python -m firmware.config --markdown"


def test_rekamd_exits_78_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "rekam.toml"
    cfg.write_text('[store]\nreserve_floor_mb = "lots"\n[usb]\nrequired = "yes"\n')
    r = subprocess.run([sys.executable, "-m", "firmware.daemon", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 78
    assert "store.reserve_floor_mb = 'lots': must be an integer" in r.stderr
    assert "usb.required = 'yes': must be true or false" in r.stderr
    cfg.write_text("[store\n")
    r = subprocess.run([sys.executable, "-m", "firmware.daemon", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 78 and "not valid TOML" in r.stderr
    r = subprocess.run([sys.executable, "-m", "firmware.daemon", "--config", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and "file not found" in r.stderr


def test_models_are_typed_sections_and_mappings() -> None:
    cfg = config.defaults(camera={"width": 640})
    assert isinstance(cfg.relay, config.RelayConfig) and cfg.relay.backoff_min_s == 1.0
    assert dict(cfg.camera)["width"] == 640 and cfg.camera["width"] == 640 and "width" in cfg.camera
    assert cfg.raw["camera"]["width"] == 640
    cfg.raw["camera"]["width"] = 1  # raw is derived: changing it changes nothing
    assert cfg.camera.width == 640
    again = config.Config(cfg.raw, "copy", cfg.base_dir)  # the form firmware.control.plane uses
    assert again.camera.width == 640 and again.source == "copy" and again.base_dir == cfg.base_dir
    with pytest.raises(ValueError):
        cfg.camera.width = 1  # type: ignore[misc]  # frozen


def test_quality_defaults_come_from_the_models() -> None:
    from firmware.enrollment.session import Devices
    from firmware.quality.face.assess import FaceThresholds
    from firmware.quality.finger.gates import Limits

    face, finger = config.QualityFaceConfig(), config.QualityFingerConfig()
    assert FaceThresholds() == FaceThresholds.from_mapping(face)
    assert FaceThresholds().ied_min_px == face.ied_min_px and Limits().min_minutiae == finger.min_minutiae
    assert Limits() == Limits.from_config(finger)
    d = Devices()
    assert (d.finger_threshold, d.finger_attempts) == (finger.threshold, finger.max_attempts)
    assert (d.face_threshold, d.face_attempts) == (face.accept_score, face.max_attempts)


def test_report_and_rekam_cli_exit_78(tmp_path: Path, capsys, monkeypatch) -> None:
    import io

    from firmware.cli.main import main

    err = config.ConfigError(["a.b = 1: must be x", "c.d = 2: must be y"], "f.toml")
    out = io.StringIO()
    assert err.report(out) == config.EX_CONFIG == 78
    assert out.getvalue() == "f.toml: a.b = 1: must be x\nf.toml: c.d = 2: must be y\n"
    bad = tmp_path / "rekam.toml"
    bad.write_text("[store]\nreserve_floor_mb = -1\n")
    monkeypatch.setenv("REKAM_LANG", "en")
    assert main(["--config", str(bad), "status"]) == 78
    assert f"{bad}: store.reserve_floor_mb = -1: must be >= 0" in capsys.readouterr().err
    # Indonesian first: the operator's shell (no REKAM_LANG) reads the same problem in Indonesian.
    monkeypatch.delenv("REKAM_LANG")
    assert main(["--config", str(bad), "status"]) == 78
    assert f"{bad}: store.reserve_floor_mb = -1: harus >= 0" in capsys.readouterr().err


def test_bounds_in_order_are_checked_together(tmp_path: Path) -> None:
    """A lower bound above its upper bound passed each key's own range and then crashed the relay at start
    (``backoff needs 0 < lo <= hi``); now the config names the pair."""
    with pytest.raises(config.ConfigError) as e:
        config.validate({"relay": {"backoff_min_s": 100.0, "backoff_max_s": 1.0}})
    assert e.value.problems == ["relay.backoff_max_s = 1.0: must be >= relay.backoff_min_s (100.0)"]
    with pytest.raises(config.ConfigError) as e:  # the default upper bound counts too
        config.validate({"relay": {"ack_timeout_s": 3600.0}})
    assert "relay.ack_timeout_max_s = 1800.0: must be >= relay.ack_timeout_s (3600.0)" in e.value.problems
    assert config.validate({"relay": {"backoff_min_s": 5.0, "backoff_max_s": 5.0}}).relay.backoff_max_s == 5.0


@pytest.mark.timeout(20)
def test_files_a_config_names_are_regular_and_bounded(tmp_path: Path) -> None:
    """Key and password files, and the config itself, pointed at a device or a FIFO: a clear error naming the key,
    not a read of /dev/zero until memory runs out or an open that waits for ever."""
    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/zero", str(tmp_path / "fifo")):
        with pytest.raises(config.ConfigError) as e:
            config.validate({"datacenter": {"public_key_files": [path]}}, base_dir=tmp_path)
        assert any(p.startswith("datacenter.public_key_files[0]") and "not a regular file" in p
                   for p in e.value.problems), e.value.problems
        with pytest.raises(config.ConfigError) as e:
            config.validate({"relay": {"password_file": path}}, base_dir=tmp_path)
        assert any(p.startswith("relay.password_file") and "not a regular file" in p for p in e.value.problems)
        with pytest.raises(config.ConfigError, match="not a regular file"):
            config.load(path)
    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(config.ConfigError, match="nested too deeply"):
        config.load(tmp_path / "deep.toml")
