"""Issue 14.2: ONE staging suite over both implementations, the embedded SQLite `Staging` and the PostgreSQL
`PgStaging` that stateless ingest workers on different hosts share: completion seen by exactly one inserter,
chunks from different workers assembled into one record, caps per kit and in total (also when 4 processes
admit at once), TTL expiry."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.wire import relay_protocol as proto
from firmware.wire.ids import make_record_id
from provisioning.staging import Staging, StagingFull, StagingLimits, StagingStore

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
