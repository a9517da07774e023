"""Staging on PostgreSQL: chunks in transit shared by stateless ingest workers on any hosts (the scale backend).

The same interface and caps as the embedded `provisioning.staging.Staging`, in the archive's own database
(tables of migrations 2 and 3 in `provisioning.archive.scale`): whichever worker a chunk reaches stages it, and
whichever worker's insert completes a record assembles and stores it. Shared subscriptions give no affinity;
nothing here needs any.

Race-safety across workers and hosts:

- a chunk of a transfer already admitted first locks the transfer's row (``SELECT ... FOR UPDATE``) until commit:
  chunks of one record are checked against the geometry its first chunk fixed and counted one transaction at a
  time, so exactly one insert sees the record complete (as ``BEGIN IMMEDIATE`` gives the SQLite staging);
- admitting a new transfer takes one transaction-scoped advisory lock for all of staging, then counts the kit's
  and everyone's transfers and reserved bytes: two workers can never both take the last place under a cap.
  (Admissions are one short transaction per record, not per chunk.)

Tables are UNLOGGED: no WAL for chunks (half the write volume); after a crash of PostgreSQL they come back empty,
which loses nothing (the kit resends every record it has no ack for). Time is the database's clock, so workers
with skewed clocks agree on the TTL.
"""

from __future__ import annotations

from typing import Any

import psycopg

from firmware.errors import ArchiveError
from firmware.wire import relay_protocol as proto
from provisioning.archive.scale import Database
from provisioning.staging import StagingLimits, check_admitted, check_chunk

ADMIT_LOCK = 0x72656B616D01  # pg_advisory_xact_lock key of staging admissions
NOW = "extract(epoch from clock_timestamp())"
_TRANSFER = ("SELECT kit_id, size, total, chunk_size FROM staging_transfers WHERE record_id = %s AND sha256 = %s "
             "FOR UPDATE")


class PgStaging:
    """Chunks of records in transit in PostgreSQL (`dsn`: the scale archive's database); see module doc."""

    def __init__(self, dsn: str, limits: StagingLimits | None = None, connect_timeout_s: float = 5.0) -> None:
        self.limits = limits or StagingLimits()
        self.db = Database(dsn, connect_timeout_s)
        with self.db.conn("cannot open the staging database"):
            pass  # connect and migrate now

    def _admit(self, c: psycopg.Connection[Any], kit_id: str, ch: proto.Chunk) -> None:
        """Reserve room for the transfer of `ch` (inside the caller's transaction); `StagingFull` if none,
        `InconsistentChunk` if `ch` does not fit itself or its transfer (then the transfer is left untouched)."""
        check_chunk(ch)
        row = c.execute(_TRANSFER, (ch.record_id, ch.sha256)).fetchone()
        if row is None:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (ADMIT_LOCK,))
            row = c.execute(_TRANSFER, (ch.record_id, ch.sha256)).fetchone()  # another worker may have admitted it
        if row is not None:  # admitted before: its row is now locked until this transaction ends
            if check_admitted(kit_id, ch, row):
                c.execute("DELETE FROM staging_chunks WHERE record_id = %s AND sha256 = %s",
                          (ch.record_id, ch.sha256))
            # Only a chunk of this transfer keeps it alive; a re-chunking (or legacy) one fixes the geometry.
            c.execute(f"UPDATE staging_transfers SET last_at = {NOW}, total = %s, chunk_size = %s WHERE "
                      "record_id = %s AND sha256 = %s", (ch.total, ch.chunk_size, ch.record_id, ch.sha256))
            return
        kit = c.execute("SELECT count(*), COALESCE(sum(size), 0) FROM staging_transfers WHERE kit_id = %s",
                        (kit_id,)).fetchone()
        total = c.execute("SELECT count(*), COALESCE(sum(size), 0) FROM staging_transfers").fetchone()
        self.limits.check(kit, total, ch.size)
        c.execute("INSERT INTO staging_transfers (record_id, sha256, kit_id, size, first_at, last_at, total, "
                  f"chunk_size) VALUES (%s, %s, %s, %s, {NOW}, {NOW}, %s, %s)",
                  (ch.record_id, ch.sha256, kit_id, ch.size, ch.total, ch.chunk_size))

    def add(self, kit_id: str, c: proto.Chunk) -> bool:
        """Stage one chunk; True if this insert completed the record (exactly one inserter, on any worker, sees
        that). Raises `StagingFull` when a new transfer does not fit the limits, `InconsistentChunk` when `c` does
        not fit itself or the geometry its transfer's first chunk fixed (nothing is staged either way)."""
        with self.db.conn("cannot stage a chunk") as conn, conn.transaction():
            self._admit(conn, kit_id, c)
            conn.execute(
                f"INSERT INTO staging_chunks VALUES (%s, %s, %s, %s, %s, %s, %s, {NOW}) "
                "ON CONFLICT (record_id, sha256, idx) DO UPDATE SET total = excluded.total, size = excluded.size, "
                "kit_id = excluded.kit_id, data = excluded.data, at = excluded.at",
                (c.record_id, c.sha256, c.index, c.total, c.size, kit_id, bytes(c.data)))
            (n,) = conn.execute("SELECT count(*) FROM staging_chunks WHERE record_id = %s AND sha256 = %s AND "
                                "total = %s", (c.record_id, c.sha256, c.total)).fetchone()
        # A chunk resent after completion may assemble the record again: the archive answers duplicate.
        return int(n) == c.total

    def assemble(self, record_id: str, sha256: str, total: int) -> bytes:
        with self.db.conn("cannot read staged chunks") as conn:
            rows = conn.execute("SELECT idx, data FROM staging_chunks WHERE record_id = %s AND sha256 = %s AND "
                                "total = %s ORDER BY idx", (record_id, sha256, total)).fetchall()
        if [r[0] for r in rows] != list(range(total)):
            raise ArchiveError(f"record {record_id}: staged chunks incomplete")
        return b"".join(bytes(r[1]) for r in rows)

    def drop(self, record_id: str, sha256: str) -> None:
        with self.db.conn("cannot drop staged chunks") as conn, conn.transaction():
            conn.execute("DELETE FROM staging_transfers WHERE record_id = %s AND sha256 = %s", (record_id, sha256))
            conn.execute("DELETE FROM staging_chunks WHERE record_id = %s AND sha256 = %s", (record_id, sha256))

    def expire(self, ttl_s: float) -> int:
        """Delete transfers with no chunk for `ttl_s` (abandoned; the kit resends from its store), whichever
        worker staged them; returns the number of chunks deleted."""
        with self.db.conn("cannot expire staged chunks") as conn, conn.transaction():
            cur = conn.execute(
                f"WITH gone AS (DELETE FROM staging_transfers WHERE last_at < {NOW} - %s RETURNING record_id, sha256) "
                "DELETE FROM staging_chunks c USING gone WHERE c.record_id = gone.record_id AND "
                "c.sha256 = gone.sha256", (float(ttl_s),))
            n = cur.rowcount
            # Chunks left without a transfer (none are made so; a defence against a half-applied manual clean-up).
            n += conn.execute(f"DELETE FROM staging_chunks c WHERE c.at < {NOW} - %s AND NOT EXISTS (SELECT 1 FROM "
                              "staging_transfers t WHERE t.record_id = c.record_id AND t.sha256 = c.sha256)",
                              (float(ttl_s),)).rowcount
        return int(n)

    def pending(self) -> int:
        with self.db.conn() as conn:
            return int(conn.execute("SELECT count(DISTINCT record_id) FROM staging_chunks").fetchone()[0])

    def usage(self, kit_id: str | None = None) -> tuple[int, int]:
        """(unfinished transfers, bytes reserved), of one kit or of all."""
        sql, args = "SELECT count(*), COALESCE(sum(size), 0) FROM staging_transfers", ()
        if kit_id is not None:
            sql, args = sql + " WHERE kit_id = %s", (kit_id,)
        with self.db.conn() as conn:
            n, b = conn.execute(sql, args).fetchone()
        return int(n), int(b)

    def close(self) -> None:
        self.db.close()
