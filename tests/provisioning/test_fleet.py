"""Fleet side: claim rules (allow-list, expiry, key mismatch, unknown credential), revocation
(CRL on the real broker, no more config or commands), and the status table."""

from __future__ import annotations

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
