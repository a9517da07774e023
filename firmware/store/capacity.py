"""The capacity guard: halt capture *before* any medium can overflow.

For each medium in use (the SD, and the USB stick when present) free bytes and free inodes
(statvfs) are compared with a reserve: room for `reserve_records` of the largest records seen,
the journal's growth (SD only), and a configured floor. From what is left it derives how many
more records fit, and a state:

* OK    - more than `warn_records` fit;
* WARN  - fewer than `warn_records` fit (or no stick while one is optional);
* HALT  - not even one more fits (or no stick while one is required). A halted medium stays
  halted until `resume_records` fit again (hysteresis), so capture does not flap.

A medium is HALT unless a record of the largest size the kit may write (`max_record_mb`) still
fits beyond its reserve, whatever the largest record seen so far. A new enrollment *reserves* one
maximal record's space when it starts; that reservation counts against every later check, so an
enrollment under way can always finish; `check_room()` checks again just before a record takes
its sequence number.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from firmware.errors import CaptureHalted
from firmware.system.fsutil import space
from firmware.system.i18n import N_, format_count, format_size, gettext

MIB = 1024 * 1024
#: A typical enrollment record (face photo and prints, sealed), used to count what fits until the first
#: record is written: `rekam sim commit` records (corpus face and prints) are 322-353 KiB.
TYPICAL_RECORD_BYTES = 384 * 1024

#: What the operator does when a medium is full (appended to its HALT reason; the CLI and console show it
#: translated). The SD and the stick need different hands: records leave the SD only once acknowledged.
HALT_ACTIONS: dict[str, str] = {
    "sd": N_("To do: connect the kit to the uplink so the data center acknowledges the records (acknowledged "
             "records already on a stick then leave the SD by themselves), or call the technician; never delete "
             "files by hand."),
    "usb": N_("To do: eject the USB stick (`rekam usb eject` or the console), hand it to the data center and "
              "insert an empty one; the records stay safe on the SD card meanwhile."),
}


#: The guard's reasons, one stable machine code each (in status and API answers, so that a client may word
#: them itself); the text is rendered in the current language (the kit's, or the CLI's) where it is built.
REASONS: dict[str, str] = {
    "no_stick": N_("no USB stick; records are kept on the SD and copied when a stick is inserted"),
    "stick_required": N_("no USB stick (a stick is required: insert one)"),
    "out_of_inodes": N_("{medium} is out of inodes ({inodes} free)"),
    "full": N_("{medium} is full: {free} free, {reserved} reserved; capture resumes when {resume} records fit"),
    "record_does_not_fit": N_("{medium} is full: {free} free, {reserved} reserved, the record needs {needs}"),
    "nearly_full": N_("{medium} nearly full: room for {left} more records"),
}


def reason_text(code: str, **params: Any) -> str:
    """The guard reason `code` in the current language (sizes and counts in its number format)."""
    kw = dict(params)
    for k in ("free", "reserved", "needs"):
        if isinstance(kw.get(k), int):
            kw[k] = format_size(kw[k])
    for k in ("inodes", "resume", "left"):
        if isinstance(kw.get(k), int):
            kw[k] = format_count(kw[k])
    return gettext(REASONS[code], **kw)


def _reason(name: str, code: str, **params: Any) -> tuple[str, str, dict[str, Any]]:
    """(code, text, params) of one medium's reason; the code is prefixed with the medium (``sd_full``)."""
    params = {"medium": name, **params}
    return (code if code in ("no_stick", "stick_required") else f"{name}_{code}"), reason_text(code, **params), params


class Level(StrEnum):
    """Guard state of one medium or of the kit; ordered OK < WARN < HALT."""

    OK = "OK"
    WARN = "WARN"
    HALT = "HALT"

    @property
    def rank(self) -> int:
        return ("OK", "WARN", "HALT").index(self.value)


@dataclass
class MediumStatus:
    """Capacity of one medium as last measured."""

    name: str
    path: str
    present: bool
    total_bytes: int = 0
    free_bytes: int = 0
    free_inodes: int = 0
    reserve_bytes: int = 0
    records_left: int = 0
    level: Level = Level.OK
    reason: str = ""  # in the current language, without the action
    code: str = ""  # stable machine code of the reason ("sd_full", "usb_nearly_full", "no_stick", ...)
    params: dict[str, Any] = field(default_factory=dict)  # the numbers in the reason (raw bytes and counts)
    action: str = ""  # what the operator does (HALT only), in the current language

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = self.level.value
        return d


@dataclass(frozen=True)
class Reservation:
    """Space held for one enrollment in progress."""

    token: int
    bytes: int


class CapacityGuard:
    """Decides whether capture may proceed; thread safe."""

    def __init__(self, store_cfg: Any, usb_required: bool) -> None:
        self.cfg = store_cfg
        self.usb_required = usb_required
        self._lock = threading.Lock()
        self._halted: dict[str, bool] = {}
        self._reservations: dict[int, int] = {}
        self._next = 1
        self.largest_record = 0
        self.record_estimate = 0  # bytes per record used to count what still fits

    @property
    def max_record_bytes(self) -> int:
        return int(self.cfg.max_record_mb) * MIB

    def note_record_size(self, size: int) -> None:
        """Tell the guard about a record's size (the reserve follows the largest one)."""
        self.largest_record = max(self.largest_record, size)

    def _estimate(self) -> int:
        # Bytes per record for counting what still fits: the largest seen. Before the first record, a typical
        # enrollment (TYPICAL_RECORD_BYTES), not max_record_mb: counting at the maximum made the count jump ~20x
        # once the first record showed the real size (9,726 -> 212,546 records). Safety does not rest on this:
        # HALT still needs room for one maximal record (see measure()).
        return self.largest_record or min(TYPICAL_RECORD_BYTES, self.max_record_bytes)

    def reserve_bytes(self, medium: str) -> int:
        """Bytes kept free on `medium` whatever happens."""
        c = self.cfg
        r = c.reserve_floor_mb * MIB + c.reserve_records * max(self.largest_record, 1)
        if medium == "sd":
            r += c.journal_reserve_mb * MIB
        return r

    def measure(self, name: str, path: Path | None, present: bool = True) -> MediumStatus:
        """statvfs one medium and classify it (applies hysteresis)."""
        if not present or path is None:
            level = Level.HALT if self.usb_required else Level.WARN
            code, why, params = _reason(name, "stick_required" if self.usb_required else "no_stick")
            return MediumStatus(name, str(path or ""), False, level=level, reason=why, code=code, params=params)
        try:
            sp = space(path)
        except OSError:
            # The medium vanished between detection and measurement (a stick pulled just now).
            return self.measure(name, path, present=False)
        with self._lock:
            held = sum(self._reservations.values())
            reserve = self.reserve_bytes(name)
            usable = sp.free_bytes - reserve - held
            est = self._estimate()
            # The next record may be as large as the kit allows (max_record_mb), whatever the largest so
            # far: it fits only if a maximal record does; further ones are counted at the estimate.
            first = self.max_record_bytes
            left = 0 if usable < first else 1 + (usable - first) // est
            inode_left = sp.usable_inodes - self.cfg.min_free_inodes - 2 * len(self._reservations)
            # Each record takes one inode (plus a temporary one while written).
            left = min(left, max(0, inode_left // 2))
            halted = self._halted.get(name, False)
            if halted:
                halted = left < self.cfg.resume_records
            else:
                halted = left < 1
            self._halted[name] = halted
        action = ""
        if halted:
            level = Level.HALT
            if inode_left < 2:
                code, why, params = _reason(name, "out_of_inodes", inodes=sp.free_inodes)
            else:
                code, why, params = _reason(name, "full", free=sp.free_bytes, reserved=reserve,
                                            resume=self.cfg.resume_records)
            action = gettext(HALT_ACTIONS[name]) if name in HALT_ACTIONS else ""
        elif left < self.cfg.warn_records:
            level = Level.WARN
            code, why, params = _reason(name, "nearly_full", left=int(left))
        else:
            level, code, why, params = Level.OK, "", "", {}
        return MediumStatus(name, str(path), True, sp.total_bytes, sp.free_bytes, sp.free_inodes, reserve,
                            int(left), level, why, code, params, action)

    def check_room(self, name: str, path: Path, nbytes: int) -> None:
        """Raise `CaptureHalted` unless `nbytes` fit on medium `name` beyond its reserve right now (checked
        just before a record takes its number: a reservation taken earlier does not prove the room)."""
        try:
            sp = space(path)
        except OSError:
            return  # the write itself will report a vanished medium
        reserve = self.reserve_bytes(name)
        if sp.free_bytes - reserve < nbytes:
            code, why, _p = _reason(name, "record_does_not_fit", free=sp.free_bytes, reserved=reserve, needs=nbytes)
            raise CaptureHalted(why, code=code)
        if sp.usable_inodes - self.cfg.min_free_inodes < 2:
            code, why, _p = _reason(name, "out_of_inodes", inodes=sp.free_inodes)
            raise CaptureHalted(why, code=code)

    def reserve(self, media: list[MediumStatus]) -> Reservation:
        """Hold space for one enrollment, or raise `CaptureHalted` with the reason."""
        halted = [m for m in media if m.level is Level.HALT]
        if halted:
            raise CaptureHalted("; ".join(m.reason for m in halted), code=halted[0].code,
                                codes=[m.code for m in halted])
        with self._lock:
            token = self._next
            self._next += 1
            self._reservations[token] = self.max_record_bytes
        return Reservation(token, self.max_record_bytes)

    def release(self, r: Reservation) -> None:
        """Give back a reservation (the enrollment was committed or cancelled)."""
        with self._lock:
            self._reservations.pop(r.token, None)

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._reservations)


def spare_bytes(store_cfg: Any, path: Path, medium: str = "sd") -> int:
    """Bytes on `medium` that anything other than records may take without bringing capture nearer a halt.

    What capture keeps for itself: the medium's reserve, one maximal record, and `warn_records` typical
    records beyond it (so another writer, e.g. a software update download, never even makes the kit WARN).
    """
    g = CapacityGuard(store_cfg, usb_required=False)
    keep = g.reserve_bytes(medium) + g.max_record_bytes + int(store_cfg.warn_records) * g._estimate()
    return space(path).free_bytes - keep


def overall(media: list[MediumStatus]) -> tuple[Level, list[str]]:
    """The kit's guard state: the worst of its media, with every reason (current language, no action)."""
    level = max((m.level for m in media), key=lambda lv: lv.rank, default=Level.OK)
    return level, [m.reason for m in media if m.reason]
