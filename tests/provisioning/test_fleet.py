"""Fleet side: claim rules (allow-list, expiry, key mismatch, unknown credential), revocation
(CRL on the real broker, no more config or commands), and the status table."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware import __version__
from firmware.errors import FleetError
from firmware.wire import control_protocol as cp

from .conftest import wait_for


def _claim(kid: str, key: Ed25519PrivateKey, user: str = "claim-test", csr: str = "x") -> tuple[str, bytes]:
    body = {"kit_id": kid, "public_key": cp.public_b64(key), "hardware_serial": "serial-" + kid,
            "software_version": __version__, "csr": csr, "nonce": "n" + kid, "issued_at": int(time.time())}
    return cp.claim_request_topic(user, kid), cp.sign("claim", body, key)


def _answer(fleet, topic: str, payload: bytes) -> dict | None:
    ans = fleet.handle_claim(topic, payload)
    if ans is None:
        return None
    return cp.verify(ans[1], "claim_response", cp.load_public_b64(fleet.public_key_b64))


def test_claim_rules(fleet) -> None:
    key = Ed25519PrivateKey.generate()
    assert _answer(fleet, *_claim("rk-fleetaaa1", key))["status"] == "pending"
    # Same kit id, another key: refused (someone else claims to be this kit).
    ans = _answer(fleet, *_claim("rk-fleetaaa1", Ed25519PrivateKey.generate()))
    assert ans["status"] == "rejected" and "another key" in ans["reason"]
    # Unknown claim credential, a signature by another key, a kit id that differs from the topic: ignored.
    assert _answer(fleet, *_claim("rk-fleetaaa2", key, user="claim-stolen")) is None
    topic, payload = _claim("rk-fleetaaa3", key)
    assert _answer(fleet, topic.replace("rk-fleetaaa3", "rk-fleetaaa4"), payload) is None
    body, _, _ = cp.decode(payload, "claim")
    forged = cp.sign("claim", {**body, "public_key": cp.public_b64(Ed25519PrivateKey.generate())}, key)
    assert _answer(fleet, topic, forged) is None
    assert fleet.kit("rk-fleetaaa3") is None
    # Approval of a bad CSR: answered rejected, no certificate.
    fleet.approve("rk-fleetaaa1")
    ans = _answer(fleet, *_claim("rk-fleetaaa1", key, csr="not a csr"))
    assert ans["status"] == "rejected" and "CSR" in ans["reason"]


def test_pending_claims_expire(fleet) -> None:
    key = Ed25519PrivateKey.generate()
    _answer(fleet, *_claim("rk-fleetexp1", key))
    assert fleet.kit("rk-fleetexp1")["state"] == "pending"
    ttl_s = fleet.settings["claim_ttl_hours"] * 3600
    assert fleet.expire_claims(now=time.time() + ttl_s + 60) >= 1
    assert fleet.kit("rk-fleetexp1") is None
    with pytest.raises(FleetError, match="expired"):
        fleet.approve("rk-fleetexp1")
    # The kit's next retry simply files a new claim.
    assert _answer(fleet, *_claim("rk-fleetexp1", key))["status"] == "pending"


def test_revoked_kit_is_cut_off(online_kit, fleet, broker, tmp_path) -> None:
    k = online_kit
    kid = k.identity.kit_id
    from provisioning import cli
    from provisioning.fleet_link import FleetLink

    seen: list[bytes] = []
    probe = FleetLink(fleet, "fleet-revoke-probe0", lambda _l, m: seen.append(bytes(m.payload)),
                      (cp.config_topic(kid),)).start()
    wait_for(lambda: seen, 5, "v1 retained on the kit's config topic since the claim")
    probe.close()
    assert seen == [fleet.latest_config(kid)[1]]
    assert cli.main(["kits", "revoke", kid, "--data", str(fleet.data)]) == 0
    serial = fleet.kit(kid)["cert_serial"]
    assert serial and fleet.kit(kid)["state"] == "revoked"
    got: list[bytes] = []
    probe = FleetLink(fleet, "fleet-revoke-probe", lambda _l, m: got.append(bytes(m.payload)),
                      (cp.config_topic(kid),)).start()
    time.sleep(0.5)
    probe.close()
    assert got == []  # the retained config was cleared
    with pytest.raises(FleetError, match="revoked"):
        fleet.make_config(kid, {})
    with pytest.raises(FleetError, match="revoked"):
        fleet.make_command(kid, "status")
    # Its claim cannot be renewed either.
    ans = _answer(fleet, *_claim(kid, k.identity.signing_key))
    assert ans["status"] == "rejected" and "revoked" in ans["reason"]
    broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads certificates and the CRL
    time.sleep(0.5)
    k.control._client.socket().shutdown(socket.SHUT_RDWR)  # force a reconnect
    wait_for(lambda: not k.control.connected.is_set(), 5, "kit disconnected")
    time.sleep(3)  # reconnect attempts (1 s, 2 s backoff) must all fail the TLS handshake
    assert not k.control.connected.is_set()
    # Same CA, same listener: a certificate that is not on the CRL still gets in, the revoked one does not.
    from provisioning import ca as ca_mod

    crt, key, _ = ca_mod.issue_kit_files(fleet.ca, "rk-notrevoked", tmp_path / "ok")
    assert _connects(fleet, broker, crt, key)
    assert not _connects(fleet, broker, k.control.paths.cert, k.control.paths.tls_key)


def _connects(fleet, broker, crt, key) -> bool:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rk-probe" + str(time.monotonic_ns())[-6:],
                    protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(fleet.ca.fleet_ca_crt), certfile=str(crt), keyfile=str(key))
    ok: list[bool] = []
    c.on_connect = lambda _c, _u, _f, rc, _p: ok.append(not rc.is_failure)
    try:
        c.connect("127.0.0.1", broker.port)
        for _ in range(40):
            if c.loop(timeout=0.05) != 0 or ok:
                break
    except OSError:
        return False
    finally:
        c.disconnect()
    return ok == [True]


def test_status_table(online_kit, fleet) -> None:
    kid = online_kit.identity.kit_id
    wait_for(lambda: fleet.kit(kid)["telemetry"], 10, "telemetry")
    row = next(r for r in fleet.status_rows() if r["kit_id"] == kid)
    assert row["online"] == "online" and row["backlog"] == 0 and row["sd_free_mb"] > 0 and row["halted"] == ""
    assert row["config"] == 1


def _reporting_kit(f, kid: str, software_version: str = "0.1.0", serial: str = "serial") -> Ed25519PrivateKey:
    """An approved kit row as a claim leaves it (the claim itself: test_claim.py), and its key."""
    key = Ed25519PrivateKey.generate()
    f.db.execute("INSERT INTO kits (kit_id, public_key, hardware_serial, software_version, state, claimed_at) "
                 "VALUES (?, ?, ?, ?, 'approved', 0)", (kid, cp.public_b64(key), serial, software_version))
    return key


def _report(f, kid: str, key: Ed25519PrivateKey, kind: str, body: dict) -> str | None:
    topic = cp.telemetry_topic(kid) if kind == "telemetry" else cp.status_topic(kid)
    return f.handle_kit_message(topic, cp.sign(kind, {"kit_id": kid, **body}, key))


def _fleet_cli(f, capsys, *args: str) -> str:
    from provisioning import cli

    assert cli.main([*args, "--data", str(f.data)]) == 0
    return capsys.readouterr().out


def test_one_kits_malformed_telemetry_never_breaks_the_fleets_status(tmp_path, monkeypatch, capsys) -> None:
    """A signed but ill-shaped report (`{"media": [1]}`, `{"backlog": []}`, ...) made `status_rows()` raise for the
    whole fleet, and a status `{"state": {...}}` failed to be stored. The fields the fleet reads are checked on
    arrival (a bad one is dropped, with an event); a row stored before (or by an older fleet) that cannot be read
    shows "telemetry unreadable" for that kit alone."""
    import json

    from provisioning.registry import Fleet

    monkeypatch.setenv("REKAM_LANG", "en")
    f = Fleet.init(tmp_path / "fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test")
    good = {"media": [{"name": "sd", "free_bytes": 3 << 20}, {"name": "usb", "free_bytes": None}],
            "backlog": {"records": 7, "bytes": 70}, "halted": True, "halt_reasons": ["sd full"], "locked": "",
            "health": {"camera": {"ok": True}}}
    bad = {"rk-media1": {"media": [1]}, "rk-media2": {"media": "x"}, "rk-media3": {"media": [{"name": "sd",
           "free_bytes": "lots"}]}, "rk-media4": {"media": [{"name": "sd", "free_bytes": 1}] * 1000},
           "rk-backlog1": {"backlog": []}, "rk-backlog2": {"backlog": {"records": True}},
           "rk-halt1": {"halt_reasons": [1]}, "rk-halt2": {"halted": "yes"},
           "rk-locked1": {"locked": {"why": 1}}, "rk-locked2": {"locked": "x" * 5000}}
    keys = {kid: _reporting_kit(f, kid) for kid in ["rk-good", *bad]}
    assert _report(f, "rk-good", keys["rk-good"], "telemetry", good) == "telemetry"
    for kid, body in bad.items():
        assert _report(f, kid, keys[kid], "telemetry", {**good, **body}) == "telemetry", kid
    for state in ({"nested": 1}, ["online"], "x" * 1000):  # kept nowhere as given: "?" (unknown)
        assert _report(f, "rk-media1", keys["rk-media1"], "status", {"state": state}) == "status"
        assert f.kit("rk-media1")["online"] == "?"
    assert _report(f, "rk-good", keys["rk-good"], "status", {"state": "online"}) == "status"
    rows = {r["kit_id"]: r for r in f.status_rows()}
    assert rows["rk-good"] == {**rows["rk-good"], "online": "online", "backlog": 7, "sd_free_mb": 3,
                               "usb_free_mb": None, "halted": "sd full", "locked": "", "telemetry_unreadable": False}
    for kid, body in bad.items():  # only the bad field is gone; the rest of that kit's report is kept
        row, stored = rows[kid], json.loads(f.kit(kid)["telemetry"])
        assert set(body) & set(stored) == set() and stored["health"] == good["health"], kid
        assert not row["telemetry_unreadable"], kid
    assert rows["rk-media1"]["sd_free_mb"] is None and rows["rk-media1"]["backlog"] == 7
    assert rows["rk-halt1"]["halted"] == "HALT" and rows["rk-backlog1"]["backlog"] is None  # halted, no reasons
    dropped = [json.loads(r["detail"]) | {"kit": r["kit_id"]} for r in
               f.db.execute("SELECT kit_id, detail FROM events WHERE kind = 'kit_report_fields_dropped'")]
    assert {d["kit"] for d in dropped} == set(bad) and all(d["report"] == "telemetry" for d in dropped[:len(bad)])
    assert sorted(dropped[0]["fields"]) == ["media"] and "at most 16" in dropped[3]["fields"]["media"], dropped
    # Rows stored before the check (or by an older fleet): that kit alone is unreadable, the others are shown.
    for n, text in enumerate(('[1]', '{"media": 5, "backlog": {"records": 2}}', 'not json', '{"halted": true, '
                              '"halt_reasons": [null]}')):
        _reporting_kit(f, f"rk-legacy{n}")
        f.db.execute("UPDATE kits SET telemetry = ?, config_state = ?, online = 'online' WHERE kit_id = ?",
                     (text, '{"running": {"v": 1}}', f"rk-legacy{n}"))
    rows = {r["kit_id"]: r for r in f.status_rows()}
    assert [k for k, r in rows.items() if r["telemetry_unreadable"]] == [f"rk-legacy{n}" for n in range(4)]
    assert rows["rk-legacy1"]["backlog"] == 2 and rows["rk-legacy1"]["config"] is None
    assert rows["rk-good"]["sd_free_mb"] == 3
    out = _fleet_cli(f, capsys, "status")
    assert out.count("telemetry unreadable") == 4 and "sd full" in out, out
    assert len(json.loads(_fleet_cli(f, capsys, "status", "--json"))) == len(rows)
    f.close()


def test_what_a_kit_reports_reaches_the_operators_terminal_escaped_and_cut(tmp_path, monkeypatch, capsys) -> None:
    """The operator approves kits from `kits list` and watches `status`: a kit's version, serial, lock reason or
    status must not move the cursor, repaint a line (``\\r\\x1b[2K\\x1b[1A`` hid a row) or pass for other text."""
    from provisioning.registry import Fleet

    monkeypatch.setenv("REKAM_LANG", "en")
    f = Fleet.init(tmp_path / "fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test")
    key = _reporting_kit(f, "rk-evil", software_version="\r\x1b[2K\x1b[1Ark-real approved -",
                         serial="\x1b]0;title\x07serial")
    _reporting_kit(f, "rk-plain", software_version="0.1.0.dev1234567+gabcdef", serial="серийный")
    assert _report(f, "rk-evil", key, "telemetry", {"locked": "\x1b[2J\x1b[Hstolen", "halted": False}) == "telemetry"
    assert _report(f, "rk-evil", key, "status", {"state": "\x1b[31mon"}) == "status"
    assert f.kit("rk-evil")["online"] == "?"  # a state is a short printable word; as an older fleet stored it:
    f.db.execute("UPDATE kits SET online = ? WHERE kit_id = 'rk-evil'", ("\x1b[31mon",))
    control = {chr(c) for c in range(32)} - {"\n"} | {"\x7f"}
    for args in (("kits", "list"), ("status",)):
        out = _fleet_cli(f, capsys, *args)
        assert not set(out) & control, (args, out)  # no control character
        assert all(ch.isascii() for ch in out), out  # and no look-alike letters (the serial in Cyrillic)
    listed = _fleet_cli(f, capsys, "kits", "list").splitlines()
    evil = next(ln for ln in listed if ln.startswith("rk-evil"))
    assert "'\\r\\x1b" in evil and "approved -" not in evil, evil  # escaped, and cut to its column
    plain = next(ln for ln in listed if ln.startswith("rk-plain"))
    assert "0.1.0.dev12~" in plain and "'\\u0441" in plain, plain
    status = _fleet_cli(f, capsys, "status")
    assert "locked: '\\x1b[2J\\x1b[Hstolen'" in status and "'\\x1b[3~" in status, status  # online: cut at 8
    f.close()


def test_several_fleet_services_share_the_kits_messages_and_each_learns_the_retained_state(tmp_path) -> None:
    """`rekam-fleet serve` on two hosts (here two services, each with its own registry handle, on the deployed
    broker config): each telemetry message is handled by exactly one of them, both take a share, and when one stops
    the other handles everything; the kits' retained status reaches every service, one started later included (a
    shared subscription gets no retained messages)."""
    from provisioning.fleet_link import FleetLink
    from provisioning.fleet_service import FleetService
    from provisioning.registry import Fleet
    from tests.support import Mosquitto

    b = Mosquitto(tmp_path / "broker", claim_listener=True)
    f = Fleet.init(tmp_path / "fleet", [f"127.0.0.1:{b.port}"], [f"127.0.0.1:{b.claim_port}"], ["127.0.0.1"],
                   batch="test")
    b.use_shipped(f.ca)
    b.start()
    key, kid = Ed25519PrivateKey.generate(), "rk-shared01"
    f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, ?, 'approved', 0)",
                 (kid, cp.public_b64(key)))
    services = [FleetService(Fleet(f.data)).start(), FleetService(Fleet(f.data)).start()]
    link = FleetLink(f, "fleet-test-publisher").start()
    late = None
    try:
        def send(n: int, first: int) -> None:
            for i in range(first, first + n):
                link.publish(cp.telemetry_topic(kid), cp.sign("telemetry", {"kit_id": kid, "n": i}, key))
            link.flush()

        def got(svc: FleetService) -> list[str]:
            out = []
            while not svc.received.empty():
                out.append(svc.received.get_nowait()[0])
            return out

        send(40, 0)
        counts = [0, 0]

        def all_handled(want: int) -> bool:
            for i, s in enumerate(services):
                counts[i] += got(s).count("telemetry")
            return sum(counts) >= want

        wait_for(lambda: all_handled(40), 10, "40 telemetry messages handled")
        time.sleep(0.5)
        all_handled(40)
        assert sum(counts) == 40 and min(counts) >= 5, counts  # once each, split (mosquitto: round robin)
        services[1].close()
        counts = [0, 0]
        send(10, 40)
        wait_for(lambda: all_handled(10), 10, "10 more, by the service left")
        assert counts == [10, 0], counts
        assert json.loads(f.kit(kid)["telemetry"])["n"] == 49
        # retained state: to every service, and to one that starts later
        link.publish(cp.status_topic(kid), cp.sign("status", {"kit_id": kid, "state": "online"}, key), retain=True)
        link.flush()
        wait_for(lambda: "status" in got(services[0]), 10, "the status at the running service")
        late = FleetService(Fleet(f.data)).start()
        wait_for(lambda: "status" in got(late), 10, "the retained status at a service started later")
    finally:
        link.close()
        for s in [*services, *([late] if late else [])]:
            s.close()
        b.stop()
        f.close()
