"""The read-back check compares what the medium returns with what was written, byte for byte (issue #17: no
second SHA-256 per medium); a file that differs, is shorter or longer is a mismatch."""

from __future__ import annotations

import os
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
