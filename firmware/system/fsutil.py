"""Crash-safe file primitives: atomic write with fsync discipline, read-back check, statvfs."""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from firmware.errors import ReadbackMismatch

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, verify: bool = True, expect_sha256: str | None = None) -> None:
    """Write `data` to `path` atomically: temp file, fsync, rename, fsync directory.

    With `verify`, the file is dropped from the page cache and read back from the medium and
    its SHA-256 compared (a card that lies about writes is caught here, not at the data center).
    On any error the temp file is removed and the exception propagates; `path` is then either
    absent or an earlier complete version, never partial.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    if verify:
        want = expect_sha256 or hashlib.sha256(data).hexdigest()
        got = sha256_file(path, drop_cache=True)
        if got != want:
            raise ReadbackMismatch(errno.EIO, f"read-back of {path} gave sha256 {got[:12]}, wrote {want[:12]}")


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


def space(path: Path) -> Space:
    """statvfs of the file system holding `path` (f_bavail: what a non-root writer can use)."""
    st = os.statvfs(path)
    return Space(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, st.f_favail, st.f_files)
