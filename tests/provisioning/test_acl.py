"""Broker security as deployed (provisioning/mosquitto/): TLS client certificates, CN as user name,
ACL patterns. Kit A must not publish as kit B, read B's config or acks, or publish any command;
the claim credential reaches nothing but the claim topics; each CA works only on its listener."""

from __future__ import annotations

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
        self.connected = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=str(cafile), certfile=str(cert), keyfile=str(key))
        self.c.on_connect = lambda _c, _u, _f, rc, _p: rc.is_failure or self.connected.set()
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc.value)
        self.c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.append([r.value for r in rcs])
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
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
