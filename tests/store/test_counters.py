"""The journal's counters and purge queue (schema 2): right after every state transition, O(1) to read,
and built by the migration from a schema-1 journal (issue #17: status and maintenance O(1) per poll).

Everything runs on a real SQLite journal; the expected values are recomputed here with full COUNT(*)
queries written independently of the journal's own SQL.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firmware.seal import identity
from firmware.store.journal import LIVE, STATES, Journal
from firmware.store.store import Store
from tests.store.conftest import make_config


def payload(tag: str) -> bytes:
    from firmware.wire import record_format

    return record_format.Payload({"nik": "3273010101900001", "tag": tag},
                                 [record_format.Attachment("face", "jpg", tag.encode() * 50)]).encode()


def recomputed(conn: sqlite3.Connection) -> dict[str, Any]:
    """Counters, mirror lag, purge queue and oldest unacked from a full scan of the rows."""
    counts = {s: {"records": 0, "bytes": 0} for s in STATES}
    for state, n, b in conn.execute("SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM records GROUP BY state"):
        counts[state] = {"records": n, "bytes": b}
    n, b = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records r WHERE state IN (?,?,?) AND NOT "
                        "EXISTS (SELECT 1 FROM mirrors m WHERE m.record_id = r.id)", LIVE).fetchone()
    purge = [r[0] for r in conn.execute("SELECT id FROM records r WHERE state = 'acked' AND EXISTS "
                                        "(SELECT 1 FROM mirrors m WHERE m.record_id = r.id) ORDER BY seq")]
    (oldest,) = conn.execute("SELECT MIN(created) FROM records WHERE state IN ('stored', 'sent')").fetchone()
    return {"counts": counts, "lag": {"records": n, "bytes": b}, "purge": purge, "oldest": oldest or None}


def kept(j: Journal) -> dict[str, Any]:
    """The same, as the journal answers it from its counters and queue."""
    return {"counts": j.counts(), "lag": j.mirror_lag(), "purge": j.purgeable(True, 10**6),
            "oldest": j.oldest_unacked()}


def check(j: Journal) -> None:
    assert kept(j) == recomputed(j.conn)


def vm_steps(j: Journal, fn: Callable[[], Any]) -> int:
    """SQLite virtual-machine instructions executed by `fn` on the journal's connection."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    j.conn.set_progress_handler(tick, 1)
    try:
        fn()
    finally:
        j.conn.set_progress_handler(None, 1)
    return steps[0]


def open_store(cfg: Any, ident: Any = None) -> Store:
    s = Store(cfg, ident or identity.load_or_create(cfg.state_dir))
    s.open()
    return s


def test_counters_follow_every_transition(tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    cfg = make_config(tmp_path, dc_keys["pub_path"])
    s = open_store(cfg)
    try:
        j = s.j
        check(j)
        with_stick = [s.commit(payload(f"a{i}")) for i in range(4)]  # commit, mirrored in the same transaction
        assert all(r.stick_id for r in with_stick)
        check(j)
        s.eject()
        shutil.rmtree(usb)  # the stick is gone: the next commits join the mirror lag
        bare = [s.commit(payload(f"b{i}")) for i in range(4)]
        assert not any(r.stick_id for r in bare)
        check(j)
        assert j.mirror_lag()["records"] == 4
        s.mark_delivery([with_stick[0].record_id, bare[0].record_id, bare[1].record_id], [])  # sent
        check(j)
        s.mark_delivery([], [with_stick[0].record_id, with_stick[1].record_id, bare[0].record_id])  # acked
        check(j)
        assert j.purgeable(True, 10) == [with_stick[0].record_id, with_stick[1].record_id]
        s.mark(with_stick[2].record_id, "quarantined", "test")  # quarantined
        s.mark(bare[3].record_id, "quarantined", "test")
        check(j)
        s._quarantine("unknown-record", "unjournaled file", seq=999)  # insert_quarantined
        check(j)
        s._quarantine("unknown-record", "seen again", seq=999)  # INSERT OR REPLACE of the same row
        check(j)
        assert s.purge_acknowledged() == 2  # purged: only the acked records a stick holds
        check(j)
        usb.mkdir()
        s.poll_usb()  # a new stick: backfill mirrors the rest (first mirror moves records out of the lag)
        assert s.stick is not None
        check(j)
        assert j.mirror_lag()["records"] == 0
        assert s.purge_acknowledged() == 1  # bare[0] is now on a stick
        check(j)
        j.add_mirror(bare[1].record_id, "stick-other")  # a second copy changes nothing in the counters
        check(j)
        # Key rotation: records sealed under the new identity count the same.
        new_ident = identity.load_or_create(tmp_path / "rotated")
        s.use_identity(new_ident)
        rotated = s.commit(payload("r"))
        check(j)
        # Writers outside this module (another connection, raw SQL) are counted by the triggers too.
        other = sqlite3.connect(cfg.state_dir / "journal.db", isolation_level=None)
        other.execute("DELETE FROM mirrors WHERE record_id = ?", (rotated.record_id,))
        other.execute("UPDATE records SET state = 'acked' WHERE id = ?", (bare[2].record_id,))
        other.execute("DELETE FROM records WHERE id = ?", (with_stick[3].record_id,))
        other.close()
        check(j)
        s.mark(bare[1].record_id, "stored")  # back to stored: leaves the purge queue
        check(j)
    finally:
        s.close()
    # Reopened: the counters are what was committed.
    s = open_store(cfg, new_ident)
    try:
        check(s.j)
    finally:
        s.close()


def _fill(j: Journal, n: int, state: str, mirrored: bool, start: int = 1) -> None:
    rows = [(f"R-{i:08d}", i, f"2026-01-01T00:00:{i % 60:02d}Z", 0, 1000 + i, "0" * 64, state,
             "2026-01-01T00:00:00Z", "op", "") for i in range(start, start + n)]
    with j.transaction() as c:
        c.executemany("INSERT INTO records (id, seq, created, clock_synced, size, sha256, state, state_at, "
                      "operator_id, reason) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        if mirrored:
            c.executemany("INSERT INTO mirrors VALUES (?,?,?)", [(r[0], "stick-x", r[2]) for r in rows])


def _status_steps(tmp_path: Path, dc_keys: dict[str, Any], n: int) -> dict[str, int]:
    root = tmp_path / f"n{n}"
    (root / "usb").mkdir(parents=True)
    cfg = make_config(root, dc_keys["pub_path"], store={"purge_requires_stick": True})
    s = open_store(cfg)
    try:
        j = s.j
        # A backlog like the outage's: unsent, sent, and acked that no stick holds (not purgeable).
        _fill(j, n, "stored", mirrored=False)
        _fill(j, n, "sent", mirrored=True, start=n + 1)
        _fill(j, n, "acked", mirrored=False, start=2 * n + 1)
        _fill(j, 3, "acked", mirrored=True, start=3 * n + 1)
        check(j)
        assert s.purge_acknowledged() == 3
        check(j)
        return {"counts": vm_steps(j, j.counts), "lag": vm_steps(j, j.mirror_lag),
                "oldest": vm_steps(j, j.oldest_unacked), "purge_again": vm_steps(j, s.purge_acknowledged),
                "status": vm_steps(j, s.status)}
    finally:
        s.close()


def test_status_and_idle_purge_do_not_grow_with_the_backlog(tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    small = _status_steps(tmp_path, dc_keys, 20)
    big = _status_steps(tmp_path, dc_keys, 3000)
    # O(1): the same SQLite work at 60 and 9,000 records (a scan would be ~150x); a little slack for
    # B-tree depth (O(log n) probes).
    for k in small:
        assert big[k] <= small[k] + 60, (k, small[k], big[k])
    assert big["purge_again"] < 200  # a purge with nothing to do reads the (empty) queue and stops


def test_purge_with_requires_stick_false_reads_only_what_it_purges(tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    (tmp_path / "usb").mkdir()
    cfg = make_config(tmp_path, dc_keys["pub_path"], store={"purge_requires_stick": False})
    s = open_store(cfg)
    try:
        _fill(s.j, 2000, "stored", mirrored=False)
        _fill(s.j, 450, "acked", mirrored=False, start=3001)
        assert s.purge_acknowledged(batch=200) == 450
        check(s.j)
        assert vm_steps(s.j, s.purge_acknowledged) < 200
    finally:
        s.close()


# The schema as the schema-1 code (before issue #17) created it, verbatim from its sqlite_master.
SCHEMA_1 = """
CREATE TABLE "records" ("id" TEXT PRIMARY KEY, "seq" INTEGER NOT NULL, "created" TEXT, "clock_synced" INTEGER,
  "size" INTEGER NOT NULL, "sha256" TEXT NOT NULL, "state" TEXT NOT NULL, "state_at" TEXT, "operator_id" TEXT,
  "reason" TEXT);
CREATE UNIQUE INDEX "idx_records_seq" ON "records" ("seq");
CREATE INDEX "idx_records_state_seq" ON "records" ("state", "seq");
CREATE TABLE "mirrors" ("record_id" TEXT, "stick_id" TEXT, "at" TEXT, PRIMARY KEY ("record_id", "stick_id"));
CREATE INDEX "idx_mirrors_stick_id" ON "mirrors" ("stick_id");
CREATE TABLE "sticks" ("stick_id" TEXT PRIMARY KEY, "first_seen" TEXT, "last_seen" TEXT);
CREATE TABLE "audit" ("id" INTEGER PRIMARY KEY, "at" TEXT, "kind" TEXT, "actor" TEXT, "detail" TEXT);
CREATE TABLE "niks" ("digest" TEXT, "record_id" TEXT, "at" TEXT, PRIMARY KEY ("digest", "record_id"));
CREATE TABLE "fp_library" ("page" INTEGER PRIMARY KEY, "record_id" TEXT, "nik_digest" TEXT, "finger" TEXT,
  "at" TEXT);
CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_schema_1_journal_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(SCHEMA_1)
    states = ["stored", "sent", "acked", "purged", "quarantined"]
    for i in range(1, 101):
        old.execute("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (f"R-{i:04d}", i, f"2026-02-{1 + i % 28:02d}T00:00:00Z", 1, 500 + i, "a" * 64, states[i % 5],
                     "2026-03-01T00:00:00Z", "op", ""))
        if i % 3 == 0:
            old.execute("INSERT INTO mirrors VALUES (?,?,?)", (f"R-{i:04d}", "stick-1", "2026-03-01T00:00:00Z"))
        if i % 6 == 0:
            old.execute("INSERT INTO mirrors VALUES (?,?,?)", (f"R-{i:04d}", "stick-2", "2026-03-01T00:00:00Z"))
    old.execute("INSERT INTO audit (at, kind, actor, detail) VALUES ('x', 'purge', '', '{}')")
    old.close()

    j = Journal(path)
    try:
        assert j.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
        check(j)
        assert j.counts()["acked"]["records"] == 20 and len(j.purgeable(True, 1000)) == 6
        assert j.get("R-0042") is not None and len(j.audit_events()) == 1  # the old rows are all there
        # After the upgrade the triggers keep the counters.
        j.mark_delivery(["R-0005", "R-0010"], ["R-0001", "R-0006"])
        j.add_mirror("R-0001", "stick-1")
        check(j)
    finally:
        j.close()
    j = Journal(path)  # a second open does not migrate again (nor double the counts)
    try:
        check(j)
    finally:
        j.close()


def test_begin_leaves_the_stick_index_fsync_to_the_poll(store: Store) -> None:
    """The commit path's serial part: `begin()` notices the stick but does not fsync its index (issue #17.3);
    the USB watcher's poll does, and so do eject and close."""
    store.commit(payload("x"))
    stick = store.stick
    store.wait_mirror_idle()  # the line is appended by the mirror thread after the commit has its answer
    assert stick is not None and stick.index_dirty  # the line is appended, its fsync deferred
    r = store.begin()
    store.release(r)
    assert store.stick is stick and stick.index_dirty
    store.poll_usb()
    assert not stick.index_dirty


def test_periodic_purge_is_bounded_per_poll_and_resumes(tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    """The USB watcher purges at most PURGE_BATCHES_PER_POLL batches per poll; the queue keeps the rest."""
    from firmware.store.service import UsbWatcher

    (tmp_path / "usb").mkdir()
    cfg = make_config(tmp_path, dc_keys["pub_path"], store={"purge_requires_stick": True})
    s = open_store(cfg)
    try:
        _fill(s.j, 2500, "acked", mirrored=True)
        w = UsbWatcher(s, 2.0, auto_purge=True)
        per_poll = w.PURGE_BATCHES_PER_POLL * 200
        w.tick()
        assert s.j.counts()["purged"]["records"] == per_poll
        check(s.j)
        w.tick()
        w.tick()
        assert s.j.counts()["purged"]["records"] == 2500 and s.j.purgeable(True, 10) == []
        check(s.j)
    finally:
        s.close()
