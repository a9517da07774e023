"""File primitives: atomic write with fsync discipline, read-back check, statvfs, and safe reads of untrusted media.

`open_untrusted` / `read_untrusted` / `sha256_untrusted` are how anything on a USB stick (or any
other medium a stranger may have prepared) is opened: every path component is walked with
``O_NOFOLLOW`` beneath a root, only regular files are accepted (a FIFO or device is refused without
blocking), and a size cap is checked on the open descriptor before a byte is read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from firmware.errors import ReadbackMismatch, UntrustedFile

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: `atomic_write`'s `pending`: (offset, wait) where data[offset:] is still being filled in (see `atomic_write_at`).
Pending = tuple[int, Callable[[], object]]


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: Path, data: bytes, *, verify: bool = True, expect_sha256: str | None = None,
                 pending: Pending | None = None) -> None:
    """Write `data` to `path` atomically: temp file, fsync, rename, fsync directory.

    With `verify`, the file is dropped from the page cache, read back from the medium and compared
    with `data` (a card that lies about writes is caught here, not at the data center).
    On any error the temp file is removed and the exception propagates; `path` is then either
    absent or an earlier complete version, never partial.
    """
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # a trusted folder: may be a symlink
    try:
        atomic_write_at(dfd, path.name, data, verify=verify, expect_sha256=expect_sha256, where=str(path.parent),
                        pending=pending)
    finally:
        os.close(dfd)


def sha256_file(path: Path, drop_cache: bool = False) -> str:
    """SHA-256 of a file; with `drop_cache`, evict it from the page cache first so the medium is read."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def remove_durably(path: Path) -> bool:
    """Unlink a file and fsync its directory; False if it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


@dataclass(frozen=True)
class Space:
    """Free space of a file system as seen by an unprivileged writer."""

    total_bytes: int
    free_bytes: int
    free_inodes: int
    total_inodes: int

    # FAT and exFAT have no inode table: the kernel's vfat/exfat drivers report f_files = f_favail = 0 (only
    # FUSE's exfat invents counts), so "0 free" there means "not limited by inodes", not "full".
    UNLIMITED_INODES = 2**31

    @property
    def usable_inodes(self) -> int:
        """Free inodes a writer can count on: `free_inodes`, or `UNLIMITED_INODES` on a file system that has
        no inode count (``f_files == 0``: FAT, exFAT)."""
        return self.free_inodes if self.total_inodes > 0 else self.UNLIMITED_INODES


def space(path: Path) -> Space:
    """statvfs of the file system holding `path` (f_bavail: what a non-root writer can use)."""
    st = os.statvfs(path)
    return Space(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, st.f_favail, st.f_files)


# --- untrusted media -----------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def _parts(rel: str | os.PathLike[str]) -> list[str]:
    parts = [p for p in PurePosixPath(os.fspath(rel)).parts if p not in ("", ".")]
    if not parts or parts[0] == "/" or ".." in parts:
        raise UntrustedFile(errno.EINVAL, f"path {os.fspath(rel)!r} is not relative to its root")
    return parts


def open_dir_beneath(root: Path, rel: str | os.PathLike[str] = ".") -> int:
    """Open directory `root`/`rel` without following a symlink at any component below `root`.

    Returns a directory descriptor (the caller closes it). `root` itself is trusted (a mount point
    the kit chose). Raises `UntrustedFile` (ELOOP) for a symlink, ENOTDIR for a non-directory, and
    FileNotFoundError when a component is missing.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = [] if os.fspath(rel) in (".", "") else _parts(rel)
        for name in parts:
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UntrustedFile(e.errno, f"{root}/{rel}: {name!r} is a symlink or not a directory") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular_at(dir_fd: int, name: str, where: str) -> int:
    """Open regular file `name` in `dir_fd` read-only without ever opening anything else; returns the descriptor.

    The name is first opened with ``O_PATH|O_NOFOLLOW``, which calls no driver: a device node planted on a
    medium (a watchdog, whose open arms it; a tape, whose open rewinds it) or a FIFO (whose open wakes a
    writer) is refused from its ``fstat`` without having been opened, a symlink is refused, not followed. Only
    a regular file is then opened for reading, through ``/proc/self/fd`` (the same inode, no second lookup
    of the name that could be swapped). `where` names the file in errors (`UntrustedFile`).
    """
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedFile(errno.ELOOP, f"{where} is a symlink") from None
        raise
    try:
        mode = os.fstat(pfd).st_mode
        if stat.S_ISLNK(mode):
            raise UntrustedFile(errno.ELOOP, f"{where} is a symlink")
        if not stat.S_ISREG(mode):
            raise UntrustedFile(errno.EINVAL, f"{where} is not a regular file")
        try:
            fd = os.open(f"/proc/self/fd/{pfd}", _FILE_FLAGS & ~os.O_NOFOLLOW)
        except FileNotFoundError:  # no /proc (a minimal chroot): by name, then checked on the descriptor
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UntrustedFile(errno.EINVAL, f"{where} is not a regular file") from None
        return fd
    finally:
        os.close(pfd)


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The content of regular file `path` (symlinks followed: a configured path may be one), at most `max_bytes`.

    For files a configuration names (keys, passwords, serial numbers): a path set to ``/dev/zero`` or a FIFO
    must be a clear error, not a read that never ends or a config load that hangs. Raises `UntrustedFile`
    (EINVAL not a regular file, EFBIG too large) or the `OSError` of the open (FileNotFoundError...).
    """
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile(errno.EINVAL, f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise UntrustedFile(errno.EFBIG, f"{path} is {st.st_size} bytes; the limit is {max_bytes}")
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(pfd)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # (sysfs reports 4096 whatever it holds; and a file may grow after the fstat)
        raise UntrustedFile(errno.EFBIG, f"{path} is larger than the limit of {max_bytes} bytes")
    return data


@contextmanager
def open_untrusted(root: Path, rel: str | os.PathLike[str], max_bytes: int) -> Iterator[tuple[int, int]]:
    """Open regular file `root`/`rel` for reading, safely; yields ``(fd, size)``.

    No component below `root` may be a symlink (ELOOP), the file must be a regular file (a FIFO,
    socket or device is refused without blocking: EINVAL) and at most `max_bytes` long (EFBIG), all
    checked on the open descriptor so the file cannot be swapped between check and read.
    """
    parts = _parts(rel)
    dfd = open_dir_beneath(root, "/".join(parts[:-1]) or ".")
    try:
        fd = open_regular_at(dfd, parts[-1], f"{root}/{rel}")
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if st.st_size > max_bytes:
            raise UntrustedFile(errno.EFBIG, f"{root}/{rel} is {st.st_size} bytes; the limit is {max_bytes}")
        os.set_blocking(fd, True)
        yield fd, st.st_size
    finally:
        os.close(fd)


def read_untrusted(root: Path, rel: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The whole content of a regular file on an untrusted medium, at most `max_bytes` (see `open_untrusted`).

    Reads at most ``max_bytes + 1`` bytes, so a file that grows after the size check is refused too.
    """
    with open_untrusted(root, rel, max_bytes) as (fd, _size):
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise UntrustedFile(errno.EFBIG, f"{root}/{rel} grew past the limit of {max_bytes} bytes")
        return b"".join(chunks)


def sha256_untrusted(root: Path, rel: str | os.PathLike[str], max_bytes: int) -> tuple[str, int]:
    """Streaming SHA-256 and byte count of a regular file on an untrusted medium (never all in memory)."""
    h = hashlib.sha256()
    total = 0
    with open_untrusted(root, rel, max_bytes) as (fd, _size):
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise UntrustedFile(errno.EFBIG, f"{root}/{rel} grew past the limit of {max_bytes} bytes")
            h.update(chunk)
    return h.hexdigest(), total


# Creating a file on an untrusted medium: never through a symlink or onto a FIFO/device left there.
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def atomic_write_at(dir_fd: int, name: str, data: bytes, *, verify: bool = True,
                    expect_sha256: str | None = None, where: str = "", pending: Pending | None = None) -> None:
    """`atomic_write` relative to a directory descriptor from `open_dir_beneath`, for untrusted media.

    The temp file is created with ``O_EXCL|O_NOFOLLOW`` (a symlink or FIFO planted under the temp name
    is unlinked, never followed), renamed over `name` with ``renameat`` (which replaces a symlink at
    `name` rather than writing through it), then the file and the directory are fsync'd. With `verify`
    the file is re-opened with ``O_NOFOLLOW``, dropped from the page cache, read back and compared.
    `where` names the directory in errors. `expect_sha256`, the digest of `data` if the caller has it, only
    names the record in a mismatch error: the read-back is compared with `data` byte for byte.
    `pending` = (offset, wait): the bytes of `data` from `offset` on are still being filled in by another
    thread (or by `wait` itself); the head is written at once and its writeback started, then `wait()` is called
    (it returns once they are final, or raises to abort: the temp file is then removed) before the rest is
    written and the file fsync'd.
    """
    if "/" in name or name in ("", ".", ".."):
        raise UntrustedFile(errno.EINVAL, f"{name!r} is not a file name")
    tmp = name + TMP_SUFFIX
    try:
        fd = os.open(tmp, _NEW_FILE_FLAGS, 0o640, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(tmp, dir_fd=dir_fd)  # a leftover temp file (or whatever was planted there): removed, not followed
        fd = os.open(tmp, _NEW_FILE_FLAGS, 0o640, dir_fd=dir_fd)
    try:
        try:
            if pending is None:
                write_all(fd, data)
            else:
                with memoryview(data) as view:
                    write_all(fd, view[: pending[0]])
                    # Start the head's writeback now (DONTNEED on dirty pages only queues them): the medium
                    # works while the rest is computed, and the fsync below waits for less.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    pending[1]()
                    write_all(fd, view[pending[0]:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    os.fsync(dir_fd)
    if verify:
        rfd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(rfd).st_mode):
                raise UntrustedFile(errno.EINVAL, f"{where}/{name} is not a regular file after the rename")
            os.set_blocking(rfd, True)
            os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
            same = _reads_back(rfd, data)
        finally:
            os.close(rfd)
        if not same:
            what = f"sha256 {expect_sha256[:12]}" if expect_sha256 else f"{len(data)} bytes"
            raise ReadbackMismatch(errno.EIO, f"read-back of {where}/{name} differs from what was written ({what})")


def _reads_back(fd: int, data: bytes) -> bool:
    """Does `fd` (at offset 0) hold exactly `data`? Read from the medium and compared byte for byte (one
    memcmp): as strong as comparing SHA-256 digests, without hashing the bytes again per medium."""
    want = len(data)
    back = os.read(fd, want + 1)  # one spare byte: a longer file shows as a read past the end
    parts = [back]
    got = len(back)
    while back and got <= want:  # a short read (rare on a regular file): read on to the end
        back = os.read(fd, want + 1 - got)
        parts.append(back)
        got += len(back)
    if got != want:
        return False
    # The usual case is one full read and an empty one (end of file): compare that read itself. Joining
    # the parts regardless copied the whole record once more per medium (~0.3 ms on the commit's path).
    parts = [p for p in parts if p]
    return (parts[0] if len(parts) == 1 else b"".join(parts)) == data


@contextmanager
def open_append_at(dir_fd: int, name: str, where: str = "") -> Iterator[tuple[int, int]]:
    """Open (creating if absent) regular file `name` in `dir_fd` for appending (and reading, e.g. its last byte
    with ``pread``); yields ``(fd, size)``.

    ``O_NOFOLLOW|O_NONBLOCK``, then the descriptor must be a regular file: a symlink (ELOOP) or a FIFO,
    device or directory (EINVAL) planted under `name` raises `UntrustedFile` without blocking or
    writing anything through it. `where` names the directory in errors.
    """
    try:
        fd = os.open(name, _APPEND_FLAGS, 0o644, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedFile(errno.ELOOP, f"{where}/{name} is a symlink") from None
        if e.errno in (errno.ENXIO, errno.ENODEV, errno.EISDIR):
            raise UntrustedFile(errno.EINVAL, f"{where}/{name} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile(errno.EINVAL, f"{where}/{name} is not a regular file")
        os.set_blocking(fd, True)
        yield fd, st.st_size
    finally:
        os.close(fd)
