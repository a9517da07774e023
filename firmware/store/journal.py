"""The store's journal: each record's state, its mirror copies, and the audit log, in SQLite.

WAL with ``synchronous=FULL``: a committed transaction survives a power cut (WAL with NORMAL
may roll back the last ones). One connection, guarded by a lock, shared by the daemon's threads.

Record states (``records.state``)::

    stored -> sent -> acked -> purged          (and quarantined, from any state)

``stored`` means the sealed file is durable on the SD. Copies on USB sticks are rows in
``mirrors`` (one per stick id), so "mirrored" is per stick and independent of the uplink.

What the daemon reads every poll is kept O(1) in the backlog (schema 2): SQLite triggers maintain
``tally`` (records and bytes per state and mirrored-or-not) and ``purgeable`` (acked records that a
stick holds, the purge queue) in the same transaction as every change to ``records`` or ``mirrors``,
whoever writes it. ``_migrate`` builds both from the rows when it upgrades a schema-1 journal.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from firmware.system.clock import iso

STATES = ("stored", "sent", "acked", "purged", "quarantined")
LIVE = ("stored", "sent", "acked")  # a file is expected on the SD in these states
SCHEMA_VERSION = 2

# Schema 2: counters and the purge queue, maintained by triggers in the writer's own transaction.
# `_HAS_MIRROR` is an indexed lookup on mirrors' primary key (O(log n)).
_HAS_MIRROR = "(SELECT EXISTS (SELECT 1 FROM mirrors WHERE record_id = {}))"
_TALLY_ADD = ("INSERT INTO tally (state, mirrored, records, bytes) VALUES ({state}, {m}, 1, {size}) "
              "ON CONFLICT (state, mirrored) DO UPDATE SET records = records + 1, bytes = bytes + excluded.bytes;")
_TALLY_SUB = "UPDATE tally SET records = records - 1, bytes = bytes - {size} WHERE state = {state} AND mirrored = {m};"
_SCHEMA_2 = [
    "CREATE TABLE IF NOT EXISTS tally (state TEXT NOT NULL, mirrored INTEGER NOT NULL, records INTEGER NOT NULL, "
    "bytes INTEGER NOT NULL, PRIMARY KEY (state, mirrored))",
    "CREATE TABLE IF NOT EXISTS purgeable (seq INTEGER PRIMARY KEY, id TEXT NOT NULL)",
    # oldest_unacked(): MIN(created) of one state is one index probe.
    "CREATE INDEX IF NOT EXISTS idx_records_state_created ON records (state, created)",
    "CREATE TRIGGER IF NOT EXISTS rk_records_ins AFTER INSERT ON records BEGIN "
    + _TALLY_ADD.format(state="NEW.state", m=_HAS_MIRROR.format("NEW.id"), size="NEW.size")
    + " INSERT OR IGNORE INTO purgeable (seq, id) SELECT NEW.seq, NEW.id WHERE NEW.state = 'acked' AND "
    + _HAS_MIRROR.format("NEW.id") + "; END",
    "CREATE TRIGGER IF NOT EXISTS rk_records_del AFTER DELETE ON records BEGIN "
    + _TALLY_SUB.format(state="OLD.state", m=_HAS_MIRROR.format("OLD.id"), size="OLD.size")
    + " DELETE FROM purgeable WHERE seq = OLD.seq; END",
    "CREATE TRIGGER IF NOT EXISTS rk_records_upd AFTER UPDATE OF state, size, seq, id ON records "
    "WHEN OLD.state IS NOT NEW.state OR OLD.size IS NOT NEW.size OR OLD.seq IS NOT NEW.seq OR OLD.id IS NOT NEW.id "
    "BEGIN "
    + _TALLY_SUB.format(state="OLD.state", m=_HAS_MIRROR.format("OLD.id"), size="OLD.size") + " "
    + _TALLY_ADD.format(state="NEW.state", m=_HAS_MIRROR.format("NEW.id"), size="NEW.size")
    + " DELETE FROM purgeable WHERE seq = OLD.seq;"
    + " INSERT OR IGNORE INTO purgeable (seq, id) SELECT NEW.seq, NEW.id WHERE NEW.state = 'acked' AND "
    + _HAS_MIRROR.format("NEW.id") + "; END",
    # A record's first copy on any stick moves it from "on no stick" to "mirrored"; its last removed, back.
    "CREATE TRIGGER IF NOT EXISTS rk_mirrors_ins AFTER INSERT ON mirrors "
    "WHEN (SELECT COUNT(*) FROM mirrors WHERE record_id = NEW.record_id) = 1 BEGIN "
    "UPDATE tally SET records = records - 1, bytes = bytes - (SELECT size FROM records WHERE id = NEW.record_id) "
    "WHERE mirrored = 0 AND state = (SELECT state FROM records WHERE id = NEW.record_id); "
    "INSERT INTO tally (state, mirrored, records, bytes) SELECT state, 1, 1, size FROM records "
    "WHERE id = NEW.record_id ON CONFLICT (state, mirrored) DO UPDATE SET records = records + 1, "
    "bytes = bytes + excluded.bytes; "
    "INSERT OR IGNORE INTO purgeable (seq, id) SELECT seq, id FROM records WHERE id = NEW.record_id "
    "AND state = 'acked'; END",
    "CREATE TRIGGER IF NOT EXISTS rk_mirrors_del AFTER DELETE ON mirrors "
    "WHEN NOT EXISTS (SELECT 1 FROM mirrors WHERE record_id = OLD.record_id) BEGIN "
    "UPDATE tally SET records = records - 1, bytes = bytes - (SELECT size FROM records WHERE id = OLD.record_id) "
    "WHERE mirrored = 1 AND state = (SELECT state FROM records WHERE id = OLD.record_id); "
    "INSERT INTO tally (state, mirrored, records, bytes) SELECT state, 0, 1, size FROM records "
    "WHERE id = OLD.record_id ON CONFLICT (state, mirrored) DO UPDATE SET records = records + 1, "
    "bytes = bytes + excluded.bytes; "
    "DELETE FROM purgeable WHERE seq = (SELECT seq FROM records WHERE id = OLD.record_id); END",
]
# Full recomputations (the migration, and the tests that check the triggers against them).
TALLY_RECOMPUTE = ("SELECT state, " + _HAS_MIRROR.format("r.id") + " AS m, COUNT(*), COALESCE(SUM(size), 0) "
                   "FROM records r GROUP BY state, m")
PURGEABLE_RECOMPUTE = ("SELECT seq, id FROM records r WHERE state = 'acked' AND " + _HAS_MIRROR.format("r.id")
                       + " ORDER BY seq")


@dataclass(frozen=True)
class RecordRow:
    """One record as the journal knows it."""

    id: str
    seq: int
    created: str
    clock_synced: bool
    size: int
    sha256: str
    state: str
    state_at: str
    operator_id: str
    reason: str

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> RecordRow:
        return cls(r["id"], r["seq"], r["created"], bool(r["clock_synced"]), r["size"], r["sha256"],
                   r["state"], r["state_at"], r["operator_id"] or "", r["reason"] or "")


class Journal:
    """SQLite journal of the record store (see module doc)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        else:
            conn = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # INSERT OR REPLACE deletes the row it replaces: only with this do the counters' delete triggers see it.
            conn.execute("PRAGMA recursive_triggers=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        if not readonly:
            self._migrate()

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # --- schema -------------------------------------------------------------------------

    def _migrate(self) -> None:
        db = self.db
        with self.transaction():
            if "records" not in db.table_names():
                db["records"].create({
                    "id": str, "seq": int, "created": str, "clock_synced": int, "size": int, "sha256": str,
                    "state": str, "state_at": str, "operator_id": str, "reason": str,
                }, pk="id", not_null={"seq", "size", "sha256", "state"})
                db["records"].create_index(["seq"], unique=True)
                db["records"].create_index(["state", "seq"])
            if "mirrors" not in db.table_names():
                db["mirrors"].create({"record_id": str, "stick_id": str, "at": str},
                                     pk=("record_id", "stick_id"))
                db["mirrors"].create_index(["stick_id"])
            if "sticks" not in db.table_names():
                db["sticks"].create({"stick_id": str, "first_seen": str, "last_seen": str}, pk="stick_id")
            if "audit" not in db.table_names():
                db["audit"].create({"id": int, "at": str, "kind": str, "actor": str, "detail": str}, pk="id")
            if "niks" not in db.table_names():
                # HMAC digests of enrolled NIKs (never the NIK itself) for the "already enrolled here" check.
                db["niks"].create({"digest": str, "record_id": str, "at": str}, pk=("digest", "record_id"))
            if "fp_library" not in db.table_names():
                # Which record each slot of the sensor's template library belongs to (local duplicate check).
                db["fp_library"].create({"page": int, "record_id": str, "nik_digest": str, "finger": str,
                                         "at": str}, pk="page")
            if "meta" not in db.table_names():
                db["meta"].create({"key": str, "value": str}, pk="key")
                db["meta"].insert({"key": "schema_version", "value": "1"})
            (version,) = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if int(version) < 2:  # one step per schema version
                self._migrate_2()

    def _migrate_2(self) -> None:
        """Schema 1 -> 2 in place (inside `_migrate`'s transaction): counters, purge queue, their triggers.

        The counters start from a full count of the rows; from then on the triggers keep them.
        """
        c = self.conn
        for ddl in _SCHEMA_2:
            c.execute(ddl)
        c.execute("DELETE FROM tally")
        c.execute("INSERT INTO tally (state, mirrored, records, bytes) " + TALLY_RECOMPUTE)
        c.execute("DELETE FROM purgeable")
        c.execute("INSERT INTO purgeable (seq, id) " + PURGEABLE_RECOMPUTE)
        c.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate write transaction (committed, i.e. fsync'd, on exit)."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    # --- meta: the sequence high-water mark and the clean-shutdown marker --------------------

    def get_meta(self, key: str) -> str | None:
        """A value of the `meta` table (None when unset)."""
        with self._lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: str) -> None:
        """Set `meta` values in one durable commit (the store's sequence high-water mark, clean marker)."""
        with self.transaction() as c:
            c.executemany("INSERT INTO meta (key, value) VALUES (?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value = excluded.value", list(values.items()))

    # --- records ------------------------------------------------------------------------

    def add_record(self, *, record_id: str, seq: int, created: str, clock_synced: bool, size: int,
                   sha256: str, operator_id: str = "", stick_id: str | None = None) -> None:
        """Journal a record that is durable on the SD (and on `stick_id`, if given), in one commit."""
        now = iso()
        with self.transaction() as c:
            c.execute("INSERT INTO records (id, seq, created, clock_synced, size, sha256, state, state_at, "
                      "operator_id, reason) VALUES (?,?,?,?,?,?, 'stored', ?, ?, '')",
                      (record_id, seq, created, int(clock_synced), size, sha256, now, operator_id))
            if stick_id:
                c.execute("INSERT OR IGNORE INTO mirrors VALUES (?,?,?)", (record_id, stick_id, now))

    def get(self, record_id: str) -> RecordRow | None:
        with self._lock:
            rows = list(self.db.query("SELECT * FROM records WHERE id = ?", [record_id]))
        return RecordRow.from_row(rows[0]) if rows else None

    def records(self, state: str | None = None, limit: int | None = None, after_seq: int = -1,
                newest_first: bool = False) -> list[RecordRow]:
        """Records in capture order, optionally of one state; `after_seq` < 0: from the first (quarantined rows
        with a placeholder number below 0 included, see `insert_quarantined`)."""
        sql = "SELECT * FROM records WHERE seq > ?"
        args: list[Any] = [after_seq if after_seq >= 0 else -(2**62)]
        if state:
            sql += " AND state = ?"
            args.append(state)
        sql += " ORDER BY seq" + (" DESC" if newest_first else "")
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            return [RecordRow.from_row(r) for r in self.db.query(sql, args)]

    def set_state(self, record_id: str, state: str, reason: str = "") -> None:
        """Move a record to `state` (and note why, for quarantine)."""
        if state not in STATES:
            raise ValueError(f"unknown record state {state!r}")
        with self.transaction() as c:
            cur = c.execute("UPDATE records SET state = ?, state_at = ?, reason = ? WHERE id = ?",
                            (state, iso(), reason, record_id))
            if cur.rowcount != 1:
                raise KeyError(f"no record {record_id} in the journal")

    def mark_delivery(self, sent: list[str], acked: list[str]) -> None:
        """Batch progress from the relay in one commit. Order-proof: an ack that overtook its PUBACK
        stays acked, and a quarantined or purged record is never moved back."""
        at = iso()
        with self.transaction() as c:
            c.executemany("UPDATE records SET state = 'sent', state_at = ?, reason = '' WHERE id = ? "
                          "AND state = 'stored'", [(at, r) for r in sent])
            c.executemany("UPDATE records SET state = 'acked', state_at = ?, reason = '' WHERE id = ? "
                          "AND state IN ('stored', 'sent')", [(at, r) for r in acked])

    def insert_quarantined(self, record_id: str, seq: int, size: int, sha256: str, reason: str) -> None:
        """Journal a file found on disk that fails verification (never deleted silently).

        When its number is unknown (0) or already another record's (a number reused by a kit that lost its
        journal), the row gets a placeholder number below every real one (the record id still names the
        number): INSERT OR REPLACE on the unique seq would otherwise delete the other record's row."""
        with self.transaction() as c:
            other = c.execute("SELECT id FROM records WHERE seq = ?", (seq,)).fetchone()
            if seq <= 0 or (other is not None and other[0] != record_id):
                (low,) = c.execute("SELECT COALESCE(MIN(seq), 0) FROM records WHERE id != ?", (record_id,)).fetchone()
                seq = min(int(low), 0) - 1
            c.execute("INSERT OR REPLACE INTO records (id, seq, created, clock_synced, size, sha256, state, "
                      "state_at, operator_id, reason) VALUES (?,?,?,?,?,?, 'quarantined', ?, '', ?)",
                      (record_id, seq, "", 0, size, sha256, iso(), reason))

    def scan(self, page: int = 5000) -> Iterator[tuple[str, int, str, int]]:
        """Every record as (id, seq, state, size), in seq order: the reconcile's listing. Plain tuples, fetched a
        page at a time with the lock released in between (a 50,000-row listing never holds up a status read)."""
        after = -(2**62)  # placeholder numbers of quarantined rows are below 0 (see `insert_quarantined`)
        while True:
            with self._lock:
                rows = self.conn.execute("SELECT id, seq, state, size FROM records WHERE seq > ? ORDER BY seq "
                                         "LIMIT ?", (after, page)).fetchall()
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1][1]

    def max_seq(self) -> int:
        with self._lock:
            (v,) = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
        return int(v)

    def largest_size(self) -> int:
        with self._lock:
            (v,) = self.conn.execute("SELECT COALESCE(MAX(size), 0) FROM records").fetchone()
        return int(v)

    def _tally(self) -> list[tuple[str, int, int, int]]:
        with self._lock:
            return list(self.conn.execute("SELECT state, mirrored, records, bytes FROM tally"))

    def counts(self) -> dict[str, dict[str, int]]:
        """Records and bytes per state (from the trigger-kept counters: at most 2 rows per state read)."""
        out = {s: {"records": 0, "bytes": 0} for s in STATES}
        for state, _m, n, b in self._tally():
            d = out.setdefault(state, {"records": 0, "bytes": 0})
            d["records"] += n
            d["bytes"] += b
        return out

    def oldest_unacked(self) -> str | None:
        """Creation time of the oldest record the data center has not acknowledged (two index probes)."""
        with self._lock:
            row = self.conn.execute(
                "SELECT MIN(c) FROM (SELECT MIN(created) AS c FROM records WHERE state = 'stored' "
                "UNION ALL SELECT MIN(created) FROM records WHERE state = 'sent')").fetchone()
        return row[0] if row and row[0] else None

    def purgeable(self, need_stick: bool, limit: int) -> list[str]:
        """Up to `limit` acked records whose SD copy may go (oldest first): with `need_stick`, only those
        a stick holds (the trigger-kept queue); else every acked one. Reads only the rows it returns."""
        with self._lock:
            if need_stick:
                rows = self.conn.execute("SELECT id FROM purgeable ORDER BY seq LIMIT ?", (limit,))
            else:
                rows = self.conn.execute("SELECT id FROM records WHERE state = 'acked' ORDER BY seq LIMIT ?",
                                         (limit,))
            return [r[0] for r in rows]

    def mark_purged(self, ids: list[str]) -> list[str]:
        """Move those of `ids` still acked to purged, in one commit; returns the ones moved."""
        at = iso()
        with self.transaction() as c:
            moved = [rid for rid in ids
                     if c.execute("UPDATE records SET state = 'purged', state_at = ?, reason = '' "
                                  "WHERE id = ? AND state = 'acked'", (at, rid)).rowcount == 1]
            # A queue entry whose record is no longer acked cannot stay at the head of the queue.
            stale = [(rid,) for rid in ids if rid not in moved]
            if stale:
                c.executemany("DELETE FROM purgeable WHERE id = ?", stale)
        return moved

    # --- mirrors ------------------------------------------------------------------------

    def add_mirror(self, record_id: str, stick_id: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO mirrors VALUES (?,?,?)", (record_id, stick_id, iso()))

    def mirrored_on(self, stick_id: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self.conn.execute("SELECT record_id FROM mirrors WHERE stick_id = ?",
                                                    (stick_id,))}

    def mirror_lag(self) -> dict[str, int]:
        """Live records that are on no stick at all (records, bytes), from the counters."""
        n = b = 0
        for state, m, rn, rb in self._tally():
            if state in LIVE and not m:
                n += rn
                b += rb
        return {"records": n, "bytes": b}

    def has_mirror(self, record_id: str) -> bool:
        with self._lock:
            return self.conn.execute("SELECT 1 FROM mirrors WHERE record_id = ? LIMIT 1",
                                     (record_id,)).fetchone() is not None

    def note_stick(self, stick_id: str) -> None:
        now = iso()
        with self.transaction() as c:
            c.execute("INSERT INTO sticks VALUES (?,?,?) ON CONFLICT(stick_id) DO UPDATE SET last_seen = ?",
                      (stick_id, now, now, now))

    # --- audit --------------------------------------------------------------------------

    def audit(self, kind: str, actor: str = "", **detail: Any) -> None:
        """Append an audit event (operator actions, quarantines, purges)."""
        with self.transaction() as c:
            c.execute("INSERT INTO audit (at, kind, actor, detail) VALUES (?,?,?,?)",
                      (iso(), kind, actor, json.dumps(detail, sort_keys=True, default=str)))

    def audit_events(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT * FROM audit" + (" WHERE kind = ?" if kind else "") + " ORDER BY id DESC LIMIT ?"
        args: list[Any] = ([kind] if kind else []) + [limit]
        with self._lock:
            rows = list(self.db.query(sql, args))
        for r in rows:
            r["detail"] = json.loads(r["detail"] or "{}")
        return rows

    # --- enrollment indexes ---------------------------------------------------------------

    def nik_records(self, digest: str) -> list[str]:
        """Records enrolled on this kit under a NIK digest."""
        with self._lock:
            return [r[0] for r in self.conn.execute("SELECT record_id FROM niks WHERE digest = ? ORDER BY at",
                                                    (digest,))]

    def add_nik(self, digest: str, record_id: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO niks VALUES (?,?,?)", (digest, record_id, iso()))

    def library_pages(self) -> dict[int, dict[str, Any]]:
        """The sensor library's slots as this kit assigned them."""
        with self._lock:
            return {r["page"]: r for r in self.db.query("SELECT * FROM fp_library")}

    def set_library_page(self, page: int, record_id: str, nik_digest: str, finger: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO fp_library VALUES (?,?,?,?,?)",
                      (page, record_id, nik_digest, finger, iso()))
