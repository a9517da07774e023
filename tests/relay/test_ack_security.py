"""Issue 13.3 / 13.9 on the ack path: acks are signed by the data center, parsed bounded, and nothing else moves a
record. Real mosquitto (anonymous, no ACL: the misconfigured broker where anyone may publish on a kit's ack
topic), real kit store and relay, real ingest."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.errors import ProtocolError
from firmware.wire import control_protocol as cp
from firmware.wire import relay_protocol as proto
from tests.relay.conftest import ACK_KEY, ACK_PUB, assert_delivered_once, wait_for, write_ack_key

RID = "rk-abcdefghjk-00000042-20261129T040000Z"
SHA = "ab" * 32


# --- wire -------------------------------------------------------------------------------------


def test_signed_ack_round_trip_and_what_fails_to_verify():
    raw = proto.load_ack_public_key(ACK_PUB)
    other = Ed25519PrivateKey.generate()
    ack = proto.Ack.decode(proto.Ack(RID, SHA, "stored").encode(ACK_KEY))
    assert ack.verify([raw]) and ack.kid == proto.ack_key_id(raw)
    assert not proto.Ack.decode(proto.Ack(RID, SHA, "stored").encode(other)).verify([raw])
    assert proto.Ack.decode(proto.Ack(RID, SHA, "stored").encode(other)).verify(
        [raw, proto.load_ack_public_key(proto.ack_public_b64(other))])  # rotation overlap: either key
    # The signature covers id, hash and status: a genuine "rejected" cannot be turned into "stored" (or moved).
    genuine = json.loads(proto.Ack(RID, SHA, "rejected", "bad").encode(ACK_KEY))
    for field, value in (("status", "stored"), ("sha256", "cd" * 32), ("reason", "x"),
                         ("record_id", "rk-abcdefghjk-00000043-20261129T040000Z")):
        forged = dict(genuine, **{field: value})
        assert not proto.Ack.decode(json.dumps(forged).encode()).verify([raw]), field
    # v1 (unsigned) acks and v2 without a signature are refused at decode.
    with pytest.raises(ProtocolError, match="protocol version"):
        proto.Ack.decode(json.dumps({"v": 1, "record_id": RID, "sha256": SHA, "status": "stored"}).encode())
    with pytest.raises(ProtocolError, match="unsigned"):
        proto.Ack.decode(json.dumps({"v": 2, "record_id": RID, "sha256": SHA, "status": "stored"}).encode())


def test_record_ids_ending_in_newline_fail_every_wire_parser():
    bad = RID + "\n"
    ack = json.loads(proto.Ack(RID, SHA, "stored").encode(ACK_KEY))
    with pytest.raises(ProtocolError, match="bad record_id"):
        proto.Ack.decode(json.dumps(dict(ack, record_id=bad)).encode())
    ann = json.loads(proto.Announce(RID, 42, 1000, SHA, 4, 300).encode())
    with pytest.raises(ProtocolError, match="bad record_id"):
        proto.Announce.decode(json.dumps(dict(ann, record_id=bad)).encode())
    with pytest.raises(ProtocolError, match="bad record_id"):
        proto.Chunk.decode(proto.split(bad, b"x" * 10, SHA, 300)[0].encode())
    with pytest.raises(ProtocolError, match="bad kit id"):
        proto.parse_records_topic("rekam/v1/rk-abc\n/records/chunk")
    from provisioning.archive import record_id_mismatch
    assert record_id_mismatch(bad, "rk-abcdefghjk")


@pytest.mark.parametrize("parse", [proto.Ack.decode, proto.Announce.decode,
                                   lambda b: cp.decode(b, "config"), lambda b: cp.decode(b, "cmd")])
def test_deeply_nested_json_is_refused_not_a_recursion_error(parse):
    for payload in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 3000 + b"1" + b"}" * 3000):
        with pytest.raises(ProtocolError) as e:
            parse(payload)
        assert e.value.reason in ("too_deep", "too_large")


# --- real broker, real relay ------------------------------------------------------------------


class Publisher:
    """Anyone with publish rights on the broker (a misconfigured ACL, a stolen credential)."""

    def __init__(self, port: int) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _ack(kit, rid: str, status: str, key: Ed25519PrivateKey = ACK_KEY, reason: str = "") -> bytes:
    return proto.Ack(rid, kit.store.j.get(rid).sha256, status, reason).encode(key)


def test_forged_acks_neither_purge_nor_quarantine(mosquitto, make_kit, make_ingest, tmp_path):
    kit = make_kit([mosquitto.url])
    ids = kit.capture(3)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["sent"] == 3, 15, "records sent (no ingest: no genuine ack)")
    pub = Publisher(mosquitto.port)
    attacker = Ed25519PrivateKey.generate()
    topic = proto.ack_topic(kit.kit_id)
    try:
        pub.send(topic, _ack(kit, ids[0], "stored", attacker))  # signed, by the wrong key
        pub.send(topic, _ack(kit, ids[1], "rejected", attacker, "forged"))
        pub.send(topic, json.dumps({"v": 1, "record_id": ids[0], "sha256": kit.store.j.get(ids[0]).sha256,
                                    "status": "stored", "reason": ""}).encode())  # the old unsigned format
        # A genuine signature over a "rejected" replayed as "stored": the signature does not cover it.
        forged = dict(json.loads(_ack(kit, ids[2], "rejected", ACK_KEY, "x")), status="stored")
        pub.send(topic, json.dumps(forged).encode())
        wait_for(lambda: relay.status()["counters"]["acks_unverified"] >= 3, 10, "forged acks counted")
        wait_for(lambda: relay.status()["counters"]["acks_ignored"] >= 4, 10, "all four ignored")
    finally:
        pub.close()
    for rid in ids:
        assert kit.store.j.get(rid).state == "sent", rid  # not acked (so never purged), not quarantined
        assert kit.store.sd_path(rid).exists()
    assert relay.status()["counters"]["records_acked"] == 0 and kit.counts()["quarantined"] == 0
    make_ingest(mosquitto.url)  # the genuine data center: its signed acks still work
    wait_for(lambda: kit.counts()["acked"] == 3, 30, "genuine acks")
    assert_delivered_once(kit, tmp_path / "archive", ids)


def test_ack_key_rotation_overlap_then_old_key_refused(mosquitto, make_kit, make_ingest, tmp_path):
    new = Ed25519PrivateKey.generate()
    kit = make_kit([mosquitto.url], ack_public_keys=[ACK_PUB, proto.ack_public_b64(new)])
    ids = kit.capture(4)
    relay = kit.start_relay()
    w = make_ingest(mosquitto.url, ack_key=write_ack_key(tmp_path / "new-ack.key", new))  # ingest switched
    wait_for(lambda: kit.counts()["acked"] == 4, 30, "acked with the new key during the overlap")
    w.close()
    relay.set_ack_keys([proto.ack_public_b64(new)])  # the next signed config drops the old key (live)
    more = kit.capture(2)
    wait_for(lambda: kit.counts()["sent"] == 2, 15, "sent")
    pub = Publisher(mosquitto.port)
    try:
        pub.send(proto.ack_topic(kit.kit_id), _ack(kit, more[0], "stored", ACK_KEY))  # retired key
        wait_for(lambda: relay.status()["counters"]["acks_unverified"] >= 1, 10, "old-key ack refused")
    finally:
        pub.close()
    assert kit.store.j.get(more[0]).state == "sent"
    make_ingest(mosquitto.url, ack_key=tmp_path / "new-ack.key")
    wait_for(lambda: kit.counts()["acked"] == 6, 30, "acked with the new key")
    assert_delivered_once(kit, tmp_path / "archive", ids + more)


def test_kit_without_ack_keys_trusts_no_ack(mosquitto, make_kit, make_ingest):
    kit = make_kit([mosquitto.url], ack_public_keys=[])
    kit.capture(2)
    relay = kit.start_relay()
    w = make_ingest(mosquitto.url)
    wait_for(lambda: w.counters.stored == 2, 20, "archived")
    wait_for(lambda: relay.status()["counters"]["acks_unverified"] >= 2, 10, "acks refused")
    assert kit.counts()["acked"] == 0 and kit.counts()["sent"] == 2


def test_deeply_nested_ack_does_not_crash_the_relay(mosquitto, make_kit, make_ingest, tmp_path):
    kit = make_kit([mosquitto.url])
    ids = kit.capture(2)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["sent"] == 2, 15, "sent")
    thread = relay.thread
    pub = Publisher(mosquitto.port)
    try:
        for payload in (b"[" * 200_000 + b"]" * 200_000, b'{"v":' * 1000 + b"2" + b"}" * 1000, b"\xff" * 100):
            pub.send(proto.ack_topic(kit.kit_id), payload)
        wait_for(lambda: relay.status()["counters"]["acks_ignored"] >= 2, 10, "bad acks counted")
    finally:
        pub.close()
    time.sleep(0.3)
    # The 400 KB one never reached the kit: its CONNECT's Maximum Packet Size made the broker drop it.
    assert relay.status()["counters"]["acks_ignored"] == 2
    assert relay.thread is thread and thread.is_alive() and relay.error == "", relay.error
    assert relay.health()["state"] == "running"
    make_ingest(mosquitto.url)
    wait_for(lambda: kit.counts()["acked"] == 2, 30, "the next genuine acks work")
    assert_delivered_once(kit, tmp_path / "archive", ids)


def test_rollout_flag_also_sends_v1_acks_which_upgraded_kits_ignore(mosquitto, make_kit, make_ingest, tmp_path):
    """`--legacy-unsigned-acks` (rollout only): old kits still get the v1 ack they read; upgraded kits act on the
    signed v2 one and ignore (count) the v1 copy."""
    kit = make_kit([mosquitto.url])
    seen: list[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: seen.append(json.loads(m.payload))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe(proto.ack_topic(kit.kit_id), qos=1)
    sub.loop_start()
    try:
        make_ingest(mosquitto.url, legacy_unsigned_acks=True)
        ids = kit.capture(2)
        relay = kit.start_relay()
        wait_for(lambda: kit.counts()["acked"] == 2, 30, "acked through the signed acks")
        wait_for(lambda: sum(1 for a in seen if a["v"] == 1) >= 2, 10, "v1 copies published")
    finally:
        sub.loop_stop()
        sub.disconnect()
    v1 = [a for a in seen if a["v"] == 1]
    assert set(v1[0]) == {"v", "record_id", "sha256", "status", "reason"}  # the v1 shape old kits decode
    assert relay.status()["counters"]["acks_ignored"] >= 2
    assert_delivered_once(kit, tmp_path / "archive", ids)


def test_a_replayed_retry_ack_does_not_postpone_a_record_for_ever(mosquitto, make_kit, make_ingest, tmp_path):
    """A genuine signed "retry" carries no attempt of its own: replayed by whoever can publish on the ack topic it
    postponed the record's resend each time. It counts once per attempt, and not at all for an acked record."""
    kit = make_kit([mosquitto.url])
    ids = kit.capture(1)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["sent"] == 1, 15, "record sent (no ingest yet: no ack)")
    pub = Publisher(mosquitto.port)
    retry = _ack(kit, ids[0], "retry", ACK_KEY, "archive busy")  # genuine, captured once
    try:
        for _ in range(5):
            pub.send(proto.ack_topic(kit.kit_id), retry)
        wait_for(lambda: relay.status()["counters"]["acks_ignored"] >= 4, 10, "the copies ignored")
        assert relay.status()["counters"]["retry_acks"] == 1
    finally:
        pub.close()
    make_ingest(mosquitto.url)  # the data center back: the record's next attempt is acked
    wait_for(lambda: kit.counts()["acked"] == 1, 30, "acked on its next attempt")
    assert_delivered_once(kit, tmp_path / "archive", ids)
