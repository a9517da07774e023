"""The USB mirror stick: detection, its self-describing layout, and writing records to it.

Layout on the stick (`firmware.wire.stick_layout`), readable by the data center without the kit
(`rekam-fleet import`)::

    rekam/stick.json                    {"stick_id": ..., "created": ...}
    rekam/<kit_id>/kit.json             {"kit_id", "kit_public_key", "format_version", ...}
    rekam/<kit_id>/index.jsonl          one line per record copied: record_id, seq, sha256, size
    rekam/<kit_id>/records/<record_id>.rkm

The index is append-only (lines fsync'd by `flush_index`: the USB watcher's poll, eject, close, the
end of a backfill); a torn last line after a yank is ignored by readers, and a record is listed only
after its file is durable (a commit's line, only once its journal row is committed: a failed commit
has none).

A stick is untrusted input (anyone can prepare one): every open, create, rename and unlink on it goes
through directory descriptors opened beneath the mount point with ``O_NOFOLLOW`` (`open_dir_beneath`,
`atomic_write_at`, `open_append_at`, `read_untrusted`), so a symlink, FIFO or device planted where a
rekam file or folder belongs is never followed or blocked on; JSON is read with bounded size and depth.
`open_stick` refuses such a stick (`HostileStick`, naming the path); nothing is written to it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.errors import HostileStick, ProtocolError, StickError, UntrustedFile
from firmware.system.clock import iso
from firmware.system.fsutil import (
    TMP_SUFFIX,
    Pending,
    atomic_write_at,
    open_append_at,
    open_dir_beneath,
    open_untrusted,
    read_untrusted,
    sha256_untrusted,
)
from firmware.wire import record_format
from firmware.wire import stick_layout as L

log = logging.getLogger(__name__)


@contextmanager
def _dir(mount: Path, rel: str) -> Iterator[int]:
    fd = open_dir_beneath(mount, rel)
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass
class Stick:
    """A mounted stick usable as a mirror for one kit."""

    mount: Path
    stick_id: str
    kit_id: str

    # Paths relative to the mount point, walked with O_NOFOLLOW on every use.
    @property
    def rel_kit(self) -> str:
        return f"{L.ROOT}/{self.kit_id}"

    @property
    def rel_records(self) -> str:
        return f"{self.rel_kit}/{L.RECORDS}"

    # Absolute paths, for logs and messages only: never opened as such.
    @property
    def kit_dir(self) -> Path:
        return self.mount / self.rel_kit

    @property
    def records_dir(self) -> Path:
        return self.mount / self.rel_records

    @property
    def index_path(self) -> Path:
        return self.kit_dir / L.INDEX

    def record_path(self, record_id: str) -> Path:
        return self.records_dir / (record_id + record_format.FILE_SUFFIX)

    index_dirty: bool = False
    index_error: OSError | None = field(default=None, repr=False, compare=False)  # a deferred append's failure
    # Serialises the index's appends and fsyncs: the commit's mirror thread appends after the commit has its
    # answer, while the USB watcher may flush or a backfill reindex (see `add_to_index`).
    _index_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def write_record(self, record_id: str, seq: int, data: bytes, sha256: str, verify: bool = True) -> None:
        """Copy one sealed record to the stick (atomic, fsync'd, read back) and index it.

        The record file itself is durable when this returns. The index line is flushed by
        `flush_index()` (maintenance loop, eject, end of backfill): the index is a convenience for
        the importer, which also scans `records/`, and `reindex()` re-adds lines a yank cost.
        """
        self.write_file(record_id, data, verify=verify, expect_sha256=sha256)
        self.add_to_index(record_id, seq, sha256, len(data))

    def records_folder(self) -> contextlib.AbstractContextManager[int]:
        """A descriptor of this kit's records folder, walked beneath the mount with O_NOFOLLOW (closed on exit)."""
        return _dir(self.mount, self.rel_records)

    def write_file(self, record_id: str, data: bytes, verify: bool = True, expect_sha256: str | None = None,
                   pending: Pending | None = None, rfd: int | None = None) -> None:
        """The record file of `write_record` alone (atomic, fsync'd, read back; see `atomic_write_at`, also for
        `pending`), in `rfd` (from `records_folder`) if given. Durable when this returns; its index line is
        `add_to_index`'s."""
        if rfd is None:
            with self.records_folder() as fd:
                self.write_file(record_id, data, verify, expect_sha256, pending, fd)
            return
        atomic_write_at(rfd, record_id + record_format.FILE_SUFFIX, data, verify=verify,
                        expect_sha256=expect_sha256, where=str(self.records_dir), pending=pending)

    def add_to_index(self, record_id: str, seq: int, sha256: str, size: int) -> None:
        """Append a record's index line (not fsync'd: `flush_index`). Only for a record whose file is durable."""
        self._append_index([{"record_id": record_id, "seq": seq, "sha256": sha256, "size": size, "at": iso()}])

    def _append_index(self, entries: list[dict[str, Any]], sync: bool = False) -> None:
        lines = b"".join((json.dumps(e, sort_keys=True) + "\n").encode() for e in entries)
        with self._index_lock, _dir(self.mount, self.rel_kit) as kfd, \
                open_append_at(kfd, L.INDEX, str(self.kit_dir)) as (fd, size):
            # A yank can leave a torn line; start a fresh line so one bad line cannot swallow the next.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")
            os.write(fd, lines)
            if sync:
                os.fsync(fd)
            self.index_dirty = not sync

    def flush_index(self) -> None:
        """fsync the index if lines were appended since the last flush."""
        with self._index_lock:
            if not self.index_dirty:
                return
            with _dir(self.mount, self.rel_kit) as kfd, open_append_at(kfd, L.INDEX, str(self.kit_dir)) as (fd, _):
                os.fsync(fd)
            self.index_dirty = False

    def index_entries(self) -> Iterator[dict[str, Any]]:
        """Entries of this stick's index (see `read_index`)."""
        return read_index(self.kit_dir, root=self.mount)

    def reindex(self, known: dict[str, tuple[int, str, int]]) -> int:
        """Add index lines for record files present on the stick but missing from its index.

        `known` maps record id -> (seq, sha256, size) from the kit's journal; only files whose
        size matches are listed (the importer verifies every file anyway).
        """
        listed = {e["record_id"] for e in self.index_entries()}
        missing = [{"record_id": rid, "seq": known[rid][0], "sha256": known[rid][1], "size": size, "at": iso()}
                   for rid, size in self.record_files().items()
                   if rid not in listed and rid in known and known[rid][2] == size]
        if missing:
            self._append_index(missing, sync=True)
        return len(missing)

    def record_files(self) -> dict[str, int]:
        """Record ids present on the stick with their file sizes (regular files only: a symlink is not a copy)."""
        out = {}
        try:
            with _dir(self.mount, self.rel_records) as rfd, os.scandir(rfd) as it:
                for e in it:
                    if e.name.endswith(record_format.FILE_SUFFIX) and e.is_file(follow_symlinks=False):
                        out[e.name[: -len(record_format.FILE_SUFFIX)]] = e.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
        except UntrustedFile as e:
            log.warning("usb records folder refused path=%s error=%s", self.records_dir, e)
        return out

    def remove_temp_files(self) -> int:
        """Delete temp files left by an interrupted copy (unlinkat: a symlink is removed, not followed)."""
        n = 0
        try:
            with _dir(self.mount, self.rel_records) as rfd:
                for name in [e.name for e in os.scandir(rfd) if e.name.endswith(TMP_SUFFIX)]:
                    try:
                        os.unlink(name, dir_fd=rfd)
                        n += 1
                    except OSError:
                        pass
        except OSError:
            pass
        return n

    def sha256_of(self, record_id: str, max_bytes: int) -> str:
        """Streaming SHA-256 of this stick's copy of a record (at most `max_bytes`; `OSError` if unusable)."""
        return sha256_untrusted(self.mount, f"{self.rel_records}/{record_id}{record_format.FILE_SUFFIX}",
                                max_bytes)[0]

    def read_record(self, record_id: str, max_bytes: int) -> bytes:
        """The bytes of this stick's copy of a record, at most `max_bytes` (`OSError` if absent or unusable)."""
        return read_untrusted(self.mount, f"{self.rel_records}/{record_id}{record_format.FILE_SUFFIX}", max_bytes)

    def remove_record(self, record_id: str) -> None:
        """Delete this stick's copy of a record durably (unlinkat beneath the mount: a symlink is removed, not
        followed); `OSError` if it cannot be."""
        with _dir(self.mount, self.rel_records) as rfd:
            os.unlink(record_id + record_format.FILE_SUFFIX, dir_fd=rfd)
            os.fsync(rfd)


def read_index(kit_dir: Path, root: Path | None = None) -> Iterator[dict[str, Any]]:
    """Entries of a stick's index, skipping torn or invalid lines.

    Every component of `kit_dir` below `root` (default: `kit_dir` itself) is walked with O_NOFOLLOW;
    `UntrustedFile` if the index is a symlink, not a regular file or over `MAX_INDEX_BYTES`.
    """
    root = kit_dir if root is None else root
    rel = kit_dir.relative_to(root) / L.INDEX
    try:
        with open_untrusted(root, rel, L.MAX_INDEX_BYTES) as (fd, _), open(fd, "rb", closefd=False) as f:
            for n, e in L.index_entries(f, str(kit_dir / L.INDEX)):
                if isinstance(e, ProtocolError):
                    log.warning("stick index line unreadable path=%s line=%d error=%s", kit_dir / L.INDEX, n, e)
                else:
                    yield e
    except FileNotFoundError:
        return


def detect(mount: Path, require_mountpoint: bool) -> bool:
    """Is a usable stick present at `mount`?"""
    try:
        if not mount.is_dir():
            return False
        if require_mountpoint and not os.path.ismount(mount):
            return False
        return os.access(mount, os.W_OK)
    except OSError:
        return False


def _read_stick_id(mount: Path) -> str:
    """The id in rekam/stick.json; "" when absent or torn; `HostileStick` when it was made to hurt."""
    rel = f"{L.ROOT}/{L.STICK_JSON}"
    try:
        meta = L.parse_meta(read_untrusted(mount, rel, L.MAX_STICK_JSON), str(mount / rel), L.MAX_STICK_JSON)
    except FileNotFoundError:
        return ""
    except UntrustedFile as e:
        raise HostileStick(e.errno, f"stick refused: {e.strerror or e}") from None
    except ProtocolError as e:
        if e.reason in L.HOSTILE_REASONS:
            raise HostileStick(errno.EINVAL, f"stick refused: {e}") from None
        return ""  # torn or garbled (a yank, another tool): a fresh id replaces it
    try:
        return L.stick_id_of(meta, str(mount / rel))
    except ProtocolError as e:  # an id made to be logged (newlines, 10 kB): not a stick of ours
        raise HostileStick(errno.EINVAL, f"stick refused: {e}") from None


def stick_id_at(mount: Path) -> str:
    """The id in a stick's rekam/stick.json, or "" when there is none or it is unreadable or refused."""
    try:
        return _read_stick_id(mount)
    except OSError:
        return ""


def _ensure_dir(mount: Path, rel: str) -> int:
    """A descriptor of folder `rel` beneath `mount`, created if absent; `UntrustedFile` if it is a symlink or
    not a folder (mkdirat never follows one; the O_NOFOLLOW walk then refuses it)."""
    parent, _, name = rel.rpartition("/")
    with _dir(mount, parent or ".") as pfd:
        try:
            os.mkdir(name, 0o755, dir_fd=pfd)
        except FileExistsError:
            pass
    return open_dir_beneath(mount, rel)


def _check_regular(dfd: int, name: str, where: Path) -> bool:
    """True if `name` is a regular file in `dfd`, False if absent; `UntrustedFile` if it is anything else."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UntrustedFile(errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.EINVAL, f"{where / name} is {kind}")
    return True


def _kit_json_usable(mount: Path, rel: str) -> bool:
    """Is there a readable kit.json? False if absent or garbled (rewritten); `HostileStick` if made to hurt."""
    try:
        L.parse_meta(read_untrusted(mount, rel, L.MAX_KIT_JSON), str(mount / rel), L.MAX_KIT_JSON)
        return True
    except FileNotFoundError:
        return False
    except UntrustedFile as e:
        raise HostileStick(e.errno, f"stick refused: {e.strerror or e}") from None
    except ProtocolError as e:
        if e.reason in L.HOSTILE_REASONS:
            raise HostileStick(errno.EINVAL, f"stick refused: {e}") from None
        return False


def _inspect(mount: Path, stick: Stick) -> tuple[str, bool]:
    """Check what is already on the stick, writing nothing: (its stick id or "", kit.json usable).

    Raises `UntrustedFile` / `HostileStick` for a symlinked, FIFO or odd rekam folder or file.
    """
    stick_id = _read_stick_id(mount)
    for rel in (L.ROOT, stick.rel_kit, stick.rel_records):
        try:
            os.close(open_dir_beneath(mount, rel))
        except FileNotFoundError:
            return stick_id, False  # created below, empty
    with _dir(mount, stick.rel_kit) as kfd:
        _check_regular(kfd, L.INDEX, stick.kit_dir)
    return stick_id, _kit_json_usable(mount, f"{stick.rel_kit}/{L.KIT_JSON}")


def open_stick(mount: Path, kit_id: str, kit_public_key: str) -> Stick:
    """Prepare a present stick for mirroring: its id, the kit folder and kit.json.

    Raises `HostileStick` (naming the path) when a rekam folder or file on it is a symlink, FIFO,
    device or otherwise odd, or its JSON is oversized or nested too deep; nothing is written to such a
    stick. Raises `StickError` when it cannot be written.
    """
    stick = Stick(mount, "", kit_id)
    try:
        stick_id, kit_json_ok = _inspect(mount, stick)
        # Everything below is created through descriptors walked with O_NOFOLLOW (nothing can be swapped in).
        base = _ensure_dir(mount, L.ROOT)
        try:
            if not stick_id:
                stick_id = "stick-" + uuid.uuid4().hex[:12]
                atomic_write_at(base, L.STICK_JSON, json.dumps({"stick_id": stick_id, "created": iso()}).encode(),
                                where=str(mount / L.ROOT))
        finally:
            os.close(base)
        stick.stick_id = stick_id
        kfd = _ensure_dir(mount, stick.rel_kit)
        try:
            os.close(_ensure_dir(mount, stick.rel_records))
            if not kit_json_ok:
                atomic_write_at(kfd, L.KIT_JSON, json.dumps({
                    "kit_id": kit_id, "kit_public_key": kit_public_key, "format_version": record_format.VERSION,
                    "record_suffix": record_format.FILE_SUFFIX, "index": L.INDEX,
                    "layout": "records/<record_id>.rkm; see docs/record-format.md"}, indent=1).encode(),
                    where=str(stick.kit_dir))
            os.fsync(kfd)
        finally:
            os.close(kfd)
    except StickError:
        raise
    except UntrustedFile as e:
        raise HostileStick(e.errno, f"stick refused: {e.strerror or e}") from None
    except OSError as e:
        raise StickError(e.errno or 5, f"stick at {mount} is not writable: {e.strerror or e}") from e
    return stick
