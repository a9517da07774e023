"""Issue 14.2: ONE staging suite over both implementations, the embedded SQLite `Staging` and the PostgreSQL
`PgStaging` that stateless ingest workers on different hosts share: completion seen by exactly one inserter,
chunks from different workers assembled into one record, caps per kit and in total (also when 4 processes
admit at once), TTL expiry; a transfer's geometry fixed by its first chunk (a kit cannot stage past its cap with
chunks that announce another size), also for transfers staged before the geometry was stored."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.errors import ArchiveError, ProtocolError
from firmware.wire import relay_protocol as proto
from firmware.wire.ids import make_record_id
from provisioning.staging import InconsistentChunk, Staging, StagingFull, StagingLimits, StagingStore

KIT = "rk-abcdefghjk"
OTHER = "rk-mnpqrstvwx"


def rid(seq: int, kit: str = KIT) -> str:
    return make_record_id(kit, seq, "20261201T000000Z")


def _open(spec: str, limits: StagingLimits | None = None) -> StagingStore:
    if spec.startswith("postgresql://"):
        from provisioning.staging_pg import PgStaging

        return PgStaging(spec, limits)
    return Staging(Path(spec), limits)


@pytest.fixture(params=["sqlite", "postgresql"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "staging.db") if request.param == "sqlite" else request.getfixturevalue("pg_database")


@pytest.fixture
def staging(spec: str) -> Iterator[Callable[..., StagingStore]]:
    made: list[StagingStore] = []

    def make(limits: StagingLimits | None = None) -> StagingStore:
        made.append(_open(spec, limits))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_chunks_from_two_workers_complete_once_and_expire(staging):
    w1, w2 = staging(), staging()  # two workers, each its own handle
    data = bytes(range(256)) * 8
    sha = "ab" * 32
    chunks = proto.split(rid(1), data, sha, 700)
    assert len(chunks) == 3
    assert [w1.add(KIT, chunks[0]), w2.add(KIT, chunks[2]), w1.add(KIT, chunks[1])] == [False, False, True]
    assert w2.assemble(rid(1), sha, 3) == data
    assert w1.usage(KIT) == (1, len(data)) and w2.pending() == 1
    w2.drop(rid(1), sha)
    assert w1.usage() == (0, 0) and w1.pending() == 0
    w1.add(KIT, chunks[0])
    time.sleep(0.05)
    assert w2.expire(3600) == 0 and w2.pending() == 1
    assert w2.expire(0.01) == 1 and w1.pending() == 0 and w1.usage() == (0, 0)


def test_caps_per_kit_and_in_total(staging):
    st = staging(StagingLimits(kit_bytes=3000, kit_transfers=2, total_bytes=10_000, total_transfers=3))
    c = [proto.split(rid(i), b"x" * 1000, f"{i:064x}", 400)[0] for i in range(1, 5)]
    assert not st.add(KIT, c[0]) and not st.add(KIT, c[1])
    with pytest.raises(StagingFull) as e:
        st.add(KIT, c[2])
    assert e.value.scope == "kit_transfers"
    assert st.add(KIT, proto.split(rid(1), b"x" * 1000, f"{1:064x}", 400)[1]) is False  # an admitted one goes on
    assert not st.add(OTHER, proto.split(rid(1, OTHER), b"y" * 1000, "cd" * 32, 400)[0])
    with pytest.raises(StagingFull) as e:
        st.add(OTHER, proto.split(rid(2, OTHER), b"y" * 1000, "ef" * 32, 400)[0])
    assert e.value.scope == "total_transfers"
    big = proto.split(rid(3, OTHER), b"z" * 4000, "12" * 32, 400)[0]
    assert st.usage() == (3, 3000) and st.usage(KIT) == (2, 2000)
    st.drop(rid(1), f"{1:064x}")
    with pytest.raises(StagingFull) as e:
        staging(StagingLimits(kit_bytes=3000, kit_transfers=2, total_bytes=5500, total_transfers=9)).add(OTHER, big)
    assert e.value.scope == "kit_bytes"


def _admit_worker(spec: str, kit: str, first: int, barrier: Any, out: Any) -> None:
    st = _open(spec, StagingLimits(kit_bytes=1 << 30, kit_transfers=5, total_bytes=1 << 30, total_transfers=8))
    ok = full = 0
    try:
        barrier.wait(60)
        for i in range(first, first + 6):
            try:
                st.add(kit, proto.split(rid(i, kit), b"x" * 1000, f"{i:064x}", 400)[0])
                ok += 1
            except StagingFull:
                full += 1
        out.put((ok, full))
    except Exception as e:  # noqa: BLE001  (reported to the parent)
        out.put((repr(e), 0))
    finally:
        st.close()


def test_caps_hold_when_four_processes_admit_at_once(spec):
    """4 workers (processes) admitting 24 new transfers of two kits at once: never more than the caps."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    jobs = [(KIT, 1), (KIT, 101), (OTHER, 1), (OTHER, 101)]
    procs = [ctx.Process(target=_admit_worker, args=(spec, k, f, barrier, out)) for k, f in jobs]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(isinstance(ok, int) for ok, _ in results), results
    assert sum(ok for ok, _ in results) == 8 and sum(full for _, full in results) == 16
    st = _open(spec)
    try:
        assert st.usage()[0] == 8 and st.usage(KIT)[0] <= 5 and st.usage(OTHER)[0] <= 5
    finally:
        st.close()


MIB = 1024 * 1024


def _sql(st: StagingStore, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run `sql` (``?`` placeholders, table names of the SQLite staging) on either backend's own tables."""
    if isinstance(st, Staging):
        rows = st.conn.execute(sql, args).fetchall()
        st.conn.commit()
        return rows
    sql = sql.replace("?", "%s").replace("chunks", "staging_chunks").replace("transfers", "staging_transfers")
    with st.db.conn() as conn:  # type: ignore[attr-defined]
        cur = conn.execute(sql, args)
        return cur.fetchall() if cur.description else []


def _staged_bytes(st: StagingStore, kit: str | None = None) -> int:
    sql = "SELECT COALESCE(SUM(length(data)), 0) FROM chunks" + (" WHERE kit_id = ?" if kit else "")
    return int(_sql(st, sql, (kit,) if kit else ())[0][0])


def test_chunks_announcing_another_size_cannot_stage_past_the_kit_cap(staging):
    """The review's attack: a 2-byte transfer admitted by its first chunk, then 1 MiB chunks of the same record id
    and hash announcing 64 MiB, the last never sent. Before the fix each one was staged against the 2 bytes
    reserved (20 MiB against a 1 MiB cap) and kept the transfer alive past its TTL."""
    st = staging(StagingLimits(kit_bytes=MIB, kit_transfers=128, total_bytes=1 << 30, total_transfers=4096))
    sha = "66" * 32
    assert st.add(KIT, proto.Chunk(rid(1), sha, 2, 0, 2, 1, b"a")) is False
    time.sleep(0.3)
    for idx in range(1, 21):
        with pytest.raises(InconsistentChunk) as e:
            st.add(KIT, proto.Chunk(rid(1), sha, 64 * MIB, idx, 64, MIB, b"\0" * MIB))
        assert e.value.field == "size" and "size" in str(e.value)
    assert st.usage(KIT) == (1, 2) and _staged_bytes(st, KIT) == 1 <= MIB
    # The refused chunks did not keep the transfer alive: it expires 0.3 s after its only good chunk.
    assert st.expire(0.2) == 1 and st.usage() == (0, 0) and _staged_bytes(st) == 0


@pytest.mark.parametrize("field", ["kit", "size"])
def test_a_chunk_of_another_geometry_is_refused_and_the_transfer_survives(staging, field):
    """A hostile duplicate of a genuine transfer (same record id and hash, another kit or size) is refused
    with an error naming what differed, stages nothing, and the genuine transfer still completes."""
    w1, w2 = staging(), staging()
    data, sha = bytes(range(250)) * 4, "77" * 32
    good = proto.split(rid(1), data, sha, 400)
    assert len(good) == 3 and w1.add(KIT, good[0]) is False
    hostile = {"kit": (OTHER, proto.Chunk(rid(1), sha, 1000, 1, 3, 400, b"h" * 400)),
               "size": (KIT, proto.Chunk(rid(1), sha, 1200, 1, 3, 400, b"h" * 400))}[field]
    with pytest.raises(InconsistentChunk) as e:
        w2.add(*hostile)
    assert e.value.field == field and f": {field}: " in str(e.value) and rid(1) in str(e.value)
    # The ingest drops it like a chunk it cannot stage (an ArchiveError: logged, no ack); it is malformed too.
    assert isinstance(e.value, ArchiveError) and isinstance(e.value, ProtocolError)
    assert w1.usage() == (1, 1000) and _staged_bytes(w1) == 400
    assert [w2.add(KIT, good[2]), w1.add(KIT, good[1])] == [False, True]
    assert w2.assemble(rid(1), sha, 3) == data


def test_a_transfer_resent_in_smaller_chunks_starts_over(staging):
    """A kit that shrank its chunks for a broker's smaller packet limit resends the record (same size and hash)
    in another chunk size: the chunks staged so far are dropped and the new ones complete it at once (no wait
    for the old transfer to expire), under the same reservation."""
    w1, w2 = staging(), staging()
    data, sha = bytes(range(250)) * 4, "66" * 32
    old, new = proto.split(rid(1), data, sha, 400), proto.split(rid(1), data, sha, 300)
    assert len(old) == 3 and len(new) == 4
    assert [w1.add(KIT, old[0]), w1.add(KIT, old[2])] == [False, False]
    assert [w2.add(KIT, c) for c in new] == [False, False, False, True]
    assert w1.usage() == (1, 1000) and _staged_bytes(w1) == 1000
    assert w1.assemble(rid(1), sha, 4) == data
    # The old geometry is gone with its chunks: a late chunk of it is now the re-chunk, not a completion.
    assert w2.add(KIT, old[1]) is False and _staged_bytes(w2) == 400


@pytest.mark.parametrize(("field", "chunk"), [
    ("data", proto.Chunk(rid(1), "88" * 32, 1000, 0, 3, 400, b"x" * MIB)),
    ("data", proto.Chunk(rid(1), "88" * 32, 1000, 2, 3, 400, b"x" * 400)),
    ("total", proto.Chunk(rid(1), "88" * 32, 1000, 0, 2, 400, b"x" * 400)),
    ("total", proto.Chunk(rid(1), "88" * 32, 1000, 0, 3, 0, b"")),
    ("index", proto.Chunk(rid(1), "88" * 32, 1000, 3, 3, 400, b"x" * 400))])
def test_a_chunk_that_contradicts_itself_is_refused(staging, field, chunk):
    """What a transfer reserves is never less than what it stages, whoever calls `add` (not only the decoder's
    chunks): a chunk whose data or count does not fit its own size and chunk size is refused."""
    st = staging()
    with pytest.raises(InconsistentChunk) as e:
        st.add(KIT, chunk)
    assert e.value.field == field
    assert st.usage() == (0, 0) and _staged_bytes(st) == 0


def _legacy_staging(spec: str) -> StagingStore:
    """A staging database as the previous release left it: no geometry columns, two transfers of KIT staged by
    its code (a genuine one, chunk 0 of 3; the review's attack, 1 + 4000 bytes against 2 reserved)."""
    old = [("INSERT INTO transfers VALUES (?,?,?,?,?,?)", (rid(1), "99" * 32, KIT, 1000, 1.0, time.time())),
           ("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?)", (rid(1), "99" * 32, 0, 3, 1000, KIT, b"g" * 400, 1.0)),
           ("INSERT INTO transfers VALUES (?,?,?,?,?,?)", (rid(2), "aa" * 32, KIT, 2, 1.0, time.time())),
           ("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?)", (rid(2), "aa" * 32, 0, 2, 2, KIT, b"a", 1.0)),
           ("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?)", (rid(2), "aa" * 32, 5, 64, 64000, KIT, b"h" * 4000, 1.0))]
    if spec.startswith("postgresql://"):
        st = _open(spec)  # migrations 1-3, then undo 3: as the previous release left it
        _sql(st, "ALTER TABLE transfers DROP COLUMN total, DROP COLUMN chunk_size")
        with st.db.conn() as conn:  # type: ignore[attr-defined]
            conn.execute("DELETE FROM schema_migrations WHERE version = 3")
        for sql, args in old:
            _sql(st, sql, args)
        st.close()
    else:
        conn = sqlite3.connect(spec)
        conn.executescript("""
            CREATE TABLE chunks (record_id TEXT NOT NULL, sha256 TEXT NOT NULL, idx INTEGER NOT NULL,
                total INTEGER NOT NULL, size INTEGER NOT NULL, kit_id TEXT NOT NULL, data BLOB NOT NULL,
                at REAL NOT NULL, PRIMARY KEY (record_id, sha256, idx));
            CREATE TABLE transfers (record_id TEXT NOT NULL, sha256 TEXT NOT NULL, kit_id TEXT NOT NULL,
                size INTEGER NOT NULL, first_at REAL NOT NULL, last_at REAL NOT NULL, PRIMARY KEY (record_id, sha256));
        """)
        for sql, args in old:
            conn.execute(sql, args)
        conn.commit()
        conn.close()
    return _open(spec)


def test_transfers_staged_before_the_geometry_was_stored(spec):
    """An old staging database gets the geometry columns; the next chunk of one of its transfers starts that
    transfer over in its own geometry (so the review's attack, staged by the old code, is dropped with it), and a
    genuine resend then completes."""
    st = _legacy_staging(spec)
    try:
        assert st.usage(KIT) == (2, 1002) and _staged_bytes(st, KIT) == 4401
        data = b"g" * 400 + b"h" * 400 + b"i" * 200
        good = proto.split(rid(1), data, "99" * 32, 400)
        with pytest.raises(InconsistentChunk) as e:  # the size is still the one reserved
            st.add(KIT, proto.Chunk(rid(1), "99" * 32, 1200, 1, 3, 400, b"x" * 400))
        assert e.value.field == "size"
        assert [st.add(KIT, c) for c in good] == [False, False, True]
        assert _sql(st, "SELECT total, chunk_size FROM transfers WHERE record_id = ?", (rid(1),)) == [(3, 400)]
        assert st.assemble(rid(1), "99" * 32, 3) == data
        st.drop(rid(1), "99" * 32)
        assert st.add(KIT, proto.Chunk(rid(2), "aa" * 32, 2, 1, 2, 1, b"b")) is False  # its 4001 bytes dropped
        assert _staged_bytes(st, KIT) == 1 and st.usage(KIT) == (1, 2)
        time.sleep(0.3)
        assert st.expire(0.2) == 1 and st.usage() == (0, 0) and _staged_bytes(st) == 0
    finally:
        st.close()
