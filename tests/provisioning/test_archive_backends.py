"""Issue 14.1: ONE archive suite over both backends, the embedded one (SQLite + files in tmp_path) and the scale one
(a fresh database on the session's real PostgreSQL, a fresh key prefix on the session's real SeaweedFS S3): store,
duplicate, conflict, rejects, unknown kit, trust on first use, key rotation, read, since, and 4 writer processes
racing. Plus what only the scale backend has: the `since` cursor under concurrent transactions, versioned
migrations under concurrent start-up."""

from __future__ import annotations

import base64
import json
import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.errors import ArchiveError, KitRevoked, UnknownKit
from firmware.wire import record_format as rf
from provisioning.archive import Archive, ArchiveBase, open_archive

KIT = "rk-abcdefghjk"
OTHER_KIT = "rk-mnpqrstvwx"
_, DC_PUB = rf.generate_datacenter_keypair()
RECIPIENT = rf.load_recipient_key(DC_PUB)


def seal(key: Ed25519PrivateKey, seq: int, kit: str = KIT, payload: bytes = b"payload",
         rid: str | None = None) -> tuple[str, bytes]:
    """A sealed record `seq` of `kit`, signed with `key` (tiny payload: the archive checks, not the size)."""
    rid = rid or f"{kit}-{seq:08d}-20261129T000000Z"
    return rid, rf.seal(payload, record_id=rid, kit_id=kit, seq=seq, created="2026-11-29T00:00:00Z",
                        clock_synced=True, signing_key=key, recipients=[RECIPIENT])


def b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(rf.raw_public(key.public_key())).decode()


@dataclass
class Backend:
    """One archive (its spec) that tests open handles on, as several workers would."""

    kind: str
    spec: str
    objects: str | None
    opened: list[ArchiveBase] = field(default_factory=list)

    def open(self, **kw: Any) -> ArchiveBase:
        a = open_archive(self.spec, self.objects, **kw)
        self.opened.append(a)
        return a

    def place(self, a: ArchiveBase, kit: str, rid: str, data: bytes) -> None:
        """Put bytes at the record's place behind the archive's back (a copy whose index row never came)."""
        if isinstance(a, Archive):
            p = a.path_of(kit, rid)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        else:
            assert a.objects.put_once(a.object_key(kit, rid), data)  # type: ignore[attr-defined]

    def damage(self, a: ArchiveBase, kit: str, rid: str) -> None:
        """Flip the last byte of an archived record where it is stored."""
        if isinstance(a, Archive):
            p = a.path_of(kit, rid)
            raw = p.read_bytes()
            p.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))  # XOR: never the byte it already was
        else:
            o, key = a.objects, a.object_key(kit, rid)  # type: ignore[attr-defined]
            data = o.get(key)
            o.s3.put_object(Bucket=o.url.bucket, Key=o.url.key(key), Body=data[:-1] + bytes([data[-1] ^ 0xFF]))

    def conflicts(self, a: ArchiveBase) -> list[str]:
        if isinstance(a, Archive):
            return sorted(p.name for p in (a.root / "conflicts").iterdir())
        o = a.objects  # type: ignore[attr-defined]
        r = o.s3.list_objects_v2(Bucket=o.url.bucket, Prefix=o.url.key("conflicts/"))
        return sorted(x["Key"].rpartition("/")[2] for x in r.get("Contents", []))


@pytest.fixture(params=["embedded", "scale"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        b = Backend("embedded", str(tmp_path / "archive"), None)
    else:
        b = Backend("scale", request.getfixturevalue("pg_database"), request.getfixturevalue("s3_objects"))
    yield b
    for a in b.opened:
        a.close()


@pytest.fixture
def kit_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_store_duplicate_read_and_since(backend, kit_key):
    a = backend.open(tofu=True)
    recs = [seal(kit_key, s) for s in (1, 2, 3)]
    assert a.since() == []
    for rid, data in recs[:2]:
        r = a.store(data, KIT, "mqtt", expect_record_id=rid, expect_sha256=rf.sha256_hex(data))
        assert (r.status, r.record_id, r.sha256) == ("stored", rid, rf.sha256_hex(data))
    assert a.store(recs[0][1], KIT, "usb:x", expect_record_id=recs[0][0]).status == "duplicate"
    assert a.store(recs[0][1], KIT, "usb:x").status == "duplicate"  # no id announced: found from the header
    first = a.since()
    assert [(r.record_id, r.kit_id, r.seq, r.size) for r in first] == [
        (rid, KIT, i + 1, len(d)) for i, (rid, d) in enumerate(recs[:2])]
    assert first[0].received_at.endswith("Z") and first[0].sha256 == rf.sha256_hex(recs[0][1])
    assert a.since(first[-1].cursor) == []
    assert a.store(recs[2][1], KIT, "mqtt").status == "stored"
    assert [r.record_id for r in a.since(first[-1].cursor)] == [recs[2][0]]
    assert [r.record_id for r in a.since(None, limit=1)] == [recs[0][0]]
    assert a.read(recs[1][0]) == recs[1][1]
    with pytest.raises(KeyError):
        a.read(f"{KIT}-00000099-20261129T000000Z")
    assert a.count() == 3 and a.count(KIT) == 3 and a.count(OTHER_KIT) == 0
    assert a.record_ids(KIT) == [rid for rid, _ in recs]
    assert a.has(recs[0][0]) == rf.sha256_hex(recs[0][1]) and a.lookup(recs[0][0]) == (a.has(recs[0][0]), KIT)
    # Another handle (another worker) sees the same archive.
    b = backend.open()
    assert b.count() == 3 and b.store(recs[1][1], KIT, "mqtt").status == "duplicate"
    # A damaged copy is never handed on.
    backend.damage(a, KIT, recs[0][0])
    with pytest.raises(ArchiveError, match="no longer matches"):
        a.read(recs[0][0])


def test_records_of_a_seq_range_and_cursor_order(backend, kit_key):
    """What the export's late clock corrections look up: a kit's records by seq range, paged; `cursor_key` orders
    `since()` cursors (a record at or before the saved cursor was exported)."""
    a = backend.open(tofu=True)
    recs = [seal(kit_key, s) for s in (1, 2, 3, 5, 8)]
    for _rid, data in recs:
        assert a.store(data, KIT, "mqtt").status == "stored"
    a.store(seal(Ed25519PrivateKey.generate(), 2, OTHER_KIT)[1], OTHER_KIT, "mqtt")
    page = a.records_in_range(KIT, 2, 7, limit=2)
    assert [r.seq for r in page] == [2, 3] and {r.kit_id for r in page} == {KIT}
    rest = a.records_in_range(KIT, 2, 7, (page[-1].seq, page[-1].record_id), limit=2)
    assert [r.seq for r in rest] == [5]
    assert a.records_in_range(KIT, 9, 20) == [] and [r.seq for r in a.records_in_range(OTHER_KIT, 1, 9)] == [2]
    listed = a.since(None, 10)
    keys = [a.cursor_key(r.cursor) for r in listed]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    by_id = {r.record_id: r.cursor for r in listed}
    assert [by_id[r.record_id] for r in page + rest] == [r.cursor for r in page + rest]  # the same cursors as since()
    with pytest.raises(ValueError):
        a.cursor_key("not-a-cursor")


def test_unknown_kit_tofu_and_registration(backend, kit_key):
    a = backend.open()
    rid, data = seal(kit_key, 1)
    with pytest.raises(UnknownKit, match="register-kit"):
        a.store(data, KIT, "mqtt", expect_record_id=rid)
    assert a.count() == 0 and a.kits() == []
    a.register_kit(KIT, b64(kit_key))
    a.register_kit(KIT, b64(kit_key))  # confirming the same key is fine
    with pytest.raises(ValueError, match="another key"):
        a.register_kit(KIT, b64(Ed25519PrivateKey.generate()))
    assert a.store(data, KIT, "mqtt", expect_record_id=rid).status == "stored"
    t = backend.open(tofu=True)
    other = Ed25519PrivateKey.generate()
    rid2, data2 = seal(other, 1, kit=OTHER_KIT)
    assert t.store(data2, OTHER_KIT, "mqtt", expect_record_id=rid2).status == "stored"
    kits = {k["kit_id"]: k for k in a.kits()}
    assert kits[KIT]["how"] == "registered" and kits[OTHER_KIT]["how"] == "tofu"
    assert kits[OTHER_KIT]["public_key"] == b64(other) and kits[KIT]["registered_at"].endswith("Z")
    # TOFU pinned the first key: a record of that kit under another key is refused.
    _, forged = seal(Ed25519PrivateKey.generate(), 2, kit=OTHER_KIT)
    r = t.store(forged, OTHER_KIT, "mqtt")
    assert r.status == "rejected" and "not by a registered key" in r.reason
    assert a.kit_key(OTHER_KIT) == rf.raw_public(other.public_key())


def test_rejects_keep_nothing(backend, kit_key):
    a = backend.open()
    a.register_kit(KIT, b64(kit_key))
    a.register_kit(OTHER_KIT, b64(Ed25519PrivateKey.generate()))
    rid, data = seal(kit_key, 1)
    with pytest.raises(ArchiveError, match="announced"):
        a.store(data, KIT, "mqtt", expect_record_id=rid, expect_sha256="0" * 64)
    cases = [
        (a.store(data, OTHER_KIT, "mqtt"), "not by a registered key"),  # signed by KIT's key, sent as another kit
        (a.store(data, KIT, "mqtt", expect_record_id=f"{OTHER_KIT}-00000001-20261129T000000Z"), "KitMismatch"),
        (a.store(data, KIT, "mqtt", expect_record_id=f"{KIT}-00000002-20261129T000000Z"), "file holds record"),
        (a.store(b"garbage" * 50, KIT, "mqtt", expect_record_id=rid), "Error"),
        (a.store(seal(kit_key, 3, rid=f"{KIT}-00000009-20261129T000000Z")[1], KIT, "mqtt"), "sequence number"),
        (a.store(seal(Ed25519PrivateKey.generate(), 4)[1], KIT, "mqtt"), "not by a registered key"),
    ]
    for r, why in cases:
        assert r.status == "rejected" and why in r.reason, (r, why)
    assert a.count() == 0 and a.since() == [] and backend.conflicts(a) == []
    assert a.refuse(rid, KIT, "ab" * 32, "by the ingest", "mqtt").status == "rejected"


def test_conflicts_are_kept_and_never_overwrite(backend, kit_key):
    a = backend.open(tofu=True)
    rid, first = seal(kit_key, 1, payload=b"first")
    _, second = seal(kit_key, 1, payload=b"second")  # same id, other (validly signed) bytes
    assert a.store(first, KIT, "mqtt", expect_record_id=rid).status == "stored"
    r = a.store(second, KIT, "usb:x", expect_record_id=rid)
    assert r.status == "rejected" and "already archived" in r.reason
    assert a.store(second, KIT, "usb:x", expect_record_id=rid).status == "rejected"  # again: still one copy kept
    assert backend.conflicts(a) == [f"{rid}.{rf.sha256_hex(second)[:16]}{rf.FILE_SUFFIX}"]
    assert a.read(rid) == first and a.count() == 1
    # A copy at a record's place whose index row never came (a store cut short): other bytes are a conflict too,
    # the same bytes are taken as they are.
    rid2, placed = seal(kit_key, 2, payload=b"placed")
    _, later = seal(kit_key, 2, payload=b"later")
    backend.place(a, KIT, rid2, placed)
    r = a.store(later, KIT, "mqtt", expect_record_id=rid2)
    assert r.status == "rejected" and rf.sha256_hex(placed)[:12] in r.reason
    assert a.has(rid2) is None
    assert a.store(placed, KIT, "mqtt", expect_record_id=rid2).status == "stored"
    assert a.read(rid2) == placed and len(backend.conflicts(a)) == 2


def fleet_db_with(path: Path, key: Ed25519PrivateKey) -> sqlite3.Connection:
    """A minimal fleet.db (its `kits` table) where KIT is approved with `key`; the open connection."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE kits (kit_id TEXT PRIMARY KEY, public_key TEXT, state TEXT)")
    db.execute("INSERT INTO kits VALUES (?,?, 'approved')", (KIT, b64(key)))
    db.commit()
    return db


def test_key_rotation_from_the_fleet_registry(backend, tmp_path):
    old, new, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    fleet = tmp_path / "fleet.db"
    db = fleet_db_with(fleet, old)
    a = backend.open(fleet_db=fleet)
    assert a.store(seal(old, 1)[1], KIT, "mqtt").status == "stored"
    assert a.kits()[0]["how"] == "fleet"
    db.execute("UPDATE kits SET public_key = ? WHERE kit_id = ?", (b64(new), KIT))
    db.commit()
    for seq, key in ((2, old), (3, new)):  # sealed before the rotation but sent after it, and after it
        assert a.store(seal(key, seq)[1], KIT, "mqtt").status == "stored", seq
    r = a.store(seal(stranger, 4)[1], KIT, "mqtt")
    assert r.status == "rejected" and "not by a registered key" in r.reason
    # The rotation is in the archive's own key history: known without the fleet registry too.
    assert backend.open().kit_keys(KIT) == [rf.raw_public(k.public_key()) for k in (old, new)]
    db.close()


def test_a_revoked_kit_is_not_archived(backend, tmp_path):
    """A kit revoked in the fleet registry can still publish (a connection open since before the revocation, a
    shard broker whose CRL copy is stale): the archive refuses its records, answers for those it already holds
    (the kit may purge them), and an archive without the registry (a supervisor's stick import) still takes them."""
    key = Ed25519PrivateKey.generate()
    fleet = tmp_path / "fleet.db"
    db = fleet_db_with(fleet, key)
    a = backend.open(fleet_db=fleet)
    rid1, r1 = seal(key, 1)
    assert a.store(r1, KIT, "mqtt", expect_record_id=rid1).status == "stored"
    db.execute("UPDATE kits SET state = 'revoked' WHERE kit_id = ?", (KIT,))
    db.commit()
    rid2, r2 = seal(key, 2)
    with pytest.raises(KitRevoked, match="revoked"):
        a.store(r2, KIT, "mqtt", expect_record_id=rid2)
    with pytest.raises(KitRevoked):
        a.store(r2, KIT, "mqtt")  # without the announced id too
    assert a.has(rid2) is None
    assert a.store(r1, KIT, "mqtt", expect_record_id=rid1).status == "duplicate"
    assert backend.open().store(r2, KIT, "usb:stick", expect_record_id=rid2).status == "stored"
    db.close()


def test_key_from_a_shared_postgresql_fleet_registry(tmp_path, pg_database):
    """An ingest on another host than `rekam-fleet serve` trusts the approved kits of a PostgreSQL registry."""
    from provisioning import registry_db

    key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    reg = registry_db.open_registry(tmp_path, pg_database)
    reg.execute("INSERT INTO kits (kit_id, public_key, state) VALUES (?, ?, 'approved')", (KIT, b64(key)))
    a = Archive(tmp_path / "archive", fleet_db=pg_database)
    assert a.store(seal(key, 1)[1], KIT, "mqtt").status == "stored"
    assert a.kits()[0]["how"] == "fleet"
    assert a.store(seal(stranger, 2)[1], KIT, "mqtt").status == "rejected"
    reg.execute("UPDATE kits SET state = 'revoked' WHERE kit_id = ?", (KIT,))
    other = Archive(tmp_path / "other", fleet_db=pg_database)
    with pytest.raises(UnknownKit):  # revoked: no longer a key the archive may learn
        other.store(seal(key, 3)[1], KIT, "mqtt")
    with pytest.raises(KitRevoked):  # and what an archive already trusted is refused from now on
        a.store(seal(key, 4)[1], KIT, "mqtt")
    a.close()
    other.close()
    reg.close()


def _race_worker(spec: str, objects: str | None, records: list[tuple[str, bytes]], barrier: Any, out: Any) -> None:
    a = open_archive(spec, objects)
    try:
        barrier.wait(60)
        out.put([a.store(data, KIT, "race", expect_record_id=rid).status for rid, data in records])
    except Exception as e:  # noqa: BLE001  (reported to the parent)
        out.put([f"error: {e!r}"])
    finally:
        a.close()


def test_four_writer_processes_race_and_store_each_record_once(backend, kit_key):
    a = backend.open()
    a.register_kit(KIT, b64(kit_key))
    records = [seal(kit_key, s) for s in range(1, 9)]
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(backend.spec, backend.objects, records, barrier, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    statuses = [s for r in results for s in r]
    assert statuses.count("stored") == len(records) and statuses.count("duplicate") == 3 * len(records), results
    assert a.count() == len(records) and sorted(a.record_ids()) == sorted(r for r, _ in records)
    assert [a.read(rid) for rid, _ in records] == [d for _, d in records]
    assert len(a.since()) == len(records) and backend.conflicts(a) == []


# --- only the scale backend --------------------------------------------------------------------------------------


def test_since_never_skips_a_row_committed_late(pg_database, s3_objects, kit_key):
    """A row inserted first but committed after a later one is listed after the cursor, not skipped: the ABIS
    exporter reading between the two commits must still get both."""
    a = open_archive(pg_database, s3_objects, tofu=True)
    try:
        assert a.store(seal(kit_key, 1)[1], KIT, "mqtt").status == "stored"
        cursor = a.since()[-1].cursor
        slow = psycopg.connect(pg_database)  # transaction A: inserts first, commits last
        slow.execute("INSERT INTO records (kit_id, record_id, seq, sha256, size, object_key, source) VALUES "
                     "(%s, %s, 2, %s, 1, 'k', 'slow')", (KIT, f"{KIT}-00000002-20261129T000000Z", "0" * 64))
        assert a.store(seal(kit_key, 3)[1], KIT, "mqtt").status == "stored"  # transaction B commits now
        seen = a.since(cursor)
        assert f"{KIT}-00000003-20261129T000000Z" not in [r.record_id for r in seen]  # held back while A runs
        slow.commit()
        slow.close()
        if seen:
            cursor = seen[-1].cursor
        rest = a.since(cursor)
        assert [r.record_id for r in seen + rest] == [f"{KIT}-00000002-20261129T000000Z",
                                                      f"{KIT}-00000003-20261129T000000Z"]
    finally:
        a.close()


def test_migrations_versioned_and_safe_when_workers_start_at_once(pg_database, s3_objects):
    from provisioning.archive import scale as archive_scale

    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait(10)
            open_archive(pg_database, s3_objects).close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=start) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert errors == []
    with psycopg.connect(pg_database) as c:
        assert [r[0] for r in c.execute("SELECT version FROM schema_migrations ORDER BY version")] == [
            v for v, _, _ in archive_scale.MIGRATIONS]
        parts = c.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'records'::regclass").fetchone()[0]
        assert parts == archive_scale.PARTITIONS
        c.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'from the future')")
        c.commit()
    with pytest.raises(ArchiveError, match="newer than this code"):
        open_archive(pg_database, s3_objects)


def test_open_archive_names_what_is_missing(tmp_path):
    with pytest.raises(ArchiveError, match="--objects"):
        open_archive("postgresql://rekam@127.0.0.1:1/x")
    with pytest.raises(ArchiveError, match="is a directory"):
        open_archive(tmp_path / "a", "s3://b?endpoint=http://127.0.0.1:1")
    assert isinstance(open_archive(tmp_path / "a"), Archive)


def test_archive_check_names_missing_and_corrupt_records(backend, kit_key, tmp_path, capsys):
    """`rekam-fleet archive check` reads every record back: a damaged one and one whose bytes are gone are named,
    the rest pass; `--limit` with `--state` goes on where the last run stopped, and a full pass starts over."""
    from provisioning.archive import check
    from provisioning.cli import main as fleet_main

    a = backend.open()
    a.register_kit(KIT, b64(kit_key))
    recs = [seal(kit_key, s) for s in range(1, 8)]
    for rid, data in recs:
        assert a.store(data, KIT, "mqtt", expect_record_id=rid).status == "stored"
    backend.damage(a, KIT, recs[2][0])
    if isinstance(a, Archive):
        a.path_of(KIT, recs[5][0]).unlink()
    else:
        a.objects.delete(a.object_key(KIT, recs[5][0]))  # type: ignore[attr-defined]
    rep = check.check(a)
    assert rep.complete and rep.checked == 7 and rep.cursor is None
    assert rep.corrupt == [recs[2][0]] and rep.missing == [recs[5][0]] and rep.unreadable == []
    # In slices of 3 through the state file: 3, 3, then the last one and the end of the pass.
    spec = ["--archive", backend.spec] + (["--objects", backend.objects] if backend.objects else [])
    state = tmp_path / "check.json"
    runs = []
    for _ in range(3):
        code = fleet_main(["archive", "check", *spec, "--limit", "3", "--state", str(state), "--json",
                           "--max-mb-s", "0"])
        runs.append((code, json.loads(capsys.readouterr().out)))
    assert [r[1]["checked"] for r in runs] == [3, 3, 1]
    assert [r[0] for r in runs] == [1, 1, 0]  # the damaged record in the first slice, the missing one in the second
    assert runs[0][1]["corrupt"] == [recs[2][0]] and runs[1][1]["missing"] == [recs[5][0]]
    assert runs[2][1]["complete"] and json.loads(state.read_text())["cursor"] is None
    # A hostile or broken state file is refused with its name, nothing read.
    state.write_text("[" * 10_000)
    assert fleet_main(["archive", "check", *spec, "--state", str(state)]) == 2
    assert "check.json" in capsys.readouterr().err


def test_archive_check_stops_when_the_store_is_unreadable(tmp_path, kit_key):
    """Every read failing (the disk or object store down, not one damaged record) stops the check after a few,
    with the cursor left before them."""
    from provisioning.archive import check

    a = Archive(tmp_path / "archive")
    a.register_kit(KIT, b64(kit_key))
    for s in range(1, check.UNREADABLE_IN_A_ROW + 6):
        rid, data = seal(kit_key, s)
        a.store(data, KIT, "mqtt", expect_record_id=rid)
    for s in range(1, check.UNREADABLE_IN_A_ROW + 6):
        p = a.path_of(KIT, seal(kit_key, s)[0])
        p.unlink()
        p.mkdir()  # reading a directory: EISDIR, an OSError that is not "missing" (root reads past permissions)
    rep = check.check(a)
    assert rep.aborted and rep.counts["unreadable"] == check.UNREADABLE_IN_A_ROW and rep.cursor is None
    a.close()
