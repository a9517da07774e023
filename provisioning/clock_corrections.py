"""The data center's side of the kits' clock corrections (issue #18; the format: `firmware.wire.clock_correction`).

A kit without a real-time clock seals records with ``clock_synced: false`` and a wrong ``created`` until chrony
syncs; then it signs one correction per boot (``segments``: runs of sequence numbers and the ``offset_s`` to add)
and repeats its newest five in every telemetry message (``clock.corrections``). `check()` is the one hostile-input
check of such a document before `provisioning.registry.Fleet` verifies its signature and keeps it
(``clock_corrections`` / ``clock_segments``, `provisioning.registry_db`); the archive reads them back for the ABIS
export (`provisioning.archive.base.ArchiveBase.clock_segment`), which shifts the capture times.

Defence in depth against a kit that signed a wrong correction (a spoofed GNSS time, an older firmware): where a
segment moves its first and last record (the time in their record ids plus `offset_s`) must lie in the plausible
range (`firmware.wire.clock_correction.NOT_BEFORE`..`NOT_AFTER`) and not after the data center's own clock (a
record cannot have been captured after the correction reached us). The offset alone is bounded only loosely: a
Pi that booted at 1970 is legitimately corrected by decades.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass
from typing import Any

from firmware.system.clock import NOT_AFTER, implausible_time, when
from firmware.wire import clock_correction
from firmware.wire.ids import parse_record_id

MAX_DOCS = 50  # documents one telemetry message may carry (a kit sends its newest 5; it keeps 50)
MAX_SEGMENTS = 1000  # segments one document may hold (a kit makes a new one only when its clock is stepped unsynced)
# A Pi boots at its last saved time or at 1970; no offset larger than 1970 -> the plausible horizon is real.
MAX_OFFSET_S = NOT_AFTER
CLOCK_SLACK_S = 86400  # the data center's own clock may be off too: a corrected time may be up to a day ahead
MAX_SEQ = 2**63 - 1  # what an INTEGER / bigint column holds
MAX_TEXT = 100  # boot_id, source, issued, reason, record ids


@dataclass(frozen=True)
class Segment:
    """One run of records of one kit's boot and the offset to add to their times (None: cannot be corrected)."""

    first_seq: int
    last_seq: int
    records: int | None
    offset_s: float | None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(doc: dict[str, Any], key: str, required: bool = True) -> str:
    v = doc.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or not v or len(v) > MAX_TEXT or not v.isprintable():
        raise ValueError(f"{key} {str(v)[:40]!r} is not printable text of 1-{MAX_TEXT} characters")
    return v


def _sealed_time(record_id: Any) -> float | None:
    """The capture time (Unix seconds) a record id carries, as the kit's clock had it; None if not a record id."""
    rid = parse_record_id(record_id)
    if rid is None:
        return None
    try:
        return float(calendar.timegm(time.strptime(rid.time, "%Y%m%dT%H%M%SZ")))
    except ValueError:  # 20261399T... matches the pattern, not the calendar
        return None


def _implausible_move(s: dict[str, Any], off: float, now: float) -> str:
    """Why segment `s` moves one of its ends (the time in its record id + `off`) out of the plausible range; ""
    when both land in it, or when an end names no record id (then only the offset bound holds)."""
    for end in ("first_record", "last_record"):
        sealed = _sealed_time(s.get(end))
        if sealed is None:
            continue
        t = sealed + off
        why = implausible_time(t)
        if not why and t > now + CLOCK_SLACK_S:
            why = f"time {when(t)} is after the data center's clock {when(now)} (+1 day)"
        if why:
            return f"offset_s {off!r} moves {end} {str(s.get(end))[:80]} (sealed {when(sealed)}): {why}"
    return ""


def check(doc: Any, kit_id: str, now: float | None = None) -> list[Segment]:
    """The segments of correction `doc` reported by `kit_id`; raises ValueError naming what is wrong (before any
    signature is checked: types, sizes, the kit, sequence ranges, offsets, where they move the records: `now` is
    the data center's clock, default `time.time()`). Does not verify the signature."""
    now = time.time() if now is None else now
    if not isinstance(doc, dict):
        raise ValueError("a correction is not an object")
    if doc.get("type") != clock_correction.TYPE:
        raise ValueError(f"type {str(doc.get('type'))[:40]!r} is not {clock_correction.TYPE}")
    if doc.get("kit_id") != kit_id:
        raise ValueError(f"correction of kit {str(doc.get('kit_id'))[:40]!r} sent by kit {kit_id}")
    for key in ("boot_id", "source", "issued"):
        _text(doc, key)
    _text(doc, "reason", required=False)
    if not isinstance(doc.get("sig"), str) or len(doc["sig"]) > 200:
        raise ValueError("sig is not a base64 signature")
    segs = doc.get("segments")
    if not isinstance(segs, list) or not 1 <= len(segs) <= MAX_SEGMENTS:
        raise ValueError(f"segments is not a list of 1-{MAX_SEGMENTS}")
    out: list[Segment] = []
    for i, s in enumerate(segs):
        if not isinstance(s, dict):
            raise ValueError(f"segment {i} is not an object")
        first, last, records, off = s.get("first_seq"), s.get("last_seq"), s.get("records"), s.get("offset_s")
        if not (_int(first) and _int(last) and 1 <= first <= last <= MAX_SEQ):
            raise ValueError(f"segment {i}: first_seq {str(first)[:20]!r} .. last_seq {str(last)[:20]!r} is not "
                             "a range of sequence numbers >= 1")
        if records is not None and not (_int(records) and 0 <= records <= last - first + 1):
            raise ValueError(f"segment {i}: records {str(records)[:20]!r} does not fit its range")
        if off is not None and (not isinstance(off, int | float) or isinstance(off, bool) or not math.isfinite(off)
                                or abs(off) > MAX_OFFSET_S):
            raise ValueError(f"segment {i}: offset_s {str(off)[:30]!r} is not a number of seconds within "
                             f"+-{MAX_OFFSET_S:.0f} (1970 to {when(NOT_AFTER)}) or null")
        if off is not None and (why := _implausible_move(s, float(off), now)):
            raise ValueError(f"segment {i}: {why}")
        out.append(Segment(first, last, records, None if off is None else float(off)))
    ordered = sorted(out, key=lambda x: x.first_seq)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.first_seq <= a.last_seq:
            raise ValueError(f"segments overlap: {a.first_seq}..{a.last_seq} and {b.first_seq}..{b.last_seq}")
    return out


def format_offset(offset_s: float) -> str:
    """An offset as the export writes it: seconds with three decimals, e.g. ``31536012.400`` / ``-3.000``."""
    return f"{offset_s:.3f}"
