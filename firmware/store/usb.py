"""The USB mirror stick: detection, its self-describing layout, and writing records to it.

Layout on the stick, readable by the data center without the kit (`rekam-fleet import`)::

    rekam/stick.json                    {"stick_id": ..., "created": ...}
    rekam/<kit_id>/kit.json             {"kit_id", "kit_public_key", "format_version", ...}
    rekam/<kit_id>/index.jsonl          one line per record copied: record_id, seq, sha256, size
    rekam/<kit_id>/records/<record_id>.rkm

The index is append-only (each line fsync'd); a torn last line after a yank is ignored by
readers, and a record is listed only after its file is durable.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.errors import StickError
from firmware.system.clock import iso
from firmware.system.fsutil import atomic_write, fsync_dir
from firmware.wire import record_format

log = logging.getLogger(__name__)


@dataclass
class Stick:
    """A mounted stick usable as a mirror for one kit."""

    mount: Path
    stick_id: str
    kit_id: str

    @property
    def kit_dir(self) -> Path:
        return self.mount / "rekam" / self.kit_id

    @property
    def records_dir(self) -> Path:
        return self.kit_dir / "records"

    @property
    def index_path(self) -> Path:
        return self.kit_dir / "index.jsonl"

    def record_path(self, record_id: str) -> Path:
        return self.records_dir / (record_id + record_format.FILE_SUFFIX)

    index_dirty: bool = False

    def write_record(self, record_id: str, seq: int, data: bytes, sha256: str, verify: bool = True) -> None:
        """Copy one sealed record to the stick (atomic, fsync'd, read back) and index it.

        The record file itself is durable when this returns. The index line is flushed by
        `flush_index()` (maintenance loop, eject, end of backfill): the index is a convenience for
        the importer, which also scans `records/`, and `reindex()` re-adds lines a yank cost.
        """
        atomic_write(self.record_path(record_id), data, verify=verify, expect_sha256=sha256)
        self._append_index([{"record_id": record_id, "seq": seq, "sha256": sha256, "size": len(data),
                             "at": iso()}])

    def _append_index(self, entries: list[dict[str, Any]], sync: bool = False) -> None:
        lines = b"".join((json.dumps(e, sort_keys=True) + "\n").encode() for e in entries)
        fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # A yank can leave a torn line; start a fresh line so one bad line cannot swallow the next.
            if os.fstat(fd).st_size and _last_byte(self.index_path) != b"\n":
                os.write(fd, b"\n")
            os.write(fd, lines)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.index_dirty = not sync

    def flush_index(self) -> None:
        """fsync the index if lines were appended since the last flush."""
        if not self.index_dirty:
            return
        fd = os.open(self.index_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.index_dirty = False

    def reindex(self, known: dict[str, tuple[int, str, int]]) -> int:
        """Add index lines for record files present on the stick but missing from its index.

        `known` maps record id -> (seq, sha256, size) from the kit's journal; only files whose
        size matches are listed (the importer verifies every file anyway).
        """
        listed = {e["record_id"] for e in read_index(self.kit_dir)}
        missing = [{"record_id": rid, "seq": known[rid][0], "sha256": known[rid][1], "size": size, "at": iso()}
                   for rid, size in self.record_files().items()
                   if rid not in listed and rid in known and known[rid][2] == size]
        if missing:
            self._append_index(missing, sync=True)
        return len(missing)

    def record_files(self) -> dict[str, int]:
        """Record ids present on the stick with their file sizes."""
        out = {}
        try:
            with os.scandir(self.records_dir) as it:
                for e in it:
                    if e.name.endswith(record_format.FILE_SUFFIX):
                        out[e.name[: -len(record_format.FILE_SUFFIX)]] = e.stat().st_size
        except FileNotFoundError:
            pass
        return out

    def remove_temp_files(self) -> int:
        """Delete temp files left by an interrupted copy; returns how many."""
        n = 0
        try:
            for p in self.records_dir.glob("*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
        except OSError:
            pass
        return n


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def read_index(kit_dir: Path) -> Iterator[dict[str, Any]]:
    """Entries of a stick's index, skipping torn or invalid lines."""
    try:
        with open(kit_dir / "index.jsonl", "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    e = json.loads(raw)
                    if isinstance(e, dict) and isinstance(e.get("record_id"), str):
                        yield e
                except ValueError:
                    log.warning("stick index line unreadable path=%s line=%d", kit_dir / "index.jsonl", n)
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


def stick_id_at(mount: Path) -> str:
    """The id in a stick's rekam/stick.json, or "" when there is none or it is unreadable."""
    try:
        return str(json.loads((mount / "rekam" / "stick.json").read_text()).get("stick_id", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def open_stick(mount: Path, kit_id: str, kit_public_key: str) -> Stick:
    """Prepare a present stick for mirroring: its id, the kit folder and kit.json."""
    base = mount / "rekam"
    try:
        base.mkdir(exist_ok=True)
        meta_path = base / "stick.json"
        stick_id = stick_id_at(mount)
        if not stick_id:
            stick_id = "stick-" + uuid.uuid4().hex[:12]
            atomic_write(meta_path, json.dumps({"stick_id": stick_id, "created": iso()}).encode())
        stick = Stick(mount, stick_id, kit_id)
        stick.records_dir.mkdir(parents=True, exist_ok=True)
        kit_json = stick.kit_dir / "kit.json"
        if not kit_json.exists():
            atomic_write(kit_json, json.dumps({
                "kit_id": kit_id, "kit_public_key": kit_public_key, "format_version": record_format.VERSION,
                "record_suffix": record_format.FILE_SUFFIX, "index": "index.jsonl",
                "layout": "records/<record_id>.rkm; see docs/record-format.md"}, indent=1).encode())
        fsync_dir(stick.kit_dir)
    except OSError as e:
        raise StickError(e.errno or 5, f"stick at {mount} is not writable: {e.strerror or e}") from e
    return stick
