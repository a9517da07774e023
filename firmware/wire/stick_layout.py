"""The USB stick layout both sides read (the kit writes it, `rekam-fleet import` reads it), and its bounds.

::

    rekam/stick.json                    {"stick_id": ..., "created": ...}
    rekam/<kit_id>/kit.json             {"kit_id", "kit_public_key", "format_version", ...}
    rekam/<kit_id>/index.jsonl          one line per record copied: record_id, seq, sha256, size
    rekam/<kit_id>/records/<record_id>.rkm
    rekam/updates/<name>.rkup           signed software update bundles a supervisor brings (docs/updates.md)

A stick is untrusted input on both sides: every file is opened through `firmware.system.fsutil`'s
``*_untrusted`` primitives and every JSON document through `firmware.wire.safejson` with the caps here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from firmware.errors import ProtocolError
from firmware.wire import safejson

ROOT = "rekam"
STICK_JSON = "stick.json"
KIT_JSON = "kit.json"
INDEX = "index.jsonl"
RECORDS = "records"
UPDATES = "updates"

MAX_STICK_JSON = 4096  # {"stick_id", "created"}: about 80 bytes
MAX_KIT_JSON = 64 * 1024  # a key, a version and a few names
MAX_INDEX_LINE = 4096  # one entry is about 200 bytes
MAX_INDEX_BYTES = 1 << 30  # ~5 M entries; read line by line, never whole
MAX_DEPTH = 8  # every document here is one object of scalars

#: What a stick id may look like (it goes into journals, logs and the archive's source column).
STICK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: ProtocolError reasons that mean "prepared to hurt", not "torn by a yank": the stick is refused for them.
HOSTILE_REASONS = ("too_large", "too_deep")


def parse_meta(data: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    """stick.json or kit.json: one JSON object, bounded in size and depth; raises `ProtocolError`."""
    return safejson.loads_object(data, max_bytes=max_bytes, max_depth=MAX_DEPTH, what=what)


def stick_id_of(meta: dict[str, Any], what: str) -> str:
    """The stick id in a parsed stick.json ("" if it has none); `ProtocolError` (malformed) unless a plain id."""
    sid = meta.get("stick_id")
    if sid is None or sid == "":
        return ""
    if not isinstance(sid, str) or not STICK_ID.fullmatch(sid):
        raise ProtocolError("malformed", f"{what}: stick_id {str(sid)[:40]!r} is not a stick id")
    return sid


def index_entries(f: BinaryIO, what: str) -> Iterator[tuple[int, dict[str, Any] | ProtocolError]]:
    """``(line number, entry or the ProtocolError that line raised)`` for each line of an index.

    Lines are read at most `MAX_INDEX_LINE` bytes at a time (an endless line costs no memory); an entry
    is an object with a string ``record_id``. A torn last line gives ``not_json``; callers treat the
    `HOSTILE_REASONS` as an attack and the rest as damage from a yank.
    """
    n = 0
    while line := f.readline(MAX_INDEX_LINE + 1):
        n += 1
        if len(line) > MAX_INDEX_LINE and not line.endswith(b"\n"):
            while (more := f.readline(1 << 16)) and not more.endswith(b"\n"):
                pass  # skip the rest of an overlong line
            yield n, ProtocolError("too_large", f"{what} line {n} is longer than {MAX_INDEX_LINE} bytes")
            continue
        if not line.strip():
            continue
        try:
            e = safejson.loads_object(line, max_bytes=MAX_INDEX_LINE + 1, max_depth=MAX_DEPTH,
                                      what=f"{what} line {n}")
        except ProtocolError as err:
            yield n, err
            continue
        if not isinstance(e.get("record_id"), str):
            yield n, ProtocolError("malformed", f"{what} line {n} has no record_id")
            continue
        yield n, e
