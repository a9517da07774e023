"""The durable record store: a primary copy on the SD, a mirror on the USB stick, a journal.

`commit()` is the only way a record enters the kit. It returns only once the sealed record is
durable (fsync'd, renamed, directory fsync'd, read back) on the SD and, when a stick is present,
on the stick too; then one journal transaction records both. A crash at any point leaves either
nothing the operator was told about, or files that `recover()` adopts after verifying them.

Nothing is deleted by age or to make room: an SD copy goes only after the data center has
acknowledged it and (configurable) a stick holds it. Corrupt files are moved to `quarantine/`
and reported, never deleted, and never block the other records.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.config import Config
from firmware.errors import RecordTooLarge, StoreError, StoreLocked
from firmware.seal.identity import KitIdentity
from firmware.store.capacity import CapacityGuard, Level, MediumStatus, Reservation, overall
from firmware.store.journal import LIVE, Journal
from firmware.store.usb import Stick, StickError, detect, open_stick, stick_id_at
from firmware.system.clock import clock_synchronised, compact, iso
from firmware.system.fsutil import TMP_SUFFIX, atomic_write, fsync_dir, remove_durably, sha256_file
from firmware.wire import record_format
from firmware.wire.ids import make_record_id, parse_record_id

log = logging.getLogger(__name__)



@dataclass
class CommitResult:
    """What the operator is told after a commit."""

    record_id: str
    sha256: str
    size: int
    seq: int
    stick_id: str | None  # the stick that also holds it, or None (it joins the mirror backlog)
    mirror_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "sha256": self.sha256, "size": self.size, "seq": self.seq,
                "stick_id": self.stick_id, "mirrored": self.stick_id is not None,
                "mirror_error": self.mirror_error}


@dataclass
class RecoveryReport:
    """What `recover()` found and did."""

    temp_removed: int = 0
    adopted: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    restored_from_stick: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    purged_leftovers: int = 0


def seq_of(record_id: str) -> int | None:
    """The sequence number in a record id (None if it is not one)."""
    rid = parse_record_id(record_id)
    return rid.seq if rid else None



class Store:
    """The kit's record store (see module doc). One process owns a state directory at a time."""

    def __init__(self, cfg: Config, identity: KitIdentity) -> None:
        self.cfg = cfg
        self.identity = identity
        self.state_dir = cfg.state_dir
        self.records_dir = self.state_dir / "records"
        self.quarantine_dir = self.state_dir / "quarantine"
        self._lock = threading.RLock()  # serialises commits, mirroring and purges
        self._lockfile: int | None = None
        self.recipients = [record_format.load_recipient_key(cfg.path(p).read_bytes())
                           for p in cfg.datacenter.public_key_files]
        self.guard = CapacityGuard(cfg.store, cfg.usb.required)
        self.journal: Journal | None = None
        self.stick: Stick | None = None
        self.stick_error = ""
        self._seq = 0
        self.on_change: list[Any] = []  # callbacks fired after a commit or state change
        self._mirror_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usb-mirror")
        self.closing = threading.Event()
        self._ejected = ""  # id of the stick released by eject(), until it is gone

    # --- lifecycle ----------------------------------------------------------------------

    def open(self, recover: bool = True) -> RecoveryReport:
        """Take ownership of the state directory, open the journal and reconcile it with the files.

        `recover=False` (read-only inspection) skips reconciliation; such a store must not commit.
        """
        for d in (self.state_dir, self.records_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"{self.state_dir} is in use by another process (is rekamd running?)") from None
        self._lockfile = fd
        self.journal = Journal(self.state_dir / "journal.db")
        report = self.recover() if recover else RecoveryReport()
        self.guard.note_record_size(self.journal.largest_size())
        self.poll_usb()
        return report

    def close(self) -> None:
        """Wait for any commit in progress, then release everything."""
        self.closing.set()  # a running backfill stops after its current record
        with self._lock:
            self._flush_stick()
            if self.journal:
                self.journal.close()
                self.journal = None
            if self._lockfile is not None:
                os.close(self._lockfile)
                self._lockfile = None

    def __enter__(self) -> Store:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def j(self) -> Journal:
        if self.journal is None:
            raise StoreError("store is not open")
        return self.journal

    # --- the journal's public face: what callers outside the store may read and record --------

    def records(self, state: str | None = None, limit: int | None = None, after_seq: int = -1,
                newest_first: bool = False) -> list[Any]:
        """Journal rows of records in capture order, optionally of one state (see `Journal.records`)."""
        return self.j.records(state=state, limit=limit, after_seq=after_seq, newest_first=newest_first)

    def record(self, record_id: str) -> Any:
        """The journal row of one record, or None."""
        return self.j.get(record_id)

    def audit(self, kind: str, actor: str = "", **detail: Any) -> None:
        """Append an event to the kit's audit log (kept in the journal, same durability as records)."""
        self.j.audit(kind, actor, **detail)

    def audit_events(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit events, optionally of one kind."""
        return self.j.audit_events(kind, limit)

    def counts(self) -> dict[str, dict[str, int]]:
        """Records and bytes per journal state."""
        return self.j.counts()

    def oldest_unacked(self) -> str | None:
        """Creation time of the oldest record not yet acknowledged, or None."""
        return self.j.oldest_unacked()

    def use_identity(self, identity: KitIdentity) -> None:
        """Seal from now on with `identity` (after a key rotation); never between a seal and its journal row."""
        with self._lock:
            self.identity = identity

    def sd_path(self, record_id: str) -> Path:
        return self.records_dir / (record_id + record_format.FILE_SUFFIX)

    # --- capacity -----------------------------------------------------------------------

    def media(self) -> list[MediumStatus]:
        """Capacity status of the SD and the stick (present or not)."""
        out = [self.guard.measure("sd", self.state_dir)]
        stick = self.stick
        out.append(self.guard.measure("usb", stick.mount if stick else self.cfg.usb_dir, stick is not None))
        return out

    def begin(self) -> Reservation:
        """Start an enrollment: reserve room for one record, or raise `CaptureHalted` with the reason."""
        stick = self.stick
        # A stick inserted or pulled since the last poll is noticed here (detect: 3 cheap syscalls). The
        # poll's other work, fsyncing the stick index's appended lines, stays with the USB watcher's poll:
        # the index is the importer's convenience (it also scans records/), each record file is already
        # durable when its commit returns, and `reindex()` restores lines a yank cost.
        if stick is None or not detect(stick.mount, self.cfg.usb.require_mountpoint):
            self.poll_usb()
        return self.guard.reserve(self.media())

    def release(self, reservation: Reservation) -> None:
        """End an enrollment that will not be committed (cancelled)."""
        self.guard.release(reservation)

    # --- commit -------------------------------------------------------------------------

    def commit(self, payload: bytes, reservation: Reservation | None = None, operator_id: str = "") -> CommitResult:
        """Seal `payload` and make it durable on the SD and the stick; see the module doc.

        Without a `reservation` one is taken here (so a HALT refuses the commit). A given
        reservation is consumed on success and kept on failure.
        Raises `StoreError` if the SD copy cannot be made; the caller still holds the payload.
        """
        own = reservation is None
        if own:
            reservation = self.begin()
        try:
            result = self._commit(payload, operator_id)
        except BaseException:
            if own:
                self.guard.release(reservation)
            raise  # a caller's reservation stays held, so the enrollment can retry the commit
        self.guard.release(reservation)
        return result

    def _commit(self, payload: bytes, operator_id: str) -> CommitResult:
        max_bytes = self.guard.max_record_bytes
        if len(payload) > max_bytes:
            raise RecordTooLarge(f"record payload is {len(payload)} bytes; store.max_record_mb allows {max_bytes}")
        with self._lock:
            seq = self._seq + 1
            created = iso()
            record_id = make_record_id(self.identity.kit_id, seq, compact())
            synced = clock_synchronised()
            sealed, digest = record_format.seal_with_digest(
                payload, record_id=record_id, kit_id=self.identity.kit_id, seq=seq, created=created,
                clock_synced=synced, signing_key=self.identity.signing_key, recipients=self.recipients)
            # The sequence number is used up from here on, whatever happens (never reused).
            self._seq = seq
            # The SD and the stick are separate devices: write both at once, confirm when both are done.
            mirror = self._mirror_pool.submit(self._mirror_one, record_id, seq, sealed, digest)
            try:
                atomic_write(self.sd_path(record_id), sealed, verify=self.cfg.store.verify_readback,
                             expect_sha256=digest)
            except OSError as e:
                log.error("commit failed on SD record_id=%s error=%s", record_id, e)
                mirror.result()
                raise StoreError(f"could not write the record to the SD card: {e.strerror or e}") from e
            stick_id, mirror_error = mirror.result()
            self.j.add_record(record_id=record_id, seq=seq, created=created, clock_synced=synced,
                              size=len(sealed), sha256=digest, operator_id=operator_id, stick_id=stick_id)
            self.guard.note_record_size(len(sealed))
        log.info("record captured record_id=%s size=%d sha256=%s stick=%s", record_id, len(sealed), digest[:12],
                 stick_id or "-")
        self._changed()
        return CommitResult(record_id, digest, len(sealed), seq, stick_id, mirror_error)

    def _mirror_one(self, record_id: str, seq: int, data: bytes, digest: str) -> tuple[str | None, str]:
        stick = self.stick
        if stick is None:
            return None, ""
        if not detect(stick.mount, self.cfg.usb.require_mountpoint):
            # Checked per record: a pulled stick must not turn into writes to the bare mount-point folder.
            self._stick_lost("removed")
            return None, "stick removed"
        try:
            stick.write_record(record_id, seq, data, digest, verify=self.cfg.store.verify_readback)
            return stick.stick_id, ""
        except OSError as e:
            # The stick vanished or failed: the SD copy stands, the record joins the mirror backlog.
            self._stick_lost(f"write failed: {e.strerror or e}")
            return None, str(e)

    def _changed(self) -> None:
        for cb in list(self.on_change):
            try:
                cb()
            except Exception:  # a listener's bug must never undo a commit
                log.exception("store change listener failed")

    # --- USB ----------------------------------------------------------------------------

    def poll_usb(self) -> None:
        """Notice a stick appearing or going; on insertion, backfill what it lacks."""
        present = detect(self.cfg.usb_dir, self.cfg.usb.require_mountpoint)
        if self._ejected:
            # The released stick stays ignored until it is gone (unmounted or pulled); another stick is taken.
            if present and stick_id_at(self.cfg.usb_dir) == self._ejected:
                return
            self._ejected = ""
        if self.stick is not None and not present:
            self._stick_lost("removed")
        elif self.stick is not None:
            with self._lock:
                self._flush_stick()
        elif self.stick is None and present:
            try:
                stick = open_stick(self.cfg.usb_dir, self.identity.kit_id, self.identity.public_key_b64)
            except StickError as e:
                if str(e) != self.stick_error:
                    log.warning("usb stick unusable mount=%s error=%s", self.cfg.usb_dir, e)
                self.stick_error = str(e)
                return
            self.stick_error = ""
            self.stick = stick
            self.j.note_stick(stick.stick_id)
            log.info("usb stick inserted stick_id=%s mount=%s", stick.stick_id, stick.mount)
            self.j.audit("usb_inserted", stick_id=stick.stick_id)
            self.backfill()

    def _stick_lost(self, why: str) -> None:
        if self.stick is not None:
            log.warning("usb stick gone stick_id=%s reason=%s; records stay on the SD", self.stick.stick_id, why)
            self.j.audit("usb_removed", stick_id=self.stick.stick_id, reason=why)
        self.stick = None
        self.stick_error = why

    def backfill(self, limit: int | None = None) -> int:
        """Copy every live record the current stick lacks; returns how many were copied."""
        stick = self.stick
        if stick is None:
            return 0
        copied = 0
        with self._lock:
            stick.remove_temp_files()
            on_stick = stick.record_files()
            known = self.j.mirrored_on(stick.stick_id)
            todo = [r for r in self.j.records() if r.state in LIVE]
        for r in todo:
            if limit is not None and copied >= limit:
                break
            if self.stick is not stick or self.closing.is_set():
                break
            if on_stick.get(r.id) == r.size:
                if r.id not in known:
                    # Present but never recorded (e.g. the journal commit was cut short): verify, then record.
                    try:
                        if sha256_file(stick.record_path(r.id)) == r.sha256:
                            self.j.add_mirror(r.id, stick.stick_id)
                            continue
                    except OSError:
                        pass
                else:
                    continue
            try:
                data = self.sd_path(r.id).read_bytes()
            except OSError as e:
                log.error("backfill cannot read SD copy record_id=%s error=%s", r.id, e)
                continue
            if record_format.sha256_hex(data) != r.sha256:
                self._quarantine(r.id, "SD copy does not match its journal hash", seq=r.seq)
                continue
            with self._lock:
                if self.journal is None:
                    break
                try:
                    stick.write_record(r.id, r.seq, data, r.sha256, verify=self.cfg.store.verify_readback)
                except OSError as e:
                    self._stick_lost(f"write failed during backfill: {e.strerror or e}")
                    break
                self.j.add_mirror(r.id, stick.stick_id)
            copied += 1
        if self.closing.is_set():
            return copied
        if self.stick is stick:
            try:
                added = stick.reindex({r.id: (r.seq, r.sha256, r.size) for r in todo})
                if added:
                    log.info("usb index repaired lines_added=%d stick_id=%s", added, stick.stick_id)
            except OSError as e:
                self._stick_lost(f"index write failed: {e.strerror or e}")
        self._flush_stick()
        if copied:
            log.info("usb backfill copied=%d stick_id=%s", copied, stick.stick_id)
            self._changed()
        return copied

    def _flush_stick(self) -> None:
        stick = self.stick
        if stick is None:
            return
        try:
            stick.flush_index()
        except OSError as e:
            self._stick_lost(f"index flush failed: {e.strerror or e}")

    def eject(self) -> None:
        """Flush and forget the stick so it can be pulled (the mount helper unmounts it)."""
        with self._lock:
            self._flush_stick()
            os.sync()
            if self.stick is not None:
                self.j.audit("usb_eject", stick_id=self.stick.stick_id)
                log.info("usb stick released for removal stick_id=%s", self.stick.stick_id)
                self._ejected = self.stick.stick_id
            self.stick = None

    # --- relay hooks ----------------------------------------------------------------------

    def read_verified(self, record_id: str) -> bytes:
        """The sealed bytes of a live record, hash-checked against the journal (quarantined if bad)."""
        r = self.j.get(record_id)
        if r is None or r.state not in LIVE:
            raise StoreError(f"record {record_id} is not in the store")
        try:
            data = self.sd_path(record_id).read_bytes()
        except OSError as e:
            raise StoreError(f"cannot read {record_id}: {e}") from e
        if record_format.sha256_hex(data) != r.sha256:
            self._quarantine(record_id, "SD copy does not match its journal hash", seq=r.seq)
            raise StoreError(f"record {record_id} is corrupt on the SD and was quarantined")
        return data

    def mark(self, record_id: str, state: str, reason: str = "") -> None:
        """Move a record along its states (sent, acked, quarantined)."""
        self.j.set_state(record_id, state, reason)
        self._changed()

    def mark_delivery(self, sent: list[str], acked: list[str]) -> None:
        """Record the relay's progress for many records in one journal commit."""
        self.j.mark_delivery(sent, acked)
        self._changed()

    def purge_acknowledged(self, batch: int = 200, max_batches: int | None = None) -> int:
        """Delete SD copies of acknowledged records (and mirrored, if configured). Never anything else.

        Driven by the journal's purge queue: a call with nothing to purge reads no record row. With
        `max_batches` it stops after that many batches (the rest stays queued for the next call), so a
        periodic caller returns promptly (a stop is not held up by a 25,000-record purge).
        Crash order per batch: the journal marks them purged (one commit), then the files are unlinked
        and the directory fsync'd; recovery removes any file left behind. Commits wait at most one batch.
        """
        need_stick = self.cfg.store.purge_requires_stick
        n = 0
        batches = 0
        while max_batches is None or batches < max_batches:
            batches += 1
            with self._lock:
                if self.closing.is_set() or self.journal is None:
                    break
                ids = self.j.mark_purged(self.j.purgeable(need_stick, batch))
                if not ids:
                    break
                for rid in ids:
                    self.sd_path(rid).unlink(missing_ok=True)
                fsync_dir(self.records_dir)
            n += len(ids)
        if n:
            log.info("purged acknowledged records count=%d", n)
            self.j.audit("purge", count=n)
            self._changed()
        return n

    # --- recovery -----------------------------------------------------------------------

    def _quarantine(self, record_id: str, reason: str, seq: int | None = None, path: Path | None = None) -> None:
        src = path or self.sd_path(record_id)
        dst = self.quarantine_dir / (src.name if src.name.endswith(record_format.FILE_SUFFIX)
                                     else src.name + ".bad")
        try:
            if src.exists():
                if dst.exists():
                    dst = dst.with_name(f"{dst.name}.{int(time.time())}")
                os.replace(src, dst)
                fsync_dir(src.parent)
                fsync_dir(dst.parent)
        except OSError as e:
            log.error("cannot move to quarantine path=%s error=%s", src, e)
        row = self.j.get(record_id)
        if row is None:
            size = dst.stat().st_size if dst.exists() else 0
            self.j.insert_quarantined(record_id, seq or 0, size, "", reason)
        else:
            self.j.set_state(record_id, "quarantined", reason)
        self.j.audit("quarantine", record_id=record_id, reason=reason, file=str(dst))
        log.error("record quarantined record_id=%s reason=%s file=%s", record_id, reason, dst)

    def recover(self) -> RecoveryReport:
        """Reconcile journal and files after a start or a crash (see module doc)."""
        rep = RecoveryReport()
        j = self.j
        max_seq = j.max_seq()
        rows = {r.id: r for r in j.records()}
        files: dict[str, Path] = {}
        with os.scandir(self.records_dir) as it:
            for e in it:
                p = Path(e.path)
                if e.name.endswith(TMP_SUFFIX):
                    rid = e.name[: -len(record_format.FILE_SUFFIX + TMP_SUFFIX)]
                    max_seq = max(max_seq, seq_of(rid) or 0)  # its number may have been shown: never reuse
                    p.unlink(missing_ok=True)
                    rep.temp_removed += 1
                elif e.name.endswith(record_format.FILE_SUFFIX):
                    files[e.name[: -len(record_format.FILE_SUFFIX)]] = p
        for q in self.quarantine_dir.iterdir():
            max_seq = max(max_seq, seq_of(q.name.split(".")[0]) or 0)
        if rep.temp_removed:
            fsync_dir(self.records_dir)
        # Files the journal does not know: written, then the process died before the journal commit.
        for rid, p in sorted(files.items()):
            if rid in rows:
                continue
            seq = seq_of(rid)
            max_seq = max(max_seq, seq or 0)
            try:
                data = p.read_bytes()
                parsed = record_format.parse(data, trusted_kit_key=self.identity.public_key_raw)
                if parsed.header.record_id != rid or seq is None:
                    raise record_format.RecordFormatError("file name does not match the record inside")
            except (OSError, record_format.RecordFormatError) as e:
                self._quarantine(rid, f"unjournaled file fails verification: {e}", seq=seq, path=p)
                rep.quarantined.append(rid)
                continue
            h = parsed.header
            j.add_record(record_id=rid, seq=h.seq, created=h.created, clock_synced=h.clock_synced,
                         size=len(data), sha256=record_format.sha256_hex(data))
            rep.adopted.append(rid)
            log.warning("recovered unjournaled record record_id=%s", rid)
        # Journaled records whose file is missing or the wrong size.
        for rid, r in rows.items():
            p = self.sd_path(rid)
            if r.state == "purged":
                if rid in files:
                    remove_durably(p)
                    rep.purged_leftovers += 1
                continue
            if r.state not in LIVE:
                continue
            size = files[rid].stat().st_size if rid in files else None
            if size == r.size:
                continue
            if size is not None:
                self._quarantine(rid, f"SD file is {size} bytes, journal says {r.size}", seq=r.seq)
                rep.quarantined.append(rid)
            if self._restore_from_stick(r):
                rep.restored_from_stick.append(rid)
                if rid in rep.quarantined:
                    j.set_state(rid, "stored", "restored from stick")
            elif size is None:
                rep.missing.append(rid)
                j.audit("missing", record_id=rid)
                log.error("journaled record missing from SD record_id=%s; insert a stick that holds it", rid)
        self._seq = max_seq
        if rep.adopted or rep.quarantined or rep.missing or rep.temp_removed or rep.restored_from_stick:
            log.info("recovery temp_removed=%d adopted=%d quarantined=%d restored=%d missing=%d",
                     rep.temp_removed, len(rep.adopted), len(rep.quarantined), len(rep.restored_from_stick),
                     len(rep.missing))
        return rep

    def _restore_from_stick(self, r: Any) -> bool:
        if not detect(self.cfg.usb_dir, self.cfg.usb.require_mountpoint):
            return False
        src = self.cfg.usb_dir / "rekam" / self.identity.kit_id / "records" / (r.id + record_format.FILE_SUFFIX)
        try:
            data = src.read_bytes()
        except OSError:
            return False
        if record_format.sha256_hex(data) != r.sha256:
            return False
        atomic_write(self.sd_path(r.id), data, verify=True, expect_sha256=r.sha256)
        log.warning("record restored from stick record_id=%s", r.id)
        return True

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything a technician needs: records per state, media, guard state, mirror lag."""
        media = self.media()
        level, reasons = overall(media)
        stick = self.stick
        return {
            "kit_id": self.identity.kit_id,
            "records": self.j.counts(),
            "oldest_unacked": self.j.oldest_unacked(),
            "mirror_lag": self.j.mirror_lag(),
            "media": [m.as_dict() for m in media],
            "guard": {"level": level.value, "reasons": reasons, "capture_allowed": level is not Level.HALT,
                      "enrollments_in_progress": self.guard.outstanding},
            "stick": {"present": stick is not None, "stick_id": stick.stick_id if stick else None,
                      "error": self.stick_error},
        }
