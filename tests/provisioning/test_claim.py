"""Claim end to end against the real broker: pending until approved, then the kit's own certificate."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from firmware.control.claim import ControlPaths
from firmware.wire import control_protocol as cp

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

    from firmware.control.claim import ClaimError, check_response, ensure_tls_key

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


def test_claim_with_relay_brokers_only(new_kit, fleet, broker, service) -> None:
    """No [control] brokers: the control plane uses the relay's mqtts:// brokers, and after the claim
    the daemon restarts so the relay runs with the kit certificate."""
    from firmware.control.plane import EX_RESTART, control_brokers

    k = new_kit(brokers=[], extra=f'[relay]\nbrokers = ["mqtts://127.0.0.1:{broker.port}"]\n')
    assert control_brokers(k.cfg) == [f"127.0.0.1:{broker.port}"]
    assert k.cfg.relay.cert_file == ""
    k.start_control()
    assert k.exited.wait(20) and k.exits == [EX_RESTART]
    k2 = k.restart()
    paths = ControlPaths.of(k2.cfg)
    assert (k2.cfg.relay.cert_file, k2.cfg.relay.key_file) == (str(paths.cert), str(paths.tls_key))
    ctl = k2.start_control()
    wait_for(ctl.connected.is_set, 10, "connected through the relay's broker list")
    k2.stop()


def test_rekam_provision_claim_and_status(tmp_path, fleet, broker, service, capsys, monkeypatch) -> None:
    """A technician claims a kit at the bench (daemon stopped) with `rekam provision claim`."""
    from firmware.cli import main as cli
    from firmware.seal import identity
    from firmware.system import i18n

    monkeypatch.setenv("REKAM_LANG", "en")  # the checks read the English text (the kit speaks Indonesian)
    monkeypatch.setattr(i18n, "_default", i18n.DEFAULT_LANGUAGE)  # main() sets the process's language: undone after

    from .conftest import write_kit_config

    cfg = write_kit_config(tmp_path / "bench", fleet, broker)
    assert cli.main(["--config", str(cfg), "provision", "status"]) == 0
    assert "NOT claimed" in capsys.readouterr().out
    # Not approved: gives up after the attempts asked for, exit 3.
    assert cli.main(["--config", str(cfg), "provision", "claim", "--attempts", "1"]) == 3
    kid = identity.load(tmp_path / "bench" / "state").kit_id
    assert fleet.kit(kid)["state"] == "pending"
    fleet.approve(kid)
    assert cli.main(["--config", str(cfg), "provision", "claim", "--attempts", "3"]) == 0
    assert "claimed; config v1 stored" in capsys.readouterr().out
    assert cli.main(["--config", str(cfg), "provision", "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["claimed"] and st["kit_id"] == kid and st["config"]["current"] == 1
    assert st["fleet_key"] == cp.key_fingerprint(fleet.public_key_b64)
    assert st["certificate"]["subject"].startswith(f"CN={kid},")


def _unsigned_claim_response(body: dict[str, Any]) -> bytes:
    """A claim response envelope with an empty signature (anyone on the claim listener can send one)."""
    return cp.canonical({"v": cp.VERSION, "kind": "claim_response", "body": body, "sig": ""})


@pytest.mark.parametrize("bad_key", ["abc", "!!!!not-base64", base64.b64encode(b"\x01" * 31).decode()],
                         ids=["bad_padding", "not_alphabet", "31_bytes"])
@pytest.mark.parametrize("preset", [True, False], ids=["preset_key", "first_claim"])
def test_claim_response_with_a_malformed_fleet_key_is_refused_not_raised(new_kit, fleet, bad_key: str,
                                                                          preset: bool) -> None:
    """A junk `fleet_public_key` in an unsigned response is refused as a bad response naming the field; it never
    escapes `check_response` (binascii.Error "Incorrect padding" used to end the control thread)."""
    from firmware.control.claim import ClaimError, check_response, ensure_tls_key

    k = new_kit(allow=False, **({"fleet_public_key": fleet.public_key_b64} if preset else {}))
    paths = ControlPaths.of(k.cfg)
    ensure_tls_key(paths, k.identity.kit_id)
    body = {"kit_id": k.identity.kit_id, "nonce": "n1", "status": "pending", "reason": "", "fleet_public_key": bad_key}
    with pytest.raises(ClaimError) as e:
        check_response(_unsigned_claim_response(body), k.cfg, k.identity, paths, "n1")
    assert e.value.reason == "bad_response" and "fleet_public_key" in str(e.value), str(e.value)


def test_claim_with_a_malformed_preset_fleet_key_names_the_setting(new_kit, fleet) -> None:
    """A typo in `control.fleet_public_key` is a ClaimError naming the setting (logged, retried), not a crash."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.control.claim import ClaimError, check_response, ensure_tls_key

    k = new_kit(allow=False, fleet_public_key="abc")
    paths = ControlPaths.of(k.cfg)
    ensure_tls_key(paths, k.identity.kit_id)
    key = Ed25519PrivateKey.generate()
    body = {"kit_id": k.identity.kit_id, "nonce": "n1", "status": "pending", "reason": "",
            "fleet_public_key": cp.public_b64(key)}
    with pytest.raises(ClaimError) as e:
        check_response(cp.sign("claim_response", body, key), k.cfg, k.identity, paths, "n1")
    assert e.value.reason == "bad_fleet_key" and "control.fleet_public_key" in str(e.value), str(e.value)
