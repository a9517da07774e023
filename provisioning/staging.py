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


class InconsistentChunk(proto.ProtocolError, ArchiveError):
    """A chunk refused by staging: its geometry contradicts itself, or the transfer it belongs to (`field`: what
    differed: ``kit``, ``size``, ``total``, ``chunk_size``, ``index`` or ``data``). Nothing of it is staged.

    A malformed chunk (a `ProtocolError`), and an `ArchiveError` too so the ingest drops it like any chunk it
    cannot stage: logged, never acked, and the transfer it names is left as it was (a hostile duplicate can
    neither spoil nor prolong a genuine transfer).
    """

    def __init__(self, c: proto.Chunk, field: str, detail: str) -> None:
        super().__init__("inconsistent_chunk", f"chunk {c.index}/{c.total} of {c.record_id}: {field}: {detail}; "
                         "chunk dropped")
        self.field = field


def chunk_bytes(size: int, total: int, chunk_size: int, index: int) -> int:
    """Length of chunk `index` of a transfer of that geometry: `chunk_size`, the last one the rest."""
    return chunk_size if index < total - 1 else size - chunk_size * (total - 1)


def check_chunk(c: proto.Chunk) -> None:
    """`InconsistentChunk` unless `c` agrees with itself (as `Chunk.decode` checks): then its transfer's chunks,
    all of one geometry, stage exactly `c.size` bytes, what its transfer reserves. Staging checks it again so the
    caps hold for any caller, not only for chunks that came through the decoder."""
    if not (c.size > 0 and c.chunk_size > 0 and 0 < c.total == -(-c.size // c.chunk_size)):
        raise InconsistentChunk(c, "total", f"{c.total} chunks does not fit size {c.size} / chunk_size "
                                f"{c.chunk_size}")
    if not 0 <= c.index < c.total:
        raise InconsistentChunk(c, "index", f"{c.index} outside 0..{c.total - 1}")
    want = chunk_bytes(c.size, c.total, c.chunk_size, c.index)
    if len(c.data) != want:
        raise InconsistentChunk(c, "data", f"{len(c.data)} bytes, expected {want}")


#: (kit_id, size, total, chunk_size) of a transfer as stored; total and chunk_size are None for a transfer staged
#: before they were stored (a legacy transfer, see `check_admitted`).
TransferRow = tuple[str, int, int | None, int | None]


def check_admitted(kit_id: str, c: proto.Chunk, t: TransferRow) -> bool:
    """`InconsistentChunk` unless `c` (already `check_chunk`-ed) belongs to the admitted transfer `t`: the same kit
    and the same size (the record's bytes are fixed by its sha256, so a genuine resend has its size).

    True when `c` re-chunks the transfer: another chunk size, as a kit sends the record after shrinking its
    chunks for a broker's smaller packet limit, or a transfer staged before the geometry was stored (legacy).
    The caller then drops the chunks staged so far and `c` fixes the geometry: the reservation (`size`) is
    unchanged, so the caps hold, and the kit need not wait for the old transfer to expire."""
    have_kit, have_size, _have_total, have_csize = t
    for field, got, have in (("kit", kit_id, have_kit), ("size", c.size, have_size)):
        if got != have:
            raise InconsistentChunk(c, field, f"{got!r} differs from the transfer's {have!r} (fixed by its first "
                                    "chunk)")
    # (With the same size and chunk size, `check_chunk` has made the total the same too.)
    return have_csize != c.chunk_size


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
    That first chunk also fixes the transfer's geometry (size, total, chunk_size, stored with it): a later chunk
    of another kit or size is refused (`InconsistentChunk`), one of another chunk size starts the transfer over
    (`check_admitted`), so a transfer never stages more than it reserved.
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
        # total, chunk_size: the geometry fixed by the first chunk; nullable, as added to a staging.db made before.
        self.conn.execute("""CREATE TABLE IF NOT EXISTS transfers (
            record_id TEXT NOT NULL, sha256 TEXT NOT NULL, kit_id TEXT NOT NULL, size INTEGER NOT NULL,
            first_at REAL NOT NULL, last_at REAL NOT NULL, total INTEGER, chunk_size INTEGER,
            PRIMARY KEY (record_id, sha256))""")
        self.conn.execute("CREATE INDEX IF NOT EXISTS transfers_kit ON transfers (kit_id)")
        self._add_geometry_columns()

    def _add_geometry_columns(self) -> None:
        """Add total and chunk_size to the transfers of a staging.db made before they were stored (its transfers
        keep NULL there: legacy, see `check_admitted`); once, whichever worker of the host gets there first."""
        def missing() -> list[str]:
            have = {r[1] for r in self.conn.execute("PRAGMA table_info(transfers)")}
            return [col for col in ("total", "chunk_size") if col not in have]

        if not missing():
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for col in missing():  # again under the write lock: another worker may have just added them
                self.conn.execute(f"ALTER TABLE transfers ADD COLUMN {col} INTEGER")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _admit(self, kit_id: str, c: proto.Chunk, now: float) -> None:
        """Reserve room for the transfer of `c` (inside the caller's transaction); `StagingFull` if none,
        `InconsistentChunk` if `c` does not fit itself or its transfer (then the transfer is left untouched)."""
        check_chunk(c)
        row = self.conn.execute("SELECT kit_id, size, total, chunk_size FROM transfers WHERE record_id = ? AND "
                                "sha256 = ?", (c.record_id, c.sha256)).fetchone()
        if row is not None:
            if check_admitted(kit_id, c, row):
                self.conn.execute("DELETE FROM chunks WHERE record_id = ? AND sha256 = ?", (c.record_id, c.sha256))
            # Only a chunk of this transfer keeps it alive; a re-chunking (or legacy) one fixes the geometry.
            self.conn.execute("UPDATE transfers SET last_at = ?, total = ?, chunk_size = ? WHERE record_id = ? AND "
                              "sha256 = ?", (now, c.total, c.chunk_size, c.record_id, c.sha256))
            return
        kit = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM transfers WHERE kit_id = ?",
                                (kit_id,)).fetchone()
        total = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM transfers").fetchone()
        self.limits.check(kit, total, c.size)
        self.conn.execute("INSERT INTO transfers (record_id, sha256, kit_id, size, first_at, last_at, total, "
                          "chunk_size) VALUES (?,?,?,?,?,?,?,?)",
                          (c.record_id, c.sha256, kit_id, c.size, now, now, c.total, c.chunk_size))

    def add(self, kit_id: str, c: proto.Chunk) -> bool:
        """Stage one chunk; True if this insert completed the record (exactly one inserter sees that).

        Raises `StagingFull` when a new transfer does not fit the limits, `InconsistentChunk` when `c` does not
        fit itself or the geometry its transfer's first chunk fixed (nothing is staged either way).
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

