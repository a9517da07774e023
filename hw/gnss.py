"""Where the kit is: a GNSS position source behind one interface (gpsd, or a simulator).

`GnssSource.fix()` answers the position *now*: a `Fix` with its type (``none``, ``2d``, ``3d``), latitude and
longitude, horizontal accuracy (m), satellites used and age (s since the receiver's report arrived, on the
monotonic clock: the wall clock of a Pi without RTC may be wrong, which is half the point of a receiver).
A report older than `max_age_s` is ``none`` with reason ``stale``: a fix that stopped coming is never shown as
current. No receiver, no daemon: ``none`` with reason ``no_receiver``.

`GpsdSource` reads gpsd's JSON watch stream (TPV and SKY reports) on a background thread with a small socket
reader of its own, reconnecting with the one backoff helper. gpsd's address may come from a remote config, so
its peer is not trusted: a line is at most `MAX_LINE_BYTES` (longer: the connection is dropped and retried), a
report is parsed with a depth bound and without NaN/Infinity, and every value taken into a `Fix` is checked
(finite, in range, the right type) or left out. `SimulatedGnss` answers a configured fix.
This module knows nothing of the firmware: plain values in, plain values out.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from firmware.errors import ProtocolError
from firmware.system.backoff import Backoff
from firmware.wire import safejson

log = logging.getLogger(__name__)

NO_FIX, FIX_2D, FIX_3D = "none", "2d", "3d"
_MODES = {2: FIX_2D, 3: FIX_3D}  # gpsd TPV "mode": 0 unknown, 1 no fix, 2 2D, 3 3D

# gpsd's longest report (a SKY listing every satellite in view) is a few KiB; 64 KiB is far above it and
# bounds what a peer that never sends a newline can make us hold (gpsdclient's readline() had no bound).
MAX_LINE_BYTES = 64 * 1024
# gpsd reports nest 3 levels (SKY: object, satellites list, satellite); `json` recurses once per level.
MAX_JSON_DEPTH = 16
MAX_SATELLITES = 255  # counts above this are not a receiver's (u-blox M10 tracks 32; all GNSS in view < 150)
# Altitude a receiver can report (m): below the Dead Sea shore with geoid error, up to COCOM's 18 km and beyond
# for balloons; outside this it is garbage, not a place to seal into a record.
ALT_RANGE_M = (-1_000.0, 100_000.0)
WATCH = b'?WATCH={"enable":true,"json":true}\n'
_RECV_BYTES = 16 * 1024
# Old gpsd with NTRIP sources emits trailing commas (gpsdclient#1); anchored on the comma, so linear.
_TRAILING_COMMA = re.compile(rb",\s*}")


@dataclass(frozen=True)
class Fix:
    """One answer of a position source. ``fix == "none"`` carries a `reason` and no coordinates."""

    fix: str = NO_FIX
    lat: float | None = None
    lon: float | None = None
    alt_m: float | None = None
    accuracy_m: float | None = None  # horizontal, ~95 % (gpsd eph, else the larger of epx/epy)
    satellites_used: int | None = None
    age_s: float | None = None
    reason: str = ""  # for "none": no_fix, stale, no_receiver, disabled
    source: str = ""  # gpsd, sim

    @property
    def valid(self) -> bool:
        return self.fix != NO_FIX

    def as_dict(self) -> dict[str, Any]:
        """The fix as a plain dict (None fields left out; coordinates rounded to ~1 cm)."""
        d = {k: v for k, v in asdict(self).items() if v is not None and v != ""}
        for k in ("lat", "lon"):
            if k in d:
                d[k] = round(d[k], 7)
        for k in ("alt_m", "accuracy_m", "age_s"):
            if k in d:
                d[k] = round(d[k], 1)
        return d


def no_fix(reason: str, source: str = "", age_s: float | None = None) -> Fix:
    return Fix(NO_FIX, reason=reason, source=source, age_s=None if age_s is None else max(0.0, age_s))


class GnssSource(Protocol):
    """What the firmware needs of a position source."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def fix(self) -> Fix: ...
    def status(self) -> dict[str, Any]: ...


def _num(v: Any, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    """`v` as a finite float in [lo, hi], else None (bools, strings, NaN, and ints too large for a float)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        f = float(v)  # a 4000-digit JSON integer raises OverflowError here
    except OverflowError:
        return None
    return f if math.isfinite(f) and lo <= f <= hi else None


def _count(v: Any) -> int | None:
    """`v` as a satellite count: an int (not a bool) in 0..MAX_SATELLITES, else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SATELLITES else None


def parse_report(line: bytes) -> dict[str, Any]:
    """One gpsd JSON line as a dict; ValueError (with what was wrong) if it is too long, too deep, not UTF-8,
    not JSON, holds NaN/Infinity, or is not an object (`firmware.wire.safejson`, the one bounded parser)."""
    try:
        return safejson.loads_object(line, max_bytes=MAX_LINE_BYTES, max_depth=MAX_JSON_DEPTH, what="gpsd report")
    except ProtocolError as e:
        fixed = _TRAILING_COMMA.sub(b"}", line) if e.reason == "not_json" else line
        if fixed == line:
            raise
        return safejson.loads_object(fixed, max_bytes=MAX_LINE_BYTES, max_depth=MAX_JSON_DEPTH, what="gpsd report")


class LineTooLong(ConnectionError):
    """The peer sent more than `MAX_LINE_BYTES` without a newline (the connection is dropped)."""


def read_lines(sock: socket.socket, max_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The newline-terminated lines of `sock` (without the newline), none longer than `max_bytes`.

    Holds at most `max_bytes` + one recv of data; raises `LineTooLong` past that, ends at EOF (a partial last
    line is dropped). Socket errors and timeouts propagate.
    """
    buf = bytearray()
    while True:
        chunk = sock.recv(_RECV_BYTES)
        if not chunk:
            return
        start = len(buf)
        buf += chunk
        while (i := buf.find(b"\n", start)) >= 0:
            if i > max_bytes:
                raise LineTooLong(f"gpsd sent a line of {i} bytes; the limit is {max_bytes}")
            line = bytes(buf[:i])
            del buf[:i + 1]
            start = 0
            yield line.rstrip(b"\r")
        if len(buf) > max_bytes:
            raise LineTooLong(f"gpsd sent more than {max_bytes} bytes without a newline")


class FixTracker:
    """Turns gpsd reports (TPV, SKY dicts) into the current `Fix`; thread safe. Separate from the socket so the
    decoding is one piece whatever feeds it."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic, source: str = "gpsd") -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self.source = source
        self._lock = threading.Lock()
        self._tpv: dict[str, Any] | None = None
        self._tpv_at = 0.0
        self._used: int | None = None
        self.reports = 0

    def feed(self, report: dict[str, Any]) -> None:
        """One gpsd JSON report (other classes are ignored)."""
        cls = report.get("class")
        now = self.clock()
        with self._lock:
            if cls == "TPV":
                self._tpv, self._tpv_at = report, now
                self.reports += 1
            elif cls == "SKY":
                # gpsd >= 3.20 says uSat; else (or when it is not a plausible count) count the ones marked used
                used = _count(report.get("uSat"))
                if used is None:
                    sats = report.get("satellites")
                    used = _count(sum(1 for s in sats if isinstance(s, dict) and s.get("used") is True)) \
                        if isinstance(sats, list) else None
                if used is not None:
                    self._used = used

    def fix(self) -> Fix:
        """The current fix: ``none`` when no report came, the last one had no fix, or it is older than max age."""
        with self._lock:
            tpv, at, used = self._tpv, self._tpv_at, self._used
        if tpv is None:
            return no_fix("no_fix", self.source)
        age = self.clock() - at
        if age > self.max_age_s:
            return no_fix("stale", self.source, age)
        raw_mode = tpv.get("mode")
        mode = _MODES.get(raw_mode) if type(raw_mode) is int else None  # not True, not 3.0
        # every value below goes into a sealed manifest: checked here or left out, never passed through
        lat, lon = _num(tpv.get("lat"), -90, 90), _num(tpv.get("lon"), -180, 180)
        if mode is None or lat is None or lon is None:
            return no_fix("no_fix", self.source, age)
        acc = _num(tpv.get("eph"), 0)  # an error estimate is never negative
        if acc is None:
            errs = [e for e in (_num(tpv.get("epx"), 0), _num(tpv.get("epy"), 0)) if e is not None]
            acc = max(errs) if errs else None
        alt = None
        if mode == FIX_3D:
            alt = _num(tpv.get("altMSL"), *ALT_RANGE_M)
            if alt is None and "altMSL" not in tpv:  # gpsd < 3.20 says "alt"
                alt = _num(tpv.get("alt"), *ALT_RANGE_M)
        return Fix(mode, lat, lon, alt, acc, used, max(0.0, age), source=self.source)


class GpsdSource:
    """Positions from gpsd (`host`:`port`, its JSON watch stream), read by `read_lines` on one thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2947, max_age_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, reconnect_max_s: float = 30.0) -> None:
        self.host, self.port = host, port
        self.tracker = FixTracker(max_age_s, clock, "gpsd")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.connected = False
        self.error = ""
        self.dropped_reports = 0  # lines that did not parse as a gpsd report (each one skipped)
        self._backoff = Backoff(0.5, reconnect_max_s)
        # gpsd sends a TPV every cycle (1 s) while a device is active: a read that waits this long has lost it
        self._read_timeout = max(1.0, min(max_age_s, 5.0))

    def start(self) -> None:
        """Start reading (idempotent); never raises for a missing gpsd: fix() says no_receiver."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gnss-gpsd", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and wait for the thread (at most one read timeout)."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv (close alone does not)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(self._read_timeout + 2)

    def _reports(self, sock: socket.socket) -> Iterator[dict[str, Any]]:
        """The TPV and SKY reports of one connection; a line that does not parse is skipped (and counted)."""
        sock.sendall(WATCH)
        first = True
        for line in read_lines(sock):
            if not line.strip():
                continue
            try:
                report = parse_report(line)
            except ValueError as e:
                if first:  # gpsd greets with VERSION: anything else is not gpsd (as gpsdclient checked)
                    raise ConnectionError(f"not gpsd: its first line is not a report ({e})") from None
                self.dropped_reports += 1
                # the first one visible, the rest (a noisy or hostile peer, reconnecting) only at debug
                (log.warning if self.dropped_reports == 1 else log.debug)(
                    "gnss report dropped gpsd=%s:%d error=%s dropped=%d", self.host, self.port,
                    str(e)[:160], self.dropped_reports)
                continue
            if first and report.get("class") != "VERSION":
                raise ConnectionError(f"not gpsd: its first report is {str(report.get('class'))[:40]!r}, "
                                      "not VERSION")
            first = False
            if report.get("class") in ("TPV", "SKY"):
                yield report

    def _run(self) -> None:
        while not self._stop.is_set():
            sock: socket.socket | None = None
            try:
                sock = self._sock = socket.create_connection((self.host, self.port), timeout=self._read_timeout)
                if self._stop.is_set():
                    break
                for report in self._reports(sock):
                    if not self.connected:
                        log.info("gnss connected gpsd=%s:%d", self.host, self.port)
                    self.connected, self.error = True, ""
                    self._backoff.reset()
                    self.tracker.feed(report)
                    if self._stop.is_set():
                        break
                else:
                    raise ConnectionError("gpsd closed the connection")
            except Exception as e:  # OSError, timeout, overlong line, not gpsd: reconnect; the fix ages out
                if self._stop.is_set():
                    break
                was, self.connected = self.connected, False
                self.error = f"{type(e).__name__}: {e}"
                delay = self._backoff.next()
                (log.warning if was else log.debug)("gnss read failed gpsd=%s:%d error=%s retry_s=%.1f",
                                                    self.host, self.port, self.error, delay)
                self._stop.wait(delay)
            finally:
                self._sock = None
                if sock is not None:
                    sock.close()

    def fix(self) -> Fix:
        """The current fix; ``no_receiver`` until gpsd was reached and reported once."""
        f = self.tracker.fix()
        if not f.valid and f.reason == "no_fix" and not self.connected and self.tracker.reports == 0:
            return no_fix("no_receiver", "gpsd")
        return f

    def status(self) -> dict[str, Any]:
        """Connection state and the current fix, for status and telemetry."""
        return {"source": "gpsd", "connected": self.connected, "error": self.error, **self.fix().as_dict()}


class SimulatedGnss:
    """A configured fix (or none) for `rekamd --sim`: `fix_type` none/2d/3d at `lat`, `lon`, `accuracy_m`."""

    def __init__(self, fix_type: str = FIX_3D, lat: float = -6.9147, lon: float = 107.6098,
                 accuracy_m: float = 4.0, satellites: int = 9, clock: Callable[[], float] = time.monotonic) -> None:
        if fix_type not in (NO_FIX, FIX_2D, FIX_3D):
            raise ValueError(f"fix type must be none, 2d or 3d, got {fix_type!r}")
        self.fix_type, self.lat, self.lon, self.accuracy_m, self.satellites = fix_type, lat, lon, accuracy_m, satellites
        self.clock = clock
        self._t0 = clock()

    def start(self) -> None:
        self._t0 = self.clock()

    def stop(self) -> None:
        pass

    def fix(self) -> Fix:
        if self.fix_type == NO_FIX:
            return no_fix("no_fix", "sim")
        age = (self.clock() - self._t0) % 1.0  # a receiver reports once a second
        return Fix(self.fix_type, self.lat, self.lon, 650.0 if self.fix_type == FIX_3D else None, self.accuracy_m,
                   self.satellites, age, source="sim")

    def status(self) -> dict[str, Any]:
        return {"source": "sim", "connected": True, "error": "", **self.fix().as_dict()}
