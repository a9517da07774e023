"""The one definition of a kit id and a record id, used by the kit, the wire formats, the CA and the archive.

A kit id is ``rk-`` and 1-32 lower-case letters or digits (``rk-7h3k2m9q4p``; new kits get 10 characters
from an alphabet without look-alikes). A record id is ``<kit id>-<sequence, 8+ digits>-<UTC time
YYYYMMDDTHHMMSSZ>``: it carries its kit, so a record can be checked against the kit that signed it.
Both are safe in MQTT topics and file names. Matching is whole-string (`fullmatch`): a trailing
newline or any other extra character is refused.
"""

from __future__ import annotations

import re
from typing import NamedTuple

KIT_ID_PATTERN = r"rk-[a-z0-9]{1,32}"
RECORD_ID_PATTERN = rf"(?P<kit>{KIT_ID_PATTERN})-(?P<seq>\d{{8,20}})-(?P<time>\d{{8}}T\d{{6}}Z)"

KIT_ID_RE = re.compile(KIT_ID_PATTERN)
RECORD_ID_RE = re.compile(RECORD_ID_PATTERN)


class RecordId(NamedTuple):
    """A parsed record id."""

    kit_id: str
    seq: int
    time: str


def is_kit_id(value: object) -> bool:
    """True if `value` is a well-formed kit id (the whole string)."""
    return isinstance(value, str) and KIT_ID_RE.fullmatch(value) is not None


def is_record_id(value: object) -> bool:
    """True if `value` is a well-formed record id (the whole string)."""
    return isinstance(value, str) and RECORD_ID_RE.fullmatch(value) is not None


def parse_record_id(value: object) -> RecordId | None:
    """The kit id, sequence number and time of a record id; None if it is not one."""
    m = RECORD_ID_RE.fullmatch(value) if isinstance(value, str) else None
    return RecordId(m["kit"], int(m["seq"]), m["time"]) if m else None


def make_record_id(kit_id: str, seq: int, compact_utc: str) -> str:
    """The record id of sequence number `seq` of `kit_id`, captured at `compact_utc` (YYYYMMDDTHHMMSSZ)."""
    rid = f"{kit_id}-{seq:08d}-{compact_utc}"
    if not is_record_id(rid):
        raise ValueError(f"not a valid record id: {rid!r}")
    return rid
