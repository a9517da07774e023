"""The one MQTT adapter (firmware/system/mqtt.py) against real mosquitto brokers."""

from __future__ import annotations

import random
import socket
import threading
import time

from firmware.system.mqtt import Broker, Event, Message, MqttLink, MqttSettings, PacketBuffer, Will


def _until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _broker(m) -> Broker:
    return Broker.parse(m.url)


def test_broker_parse() -> None:
    assert Broker.parse("mqtts://dc.example") == Broker("dc.example", 8883, True)
    assert Broker.parse("mqtt://[::1]:1884") == Broker("::1", 1884, False)
    assert Broker.parse("10.0.0.1:8884") == Broker("10.0.0.1", 8884, True)
    assert Broker("::1", 1884, False).url == "mqtt://[::1]:1884"


def test_own_thread_publish_from_many_threads_and_handlers(mosquitto) -> None:
    got: list[tuple[str, bytes, bytes | None]] = []
    other: list[str] = []
    link = MqttLink(MqttSettings([_broker(mosquitto)], "t-own", subscriptions=[("t/#", 1)], tcp_nodelay=True))
    link.handle("t/x", lambda m: got.append((m.topic, m.payload, m.correlation)))
    link.on_message = lambda m: other.append(m.topic)
    connects: list[str] = []
    link.on_connect = lambda: connects.append(link.broker.url)
    link.start()
    try:
        assert link.ready.wait(10)
        assert connects == [mosquitto.url] and link.health()["state"] == "connected"
        d = link.publish("t/x", b"1", correlation=b"c1")
        assert d.wait(5) and d.ok and d.reason == 0
        results = []

        def pub() -> None:
            results.extend(link.publish("t/y", b"%d" % i) for i in range(100))

        threads = [threading.Thread(target=pub) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert link.flush(10)
        assert len(results) == 300 and all(r.ok for r in results)
        assert _until(lambda: len(other) == 300, 5)
        assert got == [("t/x", b"1", b"c1")]
    finally:
        link.stop()
    assert link.health()["state"] == "disconnected"


def test_failover_queue_and_return_to_preferred(mosquitto_factory) -> None:
    first, second = mosquitto_factory(), mosquitto_factory()
    link = MqttLink(MqttSettings([_broker(first), _broker(second)], "t-fail", probe_interval_s=0.5,
                                 backoff_min_s=0.1, backoff_max_s=0.5))
    link.start()
    try:
        assert _until(lambda: link.connected and link.index == 0)
        first.stop()
        assert _until(lambda: link.connected and link.index == 1)
        assert link.publish("a", b"on the fallback").wait(5)
        first.start()
        assert _until(lambda: link.connected and link.index == 0)
        assert link.connects >= 3
    finally:
        link.stop()


def test_publish_while_down_waits_for_the_connection(mosquitto) -> None:
    mosquitto.stop()
    link = MqttLink(MqttSettings([_broker(mosquitto)], "t-queue", backoff_min_s=0.1, backoff_max_s=0.3))
    link.start()
    try:
        d = link.publish("q", b"later")
        time.sleep(0.3)
        assert not d.done and link.health()["queued"] == 1
        mosquitto.start()
        assert d.wait(10) and d.ok
    finally:
        link.stop()


def test_refused_publish_is_surfaced(mosquitto_factory, tmp_path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite ok/#\n")
    m = mosquitto_factory(extra=f"acl_file {acl}\n")
    link = MqttLink(MqttSettings([_broker(m)], "t-acl"))
    link.start()
    try:
        assert link.ready.wait(10)
        assert link.publish("ok/1", b"x").wait(5)
        d = link.publish("denied/1", b"x")
        assert d.wait(5) and not d.ok and d.reason is not None and d.reason >= 0x80
    finally:
        link.stop()


def test_owner_thread_step_events_and_connack_limits(mosquitto_factory) -> None:
    m = mosquitto_factory(max_packet_size=50_000)
    link = MqttLink(MqttSettings([_broker(m)], "t-step", subscriptions=[("s", 1)]))
    assert _step_until(link, lambda: link.connected)
    assert link.max_packet == 50_000 and link.receive_maximum > 0
    mid = link.send("s", b"hello")
    assert mid is not None
    assert _step_until(link, lambda: {"puback", "message"} <= {e.kind for e in link.events})
    msgs = [e.message for e in link.events if e.kind == "message"]
    assert isinstance(msgs[0], Message) and msgs[0].payload == b"hello"
    assert any(e.kind == "puback" and e.mid == mid and e.reason == 0 for e in link.events)
    link.close()
    assert not link.connected and link.send("s", b"x") is None


def _step_until(link: MqttLink, cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        link.step(0.05)
        if cond():
            return True
    return False


def test_last_will_is_made_at_every_connect(mosquitto) -> None:
    n = [0]

    def will() -> Will:
        n[0] += 1
        return Will("w", b"dead-%d" % n[0])

    seen: list[bytes] = []
    watcher = MqttLink(MqttSettings([_broker(mosquitto)], "t-watch", subscriptions=[("w", 1)]))
    watcher.on_message = lambda m: seen.append(m.payload)
    watcher.start()
    link = MqttLink(MqttSettings([_broker(mosquitto)], "t-will", will=will, backoff_min_s=0.1, backoff_max_s=0.2))
    link.start()
    try:
        assert watcher.ready.wait(10) and _until(lambda: link.connected)
        link.client.socket().shutdown(socket.SHUT_RDWR)  # dies without a DISCONNECT: the broker sends the will
        assert _until(lambda: b"dead-1" in seen)
        assert _until(lambda: link.connected and n[0] == 2)
        link.reconnect()  # a clean reconnect sends no will
        assert _until(lambda: n[0] == 3 and link.connected)
        time.sleep(0.3)
        assert seen.count(b"dead-2") == 0
    finally:
        link.stop()
        watcher.stop()


def test_requested_reconnect_lets_earlier_publishes_out_first(mosquitto) -> None:
    # A key rotation publishes its result, then asks for a reconnect (new will): the result must not be lost.
    seen: list[bytes] = []
    watcher = MqttLink(MqttSettings([_broker(mosquitto)], "t-watch2", subscriptions=[("r/#", 1)]))
    watcher.on_message = lambda m: seen.append(m.payload)
    watcher.start()
    link = MqttLink(MqttSettings([_broker(mosquitto)], "t-reconn", backoff_min_s=0.1, backoff_max_s=0.2))
    link.start()
    try:
        assert watcher.ready.wait(10) and _until(lambda: link.connected)
        for round_ in range(20):
            ds = [link.publish("r/x", b"%d-%d" % (round_, i)) for i in range(5)]
            link.reconnect()
            assert all(d.wait(10) and d.ok for d in ds), [d for d in ds if not d.ok]
            assert _until(lambda: link.connected)
        assert _until(lambda: len(seen) == 100)
    finally:
        link.stop()
        watcher.stop()


def test_io_thread_mode_sender_consumes_events_and_wakeups(mosquitto) -> None:
    # start(dispatch=False) (the relay): the link's own thread reads the network and only queues events; the
    # caller sends and consumes them. PUBACKs come in batches: fewer wake-ups than messages. A stopped link
    # starts again (its stop of the last run must not stop the next: the relay's restart after a crash).
    handled: list[str] = []
    link = MqttLink(MqttSettings([_broker(mosquitto)], "t-io", subscriptions=[("io/#", 1)], max_inflight=65535))
    link.on_message = lambda m: handled.append(m.topic)  # never called in this mode
    for round_ in range(2):
        link.start(dispatch=False, tick=0.05)
        try:
            assert _until(lambda: link.ready.is_set())
            kinds: list[str] = []
            acked: set[int] = set()
            sent: set[int] = set()
            wakeups = 0
            payload = bytes(200_000)
            while len(acked) < 200:
                while len(sent) < 200 and len(sent) - len(acked) < 20:
                    mid = link.send("io/x", payload)
                    assert mid is not None
                    sent.add(mid)
                link.wakeup.clear()
                if not link.events:
                    assert link.wakeup.wait(5), f"no wake-up with {len(sent) - len(acked)} messages in flight"
                    wakeups += 1
                while link.events:
                    e = link.events.popleft()
                    kinds.append(e.kind)
                    if e.kind == "puback":
                        assert e.reason == 0 and e.mid in sent
                        acked.add(e.mid)
            assert wakeups < 200, "one wake-up per PUBACK"
            seen = kinds.count("message")
            assert _until(lambda seen=seen: seen + sum(e.kind == "message" for e in link.events) == 200)
            assert handled == [], "a handler ran on the I/O thread"
        finally:
            link.stop()
        assert not link.running and not link.connected, f"round {round_}: not stopped"


def _drain_messages(link: MqttLink, want: int, puback: int | None = None, timeout: float = 10.0) -> list[Event]:
    """Owner-thread mode: step until `want` message events (and the PUBACK of `puback`) came; every event seen."""
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (sum(e.kind == "message" for e in seen) < want or (
            puback is not None and not any(e.kind == "puback" and e.mid == puback for e in seen))):
        link.step(0.05)
        while link.events:
            seen.append(link.events.popleft())
    return seen


def test_packet_buffer_goes_out_in_place_and_arrives_intact(mosquitto) -> None:
    # A PacketBuffer's payload is written to the socket from the buffer itself (a view: no copy of the payload in
    # user space), its header paho's own; the subscriber gets exactly the payload, at every length of MQTT's
    # remaining-length field (1 to 4 bytes), QoS 0 and 1; the same buffer serves again once its PUBACK came.
    link = MqttLink(MqttSettings([_broker(mosquitto)], "t-zc", subscriptions=[("zc/#", 1)], max_inflight=65535))
    assert link.connect(0)
    assert _until(lambda: (link.step(0.05), link.ready.is_set())[1])
    writes: list[object] = []
    sock_send = link.client._sock_send

    def record(buf):  # instrumentation on the real socket: what paho hands the kernel
        writes.append(buf.obj if isinstance(buf, memoryview) else buf)
        return sock_send(buf)

    link.client._sock_send = record
    topic = "zc/" + "t" * 40
    buf = PacketBuffer(topic, 2_200_000)
    try:
        for n, qos in ((0, 1), (5, 0), (100, 1), (20_000, 1), (300_000, 0), (2_100_000, 1)):
            data = bytes(random.Random(n).getrandbits(8) for _ in range(min(n, 4096))) * (-(-n // 4096) or 1)
            data = data[:n]
            buf.body[:n] = data
            buf.size = n
            writes.clear()
            link.events.clear()
            mid = link.send(topic, buf, qos=qos)
            assert mid is not None
            events = _drain_messages(link, 1, mid if qos else None)
            got = [e.message for e in events if e.kind == "message"]
            assert len(got) == 1 and got[0].topic == topic and got[0].payload == data, f"{n} bytes, QoS {qos}"
            if qos:
                assert any(e.kind == "puback" and e.mid == mid and e.reason == 0 for e in events)
            # Our PUBLISH went from the buffer; the other writes are our PUBACKs of the incoming copies (4 bytes).
            assert any(w is buf for w in writes), f"{n} bytes: the payload was copied before the socket"
            assert all(w is buf or len(w) < 16 for w in writes)
        # A topic other than the buffer's: the same bytes, copied (paho's own path).
        buf.body[:3] = b"abc"
        buf.size = 3
        link.events.clear()
        assert link.send("zc/other", buf, qos=1) is not None
        got = [e.message for e in _drain_messages(link, 1) if e.kind == "message"]
        assert [(m.topic, m.payload) for m in got] == [("zc/other", b"abc")]
    finally:
        link.close()


def test_packet_buffer_without_paho_hooks_is_copied(mosquitto, monkeypatch) -> None:
    # A paho whose internals differ (no hooks): a PacketBuffer still goes out, as a plain copy of its payload.
    from firmware.system import mqtt as mqtt_mod

    monkeypatch.setattr(mqtt_mod, "_CLIENT_CLASS", [None])
    link = MqttLink(MqttSettings([_broker(mosquitto)], "t-nozc", subscriptions=[("nozc/#", 1)]))
    assert link.connect(0)
    assert _until(lambda: (link.step(0.05), link.ready.is_set())[1])
    try:
        assert type(link.client).__name__ == "Client"
        buf = PacketBuffer("nozc/x", 1000)
        buf.body[:5] = b"hello"
        buf.size = 5
        assert link.send("nozc/x", buf, qos=1) is not None
        got = [e.message for e in _drain_messages(link, 1) if e.kind == "message"]
        assert [(m.topic, m.payload) for m in got] == [("nozc/x", b"hello")]
    finally:
        link.close()
