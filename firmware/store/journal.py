"""The store's journal: each record's state, its mirror copies, and the audit log, in SQLite.

WAL with ``synchronous=FULL``: a committed transaction survives a power cut (WAL with NORMAL
may roll back the last ones). One connection, guarded by a lock, shared by the daemon's threads.

Record states (``records.state``)::

    stored -> sent -> acked -> purged          (and quarantined, from any state)

``stored`` means the sealed file is durable on the SD. Copies on USB sticks are rows in
``mirrors`` (one per stick id), so "mirrored" is per stick and independent of the uplink.
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
SCHEMA_VERSION = 1


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
                db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)})

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
        """Records in capture order, optionally of one state."""
        sql = "SELECT * FROM records WHERE seq > ?"
        args: list[Any] = [after_seq]
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
        """Journal a file found on disk that fails verification (never deleted silently)."""
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO records (id, seq, created, clock_synced, size, sha256, state, "
                      "state_at, operator_id, reason) VALUES (?,?,?,?,?,?, 'quarantined', ?, '', ?)",
                      (record_id, seq, "", 0, size, sha256, iso(), reason))

    def max_seq(self) -> int:
        with self._lock:
            (v,) = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
        return int(v)

    def largest_size(self) -> int:
        with self._lock:
            (v,) = self.conn.execute("SELECT COALESCE(MAX(size), 0) FROM records").fetchone()
        return int(v)

    def counts(self) -> dict[str, dict[str, int]]:
        """Records and bytes per state."""
        out = {s: {"records": 0, "bytes": 0} for s in STATES}
        with self._lock:
            for state, n, b in self.conn.execute(
                    "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM records GROUP BY state"):
                out[state] = {"records": n, "bytes": b}
        return out

    def oldest_unacked(self) -> str | None:
        """Creation time of the oldest record the data center has not acknowledged."""
        with self._lock:
            row = self.conn.execute("SELECT MIN(created) FROM records WHERE state IN ('stored', 'sent')").fetchone()
        return row[0] if row and row[0] else None

    # --- mirrors ------------------------------------------------------------------------

    def add_mirror(self, record_id: str, stick_id: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO mirrors VALUES (?,?,?)", (record_id, stick_id, iso()))

    def mirrored_on(self, stick_id: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self.conn.execute("SELECT record_id FROM mirrors WHERE stick_id = ?",
                                                    (stick_id,))}

    def mirror_lag(self) -> dict[str, int]:
        """Live records that are on no stick at all (records, bytes)."""
        with self._lock:
            n, b = self.conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records r WHERE r.state IN ('stored','sent','acked') "
                "AND NOT EXISTS (SELECT 1 FROM mirrors m WHERE m.record_id = r.id)").fetchone()
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
