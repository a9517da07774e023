"""The wire format and the archive without a broker: validation, idempotency, races, conflicts, expiry."""

from __future__ import annotations

import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware import config
from firmware.capture.simulated import SimulatedCapture
from firmware.errors import ArchiveError
from firmware.seal import identity
from firmware.wire import record_format
from firmware.wire import relay_protocol as proto
from provisioning.archive import Archive, UnknownKit
from provisioning.ingest import Staging

RID = "rk-abcdefghjk-00000042-20261129T040000Z"
SHA = "ab" * 32


def test_chunks_round_trip_and_cover_the_record():
    data = bytes(range(256)) * 1000
    chunks = proto.split(RID, data, record_format.sha256_hex(data), 40_000)
    assert len(chunks) == 7 and chunks[-1].index == 6
    back = [proto.Chunk.decode(c.encode()) for c in chunks]
    assert b"".join(c.data for c in back) == data
    assert back[3].offset == 120_000 and back[3].total == 7


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:-1], "bytes, expected"),
    (lambda b: b[:4] + b"\xff\xff" + b[6:], "header length"),
])
def test_chunk_decode_names_the_problem(mangle, message):
    c = proto.split(RID, b"x" * 1000, SHA, 300)[1].encode()
    with pytest.raises(proto.ProtocolError, match=message):
        proto.Chunk.decode(mangle(c))


def test_announce_and_ack_validation():
    a = proto.Announce(RID, 42, 1000, SHA, 4, 300)
    assert proto.Announce.decode(a.encode()) == a
    with pytest.raises(proto.ProtocolError, match="chunks does not fit"):
        proto.Announce.decode(proto.Announce(RID, 42, 1000, SHA, 3, 300).encode())
    with pytest.raises(proto.ProtocolError, match="unknown status"):
        proto.Ack.decode(b'{"v": 2, "record_id": "%s", "sha256": "%s", "status": "maybe"}' % (RID.encode(),
                                                                                             SHA.encode()))
    with pytest.raises(proto.ProtocolError, match="bad record_id"):
        proto.Ack.decode(b'{"v": 2, "record_id": "../etc", "sha256": "%s", "status": "stored"}' % SHA.encode())
    key = Ed25519PrivateKey.generate()
    with pytest.raises(proto.ProtocolError, match="protocol version"):
        proto.Ack.decode(proto.Ack(RID, SHA, "stored").encode(key).replace(b'"v": 2', b'"v": 3'))


def test_topics_and_broker_urls():
    assert proto.parse_records_topic("rekam/v1/rk-abc/records/chunk") == ("rk-abc", "chunk")
    with pytest.raises(proto.ProtocolError):
        proto.parse_records_topic("rekam/v1/rk-abc/acks")
    assert proto.shared_records_filter("dc1") == "$share/dc1/rekam/v1/+/records/+"
    with pytest.raises(proto.ProtocolError):
        proto.shared_records_filter("a/b")
    assert proto.parse_broker_url("mqtts://dc.example.org").port == 8883
    assert proto.parse_broker_url("mqtt://[::1]:1884").host == "::1"
    with pytest.raises(ValueError, match="expected mqtt"):
        proto.parse_broker_url("http://dc")
    assert proto.chunk_data_limit(128 * 1024, 40_000, "t") == 40_000 - proto.PACKET_OVERHEAD - 1
    assert proto.chunk_data_limit(128 * 1024, None, "t") == 128 * 1024


def test_relay_config_errors_are_named():
    with pytest.raises(config.ConfigError, match="relay.brokers"):
        config.validate({"relay": {"brokers": ["tcp://x:1"]}})
    with pytest.raises(config.ConfigError, match="relay.chunk_kb"):
        config.validate({"relay": {"chunk_kb": 1}})


@pytest.fixture
def sealed(tmp_path):
    """Three sealed records of one kit (no store needed: sealing is pure)."""
    ident = identity.load_or_create(tmp_path / "kit")
    _priv, pub = record_format.generate_datacenter_keypair()
    rpk = record_format.load_recipient_key(pub)
    cap = SimulatedCapture(None, seed=1, pad_to=5000)
    out = []
    for seq in range(1, 4):
        rid = f"{ident.kit_id}-{seq:08d}-20261129T040000Z"
        out.append((rid, record_format.seal(cap.capture().encode(), record_id=rid, kit_id=ident.kit_id, seq=seq,
                                            created="2026-11-29T04:00:00Z", clock_synced=True,
                                            signing_key=ident.signing_key, recipients=[rpk])))
    return ident, out


def test_archive_unknown_kit_tofu_duplicate_and_conflict(tmp_path, sealed):
    ident, recs = sealed
    a = Archive(tmp_path / "arch")
    rid, data = recs[0]
    with pytest.raises(UnknownKit, match="register-kit"):
        a.store(data, ident.kit_id, "test", expect_record_id=rid)
    a.tofu = True
    assert a.store(data, ident.kit_id, "test", expect_record_id=rid).status == "stored"
    assert a.kits()[0]["how"] == "tofu"
    assert a.store(data, ident.kit_id, "test", expect_record_id=rid).status == "duplicate"
    # Same record id, different (validly signed) bytes: rejected, both copies kept.
    other = recs[1][1]
    r = a.store(other, ident.kit_id, "test")
    assert r.status == "stored"  # it is another record id: fine
    r = a.store(data, "rk-someoneelse", "test", expect_record_id=rid)
    assert r.status == "rejected" and "belongs to kit" in r.reason
    _priv, pub = record_format.generate_datacenter_keypair()
    twin = record_format.seal(b"other payload", record_id=rid, kit_id=ident.kit_id, seq=1,
                              created="2026-11-29T04:00:00Z", clock_synced=True, signing_key=ident.signing_key,
                              recipients=[record_format.load_recipient_key(pub)])
    r = a.store(twin, ident.kit_id, "test", expect_record_id=rid)
    assert r.status == "rejected" and "already archived" in r.reason
    assert a.has(rid) == record_format.sha256_hex(data)  # the archived copy is untouched
    assert len(list((tmp_path / "arch" / "conflicts").iterdir())) == 1
    with pytest.raises(ValueError, match="another key"):
        a.register_kit(ident.kit_id, "A" * 43 + "=")
    a.close()


def test_archive_reads_back_and_lists_since_a_cursor(tmp_path, sealed):
    ident, recs = sealed
    a = Archive(tmp_path / "arch", tofu=True)
    assert a.since() == []
    for rid, data in recs[:2]:
        a.store(data, ident.kit_id, "test", expect_record_id=rid)
    first = a.since()
    assert [r.record_id for r in first] == [recs[0][0], recs[1][0]]
    assert a.read(recs[1][0]) == recs[1][1]
    assert a.since(first[-1].cursor) == []
    a.store(recs[2][1], ident.kit_id, "test", expect_record_id=recs[2][0])
    assert [r.record_id for r in a.since(first[-1].cursor)] == [recs[2][0]]
    assert [r.record_id for r in a.since(None, limit=1)] == [recs[0][0]]
    with pytest.raises(KeyError):
        a.read(ident.kit_id + "-99999999-20261129T040000Z")
    # A damaged file is never handed on.
    path = a.path_of(ident.kit_id, recs[0][0])
    raw = path.read_bytes()
    path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    with pytest.raises(ArchiveError, match="no longer matches"):
        a.read(recs[0][0])
    a.close()


def test_two_writers_racing_store_once(tmp_path, sealed):
    ident, recs = sealed
    a0 = Archive(tmp_path / "arch")
    a0.register_kit(ident.kit_id, ident.public_key_b64)
    a0.close()
    results: list[str] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        a = Archive(tmp_path / "arch")
        barrier.wait()
        for rid, data in recs:
            results.append(a.store(data, ident.kit_id, "race", expect_record_id=rid).status)
        a.close()

    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results.count("stored") == 3 and results.count("duplicate") == 9
    a = Archive(tmp_path / "arch")
    assert a.count() == 3
    a.close()


def test_staging_completes_once_and_expires(tmp_path):
    st = Staging(tmp_path / "staging.db")
    chunks = proto.split(RID, b"y" * 1000, SHA, 400)
    assert [st.add("rk-k", c) for c in chunks] == [False, False, True]
    assert st.assemble(RID, SHA, 3) == b"y" * 1000
    st.drop(RID, SHA)
    st.add("rk-k", chunks[0])
    assert st.pending() == 1
    time.sleep(0.05)
    assert st.expire(0.01) == 1 and st.pending() == 0
    st.close()


def test_archive_rejects_a_hostile_header_and_keeps_a_printable_reason(tmp_path, sealed):
    """A record whose unsigned header is hostile (deep, an overflowing number, a forged log line in its id) is
    answered "rejected", never an exception that leaves the kit without an answer; the rejection stored and
    logged is printable and bounded."""
    from tests.store.test_record_format import _header, _with_header
    ident, recs = sealed
    a = Archive(tmp_path / "arch", tofu=True)
    rid = recs[0][0]
    assert a.store(recs[0][1], ident.kit_id, "test", expect_record_id=rid).status == "stored"
    for bad in (_with_header(b"[" * 60_000), _with_header(_header(seq="SEQ")),
                _with_header(_header(record_id="x\nrecord archived FORGED" + "y" * 5000), tail=80)):
        r = a.store(bad, ident.kit_id, "test", expect_record_id=f"{ident.kit_id}-00000009-20261129T040000Z")
        assert r.status == "rejected" and "\n" not in r.reason and len(r.reason) <= 2000, r
    reasons = [row[0] for row in a.conn.execute("SELECT reason FROM rejects")]
    assert len(reasons) == 3 and all("\n" not in x for x in reasons)
    a.close()
