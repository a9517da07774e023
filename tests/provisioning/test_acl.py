"""Broker security as deployed (provisioning/mosquitto/): TLS client certificates, CN as user name,
ACL patterns. Kit A must not publish as kit B, read B's config or acks, or publish any command;
the claim credential reaches nothing but the claim topics; each CA works only on its listener."""

from __future__ import annotations

import re
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from firmware.wire import control_protocol as cp
from firmware.wire import relay_protocol as proto
from provisioning import ca
from tests.support import wait_for

NOT_AUTHORIZED = 0x87


class Probe:
    """A raw MQTT v5 client that records PUBACK reason codes and every message delivered to it."""

    def __init__(self, client_id: str, cafile: Path, cert: Path, key: Path, port: int) -> None:
        self.pubacks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: list[list[int]] = []
        self.disconnects = 0
        self.connected = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=str(cafile), certfile=str(cert), keyfile=str(key))
        self.c.on_connect = lambda _c, _u, _f, rc, _p: rc.is_failure or self.connected.set()
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc.value)
        self.c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.append([r.value for r in rcs])
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.c.on_disconnect = lambda *_a: setattr(self, "disconnects", self.disconnects + 1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(5), f"{client_id} could not connect"

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> int:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        wait_for(lambda: info.mid in self.pubacks, 5, f"PUBACK for {topic}", step=0.01)
        return self.pubacks[info.mid]

    def subscribe(self, topic: str) -> None:
        n = len(self.subacks)
        self.c.subscribe(topic, qos=1)
        wait_for(lambda: len(self.subacks) > n, 5, f"SUBACK for {topic}", step=0.01)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def probes(fleet, broker, tmp_path):
    made: list[Probe] = []

    def kit(kit_id: str, client_suffix: str = "-ctl") -> Probe:
        crt, key, _ = ca.issue_kit_files(fleet.ca, kit_id, tmp_path / kit_id)
        p = Probe(kit_id + client_suffix, fleet.ca.fleet_ca_crt, crt, key, broker.port)
        made.append(p)
        return p

    def fleet_probe() -> Probe:
        p = Probe("fleet-probe", fleet.ca.fleet_ca_crt, fleet.ca.fleet_crt, fleet.ca.fleet_key, broker.port)
        made.append(p)
        return p

    def claimant(kit_id: str) -> Probe:
        p = Probe(kit_id, fleet.ca.fleet_ca_crt, fleet.ca.claim_crt("test"), fleet.ca.claim_key("test"),
                  broker.claim_port)
        made.append(p)
        return p

    yield kit, fleet_probe, claimant
    for p in made:
        p.close()


def test_kit_cannot_act_as_another_kit(probes) -> None:
    kit, fleet_probe, _ = probes
    a, b, f = kit("rk-aclaaaa"), kit("rk-aclbbbb"), fleet_probe()
    # Retained config for B and an ack for B, published by the fleet identity (allowed).
    assert f.publish(cp.config_topic("rk-aclbbbb"), b"config-for-b", retain=True) < 0x80
    for p in (a, b):
        p.subscribe(cp.config_topic("rk-aclbbbb"))
        p.subscribe(proto.ack_topic("rk-aclbbbb"))
        p.subscribe(cp.telemetry_topic("rk-aclbbbb"))
    assert f.publish(proto.ack_topic("rk-aclbbbb"), b"ack-for-b") < 0x80
    # A's own topics work ...
    assert a.publish(cp.telemetry_topic("rk-aclaaaa")) < 0x80
    assert a.publish(cp.status_topic("rk-aclaaaa")) < 0x80
    assert a.publish(cp.result_topic("rk-aclaaaa")) < 0x80
    assert a.publish(cp.config_state_topic("rk-aclaaaa")) < 0x80
    for topic in (proto.announce_topic("rk-aclaaaa"), proto.chunk_topic("rk-aclaaaa"),
                  proto.relay_telemetry_topic("rk-aclaaaa")):
        assert a.publish(topic) < 0x80, topic
    # ... but never B's, never a config, never a command (its own or B's).
    for topic in (cp.telemetry_topic("rk-aclbbbb"), cp.status_topic("rk-aclbbbb"), cp.result_topic("rk-aclbbbb"),
                  cp.config_state_topic("rk-aclbbbb"), proto.chunk_topic("rk-aclbbbb"),
                  proto.announce_topic("rk-aclbbbb"), proto.ack_topic("rk-aclbbbb"), proto.ack_topic("rk-aclaaaa"),
                  cp.config_topic("rk-aclaaaa"), cp.config_topic("rk-aclbbbb"),
                  cp.cmd_topic("rk-aclaaaa"), cp.cmd_topic("rk-aclbbbb"), "rekam/v1/rk-aclbbbb/cmd/x",
                  cp.claim_request_topic("claim-test", "rk-aclaaaa"), "rekam/v1/anything"):
        assert a.publish(topic) == NOT_AUTHORIZED, topic
    time.sleep(0.5)
    got_a = {t for t, _ in a.messages}
    got_b = {t: p for t, p in b.messages}
    assert got_a == set(), f"kit A read {got_a}"
    assert got_b[cp.config_topic("rk-aclbbbb")] == b"config-for-b"
    assert got_b[proto.ack_topic("rk-aclbbbb")] == b"ack-for-b"
    assert cp.telemetry_topic("rk-aclbbbb") not in got_b  # A's attempt never reached anyone
    assert f.publish(cp.config_topic("rk-aclbbbb"), b"", retain=True) < 0x80  # clear the retained message


def test_claim_credential_only_reaches_claim_topics(probes, fleet) -> None:
    kit, fleet_probe, claimant = probes
    f = fleet_probe()
    f.subscribe("rekam/v1/#")
    c, other = claimant("rk-claimaaa"), claimant("rk-claimbbb")
    other.subscribe(cp.claim_response_topic("claim-test", "rk-claimaaa"))
    assert c.publish(cp.claim_request_topic("claim-test", "rk-claimaaa")) < 0x80
    for topic in (cp.claim_request_topic("claim-test", "rk-claimbbb"),  # not its client id
                  cp.claim_request_topic("claim-other", "rk-claimaaa"),  # not its user name
                  cp.telemetry_topic("rk-claimaaa"), cp.config_topic("rk-claimaaa"), cp.cmd_topic("rk-claimaaa"),
                  proto.announce_topic("rk-claimaaa")):
        assert c.publish(topic) == NOT_AUTHORIZED, topic
    assert f.publish(cp.claim_response_topic("claim-test", "rk-claimaaa"), b"answer") < 0x80
    time.sleep(0.5)
    assert other.messages == []  # another claimant cannot read this kit's answer
    assert [t for t, _ in f.messages if "claim" in t] == [cp.claim_request_topic("claim-test", "rk-claimaaa"),
                                                          cp.claim_response_topic("claim-test", "rk-claimaaa")]


@pytest.mark.parametrize("listener", ["main", "claim"])
def test_each_ca_only_works_on_its_listener(fleet, broker, tmp_path, listener: str) -> None:
    if listener == "main":  # a claim certificate on the main listener
        cert, key, port = fleet.ca.claim_crt("test"), fleet.ca.claim_key("test"), broker.port
    else:  # a kit certificate on the claim listener
        cert, key, _ = ca.issue_kit_files(fleet.ca, "rk-wronglst", tmp_path / "k")
        port = broker.claim_port
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rk-wronglst", protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(fleet.ca.fleet_ca_crt), certfile=str(cert), keyfile=str(key))
    result: list[Any] = []
    c.on_connect = lambda _c, _u, _f, rc, _p: result.append(rc)
    try:
        c.connect("127.0.0.1", port)
        for _ in range(40):
            if c.loop(timeout=0.05) != 0:
                break
    except (ssl.SSLError, OSError):
        pass
    assert not any(not rc.is_failure for rc in result), "a certificate from the wrong CA was accepted"


def test_no_certificate_no_connection(fleet, broker) -> None:
    for port in (broker.port, broker.claim_port):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rk-nocert", protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(fleet.ca.fleet_ca_crt))
        result: list[Any] = []
        c.on_connect = lambda _c, _u, _f, rc, _p, result=result: result.append(rc)
        try:
            c.connect("127.0.0.1", port)
            for _ in range(40):
                if c.loop(timeout=0.05) != 0:
                    break
        except (ssl.SSLError, OSError):
            pass
        assert not any(not rc.is_failure for rc in result), f"port {port} accepted a client without certificate"


# --- shared-subscription hijack and client-id takeover (issue 13, findings 4 and 5) ------------------------------

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def deployed_ingest(fleet, broker, archive: Path) -> list[Any]:
    """The ingest workers exactly as rekam-ingest.service starts them: the shipped `systemd/rekam-ingest.env`
    arguments through the real `rekam-fleet ingest` parser and settings, with this test fleet's TLS files in place of
    /etc/rekam's (the deployed ingest certificate is a fleet-CA client certificate like `fleet-client.crt`)."""
    from provisioning import ingest
    from provisioning.cli import build_parser

    env = dict(ln.split("=", 1) for ln in (SYSTEMD / "rekam-ingest.env").read_text().splitlines()
               if ln and not ln.startswith("#"))
    files = {"/etc/rekam/fleet-ca.crt": str(fleet.ca.fleet_ca_crt), "/etc/rekam/ingest.crt": str(fleet.ca.fleet_crt),
             "/etc/rekam/ingest.key": str(fleet.ca.fleet_key)}
    argv = ["ingest", "--broker", f"mqtts://127.0.0.1:{broker.port}", "--archive", str(archive),
            *(files.get(w, w) for w in env["REKAM_INGEST_ARGS"].split())]
    args = build_parser().parse_args(argv)
    return [ingest.IngestWorker(ingest._settings(args, args.broker)) for _ in range(args.workers)]


def _chunk(kit_id: str, n: int) -> bytes:
    """A well-formed first chunk of a two-chunk record (never completed: it stays staged, nothing is archived)."""
    rid = f"{kit_id}-{n:08d}-20260101T000000Z"
    return proto.Chunk(rid, "0" * 64, 8, 0, 2, 4, b"abcd").encode()


def test_kit_cannot_take_a_share_of_the_ingest_group(probes, fleet, broker, tmp_path) -> None:
    """Finding 4: a kit subscribing to the ingest's shared subscription (or anything else) gets nothing, and every
    record of every other kit reaches the deployed ingest. mosquitto 2.0's ACL file does not check subscriptions:
    what stops the hijack is that the deployed group is a secret the kit cannot name (provisioning.ca.ingest_group)."""
    kit, _, claimant = probes
    workers = deployed_ingest(fleet, broker, tmp_path / "archive")
    try:
        for w in workers:
            w.start()
        for w in workers:
            wait_for(w.connected.is_set, 10, "deployed ingest subscribed")
        # The hijackers: a kit certificate on the main listener and the claim certificate (every kit image has it) on
        # the claim listener, each on every share group and filter it can name.
        thief, claim_thief = kit("rk-thiefaaa"), claimant("rk-thiefbbb")
        for p in (thief, claim_thief):
            for f in ("$share/ingest/rekam/v1/+/records/+", "$share/ingest/rekam/v1/#", "$share/rekam/rekam/v1/#",
                      "$share/fleet/rekam/v1/#", "$share/ingest/#", "rekam/v1/#", "#"):
                p.subscribe(f)
        senders = {kid: kit(kid) for kid in ("rk-shareaaa", "rk-sharebbb", "rk-shareccc")}
        per_kit = 40
        for kid, sender in senders.items():
            for n in range(per_kit):
                assert sender.publish(proto.chunk_topic(kid), _chunk(kid, n)) < 0x80
        total = per_kit * len(senders)
        wait_for(lambda: sum(w.counters.chunks for w in workers) >= total, 15, f"{total} chunks at the ingest")
        time.sleep(0.5)  # anything else in flight lands now
        assert sum(w.counters.chunks for w in workers) == total  # every chunk, once
        assert thief.messages == [] and claim_thief.messages == []
    finally:
        for w in workers:
            w.close()


def test_kit_cannot_take_a_share_of_the_fleet_services_group(probes, fleet, broker, service) -> None:
    """The same for the fleet services' shared subscriptions (claims, results, telemetry): a kit or a claimant in
    any group it can name gets nothing and takes nothing away; every telemetry message of another kit reaches the
    running service once (`provisioning.ca.fleet_service_group` is a secret of the fleet client key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    kit, _, claimant = probes
    thief, claim_thief = kit("rk-thiefccc"), claimant("rk-thiefddd")
    for p in (thief, claim_thief):
        for f in ("$share/fleet/rekam/v1/+/telemetry", "$share/fleet/rekam/v1/#", "$share/fleet-service/rekam/v1/#",
                  "$share/rekam/rekam/v1/#", "$share/fleet/rekam/v1/claim/+/+/request", "$share/fleet/#", "#"):
            p.subscribe(f)
    key, kid = Ed25519PrivateKey.generate(), "rk-fsendaaa"
    fleet.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, ?, 'approved', 0)",
                     (kid, cp.public_b64(key)))
    sender = kit(kid)
    seen = [0]

    def handled() -> int:
        while not service.received.empty():
            seen[0] += service.received.get_nowait() == ("telemetry", kid)
        return seen[0]

    for n in range(30):
        assert sender.publish(cp.telemetry_topic(kid), cp.sign("telemetry", {"kit_id": kid, "n": n}, key)) < 0x80
    wait_for(lambda: handled() >= 30, 15, "30 telemetry messages at the fleet service")
    time.sleep(0.5)  # anything else in flight lands now
    assert handled() == 30 and thief.messages == [] and claim_thief.messages == []
    g = ca.fleet_service_group(fleet.ca)
    assert re.fullmatch(r"fleet-[0-9a-f]{32}", g) and g != ca.ingest_group(None, fleet.ca.fleet_key)


def test_ingest_group_is_a_secret_of_the_ingest_key(fleet, tmp_path) -> None:
    """The default share group: the same for every worker with the same key, another for another key, never the
    guessable `ingest`; an explicit --group wins; an unreadable key is a clear error."""
    from firmware.errors import CaError

    g = ca.ingest_group(None, fleet.ca.fleet_key)
    assert re.fullmatch(r"ingest-[0-9a-f]{32}", g) and g == ca.ingest_group("", str(fleet.ca.fleet_key))
    other = tmp_path / "other.key"
    other.write_bytes(fleet.ca.server_key.read_bytes())
    assert ca.ingest_group(None, other) not in (g, "ingest")
    assert ca.ingest_group("dr-7f3a", fleet.ca.fleet_key) == "dr-7f3a"
    assert ca.ingest_group(None, None) == "ingest"  # plain test broker, no TLS key: name a secret --group there
    with pytest.raises(CaError, match="ingest key"):
        ca.ingest_group(None, tmp_path / "missing.key")


def _attempt(client_id: str, cert: Path, key: Path, port: int, cafile: Path) -> Probe | None:
    """Connect once as `client_id` (no reconnect): the Probe if the broker let it in, else None."""
    try:
        p = Probe(client_id, cafile, cert, key, port)
    except AssertionError:
        return None
    p.c.reconnect_delay_set(60, 60)  # one try each: a thief that keeps reconnecting is the loop of finding 5
    return p


def test_no_certificate_can_take_over_another_clients_session(new_kit, service, fleet, broker, tmp_path) -> None:
    """Finding 5: a kit (its own certificate, main listener) or anyone with the claim certificate (claim listener)
    connecting with every client id it can derive for kit B's control plane and relay or for the fleet service
    kicks nobody: each owner keeps its one connection (no reconnect) and a command still makes the round trip
    fleet -> B -> fleet. mosquitto 2.0 disconnects the owner of a client id whenever anyone connects with it; what
    stops the takeover is that every real id ends in 128 random bits (firmware.system.mqtt.client_id)."""
    from provisioning.fleet_ops import send_command

    k = new_kit(extra=f'[relay]\nbrokers = ["mqtts://127.0.0.1:{broker.port}"]\n')
    k.start_control()
    assert k.exited.wait(20)  # claimed: restart so the relay gets the kit certificate
    k = k.restart()
    relay, plane = k.start_relay(), k.start_control()
    b = k.identity.kit_id
    wait_for(lambda: plane.connected.is_set() and relay.status()["state"] == "connected", 15, "kit B connected")
    owners = {"B control": plane.link, "B relay": relay.uplink, "fleet service": service.link.mqtt}
    before = {name: link.connects for name, link in owners.items()}
    crt, key, _ = ca.issue_kit_files(fleet.ca, "rk-takeover", tmp_path / "thief")
    derivable = [b, f"{b}-ctl", f"{b}-relay", "fleet", "fleet-service", "fleet-cli", "fleet-ingest", "ingest"]
    thieves: list[Probe] = []
    try:
        for cid in derivable:
            for cert_, key_, port in ((crt, key, broker.port),
                                      (fleet.ca.claim_crt("test"), fleet.ca.claim_key("test"), broker.claim_port)):
                t = _attempt(cid, cert_, key_, port, fleet.ca.fleet_ca_crt)
                if t is not None:
                    thieves.append(t)
        time.sleep(1.0)  # a kicked owner would be reconnecting now
        res = send_command(fleet, b, "status", {}, ttl=60, wait=10)
        assert res is not None and res["ok"] and res["kit_id"] == b
        after = {name: link.connects for name, link in owners.items()}
        assert after == before, f"kicked off (connections before/after): {before} {after}"
        assert plane.connected.is_set() and relay.status()["state"] == "connected" and service.link.connected.is_set()
        # The real ids: <certificate identity>-<role>-<128 random bits>, a derivable prefix and an unguessable whole.
        for link, pattern in ((plane.link, rf"{b}-ctl-[0-9a-f]{{32}}"), (relay.uplink, rf"{b}-relay-[0-9a-f]{{32}}"),
                              (service.link.mqtt, r"fleet-service-[0-9a-f]{32}")):
            assert re.fullmatch(pattern, link.s.client_id), link.s.client_id
    finally:
        for t in thieves:
            t.close()


def test_retained_config_survives_a_broker_restart(mosquitto_factory, fleet) -> None:
    """The shipped broker keeps retained messages across a restart: a kit's config topic still holds its current
    document for a kit that was offline during the push and comes back after the broker restarted."""
    b = mosquitto_factory(start=False, claim_listener=True)
    b.use_shipped(fleet.ca)
    b.start()
    topic = cp.config_topic("rk-persist1")
    f = Probe("fleet-persist", fleet.ca.fleet_ca_crt, fleet.ca.fleet_crt, fleet.ca.fleet_key, b.port)
    assert f.publish(topic, b"config-v7", retain=True) < 0x80
    f.close()
    b.restart()
    g = Probe("fleet-persist-2", fleet.ca.fleet_ca_crt, fleet.ca.fleet_crt, fleet.ca.fleet_key, b.port)
    try:
        g.subscribe(topic)
        wait_for(lambda: g.messages, 5, "the retained config after the restart")
        assert g.messages == [(topic, b"config-v7")]
    finally:
        g.close()
