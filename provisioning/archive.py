"""The data center's record archive: sealed files on disk, a SQLite index, the kit key registry.

Layout of an archive directory (shared by every ingest worker and by `rekam-fleet import`)::

    index.db                    records (unique record_id), kits (registered public keys)
    records/<kit_id>/<record_id>.rkm
    conflicts/                  a second, different file claiming an archived record id (kept, never merged)

`Archive.store()` is the single way in, for MQTT and USB alike, so both paths are idempotent with
each other: it verifies the kit signature against the registered key, refuses a record whose id does
not carry the kit that signed it (`record_id_mismatch`: topic or stick folder, header and record id
agree), writes the file (temp, fsync, rename, fsync dir), then inserts the index row with INSERT OR
IGNORE in one fsync'd transaction (WAL, synchronous=FULL). Only after `store()` returns may anyone
tell the kit the record is safe. Two workers racing on one record write identical bytes to the same
path and only one index row wins.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from firmware.errors import ArchiveError, UnknownKit
from firmware.wire import record_format as rf
from firmware.wire.ids import parse_record_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreResult:
    """What happened to one record: stored (new), duplicate (already had), rejected (malformed)."""

    status: str
    record_id: str
    sha256: str
    reason: str = ""


@dataclass(frozen=True)
class ArchivedRecord:
    """One index row, as `since()` lists them. `cursor` is opaque: pass it back to `since()` to get
    only what was archived after this row (the ABIS export queue)."""

    record_id: str
    kit_id: str
    seq: int
    sha256: str
    size: int
    received_at: str
    cursor: str


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_id_mismatch(record_id: str, kit_id: str, seq: int | None = None) -> str:
    """Why `record_id` cannot be a record of `kit_id` (with sequence number `seq`), or "" if it can.

    The one check that binds a record id to its kit: the id, the header's kit and the kit that signed
    (the registered key, the MQTT topic, the stick's kit folder) must all name the same kit.
    """
    p = parse_record_id(record_id)
    if p is None:
        return f"KitMismatch: {record_id!r} is not a valid record id"
    if p.kit_id != kit_id:
        return f"KitMismatch: record id {record_id} belongs to kit {p.kit_id}, signed by kit {kit_id}"
    if seq is not None and p.seq != seq:
        return f"KitMismatch: record id {record_id} has sequence number {p.seq}, its header says {seq}"
    return ""


def decode_kit_key(text: str) -> bytes:
    """A kit's Ed25519 public key from base64 (as in kit.json / `rekam identity show`)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise ValueError(f"kit public key {text[:20]!r}... is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"kit public key must be 32 bytes (Ed25519), got {len(raw)}")
    return raw


class Archive:
    """An archive directory (see module doc). One instance per thread or process; cheap to open."""

    def __init__(self, root: Path, tofu: bool = False, fleet_db: Path | None = None) -> None:
        self.root = Path(root)
        self.tofu = tofu
        self.fleet_db = fleet_db
        self.records_dir = self.root / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "conflicts").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(self.root / "index.db", timeout=60, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=60000")
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
        self.conn.close()

    # --- kit registry ---------------------------------------------------------------------

    def register_kit(self, kit_id: str, public_key_b64: str, how: str = "registered") -> None:
        """Register (or confirm) a kit's Ed25519 key; a different key for a known kit is refused."""
        decode_kit_key(public_key_b64)
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                row = self.conn.execute("SELECT public_key FROM kits WHERE kit_id = ?", (kit_id,)).fetchone()
                if row and row[0] != public_key_b64.strip():
                    raise ValueError(f"kit {kit_id} is already registered with another key; "
                                     "remove it first if the kit was re-keyed")
                if not row:
                    self.conn.execute("INSERT INTO kits VALUES (?,?,?,?)", (kit_id, public_key_b64.strip(), _now(),
                                                                             how))
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        if not row:
            log.info("kit registered kit_id=%s how=%s key=%s", kit_id, how,
                     rf.key_id(decode_kit_key(public_key_b64)))

    def kit_keys(self, kit_id: str) -> list[bytes]:
        """Every key the kit has signed with: its first registered key, later keys (rotations), and the
        current key of an approved kit in the fleet registry. Records sealed before a rotation and
        sent after it carry the old key, so all of them stay valid."""
        first = self.kit_key(kit_id)
        keys = [first] if first is not None else []
        with self._lock:
            rows = self.conn.execute("SELECT public_key FROM kit_keys WHERE kit_id = ? ORDER BY added_at",
                                     (kit_id,)).fetchall()
        keys += [k for k in (decode_kit_key(r[0]) for r in rows) if k not in keys]
        if self.fleet_db is not None and first is not None:
            current = self._fleet_key(kit_id)
            if current is not None and decode_kit_key(current) not in keys:
                with self._lock:
                    self.conn.execute("INSERT OR IGNORE INTO kit_keys VALUES (?,?,?,?)",
                                      (kit_id, current.strip(), _now(), "fleet-rotation"))
                log.info("kit key added from the fleet registry kit_id=%s key=%s", kit_id,
                         rf.key_id(decode_kit_key(current)))
                keys.append(decode_kit_key(current))
        return keys

    def _fleet_key(self, kit_id: str) -> str | None:
        try:
            fc = sqlite3.connect(f"file:{self.fleet_db}?mode=ro", uri=True, timeout=10)
            try:
                row = fc.execute("SELECT public_key FROM kits WHERE kit_id = ? AND state = 'approved'",
                                 (kit_id,)).fetchone()
            finally:
                fc.close()
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot read the fleet registry {self.fleet_db}: {e}") from e
        return row[0] if row else None

    def kit_key(self, kit_id: str) -> bytes | None:
        """The kit's registered key: the archive's own registry, else an approved kit of the fleet registry."""
        with self._lock:
            row = self.conn.execute("SELECT public_key FROM kits WHERE kit_id = ?", (kit_id,)).fetchone()
        if row:
            return decode_kit_key(row[0])
        if self.fleet_db is not None:
            current = self._fleet_key(kit_id)
            if current is not None:
                self.register_kit(kit_id, current, how="fleet")
                return decode_kit_key(current)
        return None

    def kits(self) -> list[dict[str, str]]:
        with self._lock:
            rows = self.conn.execute("SELECT kit_id, public_key, registered_at, how FROM kits ORDER BY kit_id")
            return [dict(zip(("kit_id", "public_key", "registered_at", "how"), r, strict=True)) for r in rows]

    # --- records ----------------------------------------------------------------------------

    def has(self, record_id: str) -> str | None:
        """The archived sha256 of `record_id`, or None."""
        with self._lock:
            row = self.conn.execute("SELECT sha256 FROM records WHERE record_id = ?", (record_id,)).fetchone()
        return row[0] if row else None

    def lookup(self, record_id: str) -> tuple[str, str] | None:
        """(sha256, kit_id) of an archived record, or None."""
        with self._lock:
            row = self.conn.execute("SELECT sha256, kit_id FROM records WHERE record_id = ?", (record_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def count(self, kit_id: str | None = None) -> int:
        with self._lock:
            if kit_id:
                return int(self.conn.execute("SELECT COUNT(*) FROM records WHERE kit_id = ?", (kit_id,)).fetchone()[0])
            return int(self.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

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
        with self._lock:
            row = self.conn.execute("SELECT sha256, path FROM records WHERE record_id = ?", (record_id,)).fetchone()
        if row is None:
            raise KeyError(record_id)
        try:
            data = (self.root / row[1]).read_bytes()
        except OSError as e:
            raise ArchiveError(f"cannot read archived record {record_id}: {e}") from e
        if rf.sha256_hex(data) != row[0]:
            raise ArchiveError(f"archived record {record_id} no longer matches its index hash {row[0][:12]}")
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

    def path_of(self, kit_id: str, record_id: str) -> Path:
        return self.records_dir / kit_id / (record_id + rf.FILE_SUFFIX)

    def refuse(self, record_id: str, kit_id: str, sha: str, reason: str, source: str) -> StoreResult:
        """Log and record a refusal decided before `store()` (e.g. by the ingest); returns the rejected result."""
        return self._reject(record_id, kit_id, sha, reason, source)

    def _reject(self, record_id: str, kit_id: str, sha: str, reason: str, source: str) -> StoreResult:
        with self._lock:
            self.conn.execute("INSERT INTO rejects (record_id, kit_id, sha256, reason, source, at) VALUES "
                              "(?,?,?,?,?,?)", (record_id, kit_id, sha, reason, source, _now()))
        log.error("record rejected record_id=%s kit_id=%s source=%s reason=%s", record_id, kit_id, source, reason)
        return StoreResult("rejected", record_id, sha, reason)

    def store(self, data: bytes, kit_id: str, source: str, expect_record_id: str | None = None,
              expect_sha256: str | None = None) -> StoreResult:
        """Verify and durably archive one sealed record from `kit_id` (see module doc).

        Returns stored / duplicate / rejected; raises `UnknownKit` or `ArchiveError` for transient
        problems (the record must then be offered again later, not acknowledged).
        """
        sha = rf.sha256_hex(data)
        rid = expect_record_id or "?"
        if expect_sha256 is not None and sha != expect_sha256:
            raise ArchiveError(f"record {rid}: bytes hash to {sha[:12]}, sender announced {expect_sha256[:12]}")
        if expect_record_id and (why := record_id_mismatch(expect_record_id, kit_id)):
            return self._reject(rid, kit_id, sha, why, source)
        if expect_record_id and self.lookup(rid) == (sha, kit_id):
            return StoreResult("duplicate", rid, sha)
        keys = self.kit_keys(kit_id)
        trusted = keys[0] if keys else None
        try:
            parsed = rf.parse(data)  # layout and signature, with the key in the header
        except rf.RecordFormatError as e:
            return self._reject(rid, kit_id, sha, f"{type(e).__name__}: {e}", source)
        h = parsed.header
        if keys and h.kit_key not in keys:
            return self._reject(rid, kit_id, sha, f"BadSignature: record {h.record_id} is signed by key "
                                f"{rf.key_id(h.kit_key)}, not by a registered key of kit {kit_id}", source)
        if expect_record_id and h.record_id != expect_record_id:
            return self._reject(rid, kit_id, sha, f"file holds record {h.record_id}, not {expect_record_id}", source)
        if h.kit_id != kit_id:
            return self._reject(h.record_id, kit_id, sha, f"record belongs to kit {h.kit_id}, sent as kit {kit_id}",
                                source)
        if why := record_id_mismatch(h.record_id, h.kit_id, h.seq):
            # A stolen kit signing records named after another kit's next numbers would otherwise squat them.
            return self._reject(h.record_id, kit_id, sha, why, source)
        if trusted is None:
            if not self.tofu:
                raise UnknownKit(f"kit {kit_id} is not registered: "
                                 f"rekam-fleet archive register-kit {kit_id} <public key>")
            # Trust on first use (explicit flag): the first record pins the kit's key.
            self.register_kit(kit_id, base64.b64encode(h.kit_key).decode(), how="tofu")
        rid = h.record_id
        known = self.has(rid)
        if known == sha:
            return StoreResult("duplicate", rid, sha)  # (its kit was checked above: header and signature)
        if known is not None:
            # Same id, other bytes: keep both files, never overwrite the archived one.
            cpath = self.root / "conflicts" / f"{rid}.{sha[:16]}{rf.FILE_SUFFIX}"
            self._write(cpath, data)
            return self._reject(rid, kit_id, sha, f"record id already archived with sha256 {known[:12]}; "
                                f"this copy kept as {cpath.name}", source)
        path = self.path_of(kit_id, rid)
        try:
            self._write(path, data)
            with self._lock:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    cur = self.conn.execute(
                        "INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?)",
                        (rid, kit_id, h.seq, sha, len(data), h.created, str(path.relative_to(self.root)), source,
                         _now()))
                    inserted = cur.rowcount == 1
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
        except (OSError, sqlite3.Error) as e:
            raise ArchiveError(f"cannot archive {rid}: {e}") from e
        if not inserted:
            return StoreResult("duplicate", rid, sha)  # another worker won the race with the same bytes
        log.info("record archived record_id=%s kit_id=%s size=%d source=%s", rid, kit_id, len(data), source)
        return StoreResult("stored", rid, sha)

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
