"""The archive's shared part: the one verification path (`ArchiveBase.store`), kit registry logic, the result
types and the id/key checks. The backends (`provisioning.archive.embedded`, `provisioning.archive.scale`) only
store; see the package doc."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.errors import ArchiveError, FleetError, KitRevoked, UnknownKit
from firmware.wire import record_format as rf
from firmware.wire.ids import parse_record_id
from provisioning.texts import for_terminal

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


@dataclass(frozen=True)
class ClockSegment:
    """A run of a kit's records and the offset its signed clock correction says to add to their times
    (`offset_s`; issue #18), as the fleet registry keeps it (`provisioning.registry_db`). `correction_id` is the
    registry's id of the correction document: it grows in commit order (the export's late-correction cursor)."""

    kit_id: str
    boot_id: str
    first_seq: int
    last_seq: int
    offset_s: float
    source: str
    correction_id: int


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _segment(r: tuple[Any, ...]) -> ClockSegment:
    return ClockSegment(str(r[0]), str(r[1]), int(r[2]), int(r[3]), float(r[4]), str(r[5]), int(r[6]))


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



class ArchiveBase:
    """The archive's one verification path (`store`) and kit registry logic over storage primitives.

    A backend implements the primitives (the methods below that raise NotImplementedError) and lists the
    exceptions that mean "storage trouble, try later" in `transient`; `store()` turns those into
    `ArchiveError`, so the caller answers retry and never acks.
    """

    transient: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, tofu: bool = False, fleet_db: Path | str | None = None) -> None:
        self.tofu = tofu
        self.fleet_db = fleet_db
        self._fleet_pg: Any = None  # the shared registry's connection, opened at its first use

    # --- primitives (per backend) -------------------------------------------------------------

    def _kit_first_key(self, kit_id: str) -> str | None:
        """The key the kit was first registered with (base64), or None."""
        raise NotImplementedError

    def _insert_kit(self, kit_id: str, key_b64: str, how: str) -> str | None:
        """Register `kit_id` with `key_b64` unless already registered (atomically); the key it already had, or
        None if this call registered it."""
        raise NotImplementedError

    def _rotation_keys(self, kit_id: str) -> list[str]:
        """Keys added after the first (rotations), oldest first."""
        raise NotImplementedError

    def _add_rotation_key(self, kit_id: str, key_b64: str, how: str) -> None:
        """Add a later key of the kit (no-op if known)."""
        raise NotImplementedError

    def _insert_reject(self, record_id: str, kit_id: str, sha: str, reason: str, source: str) -> None:
        raise NotImplementedError

    def _put_record(self, kit_id: str, record_id: str, data: bytes, sha: str) -> tuple[str, str | None]:
        """Write `data` once, durably, at the record's place and check it there. Returns (location, None) when the
        place now holds exactly `data` (written now, or by an earlier or concurrent store of the same bytes), or
        (location, other_sha) when it already holds other bytes (left as they are, never overwritten)."""
        raise NotImplementedError

    def _put_conflict(self, record_id: str, sha: str, data: bytes) -> str:
        """Keep a second, different copy claiming `record_id` aside (never merged); returns its name."""
        raise NotImplementedError

    def _insert_record(self, record_id: str, kit_id: str, seq: int, sha: str, size: int, created: str | None,
                       location: str, source: str) -> bool:
        """Insert the index row, committed durably before returning; False if the record id was already indexed."""
        raise NotImplementedError

    def lookup(self, record_id: str) -> tuple[str, str] | None:
        """(sha256, kit_id) of an archived record, or None."""
        raise NotImplementedError

    def _fleet_rows(self, sql: str, params: tuple[Any, ...], optional: bool = False) -> list[tuple[Any, ...]]:
        """Rows of a read-only query on the fleet registry (`fleet_db`: its ``fleet.db``, or the PostgreSQL DSN of
        a shared registry); ``?`` placeholders. The one place the archive reads the fleet registry. `optional`: a
        fleet.db made before the queried table existed answers no rows instead of an error (the fleet service
        creates the tables when it next starts)."""
        from provisioning import registry_db

        if registry_db.is_dsn(str(self.fleet_db)):
            try:
                if self._fleet_pg is None:
                    self._fleet_pg = registry_db.PostgresDb(str(self.fleet_db))
                return [tuple(r.values()) for r in self._fleet_pg.execute(sql, params)]
            except FleetError as e:
                raise ArchiveError(f"cannot read the fleet registry: {e}") from e
        try:
            fc = sqlite3.connect(f"file:{self.fleet_db}?mode=ro", uri=True, timeout=10)
            try:
                return [tuple(r) for r in fc.execute(sql, params)]
            finally:
                fc.close()
        except sqlite3.OperationalError as e:
            if optional and "no such table" in str(e):
                return []
            raise ArchiveError(f"cannot read the fleet registry {self.fleet_db}: {e}") from e
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot read the fleet registry {self.fleet_db}: {e}") from e

    def _fleet_kit(self, kit_id: str) -> tuple[str | None, str | None] | None:
        """(state, public key) of `kit_id` in the fleet registry, or None if it is not there."""
        rows = self._fleet_rows("SELECT state, public_key FROM kits WHERE kit_id = ?", (kit_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def _fleet_key(self, kit_id: str, row: tuple[str | None, str | None] | None | bool = False) -> str | None:
        """The current key of an approved kit in the fleet registry, or None (`row`: its `_fleet_kit` row, when
        the caller has read it already)."""
        if row is False:
            row = self._fleet_kit(kit_id)
        return row[1] if isinstance(row, tuple) and row[0] == "approved" else None

    def _check_not_revoked(self, kit_id: str) -> tuple[str | None, str | None] | None | bool:
        """`KitRevoked` if the fleet registry (when the archive has one) says `kit_id` is revoked; else the kit's
        registry row (`_fleet_kit`; False without a registry), for `kit_keys` to reuse.

        Revocation also puts the kit's certificate on the CRL, but a broker reads the CRL only at a reload, checks
        it only at the TLS handshake (an open connection stays open), and every shard broker needs its own copy:
        until then a revoked (stolen) kit can still publish. The archive is where that ends. Read per record, not
        cached: one indexed lookup, and a revocation takes effect at the next record."""
        if self.fleet_db is None:
            return False
        row = self._fleet_kit(kit_id)
        if row is not None and row[0] == "revoked":
            raise KitRevoked(f"kit {kit_id} is revoked in the fleet registry: its records are not archived "
                             f"(a supervisor who holds the kit can import its stick: rekam-fleet import)")
        return row

    _SEGMENTS = ("SELECT s.kit_id, s.boot_id, s.first_seq, s.last_seq, s.offset_s, c.source, c.id "
                 "FROM clock_segments s JOIN clock_corrections c ON c.id = s.correction_id "
                 "WHERE s.offset_s IS NOT NULL AND ")

    def clock_segment(self, kit_id: str, seq: int) -> ClockSegment | None:
        """The clock correction segment of the fleet registry that covers record `seq` of `kit_id` and has an
        offset (the first kept, if two ever did), or None; always None without a fleet registry."""
        if self.fleet_db is None:
            return None
        rows = self._fleet_rows(self._SEGMENTS + "s.kit_id = ? AND s.first_seq <= ? AND s.last_seq >= ? "
                                "ORDER BY c.id, s.first_seq LIMIT 1", (kit_id, seq, seq), optional=True)
        return _segment(rows[0]) if rows else None

    def clock_segments_since(self, after: int, limit: int = 100) -> tuple[list[ClockSegment], int]:
        """(segments with an offset, newest correction id looked at) of up to `limit` correction documents the
        fleet registry kept after id `after`, oldest first; ([], after) when there are none or no registry."""
        if self.fleet_db is None:
            return [], after
        ids = [int(r[0]) for r in self._fleet_rows("SELECT id FROM clock_corrections WHERE id > ? ORDER BY id "
                                                   "LIMIT ?", (after, limit), optional=True)]
        if not ids:
            return [], after
        rows = self._fleet_rows(self._SEGMENTS + "c.id > ? AND c.id <= ? ORDER BY c.id, s.first_seq",
                                (after, ids[-1]), optional=True)
        return [_segment(r) for r in rows], ids[-1]

    def first_clock_correction(self) -> str | None:
        """A name of the fleet registry's corrections: its first kept correction (``id:kit:sig``, rows are never
        deleted), or None (no registry, or none kept yet). The export binds its correction cursor to it."""
        if self.fleet_db is None:
            return None
        rows = self._fleet_rows("SELECT id, kit_id, sig FROM clock_corrections ORDER BY id LIMIT 1", (), optional=True)
        return f"{rows[0][0]}:{rows[0][1]}:{str(rows[0][2])[:24]}" if rows else None

    def records_in_range(self, kit_id: str, first_seq: int, last_seq: int, after: tuple[int, str] | None = None,
                         limit: int = 200) -> list[ArchivedRecord]:
        """Up to `limit` archived records of `kit_id` with ``first_seq <= seq <= last_seq``, by (seq, record id),
        after `after` = (seq, record id) of the previous page (the records a clock correction covers)."""
        raise NotImplementedError

    def cursor_key(self, cursor: str) -> tuple[int, ...]:
        """A `since()` cursor as a sortable key: a record whose cursor's key is at most the saved cursor's was
        already listed by `since()`. Raises ValueError for a malformed cursor."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _close_fleet(self) -> None:
        """Close the shared registry's connection, if one was opened (each backend's `close()` calls it)."""
        pg, self._fleet_pg = self._fleet_pg, None
        if pg is not None:
            pg.close()

    def cli_args(self) -> list[str]:
        """The `rekam-fleet` options that name this archive (for commands printed to an operator)."""
        raise NotImplementedError

    # --- kit registry -------------------------------------------------------------------------

    def register_kit(self, kit_id: str, public_key_b64: str, how: str = "registered") -> None:
        """Register (or confirm) a kit's Ed25519 key; a different key for a known kit is refused."""
        decode_kit_key(public_key_b64)
        had = self._insert_kit(kit_id, public_key_b64.strip(), how)
        if had is not None and had != public_key_b64.strip():
            raise ValueError(f"kit {kit_id} is already registered with another key; "
                             "remove it first if the kit was re-keyed")
        if had is None:
            log.info("kit registered kit_id=%s how=%s key=%s", kit_id, how,
                     rf.key_id(decode_kit_key(public_key_b64)))

    def kit_keys(self, kit_id: str, fleet_row: tuple[str | None, str | None] | None | bool = False) -> list[bytes]:
        """Every key the kit has signed with: its first registered key, later keys (rotations), and the
        current key of an approved kit in the fleet registry. Records sealed before a rotation and
        sent after it carry the old key, so all of them stay valid. `fleet_row`: the kit's fleet registry row
        when the caller read it already (one registry read per record)."""
        first = self.kit_key(kit_id)
        keys = [first] if first is not None else []
        keys += [k for k in (decode_kit_key(r) for r in self._rotation_keys(kit_id)) if k not in keys]
        if self.fleet_db is not None and first is not None:
            current = self._fleet_key(kit_id, fleet_row)
            if current is not None and decode_kit_key(current) not in keys:
                self._add_rotation_key(kit_id, current.strip(), "fleet-rotation")
                log.info("kit key added from the fleet registry kit_id=%s key=%s", kit_id,
                         rf.key_id(decode_kit_key(current)))
                keys.append(decode_kit_key(current))
        return keys

    def kit_key(self, kit_id: str) -> bytes | None:
        """The kit's registered key: the archive's own registry, else an approved kit of the fleet registry."""
        first = self._kit_first_key(kit_id)
        if first:
            return decode_kit_key(first)
        if self.fleet_db is not None:
            current = self._fleet_key(kit_id)
            if current is not None:
                self.register_kit(kit_id, current, how="fleet")
                return decode_kit_key(current)
        return None

    # --- records ------------------------------------------------------------------------------

    def has(self, record_id: str) -> str | None:
        """The archived sha256 of `record_id`, or None."""
        row = self.lookup(record_id)
        return row[0] if row else None

    def refuse(self, record_id: str, kit_id: str, sha: str, reason: str, source: str) -> StoreResult:
        """Log and record a refusal decided before `store()` (e.g. by the ingest); returns the rejected result."""
        return self._reject(record_id, kit_id, sha, reason, source)

    def _reject(self, record_id: str, kit_id: str, sha: str, reason: str, source: str) -> StoreResult:
        # What a hostile stick or kit named (a file name with undecodable bytes, a long header value) is stored
        # and logged printable and bounded: no database refuses it, no log line is forged with it.
        record_id, kit_id, reason, source = (for_terminal(record_id, 200), for_terminal(kit_id, 200),
                                             for_terminal(reason, 2000), for_terminal(source, 200))
        with self._transient_as_archive_error(f"cannot record the rejection of {record_id}"):
            self._insert_reject(record_id, kit_id, sha, reason, source)
        log.error("record rejected record_id=%s kit_id=%s source=%s reason=%s", record_id, kit_id, source, reason)
        return StoreResult("rejected", record_id, sha, reason)

    @contextmanager
    def _transient_as_archive_error(self, what: str) -> Iterator[None]:
        try:
            yield
        except ArchiveError:
            raise
        except self.transient as e:
            raise ArchiveError(f"{what}: {e}") from e

    def store(self, data: bytes, kit_id: str, source: str, expect_record_id: str | None = None,
              expect_sha256: str | None = None) -> StoreResult:
        """Verify and durably archive one sealed record from `kit_id` (see module doc).

        Returns stored / duplicate / rejected; raises `UnknownKit` or `ArchiveError` for transient
        problems (the record must then be offered again later, not acknowledged). It returns only after
        the record's bytes and its index row are both committed.
        """
        sha = rf.sha256_hex(data)
        rid = expect_record_id or "?"
        if expect_sha256 is not None and sha != expect_sha256:
            raise ArchiveError(f"record {rid}: bytes hash to {sha[:12]}, sender announced {expect_sha256[:12]}")
        if expect_record_id and (why := record_id_mismatch(expect_record_id, kit_id)):
            return self._reject(rid, kit_id, sha, why, source)
        with self._transient_as_archive_error(f"cannot archive {rid}"):
            if expect_record_id and self.lookup(rid) == (sha, kit_id):
                return StoreResult("duplicate", rid, sha)  # already held: the kit may purge its copy, revoked or not
            keys = self.kit_keys(kit_id, self._check_not_revoked(kit_id))
        trusted = keys[0] if keys else None
        try:
            parsed = rf.parse(data)  # layout and signature, with the key in the header
        except rf.RecordFormatError as e:
            return self._reject(rid, kit_id, sha, f"{type(e).__name__}: {e}", source)
        h = parsed.header
        if keys and h.kit_key not in keys:
            return self._reject(rid, kit_id, sha, f"BadSignature: record {h.record_id[:80]!r} is signed by key "
                                f"{rf.key_id(h.kit_key)}, not by a registered key of kit {kit_id}", source)
        if expect_record_id and h.record_id != expect_record_id:
            return self._reject(rid, kit_id, sha, f"file holds record {h.record_id[:80]!r}, not {expect_record_id}",
                                source)
        if h.kit_id != kit_id:
            return self._reject(h.record_id, kit_id, sha,
                                f"record belongs to kit {h.kit_id[:80]}, sent as kit {kit_id}", source)
        if why := record_id_mismatch(h.record_id, h.kit_id, h.seq):
            # A stolen kit signing records named after another kit's next numbers would otherwise squat them.
            return self._reject(h.record_id, kit_id, sha, why, source)
        if trusted is None:
            if not self.tofu:
                raise UnknownKit(f"kit {kit_id} is not registered: "
                                 f"rekam-fleet archive register-kit {kit_id} <public key>")
            # Trust on first use (explicit flag): the first record pins the kit's key.
            with self._transient_as_archive_error(f"cannot register kit {kit_id}"):
                self.register_kit(kit_id, base64.b64encode(h.kit_key).decode(), how="tofu")
        rid = h.record_id
        with self._transient_as_archive_error(f"cannot archive {rid}"):
            known = self.has(rid)
            if known == sha:
                return StoreResult("duplicate", rid, sha)  # (its kit was checked above: header and signature)
            if known is None:
                location, known = self._put_record(kit_id, rid, data, sha)
            if known is not None:
                # Same id, other bytes (indexed, or a written copy whose index row never came): keep both, never
                # overwrite the one that was there first.
                name = self._put_conflict(rid, sha, data)
                return self._reject(rid, kit_id, sha, f"record id already archived with sha256 {known[:12]}; "
                                    f"this copy kept as {name}", source)
            inserted = self._insert_record(rid, kit_id, h.seq, sha, len(data), h.created, location, source)
        if not inserted:
            return StoreResult("duplicate", rid, sha)  # another worker won the race with the same bytes
        log.info("record archived record_id=%s kit_id=%s size=%d source=%s", rid, kit_id, len(data), source)
        return StoreResult("stored", rid, sha)
