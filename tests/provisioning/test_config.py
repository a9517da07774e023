"""Signed, versioned remote config: live apply, restart + promotion, refusals, floors, rollback."""

from __future__ import annotations

import json
import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.control.plane import EX_RESTART
from firmware.enrollment.operators import hash_pin
from firmware.wire import control_protocol as cp
from firmware.wire import record_format

from .conftest import config_state, free_port, push_config, wait_event, wait_for


def _files(k) -> dict[str, bytes]:
    d = k.cfg.state_dir / "remote-config"
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def test_operators_apply_live_and_are_reported(online_kit, fleet, fleet_link) -> None:
    k = online_kit
    kid = k.identity.kit_id
    ops = [{"id": "op1", "name": "Op One", "pin_hash": hash_pin("2468")},
           {"id": "sup1", "name": "Sup", "pin_hash": hash_pin("1357"), "role": "supervisor"}]
    v = push_config(fleet, fleet_link, kid, {"operators": {"list": ops}, "control": {"telemetry_interval_s": 2.0}})
    wait_event(fleet, kid, v, "applied")
    assert set(k.enrollment.operators.by_id) == {"op1", "sup1"}
    assert k.exits == []  # no restart for live keys
    st = config_state(fleet, kid)
    assert st["running"] == v and st["last_good"] == v
    assert k.enrollment.sign_in("sup1", "1357").operator.role == "supervisor"


def test_forged_config_refused_and_nothing_applied(online_kit, fleet, fleet_link, caplog) -> None:
    k = online_kit
    kid = k.identity.kit_id
    before = _files(k)
    evil = Ed25519PrivateKey.generate()
    body = {"kit_id": kid, "version": 99, "issued_at": 1, "sections": {"operators": {"list": []}}}
    with caplog.at_level(logging.WARNING, "firmware.control.plane"):
        fleet_link.publish(cp.config_topic(kid), cp.sign("config", body, evil), retain=True)
        wait_for(lambda: k.control.stats.refused.get("bad_signature"), 10, "forged config refused")
    assert "reason=bad_signature" in caplog.text
    assert _files(k) == before  # not current, not last-good, not max_seen
    assert set(k.enrollment.operators.by_id) == {"op1"}
    # The forgery did not poison the version counter: the fleet's next real version applies.
    v = push_config(fleet, fleet_link, kid, {"control": {"telemetry_interval_s": 3.0}})
    wait_event(fleet, kid, v, "applied")
    assert v < 99


def test_replayed_and_foreign_documents_refused(online_kit, fleet, fleet_link) -> None:
    k = online_kit
    kid = k.identity.kit_id
    v1, old = fleet.make_config(kid, {"control": {"telemetry_interval_s": 2.0}})
    fleet_link.publish(cp.config_topic(kid), old, retain=True)
    wait_event(fleet, kid, v1, "applied")
    v2 = push_config(fleet, fleet_link, kid, {"control": {"telemetry_interval_s": 3.0}})
    wait_event(fleet, kid, v2, "applied")
    fleet_link.publish(cp.config_topic(kid), old, retain=True)  # replay of the older, validly signed version
    wait_for(lambda: k.control.stats.refused.get("stale_version"), 10, "replay refused")
    assert k.control.cfg.control.telemetry_interval_s == 3.0
    other = {"kit_id": "rk-someoneelse", "version": v2 + 1, "issued_at": 1, "sections": {}}
    fleet_link.publish(cp.config_topic(kid), cp.sign("config", other, fleet.key), retain=True)
    wait_for(lambda: k.control.stats.refused.get("wrong_kit"), 10, "document for another kit refused")
    assert config_state(fleet, kid)["running"] == v2


def test_invalid_config_rejected_old_kept(online_kit, fleet, fleet_link) -> None:
    k = online_kit
    kid = k.identity.kit_id
    good = push_config(fleet, fleet_link, kid, {"control": {"telemetry_interval_s": 2.0}})
    wait_event(fleet, kid, good, "applied")
    bad = push_config(fleet, fleet_link, kid, {"operators": {"max_failures": 0, "idle_signout_s": "soon"}})
    ev = wait_event(fleet, kid, bad, "rejected")
    assert "operators.max_failures = 0" in ev["reason"] and "operators.idle_signout_s" in ev["reason"]
    st = config_state(fleet, kid)
    assert st["running"] == good and st["last_good"] == good
    assert k.control.remote.version == good and k.exits == []


def test_safety_floors_and_denied_keys(online_kit, fleet, fleet_link) -> None:
    k = online_kit
    kid = k.identity.kit_id
    cases = [({"store": {"reserve_floor_mb": 0}}, "below the safety floor"),
             ({"store": {"reserve_records": 1}}, "store.reserve_records"),
             ({"store": {"verify_readback": False}}, "cannot be turned off remotely"),
             ({"store": {"purge_requires_stick": False}}, "cannot be turned off remotely"),
             ({"kit": {"state_dir": "/tmp/elsewhere"}}, "[kit] cannot be set remotely"),
             ({"control": {"fleet_public_key": "AAAA"}}, "control.fleet_public_key cannot be set remotely"),
             ({"api": {"bind": "0.0.0.0"}}, "[api] cannot be set remotely"),
             ({"relay": {"password_file": "/etc/shadow"}}, "relay.password_file cannot be set remotely"),
             ({"usb": {"mount_point": "/var/lib/rekam/x"}}, "usb.mount_point cannot be set remotely")]
    for sections, why in cases:
        v = push_config(fleet, fleet_link, kid, sections)
        ev = wait_event(fleet, kid, v, "rejected")
        assert why in ev["reason"], (sections, ev)
    assert k.control.remote.version == 1 and k.exits == []
    # Raising a floor is fine (needs a restart: the store reads it at start).
    v = push_config(fleet, fleet_link, kid, {"store": {"reserve_floor_mb": 2}})
    wait_event(fleet, kid, v, "pending_restart")
    assert k.exits == [EX_RESTART]


def test_restart_config_promoted_after_reconnect(online_kit, fleet, fleet_link) -> None:
    k = online_kit
    kid = k.identity.kit_id
    v = push_config(fleet, fleet_link, kid, {"daemon": {"status_interval_s": 5.0}})
    wait_event(fleet, kid, v, "pending_restart")
    assert k.exited.wait(5) and k.exits == [EX_RESTART]
    k2 = k.restart()
    assert k2.cfg.daemon.status_interval_s == 5.0
    assert json.loads((k2.cfg.state_dir / "remote-config" / "state.json").read_text())["trial"]["version"] == v
    k2.start_control()
    wait_event(fleet, kid, v, "applied")
    st = config_state(fleet, kid)
    assert st["running"] == v and st["last_good"] == v and st["trial"] is None
    k2.stop()


def test_config_that_cuts_the_uplink_is_rolled_back(online_kit, fleet, fleet_link, caplog) -> None:
    k = online_kit
    kid = k.identity.kit_id
    dead = f"127.0.0.1:{free_port()}"
    v = push_config(fleet, fleet_link, kid, {"control": {"brokers": [dead]}})
    wait_event(fleet, kid, v, "pending_restart")
    assert k.exited.wait(5)
    k2 = k.restart()
    assert k2.cfg.control.brokers == [dead]
    with caplog.at_level(logging.WARNING):
        k2.start_control()
        assert k2.exited.wait(15), "no rollback after rollback_after_s without a connection"
    assert k2.exits == [EX_RESTART]
    assert "remote config rolled back" in caplog.text
    k3 = k2.restart()
    assert k3.cfg.control.brokers != [dead]
    k3.start_control()
    ev = wait_event(fleet, kid, v, "rolled_back")
    assert "no broker connection" in ev["reason"]
    st = config_state(fleet, kid)
    assert st["running"] == 1 and st["last_good"] == 1
    # The bad document is still retained on the broker: the kit refuses it as already seen.
    wait_for(lambda: k3.control.stats.refused.get("stale_version"), 10, "retained bad version refused")
    assert k3.exits == []
    k3.stop()


def test_wildcard_document_and_datacenter_key_shipped_inside(online_kit, fleet, fleet_link) -> None:
    k = online_kit
    kid = k.identity.kit_id
    _, pub = record_format.generate_datacenter_keypair()
    v = push_config(fleet, fleet_link, kid, {"datacenter": {"public_key_files": ["dc-2027.pub"]}},
                    files={"dc-2027.pub": pub.decode()})
    wait_event(fleet, kid, v, "pending_restart")
    k2 = k.restart()
    assert [record_format.raw_public(r) for r in k2.store.recipients] == \
        [record_format.raw_public(record_format.load_recipient_key(pub))]
    k2.start_control()
    wait_event(fleet, kid, v, "applied")
    # A fleet-wide document ("*") is accepted by every kit it is published to. Each document is the
    # complete set of overrides (not a patch), so it carries the key file again.
    body = {"kit_id": "*", "version": v + 1, "issued_at": 1, "files": {"dc-2027.pub": pub.decode()},
            "sections": {"control": {"telemetry_interval_s": 2.5},
                         "datacenter": {"public_key_files": ["dc-2027.pub"]}}}
    fleet_link.publish(cp.config_topic(kid), cp.sign("config", body, fleet.key), retain=True)
    wait_event(fleet, kid, v + 1, "applied")
    assert k2.control.cfg.control.telemetry_interval_s == 2.5
    k2.stop()


def test_config_that_cuts_the_relay_is_rolled_back(new_kit, fleet, broker, service, fleet_link) -> None:
    """The control connection survives, but the record relay cannot reach its new brokers: not promoted,
    rolled back after rollback_after_s. Uses the real relay (firmware/relay/relay.py)."""
    good = f"mqtts://127.0.0.1:{broker.port}"
    k = new_kit(extra=f'[relay]\nbrokers = ["{good}"]\nbackoff_max_s = 1.0\n')
    kid = k.identity.kit_id
    k.start_control()
    assert k.exited.wait(20)  # claimed: restart so the relay gets the kit certificate
    k2 = k.restart()
    k2.start_relay()
    k2.start_control()
    wait_for(lambda: k2.services["relay"].status()["state"] == "connected", 15, "relay connected")
    dead = f"mqtts://127.0.0.1:{free_port()}"
    v = push_config(fleet, fleet_link, kid, {"relay": {"brokers": [dead]}})
    wait_event(fleet, kid, v, "pending_restart")
    assert k2.exited.wait(5)
    k3 = k2.restart()
    assert k3.cfg.relay.brokers == [dead]
    k3.start_relay()
    ctl = k3.start_control()
    wait_for(ctl.connected.is_set, 10, "control connects (its brokers did not change)")
    assert k3.exited.wait(15) and k3.exits == [EX_RESTART]
    k4 = k3.restart()
    assert k4.cfg.relay.brokers == [good]
    k4.start_relay()
    k4.start_control()
    ev = wait_event(fleet, kid, v, "rolled_back")
    assert "relay" in ev["reason"]
    k4.stop()
