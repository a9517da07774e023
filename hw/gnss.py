"""Where the kit is: a GNSS position source behind one interface (gpsd, or a simulator).

`GnssSource.fix()` answers the position *now*: a `Fix` with its type (``none``, ``2d``, ``3d``), latitude and
longitude, horizontal accuracy (m), satellites used and age (s since the receiver's report arrived, on the
monotonic clock: the wall clock of a Pi without RTC may be wrong, which is half the point of a receiver).
A report older than `max_age_s` is ``none`` with reason ``stale``: a fix that stopped coming is never shown as
current. No receiver, no daemon: ``none`` with reason ``no_receiver``.

`GpsdSource` reads gpsd's JSON watch stream (TPV and SKY reports) with the maintained `gpsdclient` library on
a background thread, reconnecting with the one backoff helper. `SimulatedGnss` answers a configured fix.
This module knows nothing of the firmware: plain values in, plain values out.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from firmware.system.backoff import Backoff

log = logging.getLogger(__name__)

NO_FIX, FIX_2D, FIX_3D = "none", "2d", "3d"
_MODES = {2: FIX_2D, 3: FIX_3D}  # gpsd TPV "mode": 0 unknown, 1 no fix, 2 2D, 3 3D


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


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


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
                used = report.get("uSat")  # gpsd >= 3.20; else count the satellites marked used
                if not isinstance(used, int):
                    sats = report.get("satellites")
                    used = sum(1 for s in sats if isinstance(s, dict) and s.get("used")) \
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
        mode = _MODES.get(tpv.get("mode") if isinstance(tpv.get("mode"), int) else 0)
        lat, lon = _num(tpv.get("lat")), _num(tpv.get("lon"))
        if mode is None or lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
            return no_fix("no_fix", self.source, age)
        acc = _num(tpv.get("eph"))
        if acc is None:
            errs = [e for e in (_num(tpv.get("epx")), _num(tpv.get("epy"))) if e is not None]
            acc = max(errs) if errs else None
        alt = _num(tpv.get("altMSL", tpv.get("alt"))) if mode == FIX_3D else None
        return Fix(mode, lat, lon, alt, acc, used, max(0.0, age), source=self.source)


class GpsdSource:
    """Positions from gpsd (`host`:`port`, its JSON watch stream) through `gpsdclient`, on one thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2947, max_age_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, reconnect_max_s: float = 30.0) -> None:
        self.host, self.port = host, port
        self.tracker = FixTracker(max_age_s, clock, "gpsd")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self.connected = False
        self.error = ""
        self._backoff = Backoff(0.5, reconnect_max_s)
        # gpsd sends a TPV every cycle (1 s) while a device is active: a read that waits this long has lost it
        self._read_timeout = max(1.0, min(max_age_s, 5.0))

    def start(self) -> None:
        """Start reading (idempotent); never raises for a missing gpsd: fix() says no_receiver."""
        try:
            import gpsdclient  # noqa: F401  (fail here, not on the thread, when the library is missing)
        except ImportError as e:
            self.error = f"gpsd client needs gpsdclient ({e})"
            log.error("gnss unavailable error=%s", self.error)
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gnss-gpsd", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        client = self._client
        sock = getattr(client, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv (close alone does not)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(self._read_timeout + 2)

    def _stream(self) -> Iterable[dict[str, Any]]:
        from gpsdclient import GPSDClient

        self._client = GPSDClient(self.host, self.port, timeout=self._read_timeout)
        return self._client.dict_stream(convert_datetime=False, filter=["TPV", "SKY"])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for report in self._stream():
                    if not self.connected:
                        log.info("gnss connected gpsd=%s:%d", self.host, self.port)
                    self.connected, self.error = True, ""
                    self._backoff.reset()
                    self.tracker.feed(report)
                    if self._stop.is_set():
                        break
                else:
                    raise ConnectionError("gpsd closed the connection")
            except Exception as e:  # OSError, timeout, bad JSON: reconnect; the fix ages out meanwhile
                if self._stop.is_set():
                    break
                was, self.connected = self.connected, False
                self.error = f"{type(e).__name__}: {e}"
                delay = self._backoff.next()
                (log.warning if was else log.debug)("gnss read failed gpsd=%s:%d error=%s retry_s=%.1f",
                                                    self.host, self.port, self.error, delay)
                self._stop.wait(delay)
            finally:
                if self._client is not None:
                    self._client.close()

    def fix(self) -> Fix:
        f = self.tracker.fix()
        if not f.valid and f.reason == "no_fix" and not self.connected and self.tracker.reports == 0:
            return no_fix("no_receiver", "gpsd")
        return f

    def status(self) -> dict[str, Any]:
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
