"""Claim end to end against the real broker: pending until approved, then the kit's own certificate."""

from __future__ import annotations

import json

from firmware import control_protocol as cp
from firmware.provision import ControlPaths

from .conftest import wait_for


def test_claim_pending_then_approved(new_kit, fleet, service) -> None:
    k = new_kit(allow=False)
    kit_id = k.identity.kit_id
    ctl = k.start_control()
    row = wait_for(lambda: fleet.kit(kit_id), 10, "claim reaches the fleet")
    assert row["state"] == "pending"
    assert row["public_key"] == k.identity.public_key_b64
    assert row["hardware_serial"] == "10000000deadbeef"
    assert not ControlPaths.of(k.cfg).provisioned()
    fleet.approve(kit_id)
    wait_for(ctl.connected.is_set, 20, "kit connects with its own certificate")
    paths = ControlPaths.of(k.cfg)
    assert paths.fleet_key.read_text() == fleet.public_key_b64  # pinned
    assert (paths.tls_key.stat().st_mode & 0o777) == 0o600
    # The certificate is for the kit's own key, made on the kit: the fleet never saw the private key.
    assert b"PRIVATE" not in paths.cert.read_bytes()
    # Initial config v1 (from the claim) is applied and reported.
    wait_for(lambda: json.loads(fleet.kit(kit_id)["config_state"] or "{}").get("running") == 1, 10,
             "kit reports config v1")
    wait_for(lambda: fleet.kit(kit_id)["telemetry"], 10, "telemetry arrives")
    t = json.loads(fleet.kit(kit_id)["telemetry"])
    assert t["kit_id"] == kit_id and {m["name"] for m in t["media"]} == {"sd", "usb"}
    assert t["versions"]["config"] == 1 and t["halted"] is False


def test_claim_response_forged_by_wrong_key_is_refused(new_kit, fleet, tmp_path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.provision import ClaimError, check_response, ensure_tls_key

    k = new_kit(allow=False, fleet_public_key=fleet.public_key_b64)
    paths = ControlPaths.of(k.cfg)
    ensure_tls_key(paths, k.identity.kit_id)
    evil = Ed25519PrivateKey.generate()
    body = {"kit_id": k.identity.kit_id, "nonce": "n1", "status": "pending", "reason": "",
            "fleet_public_key": cp.public_b64(evil)}
    try:
        check_response(cp.sign("claim_response", body, evil), k.cfg, k.identity, paths, "n1")
        raise AssertionError("a response from another fleet key was accepted")
    except ClaimError as e:
        assert e.reason == "wrong_fleet_key"
