"""Staging of chunks in transit for the ingest workers: the interface, caps (`StagingLimits`), and the embedded
implementation (`Staging`, SQLite ``staging.db`` next to an embedded archive, shared by the workers of one host).
`provisioning.staging_pg.PgStaging` is the same interface on PostgreSQL, shared by workers on any hosts (the scale
backend); the ingest worker picks the one that goes with its archive."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from firmware.errors import ArchiveError
from firmware.system.sqlitedb import connect_wal
from firmware.wire import relay_protocol as proto


class StagingStore(Protocol):
    """What the ingest needs of staging (both implementations)."""

    limits: StagingLimits

    def add(self, kit_id: str, c: proto.Chunk) -> bool: ...
    def assemble(self, record_id: str, sha256: str, total: int) -> bytes: ...
    def drop(self, record_id: str, sha256: str) -> None: ...
    def expire(self, ttl_s: float) -> int: ...
    def pending(self) -> int: ...
    def usage(self, kit_id: str | None = None) -> tuple[int, int]: ...
    def close(self) -> None: ...


class StagingFull(Exception):
    """A new transfer would exceed a staging limit (`scope`: kit_bytes, kit_transfers, total_bytes, total_transfers)."""

    def __init__(self, scope: str, detail: str) -> None:
        super().__init__(detail)
        self.scope = scope


@dataclass(frozen=True)
class StagingLimits:
    """Caps on unfinished transfers: per kit and in total, in transfers and in (announced) bytes."""

    # A healthy kit draining a backlog while the ingest lags has up to relay.max_unacked_records (100) + a
    # window of records partly staged: the per-kit count leaves room for that; bytes bound the disk.
    kit_bytes: int = 256 * 1024 * 1024
    kit_transfers: int = 128
    total_bytes: int = 4 * 1024 * 1024 * 1024
    total_transfers: int = 4096

    def check(self, kit: tuple[int, int], total: tuple[int, int], size: int) -> None:
        """Raise `StagingFull` unless one more transfer of `size` bytes fits, with `kit` and `total` the
        (transfers, bytes) already reserved by its kit and by all."""
        for scope, have, cap in (("kit_transfers", kit[0] + 1, self.kit_transfers),
                                 ("kit_bytes", kit[1] + size, self.kit_bytes),
                                 ("total_transfers", total[0] + 1, self.total_transfers),
                                 ("total_bytes", total[1] + size, self.total_bytes)):
            if have > cap:
                raise StagingFull(scope, f"staging full ({scope}: {have} > {cap}); resend later")


class Staging:
    """Chunks of records in transit, in SQLite (shared by the workers of one host).

    Every unfinished transfer has a row in ``transfers`` that reserves the record's whole announced size
    when its first chunk arrives, so the caps (`StagingLimits`) hold whatever order chunks come in: a kit
    that floods chunks of made-up records is refused once it holds its share, and the disk never fills.
    """

    def __init__(self, path: Path, limits: StagingLimits | None = None) -> None:
        self.limits = limits or StagingLimits()
        self.conn = connect_wal(path, 60)  # workers may open a fresh staging.db at the same moment
        # Losing staged chunks in a power cut is harmless (the kit resends until acked): no fsync per chunk.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("""CREATE TABLE IF NOT EXISTS chunks (
            record_id TEXT NOT NULL, sha256 TEXT NOT NULL, idx INTEGER NOT NULL, total INTEGER NOT NULL,
            size INTEGER NOT NULL, kit_id TEXT NOT NULL, data BLOB NOT NULL, at REAL NOT NULL,
            PRIMARY KEY (record_id, sha256, idx))""")
        self.conn.execute("CREATE INDEX IF NOT EXISTS chunks_at ON chunks (at)")
        self.conn.execute("""CREATE TABLE IF NOT EXISTS transfers (
            record_id TEXT NOT NULL, sha256 TEXT NOT NULL, kit_id TEXT NOT NULL, size INTEGER NOT NULL,
            first_at REAL NOT NULL, last_at REAL NOT NULL, PRIMARY KEY (record_id, sha256))""")
        self.conn.execute("CREATE INDEX IF NOT EXISTS transfers_kit ON transfers (kit_id)")

    def _admit(self, kit_id: str, c: proto.Chunk, now: float) -> None:
        """Reserve room for the transfer of `c` (inside the caller's transaction); `StagingFull` if none."""
        row = self.conn.execute("SELECT 1 FROM transfers WHERE record_id = ? AND sha256 = ?",
                                (c.record_id, c.sha256)).fetchone()
        if row is not None:
            self.conn.execute("UPDATE transfers SET last_at = ? WHERE record_id = ? AND sha256 = ?",
                              (now, c.record_id, c.sha256))
            return
        kit = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM transfers WHERE kit_id = ?",
                                (kit_id,)).fetchone()
        total = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM transfers").fetchone()
        self.limits.check(kit, total, c.size)
        self.conn.execute("INSERT INTO transfers VALUES (?,?,?,?,?,?)",
                          (c.record_id, c.sha256, kit_id, c.size, now, now))

    def add(self, kit_id: str, c: proto.Chunk) -> bool:
        """Stage one chunk; True if this insert completed the record (exactly one inserter sees that).

        Raises `StagingFull` when a new transfer does not fit the limits (nothing is staged).
        """
        now = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self._admit(kit_id, c, now)
            self.conn.execute("INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?,?,?,?)",
                              (c.record_id, c.sha256, c.index, c.total, c.size, kit_id, c.data, now))
            (n,) = self.conn.execute("SELECT COUNT(*) FROM chunks WHERE record_id = ? AND sha256 = ? AND total = ?",
                                     (c.record_id, c.sha256, c.total)).fetchone()
            # A chunk resent after completion may assemble the record again: the archive answers duplicate.
            complete = n == c.total
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return complete

    def assemble(self, record_id: str, sha256: str, total: int) -> bytes:
        rows = self.conn.execute("SELECT idx, data FROM chunks WHERE record_id = ? AND sha256 = ? AND total = ? "
                                 "ORDER BY idx", (record_id, sha256, total)).fetchall()
        if [r[0] for r in rows] != list(range(total)):
            raise ArchiveError(f"record {record_id}: staged chunks incomplete")
        return b"".join(r[1] for r in rows)

    def drop(self, record_id: str, sha256: str) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("DELETE FROM chunks WHERE record_id = ? AND sha256 = ?", (record_id, sha256))
            self.conn.execute("DELETE FROM transfers WHERE record_id = ? AND sha256 = ?", (record_id, sha256))
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def expire(self, ttl_s: float) -> int:
        """Delete transfers with no chunk for `ttl_s` (abandoned; the kit resends from its store); returns the
        number of chunks deleted."""
        cutoff = time.time() - ttl_s
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("DELETE FROM transfers WHERE last_at < ?", (cutoff,))
            n = self.conn.execute("DELETE FROM chunks WHERE NOT EXISTS (SELECT 1 FROM transfers t WHERE "
                                  "t.record_id = chunks.record_id AND t.sha256 = chunks.sha256)").rowcount
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return n

    def pending(self) -> int:
        return int(self.conn.execute("SELECT COUNT(DISTINCT record_id) FROM chunks").fetchone()[0])

    def usage(self, kit_id: str | None = None) -> tuple[int, int]:
        """(unfinished transfers, bytes reserved), of one kit or of all."""
        sql, args = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM transfers", ()
        if kit_id is not None:
            sql, args = sql + " WHERE kit_id = ?", (kit_id,)
        n, b = self.conn.execute(sql, args).fetchone()
        return int(n), int(b)

    def close(self) -> None:
        self.conn.close()

