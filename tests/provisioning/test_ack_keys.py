"""The data center's ack key reaches the kit in its signed config: at claim (config v1) and in every later
document, applied live to the running relay (a key rotation needs no restart); real broker, fleet service, kit."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware import config
from firmware.relay.relay import Relay
from firmware.wire import relay_protocol as rp
from provisioning.signer import ACK_KEY_FILE, load_ack_key

from .conftest import push_config, wait_event, wait_for


def test_ack_key_at_claim_and_rotated_live_by_signed_config(online_kit, fleet, fleet_link) -> None:
    k = online_kit
    dc_key = rp.ack_public_b64(load_ack_key(fleet.data / ACK_KEY_FILE))
    assert fleet.ack_public_keys() == [dc_key]  # made by `ca init`, next to (not the same as) the fleet key
    assert dc_key != fleet.public_key_b64
    wait_for(lambda: k.control.cfg.relay.ack_public_keys == [dc_key], 10, "config v1 from the claim carries the key")
    k2 = k.restart()
    assert k2.cfg.relay.ack_public_keys == [dc_key]  # and it is in the effective config after a restart
    relay_cfg = config.validate({**k2.cfg.as_toml_dict(), "relay": {"brokers": ["mqtt://127.0.0.1:1"],
                                                                    "ack_public_keys": [dc_key]}},
                                 "test", k2.cfg.base_dir)
    try:
        _rotate(k2, relay_cfg, fleet, fleet_link, dc_key)
    finally:
        k2.stop()


def _rotate(k2, relay_cfg, fleet, fleet_link, dc_key) -> None:
    kit_id = k2.identity.kit_id
    relay = Relay(k2.store, relay_cfg)  # the real relay, not started: the plane hands it the new keys
    k2.services["relay"] = relay
    ctl = k2.start_control()
    wait_for(ctl.connected.is_set, 20, "connected")
    new = rp.ack_public_b64(Ed25519PrivateKey.generate())
    v = push_config(fleet, fleet_link, kit_id, {"relay": {"ack_public_keys": [dc_key, new]}})
    wait_event(fleet, kit_id, v, "applied")  # live: no restart asked for
    assert not k2.exits
    wait_for(lambda: [rp.ack_key_id(x) for x in relay._ack_keys] == [rp.ack_key_id(rp.load_ack_public_key(x))
                                                                      for x in (dc_key, new)], 5, "relay keys")
    # A config that forgets the keys still carries the fleet's current ones (a document replaces the last).
    v2 = push_config(fleet, fleet_link, kit_id, {})
    wait_event(fleet, kit_id, v2, "applied")
    assert ctl.cfg.relay.ack_public_keys == [dc_key]
    wait_for(lambda: len(relay._ack_keys) == 1, 5, "relay back to the fleet's key")
