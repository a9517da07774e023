"""Issue 13.9: the ingest's staging is capped per kit and in total and expires quickly, so a kit flooding chunks of
transfers it never finishes cannot fill the data center's disk; a genuine kit refused for lack of room is answered
`retry` and gets its records in once room is back; chunks that contradict the geometry their transfer's first
chunk fixed are dropped unacknowledged, staging nothing. Real mosquitto, real ingest, real staging.db."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt

from firmware.wire import relay_protocol as proto
from firmware.wire.ids import make_record_id
from provisioning.ingest import StagingLimits
from tests.relay.conftest import assert_delivered_once, wait_for

CHUNK = 16 * 1024


def flood(port: int, kit_id: str, n: int, first_seq: int, chunks: int = 64, last_too: bool = False) -> None:
    """First chunks of `n` made-up 1 MiB transfers of `kit_id` (never finished), and their last chunks if `last_too`."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        size = chunks * CHUNK
        for i in range(n):
            rid = make_record_id(kit_id, first_seq + i, "20261201T000000Z")
            sha = f"{i:064x}"
            for idx in ((0, chunks - 1) if last_too else (0,)):
                body = b"\0" * CHUNK
                ch = proto.Chunk(rid, sha, size, idx, chunks, CHUNK, body)
                c.publish(proto.chunk_topic(kit_id), ch.encode(), qos=1).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


def ack_listener(port: int, kit: str, acks: list[dict]) -> mqtt.Client:
    """A client collecting every ack the data center sends to `kit` (JSON) into `acks`; loop started."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: acks.append(json.loads(m.payload))
    c.connect("127.0.0.1", port)
    c.subscribe(proto.ack_topic(kit), qos=1)
    c.loop_start()
    return c


def test_flooding_kit_is_capped_and_genuine_kit_resends_later(mosquitto, make_kit, make_ingest, tmp_path):
    limits = StagingLimits(kit_bytes=3 * 1024 * 1024, kit_transfers=3, total_bytes=64 * 1024 * 1024,
                           total_transfers=4)
    w = make_ingest(mosquitto.url, staging=limits, transfer_ttl_s=3.0)
    flooder, flooder2 = "rk-flood1", "rk-flood2"
    acks: list[dict] = []
    sub = ack_listener(mosquitto.port, flooder, acks)
    try:
        flood(mosquitto.port, flooder, 20, 1, last_too=True)
        wait_for(lambda: w.counters.staging_refused >= 17 * 2, 15, "the flood refused past the per-kit cap")
        assert w.staging.usage(flooder) == (3, 3 * 64 * CHUNK)  # its share, no more
        wait_for(lambda: len(acks) >= 17, 10, "retry answers for the refused transfers")
        assert {a["status"] for a in acks} == {"retry"} and "kit_transfers" in acks[0]["reason"]
    finally:
        sub.loop_stop()
        sub.disconnect()
    flood(mosquitto.port, flooder2, 1, 1)  # staging now holds the total cap: 4 unfinished transfers
    wait_for(lambda: w.staging.usage() == (4, 4 * 64 * CHUNK), 10, "staging full")
    kit = make_kit([mosquitto.url], chunk_kb=16)
    ids = kit.capture(3)
    relay = kit.start_relay()
    wait_for(lambda: relay.status()["counters"]["retry_acks"] >= 1, 15, "the genuine kit told to retry")
    assert kit.counts()["acked"] == 0 and kit.counts()["quarantined"] == 0
    # The flood expires (3 s without a chunk); the genuine kit's resends then go in.
    wait_for(lambda: kit.counts()["acked"] == 3, 40, "genuine records stored after the flood expired")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    assert w.counters.expired_chunks >= 4
    wait_for(lambda: w.staging.usage() == (0, 0), 10, "staging empty again")


def test_chunks_announcing_another_size_stage_nothing_and_get_no_ack(mosquitto, make_ingest):
    """The review's attack end to end: a 2-byte transfer, then 1 MiB chunks of the same record id and hash that
    announce 64 MiB (its last one too). Before the fix the ingest staged 21 MiB against a 1 MiB kit cap."""
    mib = 1024 * 1024
    w = make_ingest(mosquitto.url, staging=StagingLimits(kit_bytes=mib, kit_transfers=128,
                                                         total_bytes=64 * mib, total_transfers=4096))
    kit = "rk-flood3"
    rid, sha = make_record_id(kit, 1, "20261201T000000Z"), "ab" * 32
    acks: list[dict] = []
    c = ack_listener(mosquitto.port, kit, acks)
    try:
        chunks = [proto.Chunk(rid, sha, 2, 0, 2, 1, b"a")]
        chunks += [proto.Chunk(rid, sha, 64 * mib, i, 64, mib, b"\0" * mib) for i in (*range(1, 21), 63)]
        for ch in chunks:
            c.publish(proto.chunk_topic(kit), ch.encode(), qos=1).wait_for_publish(5)
        wait_for(lambda: w.counters.chunks >= len(chunks), 20, "every chunk handled")
        time.sleep(0.5)  # the last one's handler, and any ack it would send
        with w._handling:  # the worker's handle, between two messages
            staged = w.staging.conn.execute("SELECT COALESCE(SUM(length(data)), 0) FROM chunks").fetchone()[0]
            assert w.staging.usage(kit) == (1, 2) and staged == 1
        assert acks == [] and w.counters.staging_refused == 0 and w.counters.stored == 0
        assert w.counters.malformed == len(chunks) - 1  # each refused chunk counted, not an ingest failure
    finally:
        c.loop_stop()
        c.disconnect()
