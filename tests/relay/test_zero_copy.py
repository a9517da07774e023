"""The relay's send path (issue 17): records read from the SD straight into reusable MQTT packet buffers."""

from __future__ import annotations

import os

from firmware.relay import relay as relay_mod
from firmware.system.mqtt import PacketBuffer
from tests.relay.conftest import assert_delivered_once, wait_for


def test_read_exactly_fills_views_and_checks_the_length(tmp_path) -> None:
    # More views than one readv takes (IOV_BATCH): the file must end exactly where the views do.
    data = os.urandom(700 * 10)
    p = tmp_path / "r"
    for content, ok in ((data, True), (data[:-1], False), (data + b"x", False), (b"", False)):
        p.write_bytes(content)
        bufs = [bytearray(10) for _ in range(700)]
        fd = os.open(p, os.O_RDONLY)
        try:
            got = relay_mod._read_exactly(fd, [memoryview(b) for b in bufs])
        finally:
            os.close(fd)
        assert got is ok, f"{len(content)} bytes"
        if ok:
            assert b"".join(bufs) == data


def test_sd_copy_of_another_length_is_quarantined_not_sent(mosquitto, make_kit, make_ingest, tmp_path) -> None:
    # The direct read trusts nothing but the journal: a copy with bytes appended (its first `size` bytes still hash
    # right) or cut short goes the way of any corrupt copy (read_verified quarantines it); the others, in many
    # chunks each, arrive byte-identical.
    make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url], chunk_kb=16)
    ids = kit.capture(6)
    longer, shorter = ids[1], ids[4]
    with kit.store.sd_path(longer).open("ab") as f:
        f.write(b"tail")
    p = kit.store.sd_path(shorter)
    p.write_bytes(p.read_bytes()[:-1])
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 4 and kit.counts()["quarantined"] == 2, 30, "4 acked, 2 quarantined")
    for rid in (longer, shorter):
        row = kit.store.j.get(rid)
        assert row.state == "quarantined" and "does not match" in row.reason
    assert relay.status()["counters"]["read_errors"] == 2
    kit.stop_relay()
    assert_delivered_once(kit, tmp_path / "archive", [i for i in ids if i not in (longer, shorter)])


def test_message_buffers_are_reused_across_a_drain(mosquitto, make_kit, make_ingest, tmp_path, monkeypatch) -> None:
    # Every chunk of a drain goes out of a PacketBuffer; a buffer whose PUBACK came serves again, so a drain
    # allocates about what it has in use at once (window + records read ahead), not one buffer per chunk
    # (fresh memory to fault in for every message).
    made: list[int] = []

    class Counted(PacketBuffer):
        __slots__ = ()

        def __init__(self, topic: str, capacity: int) -> None:
            made.append(capacity)
            super().__init__(topic, capacity)

    monkeypatch.setattr(relay_mod, "PacketBuffer", Counted)
    make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url], chunk_kb=16, window=4)
    ids = kit.capture(20)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 20, 60, "20 records acked")
    chunks = sum(-(-kit.store.j.get(i).size // (16 * 1024)) for i in ids)
    sent = relay.status()["counters"]["bytes_sent"]
    kit.stop_relay()
    assert_delivered_once(kit, tmp_path / "archive", ids)
    assert chunks >= 300 and sent >= sum(kit.store.j.get(i).size for i in ids)
    assert made, "no chunk went out of a PacketBuffer"
    assert len(made) <= chunks // 2, f"{len(made)} buffers made for {chunks} chunks"
