"""The read-back check compares what the medium returns with what was written, byte for byte (issue #17: no
second SHA-256 per medium); a file that differs, is shorter or longer is a mismatch."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from firmware.system import fsutil


@pytest.mark.parametrize("on_disk", [b"x" * 4095 + b"y", b"x" * 4095, b"x" * 4097, b"", b"X" + b"x" * 4095])
def test_a_differing_file_does_not_read_back(tmp_path: Path, on_disk: bytes) -> None:
    (tmp_path / "f").write_bytes(on_disk)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert fsutil._reads_back(fd, b"x" * 4096) is False
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 400 * 1024 + 17])
def test_the_same_bytes_read_back(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    for written in (data, bytearray(data), memoryview(data)):
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            assert fsutil._reads_back(fd, written) is True
        finally:
            os.close(fd)
    fsutil.atomic_write(tmp_path / "g", bytearray(data), verify=True)  # a sealed record is a bytearray
    assert (tmp_path / "g").read_bytes() == data


def test_the_read_back_makes_no_copy_of_the_record(tmp_path: Path) -> None:
    """One read, compared as it is: the parts of the read are not joined into a second copy (issue #17.3)."""
    import tracemalloc

    data = bytearray(os.urandom(2 * 1024 * 1024))
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        tracemalloc.start()
        try:
            assert fsutil._reads_back(fd, data) is True
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        os.close(fd)
    assert peak < 1.5 * len(data)  # the read itself (2 MiB + 1 asked), not a joined second copy


def test_a_pending_tail_is_written_after_its_wait(tmp_path: Path) -> None:
    """`pending`: the head is written, then the wait fills the tail (here from another thread), then the fsync and
    the read-back of the whole file; a wait that raises leaves neither the file nor its temp file."""
    data = bytearray(os.urandom(300_000)) + bytearray(64)
    tail = os.urandom(64)
    filled = threading.Event()

    def fill() -> None:
        data[-64:] = tail
        filled.set()

    def wait() -> None:
        threading.Thread(target=fill).start()
        assert filled.wait(5)

    fsutil.atomic_write(tmp_path / "r", data, verify=True, pending=(len(data) - 64, wait))
    assert (tmp_path / "r").read_bytes() == bytes(data) and data.endswith(tail)

    def fail() -> None:
        raise RuntimeError("no tail")

    with pytest.raises(RuntimeError):
        fsutil.atomic_write(tmp_path / "s", data, verify=True, pending=(1000, fail))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
