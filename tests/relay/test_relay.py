"""End-to-end relay tests against a real mosquitto: every test ends with the count (zero lost, zero twice)."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt

from firmware.wire import relay_protocol as proto
from tests.relay.conftest import ACK_KEY, assert_delivered_once, wait_for


def test_happy_path_status_and_telemetry(mosquitto, make_kit, make_ingest, tmp_path):
    w = make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url])
    ids = kit.capture(12)
    seen: list[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: seen.append(json.loads(m.payload))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe(proto.relay_telemetry_topic(kit.kit_id))
    sub.loop_start()
    try:
        relay = kit.start_relay()
        wait_for(lambda: kit.counts()["acked"] == 12, 20, "all acked")
        assert_delivered_once(kit, tmp_path / "archive", ids)
        assert w.counters.stored == 12
        wait_for(lambda: relay.status()["backlog"]["records"] == 0, 5, "status to show an empty backlog")
        st = relay.status()
        assert st["state"] == "connected" and st["broker"] == mosquitto.url
        assert st["oldest_unacked"] is None and st["counters"]["records_acked"] == 12
        assert st["window"] == 16  # min(relay.window=16, mosquitto Receive Maximum=20)
        wait_for(lambda: bool(seen), 5, "relay telemetry")
        assert seen[-1]["kit_id"] == kit.kit_id and "backlog" in seen[-1]
        # Idle and connected, nothing due: records committed now are sent because the commit wakes the relay
        # (the store's change hook); nothing else would look for them before a reconnect.
        more = kit.capture(2)
        wait_for(lambda: kit.counts()["acked"] == 14, 10, "records committed while idle acked")
        assert_delivered_once(kit, tmp_path / "archive", ids + more)
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_backlog_and_oldest_unacked_visible_while_offline(mosquitto_factory, make_kit):
    down = mosquitto_factory(start=False)
    kit = make_kit([down.url])
    kit.capture(3)
    relay = kit.start_relay()
    wait_for(lambda: relay.status().get("backlog", {}).get("records") == 3, 6, "backlog in status")
    st = relay.status()
    assert st["state"] != "connected" and st["broker"] is None
    assert st["backlog"]["bytes"] > 3 * 30_000
    assert st["oldest_unacked_age_s"] is not None and st["oldest_unacked_age_s"] >= 0
    assert "connect failed" in st["last_error"]


def test_broker_restarted_mid_drain(mosquitto, make_kit, make_ingest, tmp_path):
    make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url], bytes_per_s=1_500_000)
    ids = kit.capture(30, size=100_000)
    kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] >= 5, 20, "drain under way")
    assert kit.counts()["acked"] < 30
    mosquitto.restart()  # drops every session; the ingest worker reconnects and resubscribes
    wait_for(lambda: kit.counts()["acked"] == 30, 40, "all acked after the restart")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    assert kit.relay.status()["connects"] >= 2


def test_broker_down_for_whole_capture_then_up(mosquitto_factory, make_kit, make_ingest, tmp_path):
    broker = mosquitto_factory(start=False)
    kit = make_kit([broker.url])
    kit.start_relay()
    ids = kit.capture(15)
    time.sleep(1.0)
    assert kit.counts()["stored"] == 15
    broker.start()
    make_ingest(broker.url)
    wait_for(lambda: kit.counts()["acked"] == 15, 30, "all acked once the broker is up")
    assert_delivered_once(kit, tmp_path / "archive", ids)


def test_uplink_flapping(mosquitto, make_kit, make_ingest, tmp_path):
    make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url], bytes_per_s=2_000_000)
    ids = kit.capture(25, size=80_000)
    kit.start_relay()
    for _ in range(4):
        time.sleep(0.6)
        mosquitto.stop()
        time.sleep(0.4)
        mosquitto.start()
    wait_for(lambda: kit.counts()["acked"] == 25, 60, "all acked after flapping")
    assert_delivered_once(kit, tmp_path / "archive", ids)


def test_ingest_down_records_stay_unacked_then_resent(mosquitto, make_kit, make_ingest, tmp_path):
    kit = make_kit([mosquitto.url], ack_timeout_s=1.0, ack_timeout_max_s=2.0)
    ids = kit.capture(8)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["sent"] == 8, 20, "all sent (PUBACKed by the broker)")
    time.sleep(1.5)
    assert kit.counts()["acked"] == 0, "a broker PUBACK must never count as delivery"
    w = make_ingest(mosquitto.url)
    wait_for(lambda: kit.counts()["acked"] == 8, 30, "all acked once ingest runs")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    assert relay.status()["counters"]["records_resent"] >= 8
    assert w.counters.stored == 8


def test_two_ingest_workers_share_one_subscription(mosquitto, make_kit, make_ingest, tmp_path):
    w1 = make_ingest(mosquitto.url)
    w2 = make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url], chunk_kb=16)
    ids = kit.capture(20, size=60_000)  # ~5 chunks each: chunks of one record land on both workers
    kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 20, 30, "all acked")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    assert w1.counters.chunks > 0 and w2.counters.chunks > 0, "the broker did not share the load"
    assert w1.counters.stored + w2.counters.stored == 20


def test_failover_to_second_broker_and_back(mosquitto_factory, make_kit, make_ingest, tmp_path):
    dc = mosquitto_factory(start=False)
    dr = mosquitto_factory()
    make_ingest(dr.url)
    kit = make_kit([dc.url, dr.url])
    first = kit.capture(6)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 6, 20, "records through the DR broker")
    assert relay.status()["broker"] == dr.url and relay.status()["broker_priority"] == 1
    dc.start()
    make_ingest(dc.url)
    wait_for(lambda: relay.status()["broker"] == dc.url, 10, "return to the data-center broker")
    second = kit.capture(6)
    wait_for(lambda: kit.counts()["acked"] == 12, 20, "records through the DC broker")
    dc.stop()
    third = kit.capture(4)
    wait_for(lambda: kit.counts()["acked"] == 16, 30, "records through the DR broker again")
    assert_delivered_once(kit, tmp_path / "archive", first + second + third)


def test_two_megabyte_record_in_chunks(mosquitto, make_kit, make_ingest, tmp_path):
    w = make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url], chunk_kb=128)
    ids = kit.capture(2, size=2_000_000)
    assert kit.store.j.get(ids[0]).size > 2_000_000
    kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 2, 30, "2 MB records acked")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    assert w.counters.chunks >= 2 * 16


def test_small_message_size_limit_shrinks_chunks(mosquitto_factory, make_kit, make_ingest, tmp_path):
    # message_size_limit is not announced in CONNACK. mosquitto 2.0 answers a too-big PUBLISH with PUBACK 0x95
    # (not a valid PUBACK reason in MQTT 5), which paho 2.2 turns into a protocol-error disconnect.
    broker = mosquitto_factory(message_size_limit=20_000)
    make_ingest(broker.url)
    kit = make_kit([broker.url], chunk_kb=128)
    ids = kit.capture(5, size=50_000)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 5, 40, "all acked through the small limit")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    st = relay.status()
    assert st["counters"]["chunk_shrinks"] >= 3  # 128 KiB -> 64 -> 32 -> 16 KiB
    assert st["chunk_bytes"] <= 20_000


def test_broker_max_packet_size_from_connack(mosquitto_factory, make_kit, make_ingest, tmp_path):
    broker = mosquitto_factory(max_packet_size=40_000)
    make_ingest(broker.url)
    kit = make_kit([broker.url], chunk_kb=128)
    ids = kit.capture(4, size=120_000)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 4, 30, "all acked")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    st = relay.status()
    assert st["chunk_bytes"] <= 40_000 - proto.PACKET_OVERHEAD
    assert st["counters"]["puback_failures"] == 0  # sized right from the start


def test_chunks_as_large_as_the_broker_max_packet_size_two_workers_archive_once(mosquitto_factory, make_kit,
                                                                                make_ingest, tmp_path):
    # Issue 17: a broker announcing a 1 MB Maximum Packet Size gets ~400 KB records in one message each (not
    # 128 KiB chunks + an announce), verified end to end; two workers of the shared group each archive whole
    # records, every record exactly once, with nothing staged.
    broker = mosquitto_factory(max_packet_size=1_000_000)
    w1 = make_ingest(broker.url)
    w2 = make_ingest(broker.url)
    kit = make_kit([broker.url])  # chunk_kb 128 (default), chunk_max_kb 1024 (default)
    ids = kit.capture(12, size=400_000)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 12, 30, "all acked")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    st = relay.status()
    assert 400_000 < st["chunk_bytes"] <= 1_000_000 - proto.PACKET_OVERHEAD
    assert st["counters"]["puback_failures"] == 0 and st["counters"]["records_resent"] == 0
    assert w1.counters.chunks + w2.counters.chunks == 12, "one message per record"
    assert w1.counters.chunks > 0 and w2.counters.chunks > 0, "the broker did not share the load"
    assert w1.counters.stored + w2.counters.stored == 12 and w1.counters.duplicate + w2.counters.duplicate == 0
    assert w1.staging.usage() == (0, 0)


def test_rejected_record_is_quarantined_and_does_not_block(mosquitto, make_kit, make_ingest, tmp_path):
    make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url])
    ids = kit.capture(6)
    bad = ids[2]
    # Flip a byte inside the sealed record and re-journal its hash: the kit's own hash check passes,
    # the kit signature does not (what a bug in sealing or a bad SD block rewritten by fsck would give).
    p = kit.store.sd_path(bad)
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF  # inside the ciphertext: layout intact, signature broken
    p.write_bytes(bytes(data))
    from firmware.wire.record_format import sha256_hex
    with kit.store.j.transaction() as c:
        c.execute("UPDATE records SET sha256 = ? WHERE id = ?", (sha256_hex(bytes(data)), bad))
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 5 and kit.counts()["quarantined"] == 1, 20, "5 acked, 1 quarantined")
    row = kit.store.j.get(bad)
    assert row.state == "quarantined" and "BadSignature" in row.reason
    assert relay.status()["last_rejects"][0]["record_id"] == bad
    good = [i for i in ids if i != bad]
    for rid in good:
        assert kit.store.j.get(rid).state == "acked"


def test_forged_ack_with_wrong_hash_is_ignored(mosquitto, make_kit):
    kit = make_kit([mosquitto.url])
    (rid,) = kit.capture(1)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["sent"] == 1, 10, "sent")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    # Signed by the data center's own ack key, but for other bytes: still not an ack of our record.
    pub.publish(proto.ack_topic(kit.kit_id), proto.Ack(rid, "0" * 64, "stored").encode(ACK_KEY),
                qos=1).wait_for_publish(5)
    pub.publish(proto.ack_topic(kit.kit_id), b"{not json", qos=1).wait_for_publish(5)
    wait_for(lambda: relay.status()["counters"]["acks_ignored"] >= 2, 5, "acks ignored")
    pub.loop_stop()
    pub.disconnect()
    assert kit.store.j.get(rid).state == "sent"


def test_bandwidth_cap_and_control_traffic_during_drain(mosquitto, make_kit, make_ingest, tmp_path):
    make_ingest(mosquitto.url)
    rate = 1_000_000
    kit = make_kit([mosquitto.url], bytes_per_s=rate, chunk_kb=32)
    ids = kit.capture(20)  # ~260 KB each without a corpus: ~5 MB at 1 MB/s
    total = sum(kit.store.j.get(i).size for i in ids)
    # A control-plane round trip (its own connection, as firmware.control does) while the backlog drains.
    latencies: list[float] = []
    got = threading.Event()
    ctl = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    ctl.on_message = lambda c, u, m: got.set()
    ctl.connect("127.0.0.1", mosquitto.port)
    ctl.subscribe(f"{proto.PREFIX}/{kit.kit_id}/cmd", qos=1)
    ctl.loop_start()
    try:
        t0 = time.monotonic()
        kit.start_relay()
        time.sleep(0.5)
        for _ in range(5):
            got.clear()
            s = time.monotonic()
            ctl.publish(f"{proto.PREFIX}/{kit.kit_id}/cmd", b"x" * 300, qos=1)
            assert got.wait(2), "control message stuck behind the drain"
            latencies.append(time.monotonic() - s)
            time.sleep(0.3)
        wait_for(lambda: kit.counts()["acked"] == 20, 30, "all acked")
        elapsed = time.monotonic() - t0
    finally:
        ctl.loop_stop()
        ctl.disconnect()
    assert_delivered_once(kit, tmp_path / "archive", ids)
    # The bucket allows one chunk of debt plus a burst of one second at most.
    assert elapsed >= (total - rate - 40_000) / rate, f"drained {total} B in {elapsed:.2f} s, above {rate} B/s"
    assert max(latencies) < 0.5


def test_corrupt_sd_copy_is_quarantined_by_the_kit_and_skipped(mosquitto, make_kit, make_ingest, tmp_path):
    make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url])
    ids = kit.capture(5)
    bad = ids[1]
    p = kit.store.sd_path(bad)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # bit rot on the SD: the journal hash no longer matches
    p.write_bytes(bytes(data))
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 4, 20, "the 4 good records acked")
    row = kit.store.j.get(bad)
    assert row.state == "quarantined" and "does not match" in row.reason
    assert relay.status()["counters"]["read_errors"] == 1
    assert not p.exists() and (kit.store.quarantine_dir / p.name).exists()  # moved, never deleted
    from provisioning.archive import Archive

    a = Archive(tmp_path / "archive")
    assert sorted(a.record_ids(kit.kit_id)) == sorted(i for i in ids if i != bad)
    a.close()


def test_window_respects_broker_receive_maximum(mosquitto_factory, make_kit, make_ingest, tmp_path):
    # mosquitto announces max_inflight_messages as Receive Maximum; exceeding it gets the client disconnected
    # (0x93), which paho does not prevent: the relay must bound its window itself.
    broker = mosquitto_factory(extra="max_inflight_messages 4\n")
    make_ingest(broker.url)
    kit = make_kit([broker.url], window=64, chunk_kb=16)
    ids = kit.capture(6)
    relay = kit.start_relay()
    peak = 0
    t_end = time.monotonic() + 30
    while kit.counts()["acked"] < 6 and time.monotonic() < t_end:
        peak = max(peak, relay.status()["in_flight_messages"])
        time.sleep(0.002)
    assert_delivered_once(kit, tmp_path / "archive", ids)
    st = relay.status()
    assert st["window"] == 4 and peak <= 4
    assert st["connects"] == 1, "the broker disconnected the relay"


def test_relay_crash_mid_drain_is_restarted_by_the_supervisor(mosquitto, make_kit, make_ingest, tmp_path, caplog):
    # The relay has no restart loop of its own: a crash ends its thread, health() says failed, and the
    # daemon's one supervisor restarts it with backoff. In flight transfers are resent from the store.
    from firmware.system.service import Supervisor

    make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url], bytes_per_s=1_000_000)
    ids = kit.capture(20, size=100_000)
    relay = kit.start_relay()
    kit.relay = None  # the supervisor owns it now
    relay.stop()
    real_step, crashes = relay._handle_events, []

    def step_that_crashes_once(*a, **kw):
        if not crashes and relay.counters["records_sent"] >= 3:
            crashes.append(1)
            raise OSError("simulated fault in the relay loop")
        return real_step(*a, **kw)

    relay._handle_events = step_that_crashes_once
    sup = Supervisor([relay], backoff_lo=0.2, backoff_hi=1.0, check_s=0.05)
    sup.start()
    try:
        wait_for(lambda: crashes and sup.status()["relay"]["restarts"] == 1, 20, "crash and one restart")
        assert "simulated fault" in sup.status()["relay"]["last_error"]
        wait_for(lambda: kit.counts()["acked"] == 20, 30, "all acked after the restart")
        assert_delivered_once(kit, tmp_path / "archive", ids)
        assert any("service crashed service=relay" in r.getMessage() for r in caplog.records)
    finally:
        sup.stop()
    assert relay.health()["state"] == "stopped"
