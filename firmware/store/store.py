"""The durable record store: a primary copy on the SD, a mirror on the USB stick, a journal.

`commit()` is the only way a record enters the kit. It returns only once the sealed record is
durable (fsync'd, renamed, directory fsync'd, read back) on the SD and, when a stick is present,
on the stick too; then one journal transaction records both. Both copies are written at once, and
the signature is computed while they already hold the rest of the file (nothing is renamed before
its whole file is fsync'd); the stick's index line follows the journal row, after the answer.
A crash at any point leaves either nothing the operator was told about, or files that `recover()`
adopts after verifying them.

Nothing is deleted by age or to make room: an SD copy goes only after the data center has
acknowledged it and (configurable) a stick holds it. Corrupt files are moved to `quarantine/`
and reported, never deleted, and never block the other records.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from firmware.config import Config
from firmware.config.checks import KEY_FILE_MAX
from firmware.errors import RecordTooLarge, StoreError, StoreLocked, UntrustedFile
from firmware.seal.identity import KitIdentity
from firmware.store.capacity import CapacityGuard, Level, MediumStatus, Reservation, overall
from firmware.store.journal import LIVE, Journal
from firmware.store.usb import HostileStick, Stick, StickError, detect, open_stick, stick_id_at
from firmware.system.backoff import Backoff
from firmware.system.clock import clock_synchronised, compact, iso
from firmware.system.fsutil import (
    TMP_SUFFIX,
    Pending,
    atomic_write,
    fsync_dir,
    read_regular,
    remove_durably,
    space,
)
from firmware.system.i18n import N_, format_count, gettext
from firmware.wire import record_format
from firmware.wire.ids import make_record_id, parse_record_id

log = logging.getLogger(__name__)

# Sequence numbers are reserved durably in blocks before any of them is used (one journal commit per
# block, not per record); a clean close writes back the last number really used, so only an unclean
# stop skips (never reuses) the rest of a block.
SEQ_BLOCK = 32
FAULT_RETRY_S = (30.0, 900.0)  # a stick left out after a fault is tried again after 30 s, doubling up to 15 min
RESERVE_AHEAD = 8  # begin() reserves the next block when at most this many reserved numbers are left
META_HWM = "seq_high_water"  # every number <= this may have been used on some medium
META_CLEAN = "clean_shutdown"  # "1": the last owner closed cleanly, nothing to reconcile
PREPARED_KEYS_MAX = 4  # key sets prepared ahead (one per enrollment begun; cancelled ones leave theirs)
RECONCILE_YIELD_EVERY = 1024  # journal rows checked between two short sleeps of the background reconcile
BACKFILL_BATCH = 256  # journal rows read per backfill step (the stop event is checked per record)
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
JOURNAL_NAME = "journal.db"
#: Pre-allocated on the SD while there is room, deleted when a full SD keeps SQLite from creating its WAL (or
#: from writing the relay's acks): the kit then starts, reports "full", and the acks free space through the purge.
SPARE_NAME = "journal.spare"
SPARE_BYTES = 1024 * 1024
#: The numbering's mark outside the journal: every number reserved (`_reserve_numbers`, before it is used) and,
#: after a clean stop, the last one used. A journal behind it (a lost WAL, an old copy) or without it is checked
#: against the record files' names at open; a clean start reads only this file (O(1) in the backlog).
FLOOR_NAME = "seq.floor"
META_ABANDONED = "abandoned_copies"  # JSON {record_id: stick_id or ""}: copies of failed commits not yet removed
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26  # sqlite3 result codes of a damaged journal file
_SQLITE_FULL = 13  # "database or disk is full"
#: Shown while a stick that failed (a write, its index) is left out until it is pulled (code "usb_stick_faulted").
STICK_FAULTED = N_("USB stick not used after a fault. Pull it out and insert it again, or insert another stick; "
                   "the records stay safe on the SD card.")
#: The guard reason of a full stick (code "usb_stick_full"), worded in status() in the reader's language.
STICK_FULL = N_("USB stick full: {count} records are not yet copied to the stick. Replace it with a larger stick; "
                "the records stay safe on the SD card.")


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
    stick_adopted: list[str] = field(default_factory=list)  # complete records found only on the stick
    stick_removed: list[str] = field(default_factory=list)  # stick-only files that failed verification


class ScanRow(NamedTuple):
    """A journal row as the reconcile lists it (`Journal.scan`)."""

    id: str
    seq: int
    state: str
    size: int


# How far beyond the kit's own highest number a number read from a stick's file names may raise the fence: far
# more than any kit records between two reconciles, far below the 20 digits a record id allows.
STICK_SEQ_AHEAD_MAX = 1_000_000


def seq_of(record_id: str) -> int | None:
    """The sequence number in a record id (None if it is not one)."""
    rid = parse_record_id(record_id)
    return rid.seq if rid else None



class _Abandoned(Exception):
    """The commit failed on the SD (or before): the stick's copy, waiting for its body or signature, gives up.
    Not an OSError, so the stick is neither called full nor dropped for the SD's fault."""


def _mirrored(mirror: Future[tuple[str | None, str]]) -> str | None:
    """The stick a commit's mirror copy went to (waiting for it), or None (also when it failed outright)."""
    try:
        return mirror.result()[0]
    except Exception:
        return None


def _believable(stick_seqs: Any, limit: int) -> list[int]:
    """The numbers of a stick's names up to `limit`: a stick's names are anyone's to write (the kit id is on every
    stick), and a number far beyond what this kit has numbered is not one it used (fencing it would make the next
    id unwritable for ever; see STICK_SEQ_AHEAD_MAX). Those beyond are logged, never fenced nor adopted."""
    seqs = list(stick_seqs)
    wild = [n for n in seqs if n > limit]
    if wild:
        log.warning("stick names sequence numbers this kit never reached count=%d highest=%d limit=%d; "
                    "not fenced, not adopted", len(wild), max(wild), limit)
    return [n for n in seqs if n <= limit]


def _floor_check(value: int) -> str:
    """The floor file's check value: a torn or edited line is read as damaged, never as a smaller number."""
    return f"{zlib.crc32(str(value).encode()):08x}"


def _int(v: str | None) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0


class Store:
    """The kit's record store (see module doc). One process owns a state directory at a time."""

    def __init__(self, cfg: Config, identity: KitIdentity) -> None:
        self.cfg = cfg
        self.identity = identity
        self.state_dir = cfg.state_dir
        self.records_dir = self.state_dir / "records"
        self.quarantine_dir = self.state_dir / "quarantine"
        self._lock = threading.RLock()  # serialises commits, mirroring and purges
        self._begin_lock = threading.Lock()
        self._backfill_lock = threading.Lock()
        self._backfill_waiting = 0  # explicit backfill calls waiting for the lock (the watcher's pass yields)
        self._lockfile: int | None = None
        self.recipients = [record_format.load_recipient_key(read_regular(cfg.path(p), KEY_FILE_MAX))
                           for p in cfg.datacenter.public_key_files]
        self.guard = CapacityGuard(cfg.store, cfg.usb.required)
        self.journal: Journal | None = None
        self.stick: Stick | None = None
        self.stick_error = ""
        self._refused = False  # stick_error is a refusal of the stick still inserted (cleared when it is pulled)
        self._seq = 0  # the last sequence number used (or possibly used: never handed out again)
        self._hwm = 0  # the durable high-water mark: numbers up to here are reserved in the journal
        self._boot_seq = 0  # numbers up to here predate this open (what a reconcile may find on media)
        self._writable = False
        self.reconcile_pending = False  # an unclean stop left media to reconcile (done in the background)
        self.backfill_due = False  # the current stick may lack records (the USB watcher copies them)
        self._backfill_cursor = -1  # seq up to which the current stick has been backfilled
        self.stick_full: dict[str, Any] = {}  # {"stick_id", "not_mirrored", "code"} once a stick is full
        self._full_reported = ""  # the stick whose "full" was logged and audited (once per insertion)
        self.on_change: list[Any] = []  # callbacks fired after a commit or state change
        self._mirror_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usb-mirror")
        # Key material (fresh DEK, ephemeral X25519 agreements) prepared when an enrollment begins, so that it
        # leaves the commit's serial path; each set is used once (see `_seal_keys`). Not a background thread:
        # measured, its GIL hand-offs cost the commit more than the 0.07 ms of key agreement it saves.
        self._prepared: list[record_format.SealKeys] = []
        self.closing = threading.Event()
        self._ejected = ""  # id of the stick released by eject(), until it is gone
        # Why the journal may not know every record on the media ("new", "rebuilt", "behind"), set by open().
        self._journal_suspect = ""
        self._faulted: dict[str, str] = {}  # stick id -> the fault that dropped it, kept out until it is pulled
        # ... or until this says to try it again: pulled and inserted again between two polls, a stick looks as
        # if it never left (same id, same folder), so a faulted stick is retried at growing intervals.
        self._fault_retry = Backoff(FAULT_RETRY_S[0], FAULT_RETRY_S[1])
        self._fault_logged = ""  # the faulted stick whose "left out" line was logged
        self._leftovers: set[str] = set()  # purged records whose SD file could not be unlinked (purge retries)
        self._abandoned: dict[str, str] = {}  # failed commits' copies not yet removed: record id -> stick id or ""
        self._floor_written = 0
        self._floor_fd: int | None = None
        self._after_open_audit: tuple[str, dict[str, Any]] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def open(self, recover: bool = True, defer_reconcile: bool = False) -> RecoveryReport:
        """Take ownership of the state directory, open the journal and, after an unclean stop, reconcile.

        O(1) in the backlog after a clean stop: the journal is the index, and the clean-shutdown marker
        says there is nothing to reconcile. After an unclean stop `recover()` runs here, or, with
        `defer_reconcile`, later in the background (`reconcile_pending`; the store is usable meanwhile:
        new numbers start above everything any medium may hold). Never backfills: see `backfill()`.
        `recover=False` (read-only inspection) changes nothing; such a store must not commit.
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
        self._journal_suspect = ""
        try:
            self.journal = j = self._open_journal(writable=recover)
        except BaseException:
            os.close(fd)
            self._lockfile = None
            raise
        self._seq = self._hwm = self._boot_seq = max(j.max_seq(), _int(j.get_meta(META_HWM)))
        report = RecoveryReport()
        if recover:
            clean = j.get_meta(META_CLEAN) == "1"
            try:
                j.set_meta(**{META_CLEAN: "0"})  # durable before any write: a kill from here on is unclean
            except Exception as e:  # SD full to the last byte: start anyway (status, purge); every number
                # reservation clears the marker again in its own commit, so no record can exist unfenced
                log.error("cannot clear the clean-shutdown marker error=%s", e)
            self._writable = True
            self._abandoned = self._load_abandoned()
            # Before any commit: numbers start above every number the record files' names show (a lost or
            # rebuilt journal, a lost WAL), and a journal that does not know them all is reconciled.
            suspect = self._fence_from_media()
            self.reconcile_pending = not clean or suspect
            if self.reconcile_pending and not defer_reconcile:
                report = self.recover()
            self._keep_spare()
        self.guard.note_record_size(j.largest_size())
        self.poll_usb(backfill=False)
        return report

    def _open_journal(self, writable: bool) -> Journal:
        """Open the journal. A corrupt one ("file is not a database", "malformed") is moved to quarantine/ and a new
        one started, which the reconcile rebuilds from the record files (they are the truth); when a full SD keeps
        SQLite from starting (its WAL cannot be created), the spare file is released and the open tried again."""
        path = self.state_dir / JOURNAL_NAME
        fresh = not path.exists()
        released = rebuilt = False
        while True:
            j: Journal | None = None
            try:
                j = Journal(path)
                j.max_seq(), j.get_meta(META_HWM), j.get_meta(META_CLEAN), j.largest_size()  # what open reads
                break
            except sqlite3.DatabaseError as e:
                if j is not None:
                    try:
                        j.close()
                    except sqlite3.Error:
                        pass
                code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
                if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) and not rebuilt:
                    if not writable:
                        raise StoreError(f"the journal {path} is corrupt ({e}); start rekamd: it moves it aside and "
                                         "rebuilds it from the record files") from e
                    self._quarantine_journal(path, e)
                    rebuilt = fresh = True
                    continue
                free = self._free_sd()
                low = free is not None and free < self.guard.reserve_bytes("sd")  # full, not another fault
                if low and not released and self._release_spare(f"journal cannot be opened: {e}"):
                    released = True
                    continue
                log.critical("journal cannot be opened path=%s error=%s free_bytes=%s", path, e, self._free_sd())
                raise StoreError(f"cannot open the journal {path}: {e}") from e
        assert j is not None
        if rebuilt:
            self._journal_suspect = "rebuilt"
        elif fresh:
            self._journal_suspect = "new"
        return j

    def _free_sd(self) -> int | None:
        try:
            return space(self.state_dir).free_bytes
        except OSError:
            return None

    def _quarantine_journal(self, path: Path, e: Exception) -> None:
        """Move a corrupt journal (and its WAL and shared-memory files) to quarantine/, never deleting it."""
        stamp = compact()
        moved = []
        for suffix in ("", "-wal", "-shm"):
            src = path.with_name(path.name + suffix)
            if not src.exists():
                continue
            dst = self.quarantine_dir / f"{src.name}.corrupt-{stamp}"
            n = 1
            while dst.exists():
                dst = self.quarantine_dir / f"{src.name}.corrupt-{stamp}.{n}"
                n += 1
            os.replace(src, dst)
            moved.append(str(dst))
        fsync_dir(self.quarantine_dir)
        fsync_dir(path.parent)
        log.critical("journal is corrupt error=%s moved_to=%s; a new journal is rebuilt from the record files on the "
                     "SD and the stick (states sent/acked are relearned from the data center's acks)",
                     e, ",".join(moved))
        self._after_open_audit = ("journal_rebuilt", {"error": str(e), "files": moved})

    def _name_seq(self, name: str) -> int:
        """The sequence number in a file name of this kit's records (0 if it is none): names only, no parsing
        of the time (this runs over every name in records/ at each open)."""
        prefix = self.identity.kit_id + "-"
        if not name.startswith(prefix):
            return 0
        digits = name[len(prefix):].partition("-")[0]
        return int(digits) if digits.isdigit() and len(digits) <= 20 else 0

    def _sd_names_max(self) -> int:
        """The highest number any file name on the SD shows (records/, its temp files, quarantine/). Names only
        (one scandir, no stat): tens of ms for tens of thousands of records; run only when the journal is in
        doubt (`_fence_from_media`)."""
        top = 0
        for d in (self.records_dir, self.quarantine_dir):
            with os.scandir(d) as it:
                for e in it:
                    n = self._name_seq(e.name)
                    if n > top:
                        top = n
        return top

    def _read_floor(self) -> tuple[int, str]:
        """The floor file's number and what is wrong with it ("" none, "missing", "unreadable")."""
        p = self.state_dir / FLOOR_NAME
        try:
            raw = read_regular(p, 64).decode("ascii").split()
        except FileNotFoundError:
            return 0, "missing"
        except (OSError, UnicodeDecodeError) as e:
            log.warning("sequence floor file unreadable path=%s error=%s", p, e)
            return 0, "unreadable"
        if not raw:
            return 0, "missing"  # just created (`_open_floor`), never written
        if len(raw) == 2 and raw[0].isdigit() and len(raw[0]) <= 20 and raw[1] == _floor_check(int(raw[0])):
            return int(raw[0]), ""
        log.warning("sequence floor file damaged path=%s", p)
        return 0, "unreadable"

    def _open_floor(self) -> None:
        p = self.state_dir / FLOOR_NAME
        try:
            existed = p.exists()
            self._floor_fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            if not existed:
                fsync_dir(self.state_dir)
        except OSError as e:
            log.error("cannot open the sequence floor file path=%s error=%s", p, e)
            self._floor_fd = None

    def _write_floor(self, value: int) -> bool:
        """Write `value` to the floor file in place (one fixed-size write and one fdatasync: no rename, so no
        directory fsync on the commit path). A torn write fails its check and is read as "unreadable", which
        only costs the next start a scan of the names. Best effort: the journal's own mark stands."""
        if self._floor_fd is None:
            return False
        line = f"{value:020d} {_floor_check(value)}\n".encode()
        try:
            os.pwrite(self._floor_fd, line, 0)  # fixed length: the file is never longer after the first write
            os.fdatasync(self._floor_fd)
        except OSError as e:
            log.error("cannot write the sequence floor file value=%d error=%s", value, e)
            return False
        self._floor_written = value
        return True

    def _stick_names_max(self, limit: int) -> int:
        """The highest number the present stick's record names show, up to `limit` (a stick's names are anyone's
        to write: see STICK_SEQ_AHEAD_MAX); 0 without a usable stick."""
        if not detect(self.cfg.usb_dir, self.cfg.usb.require_mountpoint):
            return 0
        names = Stick(self.cfg.usb_dir, "", self.identity.kit_id).record_files()  # O_NOFOLLOW, regular files only
        return max(_believable((self._name_seq(n) for n in names), limit), default=0)

    def _fence_from_media(self) -> bool:
        """Raise the numbering above every number the media's file names show, before any commit (open).

        The journal is the index, but the record files are the truth: a lost or rebuilt journal (or a lost WAL)
        would start numbering again at a number records/ already holds. Returns whether the journal may not
        know every record on the media (a reconcile is then owed, also after a clean stop)."""
        mark, problem = self._read_floor()
        self._open_floor()
        why = self._journal_suspect or ("behind" if mark > self._seq else "")
        if not why and not problem:
            self._note_floor(mark)
            return False  # a clean start: nothing but the floor file read
        sd = self._sd_names_max()
        if not why:  # no usable floor file (the first start of this version, or a damaged one): the names decide
            why = "behind" if sd > self._seq else ""
            if not why:
                self._note_floor(None)
                return False
        stick = self._stick_names_max(max(self._seq, sd, mark) + STICK_SEQ_AHEAD_MAX)
        floor = max(sd, stick, mark)
        if why == "new" and floor == 0:
            self._note_floor(None)
            return False  # a new kit: no medium holds any record of it
        log.error("journal does not know every record on the media reason=%s journal_seq=%d sd_highest=%d "
                  "stick_highest=%d; numbering continues above %d, reconcile owed", why, self._seq, sd, stick,
                  max(floor, self._seq))
        if floor > self._seq:
            self._seq = self._boot_seq = floor
            try:
                self.j.set_meta(**{META_HWM: str(floor)})
                self._hwm = floor
            except Exception as e:  # the next commit reserves a block above `floor` before using any number
                log.error("cannot write the sequence floor to the journal error=%s", e)
        self._note_floor(None)
        kind, detail = self._after_open_audit or ("journal_behind", {})
        self._after_open_audit = None
        self._audit_quietly(kind, reason=why, sd_highest=sd, stick_highest=stick, floor=mark, **detail)
        return True

    def _note_floor(self, good: int | None) -> None:
        """Bring the floor file to the journal's mark (open); `good`: the valid number it holds, if any."""
        mark = max(self._hwm, self._seq)
        if good != mark:
            if self._floor_fd is not None:
                try:
                    os.ftruncate(self._floor_fd, 0)  # whatever was there (a damaged line) goes
                except OSError as e:
                    log.error("cannot truncate the sequence floor file error=%s", e)
            self._write_floor(mark)
        else:
            self._floor_written = mark

    def _audit_quietly(self, kind: str, **detail: Any) -> None:
        """An audit row that must not stop what it records (start-up, a stick event) when the SD is full."""
        try:
            self.j.audit(kind, **detail)
        except Exception as e:
            log.error("cannot write audit event kind=%s error=%s", kind, e)

    # --- the spare file: room for SQLite when the SD is full --------------------------------------

    def _release_spare(self, why: str) -> bool:
        """Delete the spare file so SQLite has room again; False if there was none."""
        p = self.state_dir / SPARE_NAME
        try:
            os.unlink(p)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.error("cannot release the spare file path=%s error=%s", p, e)
            return False
        try:
            fsync_dir(self.state_dir)
        except OSError:
            pass  # the unlink is what frees the room; a crash just repeats it
        log.error("SD full: spare file released so the journal can work why=%s; capture stays halted until "
                  "acknowledged records are purged", why)
        return True

    def _keep_spare(self) -> None:
        """Create the spare file if it is missing and the SD has room for it beyond the guard's reserve."""
        p = self.state_dir / SPARE_NAME
        if p.exists():
            return
        try:
            if space(self.state_dir).free_bytes - SPARE_BYTES < self.guard.reserve_bytes("sd"):
                return  # not now: it is made again once purges have freed room
            tmp = p.with_name(p.name + TMP_SUFFIX)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, SPARE_BYTES)  # real blocks: released, they are free at once
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, p)
            fsync_dir(self.state_dir)
        except OSError as e:
            log.warning("cannot create the spare file path=%s error=%s", p, e)
            try:
                os.unlink(p.with_name(p.name + TMP_SUFFIX))
            except OSError:
                pass

    def _with_room(self, write: Any, *args: Any) -> Any:
        """A journal write the kit needs to get out of "full" (the relay's progress, the purge): if SQLite fails
        for want of room, release the spare file and try once more."""
        try:
            return write(*args)
        except sqlite3.OperationalError as e:
            full = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF == _SQLITE_FULL
            if not full or not self._release_spare(f"journal write failed: {e}"):
                raise  # (a busy or I/O error is not helped by room)
            return write(*args)

    def close(self) -> None:
        """Wait for any commit in progress, then release everything."""
        self.closing.set()  # a running backfill or reconcile stops after its current record
        with self._lock:
            self._prepared.clear()  # prepared key material is never kept past the store's life
            self._flush_stick()
            if self.journal:
                if self._writable:
                    # Nothing is half done now (commits, purges and mirror copies run under the lock);
                    # the numbers reserved but unused go back. Clean only if no reconcile is owed.
                    marker = "0" if self.reconcile_pending or self._leftovers or self._abandoned else "1"
                    try:
                        self.journal.set_meta(**{META_HWM: str(self._seq), META_CLEAN: marker})
                        self._write_floor(self._seq)  # (a stop between the two: the next start checks the names)
                    except Exception as e:  # the SD failing at close: the next start reconciles
                        log.error("store close could not write the clean marker error=%s", e)
                    self._writable = False
                self.journal.close()
                self.journal = None
            if self._floor_fd is not None:
                os.close(self._floor_fd)
                self._floor_fd = None
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
        self.notice_stick()
        with self._begin_lock:  # measure and hold in one step: two enrollments cannot share the last room
            reservation = self.guard.reserve(self.media())
            if len(self._prepared) < PREPARED_KEYS_MAX:
                self._prepared.append(record_format.prepare_keys(self.recipients))
        self._reserve_ahead()
        return reservation

    def _reserve_ahead(self) -> None:
        """Reserve the next block of numbers now, at the enrollment's start, when few are left: the durable
        reservation (floor file and journal, two syncs) then stays off the commit's serial path. Best effort: a
        commit that finds no number reserved reserves its own, and fails its record if it cannot."""
        if not self._writable or self._hwm - self._seq > RESERVE_AHEAD:
            return
        with self._lock:
            if self.journal is None or not self._writable or self._hwm - self._seq > RESERVE_AHEAD:
                return
            try:
                self._reserve_numbers(self._seq + 1)
            except StoreError:
                pass  # logged; the commit tries again

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
            # Refuse before a number is used: the sealed record must fit on the SD beyond its reserve
            # (a reservation taken earlier does not prove the room is still there).
            self.guard.check_room("sd", self.state_dir, len(payload) + record_format.MAX_HEADER)
            seq = self._seq + 1
            if seq > self._hwm:
                self._reserve_numbers(seq)
            created = iso()
            record_id = make_record_id(self.identity.kit_id, seq, compact())
            if os.path.lexists(self.sd_path(record_id)):  # one lstat: a commit never replaces a record file
                self._number_in_use(seq, record_id)
            synced = clock_synchronised()
            # The SD and the stick are separate devices: write both at once, confirm when both are done. The
            # mirror thread starts now: its checks (present, a folder of ours) overlap the sealing below.
            body: Future[tuple[bytearray, Pending]] = Future()
            mirror: Future[tuple[str | None, str]] = Future()
            journaled: Future[bool] = Future()  # the stick's index line waits for the journal row (see _mirror_one)
            self._mirror_pool.submit(self._mirror_one, record_id, seq, body, mirror, journaled)
            try:
                sealed, digest, stick_id, mirror_error = self._seal_and_store(
                    payload, record_id, seq, created, synced, operator_id, body, mirror)
                journaled.set_result(True)
            finally:
                if not body.done():
                    body.set_exception(_Abandoned("commit abandoned"))
                if not journaled.done():
                    journaled.set_result(False)  # failed: no index line (and no copy, see _seal_and_store)
            self.guard.note_record_size(len(sealed))
        log.info("record captured record_id=%s size=%d sha256=%s stick=%s", record_id, len(sealed), digest[:12],
                 stick_id or "-")
        self._changed()
        return CommitResult(record_id, digest, len(sealed), seq, stick_id, mirror_error)

    def _seal_and_store(self, payload: bytes, record_id: str, seq: int, created: str, synced: bool,
                        operator_id: str, body: Future[tuple[bytearray, Pending]],
                        mirror: Future[tuple[str | None, str]]) -> tuple[bytearray, str, str | None, str]:
        """The commit's seal, both copies and its journal row (lock held); (sealed, digest, stick id, mirror
        error). On failure no copy stays behind (or recovery adopts it after verifying: its number is fenced)."""
        try:
            sealed, body_len = record_format.seal_body(
                payload, record_id=record_id, kit_id=self.identity.kit_id, seq=seq, created=created,
                clock_synced=synced, recipients=self.recipients, keys=self._seal_keys(),
                kit_key=self.identity.public_key_raw)
        except BaseException as e:
            body.set_exception(e)
            _mirrored(mirror)
            raise
        # The sequence number is used up from here on, whatever happens (never reused).
        self._seq = seq
        # Off the serial path: both media write the body (header, ciphertext, tag) to their temp files and
        # start its writeback while the signature (SHA-256 of the body, Ed25519) is computed; each writes
        # the signature's 64 bytes when it is there, then fsyncs. Nothing is renamed, so nothing is a
        # record, before its whole file is fsync'd, and the read-back compares every byte, signature
        # included (`atomic_write_at`'s `pending`).
        signed: Future[str] = Future()

        def sign() -> str:
            try:
                signed.set_result(record_format.sign_body(sealed, body_len, self.identity.signing_key))
            except BaseException as e:
                signed.set_exception(e)
            return signed.result()

        body.set_result((sealed, (body_len, signed.result)))
        try:
            atomic_write(self.sd_path(record_id), sealed, verify=self.cfg.store.verify_readback,
                         pending=(body_len, sign))
        except BaseException as e:
            if not signed.done():  # the stick's copy waits for a signature that will not come: it gives up (not an
                signed.set_exception(_Abandoned(str(e)))  # I/O error of the stick's: no "stick full" or drop)
            if _mirrored(mirror) is not None:
                self._unmirror(record_id)  # the operator is told it failed: no copy may survive elsewhere
            if not isinstance(e, OSError):
                raise
            log.error("commit failed on SD record_id=%s error=%s", record_id, e)
            raise StoreError(f"could not write the record to the SD card: {e.strerror or e}") from e
        digest = signed.result()
        stick_id, mirror_error = mirror.result()
        try:
            self.j.add_record(record_id=record_id, seq=seq, created=created, clock_synced=synced,
                              size=len(sealed), sha256=digest, operator_id=operator_id, stick_id=stick_id)
        except Exception as e:  # SQLite's own ENOSPC/EIO: the operator is told it failed, so no copy stays
            log.error("commit failed in the journal record_id=%s error=%s", record_id, e)
            try:
                remove_durably(self.sd_path(record_id))
            except OSError as re:
                # Kept in memory (the journal just failed): retried by the purge and the reconcile, never adopted.
                log.error("cannot remove SD copy of a failed commit record_id=%s error=%s", record_id, re)
                self._abandon(record_id, "")
            if stick_id is not None:
                self._unmirror(record_id)  # (its index line is never written: see _mirror_one)
            raise StoreError(f"could not write the journal on the SD card: {e}") from e
        return sealed, digest, stick_id, mirror_error

    def _number_in_use(self, seq: int, record_id: str) -> None:
        """A file already has this commit's name: the journal is behind the media (the floor taken at open
        should make this impossible). The number is skipped, a reconcile (which fences every name) is owed, and
        this commit fails before anything is written (lock held); the operator's retry gets a fresh number."""
        self._seq = max(self._seq, seq)
        self.reconcile_pending = True
        log.error("record file already exists; its number is skipped and nothing is overwritten record_id=%s "
                  "seq=%d; reconcile owed", record_id, seq)
        raise StoreError(f"record number {seq} is already in use on the SD card; retry the commit")

    def _seal_keys(self) -> record_format.SealKeys:
        """Key material for the record being sealed: one prepared by `begin()`, else made now (lock held).

        A prepared set is handed out once and then dropped: never two records under one DEK or KEK.
        """
        with self._begin_lock:
            if self._prepared:
                return self._prepared.pop()
        return record_format.prepare_keys(self.recipients)

    def _reserve_numbers(self, seq: int) -> None:
        """Durably reserve a block of sequence numbers from `seq` on, before `seq` is used anywhere."""
        hwm = seq + SEQ_BLOCK - 1
        self._write_floor(hwm)  # first: if the journal loses this block (its WAL), the floor file still shows it
        try:
            self.j.set_meta(**{META_HWM: str(hwm), META_CLEAN: "0"})
        except Exception as e:  # SQLite's own ENOSPC/EIO: refuse the record before its number exists
            log.error("cannot reserve sequence numbers seq=%d error=%s", seq, e)
            raise StoreError(f"could not write the journal on the SD card: {e}") from e
        self._hwm = hwm

    def _unmirror(self, record_id: str) -> None:
        """Remove a failed commit's stick copy; if that fails it is remembered (`_abandon`) and removed later."""
        stick = self.stick
        if stick is None:
            return
        try:
            stick.remove_record(record_id)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove stick copy of a failed commit record_id=%s stick_id=%s error=%s; retried "
                        "later", record_id, stick.stick_id, e)
            self._abandon(record_id, stick.stick_id)

    def _abandon(self, record_id: str, stick_id: str) -> None:
        """Remember a failed commit's copy that could not be removed ("" = the SD's; else the stick's): the operator
        was told the commit failed, so it is removed on a later pass and never adopted by a reconcile."""
        self._abandoned[record_id] = stick_id
        self._save_abandoned()

    def _save_abandoned(self) -> None:
        try:
            self.j.set_meta(**{META_ABANDONED: json.dumps(self._abandoned, sort_keys=True)})
        except Exception as e:  # (the journal may be what failed): kept in memory; an unclean stop reconciles
            log.error("cannot record abandoned copies in the journal count=%d error=%s", len(self._abandoned), e)

    def _load_abandoned(self) -> dict[str, str]:
        try:
            v = json.loads(self.j.get_meta(META_ABANDONED) or "{}")
        except ValueError:
            return {}
        return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else {}

    def _remove_abandoned(self) -> None:
        """Retry removing failed commits' copies (lock held): the SD's, and the present stick's."""
        done = []
        for rid, stick_id in self._abandoned.items():
            try:
                if not stick_id:
                    remove_durably(self.sd_path(rid))
                elif self.stick is not None and self.stick.stick_id == stick_id:
                    try:
                        self.stick.remove_record(rid)
                    except FileNotFoundError:
                        pass
                else:
                    continue  # that stick is not here: kept for when it is
            except OSError as e:
                log.warning("abandoned copy still not removable record_id=%s stick_id=%s error=%s", rid,
                            stick_id or "sd", e)
                continue
            log.info("abandoned copy of a failed commit removed record_id=%s medium=%s", rid, stick_id or "sd")
            done.append(rid)
        for rid in done:
            del self._abandoned[rid]
        if done:
            self._save_abandoned()

    def _mirror_one(self, record_id: str, seq: int, body: Future[tuple[bytearray, Pending]],
                    result: Future[tuple[str | None, str]], journaled: Future[bool]) -> None:
        """The commit's stick copy (mirror thread): `result` gets (stick id, "") once the record file is durable
        and read back on the stick, else (None, why). `body` is the sealed buffer and its `pending` signature
        (see `_seal_and_store`). The index line is appended once the journal row is committed (`journaled`),
        off the commit's answer: the index is the importer's convenience, fsync'd later anyway (see
        `Stick.write_record`), and a failed commit gets none. A failure there is acted on (`_index_failed`)
        by the next commit or poll, under the store's lock."""
        try:
            stick = self._index_failed(self.stick)  # (the committing thread holds the lock)
            outcome, size = self._mirror_copy(stick, record_id, body)
        except BaseException as e:  # not an I/O error (the seal failed): the commit fails, nothing kept
            result.set_exception(e)
            return
        result.set_result(outcome)
        if stick is None or outcome[0] is None or not journaled.result():
            return
        try:
            stick.add_to_index(record_id, seq, str(body.result()[1][1]()), size)
        except OSError as e:
            stick.index_error = e

    def _mirror_copy(self, stick: Stick | None, record_id: str, body: Future[tuple[bytearray, Pending]]
                     ) -> tuple[tuple[str | None, str], int]:
        if stick is None:
            return (None, ""), 0
        if not detect(stick.mount, self.cfg.usb.require_mountpoint):
            # Checked per record: a pulled stick must not turn into writes to the bare mount-point folder.
            self._stick_lost("removed")
            return (None, "stick removed"), 0
        try:
            with stick.records_folder() as rfd:
                try:  # a commit never replaces a file of that name on the stick either (checked while sealing)
                    os.stat(record_id + record_format.FILE_SUFFIX, dir_fd=rfd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    log.error("usb stick already has a file of this record's name; not overwritten record_id=%s "
                              "stick_id=%s", record_id, stick.stick_id)
                    return (None, "a file of that name is already on the stick"), 0
                data, pending = body.result()
                if not self._stick_has_room(stick, len(data)):
                    self._note_stick_full(stick)
                    return (None, "stick full"), 0
                stick.write_file(record_id, data, verify=self.cfg.store.verify_readback, pending=pending, rfd=rfd)
            return (stick.stick_id, ""), len(data)
        except OSError as e:
            if e.errno in NO_ROOM:  # full, not gone: keep the stick (never flap), the record joins the backlog
                self._note_stick_full(stick)
                return (None, "stick full"), 0
            # The stick vanished or failed: the SD copy stands, the record joins the mirror backlog.
            self._stick_lost(f"write failed: {e.strerror or e}")
            return (None, str(e)), 0

    def _index_failed(self, stick: Stick | None) -> Stick | None:
        """Act on an index append that failed after its commit had its answer (as a failed copy would have
        been: full, or the stick dropped); returns the stick still usable. Called with the store's lock held,
        or by the mirror thread for the commit that holds it (whose own path does not touch the stick state)."""
        if stick is None or stick.index_error is None:
            return stick
        e, stick.index_error = stick.index_error, None
        if e.errno in NO_ROOM:
            self._note_stick_full(stick)
            return stick
        self._stick_lost(f"index write failed: {e.strerror or e}")
        return None

    def wait_mirror_idle(self) -> None:
        """Wait until the mirror thread is idle (the last commit's index line appended): before a flush, an
        eject, a close or a reindex (and a benchmark's baseline). The mirror thread never waits for the store's
        lock, only for its commit's journal row, which is settled before that commit releases the lock: so
        this may be called under the lock (never from inside a commit)."""
        self._mirror_pool.submit(int).result()

    def _changed(self) -> None:
        for cb in list(self.on_change):
            try:
                cb()
            except Exception:  # a listener's bug must never undo a commit
                log.exception("store change listener failed")

    # --- USB ----------------------------------------------------------------------------

    def notice_stick(self) -> Stick | None:
        """The stick in use, after noticing one inserted or pulled since the last poll (`poll_usb` without its
        backfill, only when the stick looks changed: detect is 3 cheap syscalls). For callers that act on the
        stick now (an enrollment's start, an operator's export) instead of waiting for the USB watcher's next poll.
        The poll's other work, fsyncing the stick index's appended lines, stays with the watcher: the index is the
        importer's convenience (it also scans records/), each record file is already durable when its commit
        returns, and `reindex()` restores lines a yank cost."""
        stick = self.stick
        if stick is None or not detect(stick.mount, self.cfg.usb.require_mountpoint):
            self.poll_usb(backfill=False)
        return self.stick

    def poll_usb(self, backfill: bool = True) -> None:
        """Notice a stick appearing or going; on insertion, backfill what it lacks (`backfill=False`: only
        flag it, `backfill_due`, for the USB watcher, which copies in the background)."""
        present = detect(self.cfg.usb_dir, self.cfg.usb.require_mountpoint)
        if self._ejected:
            # The released stick stays ignored until it is gone (unmounted or pulled); another stick is taken.
            if present and stick_id_at(self.cfg.usb_dir) == self._ejected:
                return
            self._ejected = ""
        if self.stick is not None and (not present or stick_id_at(self.cfg.usb_dir) != self.stick.stick_id):
            # Gone, or another medium (or the bare mount-point folder of a pulled stick) is there now.
            self._stick_lost("removed")
        if self._refused and not present:
            self.stick_error, self._refused = "", False  # the refused stick was pulled
        if self._faulted and (not present or stick_id_at(self.cfg.usb_dir) not in self._faulted):
            self._faulted, self._fault_logged = {}, ""  # pulled (or replaced): the next one is tried afresh
            self._fault_retry.reset()
            if self.stick is None:
                self.stick_error = ""
        elif self._faulted and self._fault_retry.ready():
            sid = next(iter(self._faulted))
            log.info("usb stick left out after a fault is tried again stick_id=%s", sid)
            self._faulted = {}  # (the fault line is logged once per stick: `_fault_logged` stays)
        if self.stick is not None:
            with self._lock:
                self._flush_stick()
            if self.stick_full and self.stick is not None and self._stick_has_room(self.stick, self._largest()):
                # Room again (files deleted, a bigger filesystem): resume the backfill.
                log.info("usb stick has room again stick_id=%s", self.stick.stick_id)
                self.stick_full = {}
                self.backfill_due = True
        elif self.stick is None and present:
            if self._faulted:  # the stick that failed is still in: out until it is pulled, one log line
                sid, why = next(iter(self._faulted.items()))
                self.stick_error = f"USB stick left out after a fault ({why}); pull it and insert it again, or " \
                                   "insert another stick"
                if self._fault_logged != sid:
                    self._fault_logged = sid
                    log.error("usb stick left out after a fault stick_id=%s fault=%s; tried again in %.0f s (sooner "
                              "if it is pulled and inserted again, or replaced); records stay on the SD", sid, why,
                              self._fault_retry.wait_s())
                    self._audit_quietly("usb_faulted", stick_id=sid, reason=why)
                return
            try:
                stick = open_stick(self.cfg.usb_dir, self.identity.kit_id, self.identity.public_key_b64)
            except StickError as e:
                if str(e) != self.stick_error:
                    log.warning("usb stick unusable mount=%s error=%s", self.cfg.usb_dir, e)
                    if isinstance(e, HostileStick):  # prepared to hurt the kit: on the record, once per stick
                        self._audit_quietly("usb_refused", reason=str(e))
                self.stick_error, self._refused = str(e), isinstance(e, HostileStick)
                return
            self.stick_error = ""
            self.stick = stick
            self.stick_full = {}
            self._full_reported = ""
            self._backfill_cursor = -1
            self.backfill_due = True
            try:
                self.j.note_stick(stick.stick_id)
            except Exception as e:  # SD full at start: the stick is still used (the copies need no journal room)
                log.error("cannot note the stick in the journal stick_id=%s error=%s", stick.stick_id, e)
            log.info("usb stick inserted stick_id=%s mount=%s", stick.stick_id, stick.mount)
            self._audit_quietly("usb_inserted", stick_id=stick.stick_id)
            if self._abandoned:
                with self._lock:
                    self._remove_abandoned()
        if backfill and self.backfill_due:
            self.backfill()

    def _stick_lost(self, why: str) -> None:
        """Drop the current stick. Unless it was removed, it failed (a write, the index): if it is still in, it is
        remembered by its id and left out (`poll_usb`) until it is pulled, instead of being taken again at the
        next poll to fail again (a stick that flapped every 2 s)."""
        stick = self.stick
        if stick is not None:
            log.warning("usb stick gone stick_id=%s reason=%s; records stay on the SD", stick.stick_id, why)
            self._audit_quietly("usb_removed", stick_id=stick.stick_id, reason=why)
            if why != "removed" and detect(self.cfg.usb_dir, self.cfg.usb.require_mountpoint) \
                    and stick_id_at(self.cfg.usb_dir) == stick.stick_id:
                self._faulted = {stick.stick_id: why}
                self._fault_retry.next()
        self.stick = None
        self.stick_error = why
        self.stick_full = {}
        self.backfill_due = False

    def _largest(self) -> int:
        return max(self.guard.largest_record, 1)

    def _stick_has_room(self, stick: Stick, nbytes: int) -> bool:
        """Does a record of `nbytes` fit on the stick beyond its reserve (bytes and inodes)?"""
        try:
            sp = space(stick.mount)
        except OSError:
            return True  # gone: the write itself will tell (and the stick is then dropped)
        return (sp.free_bytes - self.guard.reserve_bytes("usb") >= nbytes
                and sp.usable_inodes - self.cfg.store.min_free_inodes >= 2)

    def _note_stick_full(self, stick: Stick, not_mirrored: int | None = None) -> None:
        """The stick is full up to its reserve: keep it (no flapping), say so once (log, audit, status)."""
        if not_mirrored is None:  # a commit that did not fit: one more (no O(n) count on the commit path)
            prev = self.stick_full.get("not_mirrored") if self.stick_full.get("stick_id") == stick.stick_id else None
            not_mirrored = prev + 1 if prev is not None else self.j.mirror_lag()["records"]
        first = self._full_reported != stick.stick_id  # once per insertion, however often room comes and goes
        self._full_reported = stick.stick_id
        self.stick_full = {
            "stick_id": stick.stick_id, "not_mirrored": not_mirrored,
            "code": "usb_stick_full",  # the message is worded in status(), in the reader's language
        }
        self.backfill_due = False
        if first:
            log.warning("usb stick full stick_id=%s not_mirrored=%d", stick.stick_id, not_mirrored)
            self.j.audit("usb_full", stick_id=stick.stick_id, not_mirrored=not_mirrored)

    @property
    def _max_sealed(self) -> int:
        return self.guard.max_record_bytes + record_format.MAX_HEADER + 1024 * 1024

    def backfill(self, limit: int | None = None, stop: threading.Event | None = None, background: bool = False) -> int:
        """Copy live records the current stick lacks, in capture order; returns how many were copied.

        Works in bounded batches of journal rows and checks `stop` (and the store closing) before each
        record, so a stop mid-backfill takes at most one record's copy; the next call (or the next
        start) resumes. Never fills the stick past its reserve: a full stick is kept and reported
        (`stick_full`), not dropped. Stick-only files (a kill between the stick and the SD copy) are
        adopted when they verify, removed when they do not. Clears `backfill_due` when done.
        One pass at a time: a `background` pass (the USB watcher's) ends early, keeping its place, when
        an explicit call (e.g. `rekam usb export`) is waiting for its turn.
        """
        if background:  # the USB watcher: never waits; gives way to an explicit call (an export)
            if not self._backfill_lock.acquire(blocking=False):
                return 0
        else:
            self._backfill_waiting += 1
            try:
                if not self._backfill_lock.acquire(timeout=60):
                    return 0
            finally:
                self._backfill_waiting -= 1
        try:
            return self._backfill(limit, stop, background)
        finally:
            self._backfill_lock.release()

    def _backfill(self, limit: int | None, stop: threading.Event | None, background: bool) -> int:
        stick = self.stick
        if stick is None:
            return 0
        copied = 0
        with self._lock:
            stick.remove_temp_files()
            on_stick = stick.record_files()
            known = self.j.mirrored_on(stick.stick_id)
        self._reconcile_stick_only(stick, on_stick, known)
        cursor = self._backfill_cursor
        listed: dict[str, tuple[int, str, int]] = {}

        def stopped() -> bool:
            return (self.stick is not stick or self.closing.is_set() or (stop is not None and stop.is_set())
                    or (background and self._backfill_waiting > 0))

        done = False
        while not stopped():
            with self._lock:
                if self.journal is None:
                    break
                rows = self.j.records(after_seq=cursor, limit=BACKFILL_BATCH)
            if not rows:
                done = True
                break
            for r in rows:
                if (limit is not None and copied >= limit) or stopped():
                    break
                if r.state in LIVE:
                    listed[r.id] = (r.seq, r.sha256, r.size)
                    res = self._backfill_one(stick, r, on_stick, known)
                    if res == "full":
                        with self._lock:
                            lag = self.j.mirror_lag()["records"]
                        self._note_stick_full(stick, lag)
                        break
                    if res == "lost":
                        break
                    copied += res == "copied"
                cursor = r.seq
            else:
                continue
            break
        self._backfill_cursor = -1 if done else cursor  # a finished pass: the next one looks at everything again
        if self.stick is stick and not stopped():  # (a stop goes now: the index is repaired on the next pass)
            self.wait_mirror_idle()  # a commit's line appended meanwhile is not added twice
            try:
                added = stick.reindex(listed)
                if added:
                    log.info("usb index repaired lines_added=%d stick_id=%s", added, stick.stick_id)
            except OSError as e:
                if e.errno not in NO_ROOM:
                    self._stick_lost(f"index write failed: {e.strerror or e}")
            with self._lock:
                self._flush_stick()
            if done:
                self.backfill_due = False
        if copied:
            log.info("usb backfill copied=%d stick_id=%s complete=%s", copied, stick.stick_id, done)
            self._changed()
        return copied

    def _backfill_one(self, stick: Stick, r: Any, on_stick: dict[str, int], known: set[str]) -> str:
        """Mirror one record: "copied", "present", "skipped", "full" or "lost" (the stick went)."""
        if on_stick.get(r.id) == r.size:
            if r.id in known:
                return "present"
            # Present but never recorded (e.g. the journal commit was cut short): verify, then record.
            try:
                if stick.sha256_of(r.id, self._max_sealed) == r.sha256:
                    with self._lock:
                        if self.journal is not None:
                            self.j.add_mirror(r.id, stick.stick_id)
                    return "present"
            except OSError:
                pass
        if not detect(stick.mount, self.cfg.usb.require_mountpoint):
            self._stick_lost("removed")  # never write into the bare mount-point folder of a pulled stick
            return "lost"
        if not self._stick_has_room(stick, r.size):
            return "full"
        try:
            data = self.sd_path(r.id).read_bytes()
        except OSError as e:
            log.error("backfill cannot read SD copy record_id=%s error=%s", r.id, e)
            return "skipped"
        if record_format.sha256_hex(data) != r.sha256:
            with self._lock:
                if self.journal is None or not self._replace_bad_sd_copy(r):
                    return "skipped"
            data = self.sd_path(r.id).read_bytes()
        with self._lock:
            if self.journal is None or self.stick is not stick:
                return "lost"
            try:
                stick.write_record(r.id, r.seq, data, r.sha256, verify=self.cfg.store.verify_readback)
            except OSError as e:
                if e.errno in NO_ROOM:
                    return "full"
                self._stick_lost(f"write failed during backfill: {e.strerror or e}")
                return "lost"
            self.j.add_mirror(r.id, stick.stick_id)
        return "copied"

    def _reconcile_stick_only(self, stick: Stick, on_stick: dict[str, int], known: set[str],
                              rep: RecoveryReport | None = None) -> None:
        """Adopt (verified) or remove record files on the stick that the journal does not know.

        A kill between the stick copy and the SD copy leaves such a file; its number was reserved
        (high-water mark), so it is never handed out again either way.
        """
        for rid in sorted(set(on_stick) - known):
            seq = seq_of(rid)
            if seq is None or seq > self._boot_seq:  # later numbers: this process's own commits, journaled
                continue
            if self.closing.is_set() or (self.stick is not None and self.stick is not stick):
                return  # (recovery passes a stick it opened itself, before `self.stick` is set)
            with self._lock:
                if self.journal is not None and self.j.get(rid) is None:
                    self._adopt_from_stick(stick, rid, rep)

    def _adopt_from_stick(self, stick: Stick, rid: str, rep: RecoveryReport | None = None) -> None:
        if rid in self._abandoned:  # a failed commit's copy: removed (once this stick is the one), never adopted
            self._remove_abandoned()
            return
        try:
            data = stick.read_record(rid, self._max_sealed)
            parsed = record_format.parse(data, trusted_kit_key=self.identity.public_key_raw)
            h = parsed.header
            if h.record_id != rid or h.seq != seq_of(rid) or h.kit_id != self.identity.kit_id:
                raise record_format.RecordFormatError("file name does not match the record inside")
        except (OSError, record_format.RecordFormatError) as e:
            if isinstance(e, OSError) and not isinstance(e, UntrustedFile) and e.errno not in (errno.ENOENT,):
                log.warning("stick-only record unreadable record_id=%s error=%s", rid, e)
                return  # an I/O error is not a verdict: try again on the next pass
            log.error("stick-only record fails verification record_id=%s error=%s; removed from the stick", rid, e)
            try:
                stick.remove_record(rid)  # our kit folder: a bad or planted file is not kept as ours
            except OSError:
                pass
            self.j.audit("usb_orphan_removed", record_id=rid, reason=str(e))
            if rep is not None:
                rep.stick_removed.append(rid)
            return
        digest = record_format.sha256_hex(data)
        try:
            if os.path.lexists(self.sd_path(rid)):  # never replace a file (the SD reconcile looks at that one)
                raise StoreError(f"{self.sd_path(rid).name} already exists on the SD")
            self.guard.check_room("sd", self.state_dir, len(data))  # a backlog of them never eats the SD's reserve
            atomic_write(self.sd_path(rid), data, verify=True, expect_sha256=digest)
            self.j.add_record(record_id=rid, seq=h.seq, created=h.created, clock_synced=h.clock_synced,
                              size=len(data), sha256=digest, stick_id=stick.stick_id)
        except Exception as e:  # SD full, or a row with that number exists: leave it for the next pass
            log.error("cannot adopt stick-only record record_id=%s error=%s", rid, e)
            return
        self.j.audit("usb_orphan_adopted", record_id=rid, stick_id=stick.stick_id)
        log.warning("adopted stick-only record record_id=%s stick_id=%s", rid, stick.stick_id)
        if rep is not None:
            rep.stick_adopted.append(rid)

    def _flush_stick(self) -> None:
        """fsync the stick index's appended lines (lock held), once the mirror thread has appended its last."""
        self.wait_mirror_idle()
        stick = self._index_failed(self.stick)
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
        except FileNotFoundError as e:
            # Lost from the SD while the kit was stopped (a clean start does not scan): the stick may hold it.
            with self._lock:
                if not self._restore_from_stick(r):
                    raise StoreError(f"cannot read {record_id}: {e}") from e
            data = self.sd_path(record_id).read_bytes()
        except OSError as e:
            raise StoreError(f"cannot read {record_id}: {e}") from e
        if record_format.sha256_hex(data) != r.sha256:
            with self._lock:
                if self._replace_bad_sd_copy(r):
                    return self.sd_path(record_id).read_bytes()
            raise StoreError(f"record {record_id} is corrupt on the SD and was quarantined")
        return data

    def _replace_bad_sd_copy(self, r: Any) -> bool:
        """An SD copy that fails its journal hash (bit rot): quarantine it, then restore a verified copy from the
        stick if one is there; the record keeps its state (True), else it stays quarantined (lock held)."""
        self._quarantine(r.id, "SD copy does not match its journal hash", seq=r.seq)
        if not self._restore_from_stick(r):
            return False
        self.j.set_state(r.id, r.state, "restored from stick")
        self._audit_quietly("restored_from_stick", record_id=r.id)
        return True

    def mark(self, record_id: str, state: str, reason: str = "") -> None:
        """Move a record along its states (sent, acked, quarantined)."""
        self._with_room(self.j.set_state, record_id, state, reason)
        self._changed()

    def mark_delivery(self, sent: list[str], acked: list[str]) -> None:
        """Record the relay's progress for many records in one journal commit (also on a full SD: the acks are
        what lets the purge free it)."""
        self._with_room(self.j.mark_delivery, sent, acked)
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
        with self._lock:
            self._clean_leftovers()
        while max_batches is None or batches < max_batches:
            batches += 1
            with self._lock:
                if self.closing.is_set() or self.journal is None:
                    break
                ids = self._with_room(self.j.mark_purged, self.j.purgeable(need_stick, batch))
                if not ids:
                    break
                if self._floor_written < self._hwm:  # (its write at the reservation failed): before the files
                    self._write_floor(self._hwm)  # that show the highest numbers can go
                for rid in ids:
                    self._unlink_purged(rid)
                fsync_dir(self.records_dir)
            n += len(ids)
        if n:
            log.info("purged acknowledged records count=%d", n)
            self._audit_quietly("purge", count=n)
            self._keep_spare()  # room is back: so is the spare for the next time the SD fills
            self._changed()
        return n

    def _unlink_purged(self, rid: str) -> bool:
        """Delete a purged record's SD file; one that cannot be (EIO) is kept in `_leftovers`, retried by every
        purge and, if the kit stops first, by the next start's reconcile (the stop is then unclean)."""
        try:
            self.sd_path(rid).unlink(missing_ok=True)
        except OSError as e:
            if rid not in self._leftovers:
                log.error("cannot delete purged record file record_id=%s error=%s; retried by the next purge", rid, e)
            self._leftovers.add(rid)
            return False
        self._leftovers.discard(rid)
        return True

    def _clean_leftovers(self) -> None:
        """Retry what earlier passes could not remove: purged SD files, failed commits' copies (lock held)."""
        if self._leftovers:
            gone = [rid for rid in list(self._leftovers) if self._unlink_purged(rid)]
            if gone:
                fsync_dir(self.records_dir)
                log.info("purged record files removed on retry count=%d", len(gone))
        if self._abandoned:
            self._remove_abandoned()

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
        """Reconcile the journal with the SD and the stick after an unclean stop (see module doc).

        Safe while the store is in use (the USB watcher runs it in the background after an unclean
        stop): the listing, the fencing of every number seen (high-water mark) and the removal of stale
        temp files happen under the store lock (no commit is half done then), the rest per record under
        it. Stops early when the store closes, and is then owed again (`reconcile_pending`, no clean
        marker) at the next start.
        """
        rep = RecoveryReport()
        j = self.j
        stick = self.stick
        if stick is None and detect(self.cfg.usb_dir, self.cfg.usb.require_mountpoint):
            try:
                stick = open_stick(self.cfg.usb_dir, self.identity.kit_id, self.identity.public_key_b64)
            except StickError:
                stick = None
        with self._lock:  # no commit is under way meanwhile: every temp file is stale, every new file journaled
            files, rows, on_stick = self._scan_and_fence(stick, rep)
        # Files the journal does not know: written, then the process died before the journal commit.
        for rid in sorted(files):
            if self.closing.is_set():
                return rep
            if rid not in rows:
                with self._lock:
                    try:
                        if j.get(rid) is None:
                            self._adopt_sd_file(rid, self.records_dir / files[rid], rep)
                    except Exception as e:  # one bad file never holds up the others: the next reconcile retries it
                        log.error("cannot reconcile record file record_id=%s file=%s error=%s; left in place", rid,
                                  files[rid], e)
        # Records only on the stick: the kill came between the stick copy and the SD copy.
        if stick is not None:
            self._reconcile_stick_only(stick, on_stick, j.mirrored_on(stick.stick_id), rep)
        # Journaled records whose file is missing or the wrong size.
        rdir = str(self.records_dir)
        for i, r0 in enumerate(rows.values()):
            if self.closing.is_set():
                return rep
            if i % RECONCILE_YIELD_EVERY == RECONCILE_YIELD_EVERY - 1:
                time.sleep(0.0005)  # a background pass: let the daemon's start-up and requests have the GIL
            if self._sd_file_ok(r0, files, rdir):
                continue
            with self._lock:
                try:
                    r = j.get(r0.id)  # fresh: a purge or the relay may have moved it since
                    if r is not None and not self._sd_file_ok(r, files, rdir):
                        self._check_sd_file(r, files, rep)
                except Exception as e:  # (an unlink's EIO, say): the others go on; the next reconcile retries it
                    log.error("cannot reconcile journaled record record_id=%s error=%s", r0.id, e)
                    if r0.state == "purged":
                        self._leftovers.add(r0.id)
        if self.stick is None and stick is not None:
            self.poll_usb(backfill=False)
        self.reconcile_pending = False
        if rep.adopted or rep.quarantined or rep.missing or rep.temp_removed or rep.restored_from_stick \
                or rep.stick_adopted or rep.stick_removed:
            log.info("recovery temp_removed=%d adopted=%d quarantined=%d restored=%d missing=%d stick_adopted=%d "
                     "stick_removed=%d", rep.temp_removed, len(rep.adopted), len(rep.quarantined),
                     len(rep.restored_from_stick), len(rep.missing), len(rep.stick_adopted), len(rep.stick_removed))
        return rep

    def _scan_and_fence(self, stick: Stick | None, rep: RecoveryReport
                        ) -> tuple[dict[str, str], dict[str, ScanRow], dict[str, int]]:
        """List the SD (and stick) files, fence every number seen, remove stale temp files (lock held).

        Returns the SD record files (id -> file name in records/), the journal's rows and the stick's files.
        Names and plain rows, no Path or full row object per record: this runs over the whole backlog.
        """
        j = self.j
        on_stick = stick.record_files() if stick is not None else {}
        temps: list[Path] = []
        files: dict[str, str] = {}
        cut = len(record_format.FILE_SUFFIX)
        with os.scandir(self.records_dir) as it:
            for e in it:
                name = e.name
                if name.endswith(TMP_SUFFIX):
                    temps.append(Path(e.path))
                elif name.endswith(record_format.FILE_SUFFIX):
                    files[name[:-cut]] = name
        rows = {r[0]: ScanRow(*r) for r in j.scan()}
        # Every number any medium has seen (temp files, quarantine, stick files incl. stick-only ones) goes
        # into the durable high-water mark BEFORE any evidence of it is removed: it is never reused.
        seen = [seq_of(p.name[: -len(record_format.FILE_SUFFIX + TMP_SUFFIX)]) or 0 for p in temps]
        # A journaled record's number is <= the journal's largest, which the high-water mark already covers:
        # only the files the journal does not know need their number read.
        seen += [seq_of(rid) or 0 for rid in files if rid not in rows]
        seen += [seq_of(q.name.split(".")[0]) or 0 for q in self.quarantine_dir.iterdir()]
        # A stick's names are anyone's to write: only believable numbers fence (`_believable`).
        from_stick = [seq_of(rid) or 0 for rid in on_stick]
        if stick is not None:
            try:
                from_stick += [seq_of(p.name.split(".")[0]) or 0 for p in stick.records_dir.glob("*" + TMP_SUFFIX)]
            except OSError:
                pass
        limit = max(self._seq, *seen) + STICK_SEQ_AHEAD_MAX if seen else self._seq + STICK_SEQ_AHEAD_MAX
        seen += _believable(from_stick, limit)
        self._seq = max(self._seq, *seen) if seen else self._seq
        if self._seq > self._hwm:
            j.set_meta(**{META_HWM: str(self._seq)})
            self._hwm = self._seq
        self._boot_seq = max(self._boot_seq, self._seq)  # stick-only files up to here may be adopted
        for p in temps:
            p.unlink(missing_ok=True)
            rep.temp_removed += 1
        if temps:
            fsync_dir(self.records_dir)
        if stick is not None:
            stick.remove_temp_files()
        return files, rows, on_stick

    def _adopt_sd_file(self, rid: str, p: Path, rep: RecoveryReport) -> None:
        seq = seq_of(rid)
        if rid in self._abandoned:  # a failed commit's copy (the operator was told): removed, not adopted
            remove_durably(p)
            del self._abandoned[rid]
            self._save_abandoned()
            log.warning("removed the SD copy of a failed commit record_id=%s", rid)
            return
        try:
            data = p.read_bytes()
            parsed = record_format.parse(data, trusted_kit_key=self.identity.public_key_raw)
            if parsed.header.record_id != rid or seq is None:
                raise record_format.RecordFormatError("file name does not match the record inside")
        except (OSError, record_format.RecordFormatError) as e:
            self._quarantine(rid, f"unjournaled file fails verification: {e}", seq=seq, path=p)
            rep.quarantined.append(rid)
            return
        h = parsed.header
        try:
            self.j.add_record(record_id=rid, seq=h.seq, created=h.created, clock_synced=h.clock_synced,
                              size=len(data), sha256=record_format.sha256_hex(data))
        except sqlite3.IntegrityError as e:  # its number is another record's (a kit that lost its journal
            # reused it before this fix): both files are kept; a technician decides (the data center has both ids)
            other = self.j.records(after_seq=h.seq - 1, limit=1)
            log.error("record file not adopted: its sequence number is already another record's record_id=%s "
                      "file=%s seq=%d other=%s error=%s; file left in place", rid, p.name, h.seq,
                      other[0].id if other and other[0].seq == h.seq else "?", e)
            self._audit_quietly("seq_conflict", record_id=rid, seq=h.seq, file=str(p))
            return
        rep.adopted.append(rid)
        log.warning("recovered unjournaled record record_id=%s", rid)

    def _sd_file_ok(self, r: Any, files: dict[str, str], rdir: str) -> bool:
        if r.state == "purged":
            return r.id not in files
        if r.state not in LIVE:
            return True
        name = files.get(r.id)
        if name is None:
            return False
        try:
            return os.stat(os.path.join(rdir, name)).st_size == r.size
        except OSError:
            return False

    def _check_sd_file(self, r: Any, files: dict[str, str], rep: RecoveryReport) -> None:
        rid = r.id
        p = self.sd_path(rid)
        if r.state == "purged":
            if rid in files and p.exists():
                remove_durably(p)
                rep.purged_leftovers += 1
            return
        if r.state not in LIVE:
            return
        try:
            size: int | None = p.stat().st_size
        except FileNotFoundError:
            size = None
        if size == r.size:
            return
        if size is not None:
            self._quarantine(rid, f"SD file is {size} bytes, journal says {r.size}", seq=r.seq)
            rep.quarantined.append(rid)
        if self._restore_from_stick(r):
            rep.restored_from_stick.append(rid)
            if rid in rep.quarantined:
                self.j.set_state(rid, "stored", "restored from stick")
        elif size is None:
            rep.missing.append(rid)
            self.j.audit("missing", record_id=rid)
            log.error("journaled record missing from SD record_id=%s; insert a stick that holds it", rid)

    def _restore_from_stick(self, r: Any) -> bool:
        """Copy a journaled record back to the SD from the stick, verified as a stick-only record is: the journal's
        hash, the kit's signature and the id inside. Never over an existing SD file (lock held)."""
        if not detect(self.cfg.usb_dir, self.cfg.usb.require_mountpoint):
            return False
        if os.path.lexists(self.sd_path(r.id)):  # (its quarantine move failed): never overwrite it
            log.error("cannot restore from stick: the SD still holds a file of that name record_id=%s", r.id)
            return False
        try:
            # the stick is untrusted: no symlink followed, at most the journaled size read
            data = Stick(self.cfg.usb_dir, "", self.identity.kit_id).read_record(r.id, r.size)
        except OSError:
            return False
        if record_format.sha256_hex(data) != r.sha256:
            log.warning("stick copy does not match the journal hash record_id=%s; not restored", r.id)
            return False
        try:
            parsed = record_format.parse(data, trusted_kit_key=self.identity.public_key_raw)
            if parsed.header.record_id != r.id:
                raise record_format.RecordFormatError("file name does not match the record inside")
        except record_format.RecordFormatError as e:
            log.warning("stick copy fails verification record_id=%s error=%s; not restored", r.id, e)
            return False
        atomic_write(self.sd_path(r.id), data, verify=True, expect_sha256=r.sha256)
        log.warning("record restored from stick record_id=%s", r.id)
        return True

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything a technician needs: records per state, media, guard state, mirror lag."""
        media = self.media()
        level, reasons = overall(media)
        codes = [m.code for m in media if m.reason]
        actions = [m.action for m in media if m.action]
        stick_msg = ""
        if self.stick_full:
            stick_msg = gettext(STICK_FULL, count=format_count(self.stick_full.get("not_mirrored", 0)))
            reasons, codes = [*reasons, stick_msg], [*codes, "usb_stick_full"]
        if not stick_msg and self._faulted and self.stick is None:
            stick_msg = gettext(STICK_FAULTED)
        stick = self.stick
        return {
            "kit_id": self.identity.kit_id,
            "records": self.j.counts(),
            "oldest_unacked": self.j.oldest_unacked(),
            "mirror_lag": self.j.mirror_lag(),
            "media": [m.as_dict() for m in media],
            "guard": {"level": level.value, "reasons": reasons, "codes": codes, "actions": actions,
                      "capture_allowed": level is not Level.HALT,
                      "enrollments_in_progress": self.guard.outstanding},
            "stick": {"present": stick is not None, "stick_id": stick.stick_id if stick else None,
                      "error": self.stick_error, "full": bool(self.stick_full),
                      "not_mirrored": self.stick_full.get("not_mirrored", 0),
                      "code": "usb_stick_full" if self.stick_full else ("usb_stick_faulted" if stick_msg else ""),
                      "message": stick_msg,
                      "backfilling": self.backfill_due},
            "reconcile_pending": self.reconcile_pending,
        }
