"""Oversized and garbage payloads on every topic the kit subscribes to (its config and cmd topics;
only the fleet identity can publish there, so these model a compromised or buggy fleet side or a
broker bridge). Each is refused with a logged reason, nothing is applied, and the kit keeps working."""

from __future__ import annotations

import json
import logging
import random
import time

from firmware.wire import control_protocol as cp
from provisioning.fleet_ops import send_command

from .conftest import wait_for


def _garbage(fleet, kid: str) -> list[bytes]:
    sig = lambda kind, body: cp.sign(kind, body, fleet.key)  # noqa: E731
    now = int(time.time())
    items = [
        b"x" * (cp.MAX_PAYLOAD + 1),  # oversized
        b"{" * 100_000,  # oversized and deeply nested
        b"\xff\xfe\x00garbage",
        b"null", b"[]", b"42", b'"text"', b"{}",
        b'{"v": 1, "kind": "cmd", "body": {}, "sig": "!!!not-base64"}',
        b'{"v": 1, "kind": "cmd", "body": {}, "sig": "AAAA", "extra": 1}',
        b'{"v": 2, "kind": "config", "body": {}, "sig": "AAAA"}',
        b'{"v": 1, "kind": "config", "body": {"version": NaN}, "sig": "AAAA"}',
        b"[" * 5000 + b"]" * 5000,  # deep nesting under the size limit
        json.dumps({"v": 1, "kind": "cmd", "body": [], "sig": ""}).encode(),
        # Correctly signed by the fleet, but the wrong kind for the topic or a malformed body:
        sig("telemetry", {"kit_id": kid}),
        sig("cmd", {"cmd_id": "short", "kit_id": kid, "name": "lock", "args": {}, "issued_at": now,
                    "expires_at": now + 60}),
        sig("cmd", {"cmd_id": "abcdefgh1", "kit_id": kid, "name": "format_disk", "args": {}, "issued_at": now,
                    "expires_at": now + 60}),
        sig("cmd", {"cmd_id": "abcdefgh2", "kit_id": kid, "name": "lock", "args": [], "issued_at": now,
                    "expires_at": now + 60}),
        sig("cmd", {"cmd_id": "abcdefgh3", "kit_id": kid, "name": "lock", "args": {}, "issued_at": "now",
                    "expires_at": now + 60}),
        sig("cmd", {"cmd_id": "abcdefgh4", "kit_id": kid, "name": "lock", "args": {}, "issued_at": now,
                    "expires_at": now - 60}),
        sig("config", {"kit_id": kid, "version": "7", "issued_at": now, "sections": {}}),
        sig("config", {"kit_id": kid, "version": 0, "issued_at": now, "sections": {}}),
        sig("config", {"kit_id": kid, "version": 10**6, "issued_at": now, "sections": {"store": 5}}),
        sig("config", {"kit_id": kid, "version": 10**6, "issued_at": now, "sections": {}, "evil": 1}),
        sig("config", {"kit_id": "../../etc", "version": 10**6, "issued_at": now, "sections": {}}),
        sig("config", {"kit_id": kid, "version": 500, "issued_at": now, "sections": {},
                       "files": {"../../escape": "x"}}),  # well-formed and signed: answered as rejected
    ]
    rng = random.Random(8)  # bounded, reproducible fuzz
    items += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(20)]
    # Bit flips in a valid, signed command: the signature must catch every one.
    good = bytearray(sig("cmd", {"cmd_id": "flipflop1", "kit_id": kid, "name": "lock", "args": {},
                                 "issued_at": now, "expires_at": now + 60}))
    for _ in range(10):
        b = bytearray(good)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(7)
        items.append(bytes(b))
    return items


def test_garbage_on_config_and_cmd_topics(online_kit, fleet, fleet_link, caplog) -> None:
    k = online_kit
    kid = k.identity.kit_id
    ctl = k.control
    state_before = (k.cfg.state_dir / "remote-config" / "state.json").read_bytes()
    items = _garbage(fleet, kid)
    with caplog.at_level(logging.WARNING, "firmware.control.plane"):
        for topic in (cp.config_topic(kid), cp.cmd_topic(kid)):
            n0 = sum(ctl.stats.refused.values())
            for payload in items:
                fleet_link.publish(topic, payload)
            wait_for(lambda n0=n0: sum(ctl.stats.refused.values()) >= n0 + len(items), 20,
                     f"{len(items)} refusals on {topic}")
            assert sum(ctl.stats.refused.values()) == n0 + len(items)  # every one, exactly once
    assert ctl.stats.commands == 0  # nothing ran
    assert caplog.text.count("control refused") >= 2 * len(items)
    reasons = set(ctl.stats.refused)
    assert {"too_large", "not_json", "malformed", "wrong_kind", "bad_signature", "unknown_command",
            "bad_version"} <= reasons, reasons
    # Nothing applied: versions, trial and the version counter are unchanged.
    after = json.loads((k.cfg.state_dir / "remote-config" / "state.json").read_text())
    before = json.loads(state_before)
    assert (after["current"], after["last_good"], after["trial"]) == (before["current"], before["last_good"], None)
    # Only the well-formed, signed document for this kit (v500, bad file name) is remembered as rejected;
    # no junk moved the version counter.
    assert after["max_seen"] == 500 and after["last_event"]["status"] == "rejected"
    assert "files" in after["last_event"]["reason"] and before["max_seen"] < 500
    assert not list((k.cfg.state_dir / "remote-config").rglob("escape"))
    assert ctl.lock_reason() == ""
    # And the kit still works.
    res = send_command(fleet, kid, "status", {}, 60, 10)
    assert res is not None and res["ok"]
    fleet_link.publish(cp.config_topic(kid), b"", retain=True)
