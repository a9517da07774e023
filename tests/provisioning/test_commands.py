"""Signed commands over the real broker: results by response topic + correlation data, replay and
expiry protection that survives a restart, and each command's effect on the real kit parts."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.control.plane import EX_REBOOT, CommandGuard, Refused
from firmware.enrollment.nik import NikError
from firmware.enrollment.operators import hash_pin
from firmware.enrollment.session import EnrollmentError
from firmware.seal import identity
from firmware.wire import control_protocol as cp
from firmware.wire import record_format
from provisioning.fleet_ops import send_command

from .conftest import wait_for


def _cmd(fleet, kid: str, name: str, args=None, issued=None, ttl: int = 60, key=None, cmd_id=None) -> bytes:
    now = int(time.time()) if issued is None else issued
    body = {"cmd_id": cmd_id or f"t{time.monotonic_ns()}", "kit_id": kid, "name": name, "args": args or {},
            "issued_at": now, "expires_at": now + ttl}
    return cp.sign("cmd", body, key or fleet.key)


def test_status_command_round_trip(online_kit, fleet) -> None:
    kid = online_kit.identity.kit_id
    res = send_command(fleet, kid, "status", {}, ttl=60, wait=10)
    assert res is not None and res["ok"] and res["kit_id"] == kid
    d = res["data"]
    assert d["backlog"] == {"records": 0, "bytes": 0} and d["halted"] is False
    assert {m["name"] for m in d["media"]} == {"sd", "usb"} and d["media"][0]["free_bytes"] > 0
    assert d["versions"]["firmware"] and d["uptime_s"] >= 0


def test_replayed_expired_forged_commands_refused(online_kit, fleet, fleet_link, caplog) -> None:
    k = online_kit
    kid = k.identity.kit_id
    ctl = k.control
    now = int(time.time())
    good = _cmd(fleet, kid, "status")
    cases = [
        (good, None),  # runs once
        (good, "replayed"),  # the same signed bytes again
        (_cmd(fleet, kid, "lock", issued=now - 600, ttl=300), "expired"),
        (_cmd(fleet, kid, "lock", issued=now + 3600), "future"),
        (_cmd(fleet, kid, "lock", ttl=40 * 86400), "ttl_too_long"),
        (_cmd(fleet, kid, "lock", key=Ed25519PrivateKey.generate()), "bad_signature"),
        (_cmd(fleet, "rk-someoneelse", "lock"), "wrong_kit"),
    ]
    with caplog.at_level(logging.WARNING, "firmware.control.plane"):
        for payload, reason in cases:
            before = dict(ctl.stats.refused)
            fleet_link.publish(cp.cmd_topic(kid), payload)
            if reason is None:
                wait_for(lambda: ctl.stats.commands == 1, 10, "first command accepted")
            else:
                wait_for(lambda r=reason, b=before: ctl.stats.refused.get(r, 0) == b.get(r, 0) + 1, 10, reason)
                assert f"reason={reason}" in caplog.text
    assert ctl.stats.commands == 1
    assert ctl.lock_reason() == "" and k.enrollment.lock_reason == ""  # no refused lock ran


def test_expired_command_is_answered_with_the_reason(online_kit, fleet, fleet_link) -> None:
    kid = online_kit.identity.kit_id
    now = int(time.time())
    body = {"cmd_id": "expiredcmd01", "kit_id": kid, "name": "purge", "args": {}, "issued_at": now - 900,
            "expires_at": now - 300}
    fleet.db.execute("INSERT INTO commands (cmd_id, kit_id, name, args, issued_at, expires_at) VALUES "
                     "(?,?,?,?,?,?)", (body["cmd_id"], kid, "purge", "{}", body["issued_at"], body["expires_at"]))
    fleet_link.publish(cp.cmd_topic(kid), cp.sign("cmd", body, fleet.key), response_topic=cp.result_topic(kid),
                       correlation=body["cmd_id"].encode())
    row = wait_for(lambda: fleet.command("expiredcmd01")["result"], 10, "answer to the expired command")
    res = json.loads(row)
    assert res["ok"] is False and res["code"] == "expired" and online_kit.control.stats.commands == 0


def test_replay_protection_survives_restart(online_kit, fleet, fleet_link) -> None:
    k = online_kit
    kid = k.identity.kit_id
    payload = _cmd(fleet, kid, "lock", {"reason": "first"}, ttl=600)
    fleet_link.publish(cp.cmd_topic(kid), payload)
    wait_for(lambda: k.control.lock_reason() == "first", 10, "lock applied")
    send_command(fleet, kid, "unlock", {}, 60, 10)
    k2 = k.restart()
    ctl = k2.start_control()
    wait_for(ctl.connected.is_set, 10, "reconnected")
    fleet_link.publish(cp.cmd_topic(kid), payload)  # captured and replayed after the reboot
    wait_for(lambda: ctl.stats.refused.get("replayed"), 10, "replay after restart refused")
    assert ctl.lock_reason() == ""
    k2.stop()


def test_command_guard_watermark(tmp_path) -> None:
    g = CommandGuard(tmp_path / "c.db", max_skew_s=0, max_ttl_s=3600)
    t0 = 1_800_000_000
    g.admit({"cmd_id": "aaaaaaaa", "name": "status", "issued_at": t0, "expires_at": t0 + 10}, now=t0)
    with pytest.raises(Refused, match="replayed"):
        g.admit({"cmd_id": "aaaaaaaa", "name": "status", "issued_at": t0, "expires_at": t0 + 10}, now=t0 + 1)
    # Later the row is forgotten (expired), but the watermark still refuses anything issued up to t0,
    # even if the clock were set back so that it looks unexpired.
    g.admit({"cmd_id": "bbbbbbbb", "name": "status", "issued_at": t0 + 500, "expires_at": t0 + 900}, now=t0 + 500)
    assert g.watermark() == t0
    g.close()
    g = CommandGuard(tmp_path / "c.db", max_skew_s=0, max_ttl_s=3600)  # persistent
    with pytest.raises(Refused, match="too_old"):
        g.admit({"cmd_id": "aaaaaaaa", "name": "status", "issued_at": t0, "expires_at": t0 + 3000}, now=t0 + 600)
    with pytest.raises(Refused, match="replayed"):
        g.admit({"cmd_id": "bbbbbbbb", "name": "status", "issued_at": t0 + 500, "expires_at": t0 + 900}, now=t0 + 600)
    g.close()


def test_lock_blocks_enrollment_and_persists(online_kit, fleet) -> None:
    k = online_kit
    kid = k.identity.kit_id
    res = send_command(fleet, kid, "lock", {"reason": "kit reported stolen"}, 60, 10)
    assert res["ok"]
    token = k.enrollment.sign_in("op1", "2468").token
    with pytest.raises(EnrollmentError) as ei:
        k.enrollment.start(token, "3174012345670001")
    assert ei.value.code == "locked" and "stolen" in str(ei.value)
    k2 = k.restart()  # still locked after a restart, before any network
    assert k2.control is None
    k2.start_control()
    assert k2.enrollment.lock_reason == "kit reported stolen"
    wait_for(k2.control.connected.is_set, 10, "reconnected")
    assert send_command(fleet, kid, "unlock", {}, 60, 10)["ok"]
    token = k2.enrollment.sign_in("op1", "2468").token
    with pytest.raises(NikError):  # past the lock check: now the NIK itself is checked
        k2.enrollment.start(token, "not-a-nik")
    k2.stop()


def test_purge_and_export_to_usb(online_kit, fleet) -> None:
    k = online_kit
    kid = k.identity.kit_id
    ids = [k.store.commit(b"payload %d" % i).record_id for i in range(3)]
    for rid in ids[:2]:
        k.store.mark(rid, "sent")
        k.store.mark(rid, "acked")
    stick = k.store.stick
    assert stick is not None
    stick.record_path(ids[2]).unlink()  # the stick lost one copy: export puts it back
    res = send_command(fleet, kid, "export_usb", {}, 60, 10)
    assert res["ok"] and res["data"]["copied"] == 1 and stick.record_path(ids[2]).exists()
    res = send_command(fleet, kid, "purge", {}, 60, 10)
    assert res["ok"] and res["data"]["purged"] == 2
    assert [r.state for r in k.store.j.records()] == ["purged", "purged", "stored"]


def test_set_operators_live_and_after_restart(online_kit, fleet) -> None:
    k = online_kit
    kid = k.identity.kit_id
    ops = [{"id": "op9", "name": "Nine", "pin_hash": hash_pin("9999")}]
    assert send_command(fleet, kid, "set_operators", {"operators": ops}, 60, 10)["ok"]
    assert set(k.enrollment.operators.by_id) == {"op9"}
    bad = send_command(fleet, kid, "set_operators", {"operators": [{"id": "x", "pin_hash": "plain"}]}, 60, 10)
    assert not bad["ok"] and bad["code"] == "invalid" and set(k.enrollment.operators.by_id) == {"op9"}
    k2 = k.restart()
    assert [o["id"] for o in k2.cfg.operators.list] == ["op9"]
    k2.stop()


def test_sync_without_relay_reports_why(online_kit, fleet) -> None:
    res = send_command(fleet, online_kit.identity.kit_id, "sync", {}, 60, 10)
    assert not res["ok"] and res["code"] == "no_relay"


def test_rotate_key(online_kit, fleet) -> None:
    k = online_kit
    kid = k.identity.kit_id
    old = k.identity.public_key_b64
    res = send_command(fleet, kid, "rotate_key", {}, 60, 10)  # verified by the fleet with the OLD key
    assert res["ok"] and res["data"]["old_public_key"] == old
    new = res["data"]["new_public_key"]
    wait_for(lambda: fleet.kit(kid)["public_key"] == new, 5, "fleet registers the new key")
    on_disk = identity.load(k.cfg.state_dir)
    assert on_disk.public_key_b64 == new and k.store.identity.public_key_b64 == new
    assert len(list((k.cfg.state_dir / "identity" / "archive").glob("kit-*.key"))) == 1
    # Telemetry is now signed with the new key and the fleet accepts it.
    seen = fleet.kit(kid)["last_seen"]
    wait_for(lambda: fleet.kit(kid)["last_seen"] > seen, 5, "telemetry under the new key")
    # Records sealed from now on carry the new key.
    rid = k.store.commit(b"after rotation").record_id
    parsed = record_format.parse(k.store.sd_path(rid).read_bytes())
    assert parsed.header.kit_key == on_disk.public_key_raw
    record_format.parse(k.store.sd_path(rid).read_bytes(), trusted_kit_key=on_disk.public_key_raw)
    # The control connection was renewed so its Last Will is signed by the new key: the fleet accepts it.
    wait_for(lambda: k.control.stats.connects >= 2 and k.control.connected.is_set(), 10, "reconnected with new will")
    k.control._client.socket().shutdown(socket.SHUT_RDWR)
    wait_for(lambda: fleet.kit(kid)["online"] == "offline", 10, "Last Will under the new key")


def test_reboot_exits_with_reboot_status_after_answering(online_kit, fleet) -> None:
    k = online_kit
    res = send_command(fleet, k.identity.kit_id, "reboot", {}, 60, 10)
    assert res["ok"] and res["message"] == "rebooting"
    assert k.exited.wait(5) and k.exits == [EX_REBOOT]


def test_last_will_marks_kit_offline(online_kit, fleet) -> None:
    k = online_kit
    kid = k.identity.kit_id
    k.control._client.socket().shutdown(socket.SHUT_RDWR)  # the link dies without a DISCONNECT
    wait_for(lambda: fleet.kit(kid)["online"] == "offline", 10, "Last Will: offline")
    wait_for(lambda: fleet.kit(kid)["online"] == "online", 15, "back online after reconnect")
    wait_for(lambda: json.loads(fleet.kit(kid)["telemetry"])["control"]["connects"] >= 2, 5,
             "telemetry from the second connection")


def test_a_second_copy_of_a_rotation_result_is_a_duplicate_not_a_forgery(online_kit, fleet) -> None:
    # The fleet service and `rekam-fleet cmd send` both handle every result. The first copy of a rotate_key
    # result registers the new key, so the second no longer verifies against the current key: it must be
    # recognised as the same result (nothing changes), while a different body under the same cmd_id is refused.
    import base64

    from firmware.control.commands import sign_result

    kid = online_kit.identity.kit_id
    old = online_kit.identity.signing_key
    new = Ed25519PrivateKey.generate()
    cmd_id, _ = fleet.make_command(kid, "rotate_key", {}, 60)
    proof = new.sign(b"rekam-key-rotation:" + cp.public_raw(old) + cp.public_raw(new))
    data = {"new_public_key": cp.public_b64(new), "old_public_key": cp.public_b64(old),
            "proof": base64.b64encode(proof).decode()}
    body = {"cmd_id": cmd_id, "name": "rotate_key"}
    out = sign_result(kid, body, (cp.result_topic(kid), None), True, "ok", "kit key rotated", old, data)
    assert fleet.handle_kit_message(out.topic, out.payload) == "result"
    assert fleet.kit(kid)["public_key"] == cp.public_b64(new)
    assert fleet.handle_kit_message(out.topic, out.payload) == "result"  # the duplicate
    assert fleet.kit(kid)["public_key"] == cp.public_b64(new)
    forged = sign_result(kid, body, (cp.result_topic(kid), None), False, "error", "forged", old)
    assert fleet.handle_kit_message(forged.topic, forged.payload) is None
    assert json.loads(fleet.command(cmd_id)["result"])["ok"] is True


def test_lock_does_not_wait_behind_a_long_update_download(online_kit, fleet) -> None:
    """A bundle download may take hours on a rural uplink; a `lock` for a stolen kit sent meanwhile runs at once
    (the long commands have their own worker), and the download still ends with its own answer."""
    k = online_kit
    kid = k.identity.kit_id
    stall = socket.create_server(("127.0.0.1", 0))  # accepts the connection (backlog), never answers
    try:
        url = f"http://127.0.0.1:{stall.getsockname()[1]}/rekam-9.9.9.rkup"
        args = {"url": url, "sha256": "0" * 64, "size": 1000, "version": "9.9.9"}
        assert send_command(fleet, kid, "update", args, 600, 0.5) is None  # downloading: no answer yet
        t0 = time.monotonic()
        res = send_command(fleet, kid, "lock", {"reason": "kit reported stolen"}, 60, 10)
        assert res is not None and res["ok"] and time.monotonic() - t0 < 5, res
        assert k.enrollment.lock_reason == "kit reported stolen"
    finally:
        stall.close()  # the pending connection is reset: the download fails and is answered
    assert send_command(fleet, kid, "unlock", {}, 60, 10)["ok"]


def test_reboot_waits_for_the_enrollment_under_way(online_kit, fleet) -> None:
    """A fleet reboot (or a restart for a new config) must not drop an enrollment in progress: its captures live
    in memory and the resident is at the kit. New enrollments are refused meanwhile; the exit follows the end of
    the one under way (here: the operator cancels it; past the grace it would be cancelled for them)."""
    k = online_kit
    token = k.enrollment.sign_in("op1", "2468").token
    k.enrollment.start(token, "3201011505900001")
    res = send_command(fleet, k.identity.kit_id, "reboot", {}, 60, 10)
    assert res["ok"] and res["message"] == "rebooting"
    assert not k.exited.wait(1.5)  # still up: the enrollment is under way
    with pytest.raises(EnrollmentError) as ei:  # no new one may start before the restart
        k.enrollment.start(token, "3201014506900002")
    assert ei.value.code == "restart_pending", ei.value
    k.enrollment.cancel(token, "resident left")
    assert k.exited.wait(5) and k.exits == [EX_REBOOT]
    assert k.enrollment.exit_lock == "restart_pending"


def test_a_result_is_recorded_only_as_the_first_answer_to_the_command_it_names(tmp_path, caplog) -> None:
    """A kit's signed result counts only for a command issued to that kit, not yet answered, of the same name: a
    `rotate_key` result for a command never sent re-registered the kit's key, a second answer rewrote the first
    (even after the command expired), and a `status` command could be recorded as `purge`. Such results are counted
    and logged (once a minute per kit), never stored; the exact copy of a recorded one stays a duplicate."""
    import base64

    from firmware.control.commands import sign_result
    from provisioning.registry import Fleet

    f = Fleet.init(tmp_path / "fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test")
    kid = "rk-results01"
    key, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, ?, 'approved', 0)",
                 (kid, cp.public_b64(key)))
    proof = new.sign(b"rekam-key-rotation:" + cp.public_raw(key) + cp.public_raw(new))
    rotation = {"new_public_key": cp.public_b64(new), "old_public_key": cp.public_b64(key),
                "proof": base64.b64encode(proof).decode()}

    def signed(cmd_id: str, name: str, ok: bool = True, data=None) -> bytes:
        return sign_result(kid, {"cmd_id": cmd_id, "name": name}, (cp.result_topic(kid), None), ok,
                           "ok" if ok else "error", "answer", key, data).payload

    def answer(cmd_id: str, name: str, ok: bool = True, data=None) -> str | None:
        return f.handle_kit_message(cp.result_topic(kid), signed(cmd_id, name, ok, data))

    with caplog.at_level(logging.INFO, "provisioning.registry"):
        assert answer("neverissued01", "rotate_key", data=rotation) is None  # no such command
        assert f.kit(kid)["public_key"] == cp.public_b64(key) and f.command("neverissued01") is None
        status, _ = f.make_command(kid, "status", {}, 60)
        assert answer(status, "purge") is None  # another command's name
        assert answer(status, "rotate_key", data=rotation) is None
        assert f.command(status)["result"] is None and f.kit(kid)["public_key"] == cp.public_b64(key)
        real = signed(status, "status")
        assert f.handle_kit_message(cp.result_topic(kid), real) == "result"  # the real answer
        assert f.handle_kit_message(cp.result_topic(kid), real) == "result"  # its copy (service and `cmd send`)
        assert answer(status, "status", ok=False) is None  # a second, different answer
        assert json.loads(f.command(status)["result"])["ok"] is True
        now = int(time.time())
        f.db.execute("INSERT INTO commands (cmd_id, kit_id, name, args, issued_at, expires_at) VALUES "
                     "('expired00001', ?, 'lock', '{}', ?, ?)", (kid, now - 900, now - 300))
        assert answer("expired00001", "lock", ok=False) == "result"  # the kit's "expired" answer is its first
        assert answer("expired00001", "lock", ok=True) is None  # and stays the only one
        assert json.loads(f.command("expired00001")["result"])["ok"] is False
        other = f.make_command(kid, "lock", {}, 60)[0]
        assert answer(other, "lock") == "result"  # an open command of another name is not touched by the others
        rotate, _ = f.make_command(kid, "rotate_key", {}, 60)
        assert answer(rotate, "rotate_key", data=rotation) == "result"  # the one way a key is rotated
        assert f.kit(kid)["public_key"] == cp.public_b64(new)
    assert f.unmatched_results[kid] == 5
    lines = [r.getMessage() for r in caplog.records if "command result not recorded" in r.getMessage()]
    assert len(lines) == 1 and f"kit_id={kid}" in lines[0] and "reason=unknown_command" in lines[0], lines
    assert len(list(f.db.execute("SELECT 1 FROM events WHERE kind = 'result_not_recorded'"))) == 1
    f.close()
