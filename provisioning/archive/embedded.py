"""The embedded archive backend: sealed files in a directory and a SQLite index (the package doc has the layout).
The default: a district office, `make demo`, every test that opens `Archive(path)`."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from firmware.errors import ArchivedRecordCorrupt, ArchivedRecordMissing, ArchiveError
from firmware.system.fsutil import fsync_dir
from firmware.system.sqlitedb import connect_wal
from firmware.wire import record_format as rf
from provisioning.archive.base import ArchiveBase, ArchivedRecord, _now


class Archive(ArchiveBase):
    """The embedded archive: a directory (see module doc). One instance per thread or process; cheap to open."""

    transient = (OSError, sqlite3.Error)

    def __init__(self, root: Path, tofu: bool = False, fleet_db: Path | str | None = None) -> None:
        super().__init__(tofu=tofu, fleet_db=fleet_db)
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "conflicts").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self.conn = connect_wal(self.root / "index.db", 60)  # workers may open a fresh archive at the same moment
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS records (
                record_id TEXT PRIMARY KEY, kit_id TEXT NOT NULL, seq INTEGER NOT NULL, sha256 TEXT NOT NULL,
                size INTEGER NOT NULL, created TEXT, path TEXT NOT NULL, source TEXT NOT NULL,
                received_at TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS records_kit ON records (kit_id, seq);
            CREATE TABLE IF NOT EXISTS kits (
                kit_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, registered_at TEXT NOT NULL, how TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS kit_keys (
                kit_id TEXT NOT NULL, public_key TEXT NOT NULL, added_at TEXT NOT NULL, how TEXT NOT NULL,
                PRIMARY KEY (kit_id, public_key));
            CREATE TABLE IF NOT EXISTS rejects (
                id INTEGER PRIMARY KEY, record_id TEXT, kit_id TEXT, sha256 TEXT, reason TEXT, source TEXT, at TEXT);
        """)

    def close(self) -> None:
        self._close_fleet()
        self.conn.close()

    def cli_args(self) -> list[str]:
        return ["--archive", str(self.root)]

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: one writer at a time across processes)."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        with self._lock:
            return self.conn.execute(sql, args).fetchone()

    # --- kit registry primitives ------------------------------------------------------------

    def _kit_first_key(self, kit_id: str) -> str | None:
        row = self._one("SELECT public_key FROM kits WHERE kit_id = ?", (kit_id,))
        return row[0] if row else None

    def _insert_kit(self, kit_id: str, key_b64: str, how: str) -> str | None:
        with self._tx() as c:
            row = c.execute("SELECT public_key FROM kits WHERE kit_id = ?", (kit_id,)).fetchone()
            if not row:
                c.execute("INSERT INTO kits VALUES (?,?,?,?)", (kit_id, key_b64, _now(), how))
        return row[0] if row else None

    def _rotation_keys(self, kit_id: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self.conn.execute(
                "SELECT public_key FROM kit_keys WHERE kit_id = ? ORDER BY added_at", (kit_id,))]

    def _add_rotation_key(self, kit_id: str, key_b64: str, how: str) -> None:
        with self._lock:
            self.conn.execute("INSERT OR IGNORE INTO kit_keys VALUES (?,?,?,?)", (kit_id, key_b64, _now(), how))

    def kits(self) -> list[dict[str, str]]:
        with self._lock:
            rows = self.conn.execute("SELECT kit_id, public_key, registered_at, how FROM kits ORDER BY kit_id")
            return [dict(zip(("kit_id", "public_key", "registered_at", "how"), r, strict=True)) for r in rows]

    # --- records ----------------------------------------------------------------------------

    def lookup(self, record_id: str) -> tuple[str, str] | None:
        """(sha256, kit_id) of an archived record, or None."""
        row = self._one("SELECT sha256, kit_id FROM records WHERE record_id = ?", (record_id,))
        return (row[0], row[1]) if row else None

    def count(self, kit_id: str | None = None) -> int:
        if kit_id:
            return int(self._one("SELECT COUNT(*) FROM records WHERE kit_id = ?", (kit_id,))[0])
        return int(self._one("SELECT COUNT(*) FROM records", ())[0])

    def record_ids(self, kit_id: str | None = None) -> list[str]:
        with self._lock:
            sql, args = "SELECT record_id FROM records", ()
            if kit_id:
                sql, args = sql + " WHERE kit_id = ?", (kit_id,)
            return [r[0] for r in self.conn.execute(sql + " ORDER BY kit_id, seq", args)]

    def read(self, record_id: str) -> bytes:
        """The archived bytes of `record_id`, checked against the indexed hash.

        Raises `KeyError` if the record is not archived and `ArchiveError` if its stored bytes no
        longer match the index (a damaged disk: never hand such a file on).
        """
        row = self._one("SELECT sha256, path FROM records WHERE record_id = ?", (record_id,))
        if row is None:
            raise KeyError(record_id)
        try:
            data = (self.root / row[1]).read_bytes()
        except FileNotFoundError as e:
            raise ArchivedRecordMissing(f"archived record {record_id}: its file {row[1]} is missing") from e
        except OSError as e:
            raise ArchiveError(f"cannot read archived record {record_id}: {e}") from e
        if rf.sha256_hex(data) != row[0]:
            raise ArchivedRecordCorrupt(f"archived record {record_id} no longer matches its index hash {row[0][:12]}")
        return data

    def since(self, cursor: str | None = None, limit: int = 1000) -> list[ArchivedRecord]:
        """Up to `limit` records archived after `cursor` (None: from the start), oldest first.

        The cursor is the SQLite rowid of the index row: rows are only ever inserted, and one writer
        at a time commits (BEGIN IMMEDIATE), so a row with a smaller rowid can never appear later.
        """
        after = int(cursor) if cursor else 0
        with self._lock:
            rows = self.conn.execute(
                "SELECT rowid, record_id, kit_id, seq, sha256, size, received_at FROM records WHERE rowid > ? "
                "ORDER BY rowid LIMIT ?", (after, int(limit))).fetchall()
        return [ArchivedRecord(r[1], r[2], r[3], r[4], r[5], r[6], str(r[0])) for r in rows]

    def records_in_range(self, kit_id: str, first_seq: int, last_seq: int, after: tuple[int, str] | None = None,
                         limit: int = 200) -> list[ArchivedRecord]:
        seq, rid = after or (first_seq - 1, "")
        with self._lock:
            rows = self.conn.execute(
                "SELECT rowid, record_id, kit_id, seq, sha256, size, received_at FROM records WHERE kit_id = ? AND "
                "seq >= ? AND seq <= ? AND (seq, record_id) > (?, ?) ORDER BY seq, record_id LIMIT ?",
                (kit_id, first_seq, last_seq, seq, rid, int(limit))).fetchall()
        return [ArchivedRecord(r[1], r[2], r[3], r[4], r[5], r[6], str(r[0])) for r in rows]

    def cursor_key(self, cursor: str) -> tuple[int, ...]:
        return (int(cursor),)

    def path_of(self, kit_id: str, record_id: str) -> Path:
        return self.records_dir / kit_id / (record_id + rf.FILE_SUFFIX)

    # --- storage primitives -----------------------------------------------------------------

    def _insert_reject(self, record_id: str, kit_id: str, sha: str, reason: str, source: str) -> None:
        with self._lock:
            self.conn.execute("INSERT INTO rejects (record_id, kit_id, sha256, reason, source, at) VALUES "
                              "(?,?,?,?,?,?)", (record_id, kit_id, sha, reason, source, _now()))

    def _put_record(self, kit_id: str, record_id: str, data: bytes, sha: str) -> tuple[str, str | None]:
        path = self.path_of(kit_id, record_id)
        rel = str(path.relative_to(self.root))
        if not self._write_once(path, data):
            other = rf.sha256_hex(path.read_bytes())
            return rel, (None if other == sha else other)
        return rel, None

    def _put_conflict(self, record_id: str, sha: str, data: bytes) -> str:
        path = self.root / "conflicts" / f"{record_id}.{sha[:16]}{rf.FILE_SUFFIX}"
        self._write_once(path, data)  # already there: the same bytes, kept once
        return path.name

    def _insert_record(self, record_id: str, kit_id: str, seq: int, sha: str, size: int, created: str | None,
                       location: str, source: str) -> bool:
        with self._tx() as c:
            cur = c.execute("INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?)",
                            (record_id, kit_id, seq, sha, size, created, location, source, _now()))
            return cur.rowcount == 1

    def _write_once(self, path: Path, data: bytes) -> bool:
        """Write `data` at `path` durably (temp file, fsync, hard link, fsync dir) unless a file is already there;
        True if written. A link never replaces a file, so what was archived first is never overwritten, and the
        name only ever holds a complete, fsync'd file."""
        if not path.parent.is_dir():  # a new kit's folder: its entry in records/ is made durable too
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(path.parent.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                # Another worker's link: it may not have fsync'd the folder yet, and the caller acks on this answer.
                fsync_dir(path.parent)
                return False
        finally:
            os.unlink(tmp)
        fsync_dir(path.parent)
        return True
