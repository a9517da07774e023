"""Wall-clock time and whether it can be trusted (a Raspberry Pi has no RTC).

Whether the clock is synchronised comes from chrony's tracking report (`read_clock_state`: NTP or a GNSS
reference clock), read by the daemon's clock watcher, which publishes it here (`set_clock_state`); without a
watcher, the kernel's NTP flag (adjtimex). A record sealed before that carries ``clock_synced = false``, and
`ClockCorrections` issues a signed correction for it once the clock is synced, so the data center can place it
in time without the record being rewritten.

Nothing else on the kit checks the wall clock, so chrony's word is bounded here: every number of its report must
be finite, and a synchronised clock or a correction counts only when the true time it gives lies in
the plausible range (`implausible_time`) (a spoofed GNSS time, a broken receiver). Otherwise the clock
is "not synchronised": records keep ``clock_synced = false``, no correction is signed, and the data center leaves
their times as sealed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import functools
import json
import logging
import math
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: No record of this firmware was captured before its first release: a clock (or a correction) saying so is wrong.
#: Raise it with a release only if kits never run an older one (records of older kits must stay placeable).
NOT_BEFORE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
#: 30 years on: beyond any kit's service life (SD cards, batteries, the Pi itself), so a time past it is a spoofed
#: or broken source, not a late enrollment. The same span as the data center's old +-30 years offset bound.
NOT_AFTER = dt.datetime(2056, 1, 1, tzinfo=dt.UTC).timestamp()


def when(t: float) -> str:
    """`t` (Unix seconds) as ``2026-11-29T04:03:12Z`` for a message; any float, even one no calendar holds."""
    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{t!r}s"


def implausible_time(t: float) -> str:
    """Why `t` (Unix seconds) cannot be a true time of a kit's record or clock; "" when it can."""
    if not math.isfinite(t):
        return f"time {t!r} is not a number"
    if t < NOT_BEFORE:
        return f"time {when(t)} is before {when(NOT_BEFORE)} (this firmware's release)"
    if t > NOT_AFTER:
        return f"time {when(t)} is after {when(NOT_AFTER)} (beyond a kit's service life)"
    return ""

log = logging.getLogger(__name__)

_TIME_ERROR = 5  # adjtimex return value: clock not synchronised


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>; only `modes` (0 = read only) is set, the rest is padding
    # large enough for every Linux ABI.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 256)]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # find_library forks a helper process: do it once, not on every record.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_published: bool | None = None  # set by the daemon's clock watcher (chrony); None: ask the kernel


def set_clock_state(synced: bool | None) -> None:
    """Publish the watcher's verdict (None: back to the kernel's flag); every record sealed after uses it."""
    global _published
    _published = synced


def clock_synchronised() -> bool:
    """True when the clock is synchronised: the clock watcher's verdict (chrony), else the kernel's NTP flag."""
    if _published is not None:
        return _published
    return _kernel_synchronised()


def _kernel_synchronised() -> bool:
    """True when the kernel reports the clock as NTP-synchronised."""
    libc = _libc()
    if libc is None:
        return False
    try:
        state = libc.adjtimex(ctypes.byref(_Timex()))
    except AttributeError:
        return False
    return state not in (-1, _TIME_ERROR)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime | None = None) -> str:
    """UTC time as ``2026-11-29T04:03:12Z``."""
    return (t or utc_now()).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compact(t: dt.datetime | None = None) -> str:
    """UTC time as ``20261129T040312Z`` (for record ids)."""
    return (t or utc_now()).astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


# --- the real source: chrony's tracking report ---------------------------------------------------------------

#: chrony's reference ids that mean "no external source": none yet, or its own local clock (`local` directive).
_NO_REFERENCE, _LOCAL_REFERENCE = "00000000", "7F7F0101"
_SYNCED_LEAP = ("Normal", "Insert second", "Delete second")


@dataclass(frozen=True)
class ChronyTracking:
    """One `chronyc -c tracking` report (CSV; the field order of chronyc's tracking command)."""

    ref_id: str
    ref_name: str
    stratum: int
    ref_time: float
    correction_s: float  # "System time": true (NTP) time minus the system clock (< 0: the clock is fast)
    last_offset_s: float
    rms_offset_s: float
    frequency_ppm: float
    residual_freq_ppm: float
    skew_ppm: float
    root_delay_s: float
    root_dispersion_s: float
    update_interval_s: float
    leap: str

    @property
    def synced(self) -> bool:
        """Synchronised to a real source: a reference (not none, not chrony's local clock) and a leap status."""
        return (self.leap in _SYNCED_LEAP and self.ref_id.upper() not in (_NO_REFERENCE, _LOCAL_REFERENCE)
                and 0 < self.stratum < 16)

    @property
    def source(self) -> str:
        """``gnss`` (a reference clock: GPS/PPS/NMEA/SHM through gpsd), ``ntp``, ``local`` or ``none``."""
        rid = self.ref_id.upper()
        if rid == _NO_REFERENCE or not self.synced and self.leap not in _SYNCED_LEAP:
            return "none"
        if rid == _LOCAL_REFERENCE:
            return "local"
        # A reference clock's id is its refid as ASCII ("PPS", "GPS", "NMEA", "SHM0") and chronyc names it so;
        # an NTP server's id is its IPv4 address (or a hash of the IPv6 one) and the name is an address or host.
        try:
            text = bytes.fromhex(rid).rstrip(b"\0").decode("ascii")
        except (ValueError, UnicodeDecodeError):
            text = ""
        return "gnss" if text and text.isalnum() and text.isupper() and self.ref_name == text else "ntp"


#: chronyc's names (its `tracking` report) of fields 3..12 of the CSV line, for messages a technician can match.
_FLOAT_FIELDS = ("Ref time", "System time", "Last offset", "RMS offset", "Frequency", "Residual freq", "Skew",
                 "Root delay", "Root dispersion", "Update interval")


class NonFiniteTracking(ValueError):
    """chronyc reported a number that is not finite (``nan``, ``inf``: `float()` takes them): its report, and so
    its verdict, cannot be trusted, nor the kernel's flag chrony itself sets."""


def parse_chrony_tracking(text: str) -> ChronyTracking:
    """Parse `chronyc -c tracking` output; raises ValueError for anything else (an error line, old chrony), and
    `NonFiniteTracking` (a ValueError) naming the field when a number is nan or infinite."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    f = line.split(",")
    if len(f) != 14:
        raise ValueError(f"not a chronyc -c tracking line ({len(f)} fields): {line[:120]!r}")
    try:
        stratum, numbers = int(f[2]), [float(x) for x in f[3:13]]
    except ValueError as e:
        raise ValueError(f"bad chronyc -c tracking line {line[:120]!r}: {e}") from None
    bad = [f"{name}={raw.strip()[:20]}" for name, raw, v in zip(_FLOAT_FIELDS, f[3:13], numbers, strict=True)
           if not math.isfinite(v)]
    if bad:
        raise NonFiniteTracking(f"chronyc reported a non-finite number: {' '.join(bad)}")
    return ChronyTracking(f[0], f[1], stratum, *numbers, f[13])


@dataclass(frozen=True)
class ClockState:
    """Whether the wall clock can be trusted, and from what: ``gnss``, ``ntp``, ``kernel`` (the kernel's NTP flag,
    when chrony cannot be asked), ``local``/``none`` (not synchronised)."""

    synced: bool
    source: str
    correction_s: float = 0.0  # to add to the system clock for the true time (chrony), 0 when unknown
    detail: str = ""
    implausible: str = ""  # why chrony's report was not believed (then synced is False); "" when it was

    def as_dict(self) -> dict[str, Any]:
        return {"synced": self.synced, "source": self.source, "correction_s": round(self.correction_s, 6),
                "detail": self.detail}


def read_clock_state(command: list[str] | tuple[str, ...] = ("chronyc", "-c", "tracking"),
                     timeout: float = 3.0, wall: Callable[[], float] = time.time) -> ClockState:
    """Ask chrony (`command`); if it cannot answer (not installed, not running), the kernel's NTP flag.

    A report with a non-finite number, or synchronised to a true time (`wall()` + its correction) outside the
    plausible range, is "not synchronised" with `implausible` saying why (`ClockCorrections.observe` logs it)."""
    if command:
        try:
            r = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
            if r.returncode == 0:
                t = parse_chrony_tracking(r.stdout)
                detail = f"chrony ref={t.ref_name or t.ref_id} stratum={t.stratum} leap={t.leap}"
                bad = implausible_time(wall() + t.correction_s) if t.synced else ""
                if bad:  # e.g. a spoofed GNSS time: chrony is synced to it, the records must not be
                    bad = f"source={t.source} System time={t.correction_s!r}: {bad}"
                    return ClockState(False, "none", 0.0, f"{detail} implausible ({bad})", bad)
                return ClockState(t.synced, t.source if t.synced else "none", t.correction_s if t.synced else 0.0,
                                  detail)
            why = (r.stderr or r.stdout).strip()[:200] or f"exit {r.returncode}"
        except NonFiniteTracking as e:
            # chrony answered, with garbage: not the kernel's flag (chrony sets it), simply not synchronised
            return ClockState(False, "none", 0.0, f"chrony implausible ({e})", str(e))
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            why = f"{type(e).__name__}: {e}"[:200]
    else:
        why = "no chrony command"
    return ClockState(_kernel_synchronised(), "kernel", 0.0, f"chrony unavailable ({why})")


# --- the corrections for records sealed before the clock was synchronised --------------------------------------


def boot_id() -> str:
    """This boot's id (the monotonic clock is comparable only within one boot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


MAX_KEPT = 50  # signed corrections kept in the file (telemetry repeats the newest ones until the fleet has them)


class ClockCorrections:
    """Records sealed before the clock was synchronised, and the signed correction issued when it is.

    A Pi has no RTC: after a cold start its wall clock is wrong by an unknown amount, but it ticks with the
    monotonic clock, so ``wall - monotonic`` is the same for every record sealed in this boot until chrony sets
    the clock. `note()` keeps that difference per run of records (by sequence number); when the clock is synced,
    `observe()` computes for each run ``offset = (true wall - monotonic now) - (wall - monotonic then)`` and writes
    one correction ``{kit_id, boot_id, source, segments: [{first_seq, last_seq, offset_s}]}`` signed with the kit
    key. The data center adds `offset_s` to `created` of those records whose sealed header says
    ``clock_synced: false``; the sealed records themselves are never rewritten. A boot that ended before its clock
    was synced cannot be corrected (the monotonic link is gone): its runs get ``offset_s: null``.

    Plausibility: a state whose true time (wall + chrony's correction) is outside [`NOT_BEFORE`, `NOT_AFTER`], or a
    correction that would move either end of a run there, is not trusted: nothing is signed, the runs stay open
    (a later, plausible sync still corrects them), one WARNING per episode, counted in `status()`. Only the
    corrected times are bounded, never the offset: after a long power-off a Pi boots at 1970 or at its last
    saved time, and an offset of decades is then the right one.

    State (runs still open, the newest signed corrections) is one small file, written atomically on each change.
    `sign(body) -> doc` signs a correction with the kit key (`firmware.wire.clock_correction.sign`, given by the
    daemon: the document's format is the wire's); thread safe.
    """

    def __init__(self, path: Path, kit_id: str, sign: Callable[[dict[str, Any]], dict[str, Any]],
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
                 boot: Callable[[], str] = boot_id) -> None:
        self.path, self.kit_id, self.sign = path, kit_id, sign
        self.wall, self.mono = wall, mono
        self.boot = boot()
        self._lock = threading.Lock()
        self.state = ClockState(False, "none")
        self._new: list[dict[str, Any]] = []  # issued since the last `drain()` (for the journal)
        self.implausible = 0  # episodes of an implausible clock or correction since the daemon started
        self._refusing = ""  # why the current episode is not trusted ("": none); one warning per episode
        data = self._load()
        self.pending: list[dict[str, Any]] = data.get("pending", [])
        self.corrections: list[dict[str, Any]] = data.get("corrections", [])
        if self.pending and data.get("boot_id") != self.boot:
            # rebooted before the clock was synced: these runs can only be placed by their sequence numbers
            self._issue({"source": "none", "reason": "rebooted_before_sync", "boot_id": data.get("boot_id", "")},
                        [{**s, "offset_s": None} for s in self.pending])
            self.pending = []
            self._save()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # our own file; a broken one must not stop the daemon
            log.error("clock corrections file unreadable path=%s error=%s", self.path, e)
            return {}

    def _save(self) -> None:
        from firmware.system.fsutil import atomic_write

        data = {"boot_id": self.boot, "pending": self.pending, "corrections": self.corrections[-MAX_KEPT:]}
        atomic_write(self.path, json.dumps(data, indent=1).encode(), verify=False)

    def note(self, seq: int, record_id: str, synced: bool) -> None:
        """A record was sealed (`synced`: its header's clock_synced). Unsynced ones join the open run."""
        if synced:
            return
        with self._lock:
            w = self.wall()
            d = w - self.mono()
            last = self.pending[-1] if self.pending else None
            # the sealed wall times of a run's ends: where the correction moves them is checked (`_correct`)
            if last is not None and abs(last["wall_minus_mono"] - d) < 0.5 and seq > last["last_seq"]:
                last["last_seq"], last["last_record"], last["records"] = seq, record_id, last["records"] + 1
                last["last_wall"] = w
            else:  # the first, or the clock was stepped while still unsynced (set by hand): a new run
                self.pending.append({"first_seq": seq, "last_seq": seq, "first_record": record_id,
                                     "last_record": record_id, "records": 1, "wall_minus_mono": d,
                                     "first_wall": w, "last_wall": w})
            self._save()
            if self.state.synced:  # sealed just before the sync was seen: correct it at once
                self._correct()

    def observe(self, state: ClockState) -> dict[str, Any] | None:
        """The clock's latest state; when it is synced and runs are open, issue their correction (returned)."""
        with self._lock:
            why = state.implausible
            if state.synced and not why:  # read_clock_state checks too; this is for any other caller's state
                why = implausible_time(self.wall() + state.correction_s)
                if why:
                    why = f"source={state.source} correction_s={state.correction_s!r}: {why}"
                    state = ClockState(False, "none", 0.0, f"{state.detail} implausible ({why})", why)
            was, self.state = self.state.synced, state
            if why:
                self._refuse(why)
            elif state.synced and not was:
                log.info("clock synchronised source=%s correction_s=%.6f", state.source, state.correction_s)
            elif was and not state.synced:
                log.warning("clock no longer synchronised source=%s detail=%s", state.source, state.detail)
            if state.synced and self.pending:
                return self._correct()  # clears or keeps the episode itself
            if not why:
                self._refusing = ""
            return None

    def _refuse(self, why: str) -> None:
        """An implausible clock or correction: warn once per episode (every poll would flood the journal)."""
        if not self._refusing:
            self.implausible += 1
            log.warning("clock time implausible, not trusted: no correction sent, records stay unsynchronised "
                        "reason=%r allowed=%s..%s awaiting_correction=%d implausible_count=%d "
                        "check=GNSS_antenna_and_receiver(spoofed_or_faulty?),NTP_sources(chronyc_sources)",
                        why, when(NOT_BEFORE), when(NOT_AFTER), sum(s["records"] for s in self.pending),
                        self.implausible)
        self._refusing = why

    def _correct(self) -> dict[str, Any] | None:
        if not self.pending:
            return None
        m = self.mono()
        now = self.wall() + self.state.correction_s - m  # true wall minus monotonic
        segs = []
        for s in self.pending:
            off = round(now - s["wall_minus_mono"], 3)
            # both ends of the run where the correction puts them (a run noted by an older version has no sealed
            # wall times: "sealed now", i.e. the corrected time is the true time now)
            for end in ("first", "last"):
                sealed = s.get(f"{end}_wall", s["wall_minus_mono"] + m)
                bad = implausible_time(sealed + off)
                if bad:
                    self._refuse(f"source={self.state.source} segment={s['first_seq']}..{s['last_seq']} "
                                 f"offset_s={off!r} moves record {s[f'{end}_record']} sealed at {when(sealed)}: "
                                 f"{bad}")
                    return None  # the runs stay open: nothing signed, the records stay as sealed
            segs.append({k: s[k] for k in ("first_seq", "last_seq", "first_record", "last_record", "records")}
                        | {"offset_s": off})
        self._refusing = ""
        doc = self._issue({"source": self.state.source, "boot_id": self.boot}, segs)
        self.pending = []
        self._save()
        return doc

    def _issue(self, head: dict[str, Any], segments: list[dict[str, Any]]) -> dict[str, Any]:
        for s in segments:  # the kit's bookkeeping is not part of the signed document
            for k in ("wall_minus_mono", "first_wall", "last_wall"):
                s.pop(k, None)
        doc = self.sign({"kit_id": self.kit_id, "issued": iso(), **head, "segments": segments})
        self.corrections.append(doc)
        self.corrections = self.corrections[-MAX_KEPT:]
        self._new.append(doc)
        log.info("clock correction issued source=%s segments=%d records=%d offsets=%s", head.get("source"),
                 len(segments), sum(s.get("records", 0) for s in segments),
                 ",".join(str(s["offset_s"]) for s in segments))
        return doc

    def drain(self) -> list[dict[str, Any]]:
        """The corrections issued since the last call (at load, by `note()` or `observe()`), oldest first."""
        with self._lock:
            out, self._new = self._new, []
        return out

    def status(self, recent: int = 5) -> dict[str, Any]:
        """For status and telemetry: the clock's state, records awaiting a correction, the newest corrections."""
        with self._lock:
            return {**self.state.as_dict(), "awaiting_correction": sum(s["records"] for s in self.pending),
                    "implausible": self.implausible, "implausible_reason": self._refusing,
                    "corrections": list(self.corrections[-recent:])}

