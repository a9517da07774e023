"""Kit-side state machines without a broker: crash-loop rollback of a trial config, an interrupted
key rotation, and the fleet refusing forged kit messages."""

from __future__ import annotations

import json
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware import config
from firmware.control.claim import ControlPaths
from firmware.control.plane import MAX_TRIAL_BOOTS, RemoteConfig, effective_config
from firmware.seal import identity
from firmware.seal.rotation import repair_identity, rotate_key
from firmware.wire import control_protocol as cp

from .conftest import wait_for, write_kit_config


def _claimed_local(tmp_path, fleet, broker) -> tuple[config.Config, Ed25519PrivateKey, str]:
    cfg = config.load(write_kit_config(tmp_path / "k", fleet, broker))
    kid = identity.load_or_create(cfg.state_dir).kit_id
    key = Ed25519PrivateKey.generate()
    paths = ControlPaths.of(cfg)
    paths.root.mkdir(parents=True)
    paths.fleet_key.write_text(cp.public_b64(key))
    return cfg, key, kid


def test_trial_config_rolls_back_after_crash_loop(tmp_path, fleet, broker) -> None:
    local, key, kid = _claimed_local(tmp_path, fleet, broker)
    rc = RemoteConfig(local)
    doc = cp.sign("config", {"kit_id": kid, "version": 4, "issued_at": int(time.time()),
                             "sections": {"daemon": {"status_interval_s": 9.0}}}, key)
    cand = rc.evaluate(doc, kid, local)
    assert cand.changed == ["daemon.status_interval_s"] and not cand.live
    rc.accept(cand)
    # Each start that never reaches the broker counts; the daemon crashes before promoting it.
    for _ in range(MAX_TRIAL_BOOTS):
        assert effective_config(local).daemon.status_interval_s == 9.0
    cfg = effective_config(local)  # one start too many: back to the last good (here: the local file)
    assert cfg.daemon.status_interval_s == local.daemon.status_interval_s
    st = json.loads((local.state_dir / "remote-config" / "state.json").read_text())
    assert st["current"] == 0 and st["trial"] is None and st["max_seen"] == 4
    assert st["last_event"]["status"] == "rolled_back" and "starts without" in st["last_event"]["reason"]


def test_tampered_stored_document_falls_back(tmp_path, fleet, broker) -> None:
    local, key, kid = _claimed_local(tmp_path, fleet, broker)
    rc = RemoteConfig(local)
    for v, level in ((1, "warning"), (2, "error")):
        doc = cp.sign("config", {"kit_id": kid, "version": v, "issued_at": 1,
                                 "sections": {"daemon": {"log_level": level}}}, key)
        c = rc.evaluate(doc, kid, local)
        rc.accept(c)
        rc.promote(v)
    assert effective_config(local).daemon.log_level == "error"
    d = local.state_dir / "remote-config"
    cur, good = d / "current.json", d / "last-good.json"
    cur.write_bytes(cur.read_bytes().replace(b"error", b"debug"))  # edited on the SD card
    assert effective_config(local).daemon.log_level == "error"  # signature fails: last-good (v2) restored
    assert cur.read_bytes() == good.read_bytes()
    for f in (cur, good):
        f.write_bytes(f.read_bytes().replace(b"error", b"debug"))
    assert effective_config(local).daemon.log_level == local.daemon.log_level  # neither verifies: local file
    st = json.loads((d / "state.json").read_text())
    assert (st["current"], st["last_good"], st["max_seen"]) == (0, 0, 2)  # and later versions still apply


def test_interrupted_key_rotation_is_completed_or_discarded(tmp_path) -> None:
    state = tmp_path / "state"
    old = identity.load_or_create(state)
    new = rotate_key(state, old)
    assert identity.load(state).public_key_b64 == new.public_key_b64
    d = state / "identity"
    # Power cut after kit.json names the new key but before the rename: the start finishes it.
    newer = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization

    pem = newer.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    (d / "kit.key.new").write_bytes(pem)
    meta = json.loads((d / "kit.json").read_text())
    (d / "kit.json").write_text(json.dumps({**meta, "public_key": cp.public_b64(newer)}))
    repair_identity(state)
    assert identity.load(state).public_key_b64 == cp.public_b64(newer)
    # Power cut before kit.json was rewritten: the half-made key is dropped, the current one stays.
    other = Ed25519PrivateKey.generate()
    (d / "kit.key.new").write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    repair_identity(state)
    assert not (d / "kit.key.new").exists()
    assert identity.load(state).public_key_b64 == cp.public_b64(newer)


def test_fleet_refuses_forged_kit_messages(online_kit, fleet) -> None:
    kid = online_kit.identity.kit_id
    wait_for(lambda: fleet.kit(kid)["telemetry"], 10, "first telemetry")
    seen = fleet.kit(kid)["last_seen"]
    forged = cp.sign("telemetry", {"kit_id": kid, "halted": True}, Ed25519PrivateKey.generate())
    assert fleet.handle_kit_message(cp.telemetry_topic(kid), forged) is None
    assert fleet.handle_kit_message(cp.telemetry_topic("rk-neverseen"), forged) is None
    assert fleet.handle_kit_message(cp.status_topic(kid), b"garbage") is None
    assert fleet.kit(kid)["last_seen"] >= seen and json.loads(fleet.kit(kid)["telemetry"]).get("halted") is False
