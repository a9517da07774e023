"""Issue 13.2: a record id is bound to its kit. Kit B (stolen, its own valid key and topic) cannot archive records
named after kit A's next sequence numbers, over MQTT or on a stick; A's genuine records are archived afterwards
and nothing is quarantined on A. Real mosquitto, real ingest, real kit stores."""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt

from firmware.wire import record_format as rf
from firmware.wire import relay_protocol as proto
from firmware.wire.ids import parse_record_id
from provisioning.archive import Archive
from provisioning.usb_import import import_stick
from tests.relay.conftest import assert_delivered_once, wait_for


def squat(b, rid: str, header_kit: str) -> bytes:
    """A record sealed and signed by kit B under record id `rid` (another kit's id), header naming `header_kit`."""
    dc = rf.load_recipient_key(b.cfg.path(b.cfg.datacenter.public_key_files[0]).read_bytes())
    p = parse_record_id(rid)
    return rf.seal(b"squatted payload" * 100, record_id=rid, kit_id=header_kit, seq=p.seq,
                   created="2026-12-01T00:00:00Z", clock_synced=True, signing_key=b.store.identity.signing_key,
                   recipients=[dc])


def publish_record(port: int, topic_kit: str, rid: str, data: bytes) -> None:
    """Publish one record as the relay does (announce + chunks) on `topic_kit`'s topics."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        sha = rf.sha256_hex(data)
        chunks = proto.split(rid, data, sha, 4096)
        p = parse_record_id(rid)
        c.publish(proto.announce_topic(topic_kit), proto.Announce(rid, p.seq, len(data), sha, len(chunks),
                                                                  4096).encode(), qos=1).wait_for_publish(5)
        for ch in chunks:
            c.publish(proto.chunk_topic(topic_kit), ch.encode(), qos=1).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


def test_stolen_kit_cannot_squat_another_kits_record_ids(mosquitto, make_kit, make_ingest, tmp_path):
    a = make_kit([mosquitto.url], name="kit-a")
    b = make_kit([mosquitto.url], name="kit-b")
    arch_dir = tmp_path / "archive"
    arch = Archive(arch_dir)
    arch.register_kit(a.kit_id, a.public_key)  # production: keys registered, no trust on first use
    arch.register_kit(b.kit_id, b.public_key)
    arch.close()
    w = make_ingest(mosquitto.url, tofu=False)
    ids = a.capture(3)  # A's next records, not yet sent (B learned or guessed their ids)
    acks: list[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: acks.append(json.loads(m.payload))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe(proto.ack_topic(b.kit_id), qos=1)
    sub.loop_start()
    try:
        for rid in ids:  # on B's own topic, header says B, signed by B: only the id is A's
            publish_record(mosquitto.port, b.kit_id, rid, squat(b, rid, b.kit_id))
        publish_record(mosquitto.port, b.kit_id, ids[0], squat(b, ids[0], a.kit_id))  # header claims A
        wait_for(lambda: len(acks) >= 4, 15, "B's squatting records answered")
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert {x["status"] for x in acks} == {"rejected"}
    assert all("belongs to kit " + a.kit_id in x["reason"] for x in acks), acks
    assert w.counters.wrong_kit >= 4 and w.counters.stored == 0
    arch = Archive(arch_dir)
    try:
        assert arch.count() == 0
        reasons = [r[0] for r in arch.conn.execute("SELECT reason FROM rejects")]
        assert len(reasons) >= 4 and all("KitMismatch" in r for r in reasons)
    finally:
        arch.close()
    # Now A's genuine records: archived, acked, nothing quarantined on A.
    a.start_relay()
    wait_for(lambda: a.counts()["acked"] == 3, 30, "A's genuine records acked")
    assert a.counts()["quarantined"] == 0
    assert_delivered_once(a, arch_dir, ids)


def test_archive_store_and_usb_import_refuse_a_record_id_of_another_kit(make_kit, tmp_path):
    a = make_kit(["mqtt://127.0.0.1:1"], name="kit-a")
    b = make_kit(["mqtt://127.0.0.1:1"], name="kit-b")
    ids = a.capture(2)
    arch = Archive(tmp_path / "archive")
    try:
        arch.register_kit(a.kit_id, a.public_key)
        arch.register_kit(b.kit_id, b.public_key)
        # The archive itself (every door in): B's signature, B's header kit, A's record id.
        r = arch.store(squat(b, ids[0], b.kit_id), b.kit_id, "test")
        assert r.status == "rejected" and "KitMismatch" in r.reason and a.kit_id in r.reason
        # A record id whose sequence number differs from the header's.
        other = ids[1].replace(ids[1].split("-")[2], "99999999")
        data = rf.seal(b"x" * 100, record_id=other, kit_id=b.kit_id, seq=1, created="2026-12-01T00:00:00Z",
                       clock_synced=True, signing_key=b.store.identity.signing_key,
                       recipients=[rf.load_recipient_key(a.cfg.path(a.cfg.datacenter.public_key_files[0])
                                                         .read_bytes())])
        assert arch.store(data, b.kit_id, "test").status == "rejected"
        # A stick of kit B carrying a file named after A's record.
        kdir = tmp_path / "stick" / "rekam" / b.kit_id
        (kdir / "records").mkdir(parents=True)
        (kdir / "kit.json").write_text(json.dumps({"kit_id": b.kit_id, "kit_public_key": b.public_key}))
        (kdir / "records" / f"{ids[1]}.rkm").write_bytes(squat(b, ids[1], b.kit_id))
        s = import_stick(tmp_path / "stick", arch, progress=False)
        assert not s.new and len(s.rejected) == 1 and "KitMismatch" in s.rejected[0][1], s.rejected
        assert arch.count() == 0
        # A's genuine records still go in afterwards (no conflict left behind).
        for rid in ids:
            assert arch.store(a.store.sd_path(rid).read_bytes(), a.kit_id, "test", expect_record_id=rid).status \
                == "stored"
        assert not list((tmp_path / "archive" / "conflicts").iterdir())
    finally:
        arch.close()
