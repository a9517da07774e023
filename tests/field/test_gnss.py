"""The GNSS position source against a real gpsd fed by gpsfake (Debian gpsd-clients) with the recorded NMEA logs
of tests/field/data (written by tests/field/make_nmea.py): a fix, no fix, a fix lost mid-run; a stale fix is
never current; no gpsd at all is "no receiver". A hostile peer (gpsd's address can come from a remote config)
is a scripted gpsd on a real TCP socket (`FakeGpsd`): overlong lines, bad JSON, implausible values."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hw.gnss import FIX_3D, MAX_LINE_BYTES, NO_FIX, FixTracker, GpsdSource, SimulatedGnss
from tests.field.conftest import GpsFake
from tests.support import free_port, wait_for

VERSION = b'{"class":"VERSION","release":"3.22","rev":"3.22","proto_major":3,"proto_minor":14}\n'
TPV = {"class": "TPV", "mode": 3, "lat": -6.9147, "lon": 107.6098, "altMSL": 712.4, "eph": 17.1}


def line(report: dict[str, Any] | str) -> bytes:
    """One gpsd line: a report as JSON (or raw text as given) and its newline."""
    return (report if isinstance(report, str) else json.dumps(report)).encode() + b"\n"


class FakeGpsd:
    """A scripted gpsd on a real TCP socket on 127.0.0.1: each connection waits for the client's ?WATCH, gets
    VERSION, then `script(conn, n)` (n: 1 for the first connection); `held` keeps connections open afterwards."""

    def __init__(self, script: Callable[[socket.socket, int], None]) -> None:
        self.script = script
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.watch: list[bytes] = []
        self.closed = threading.Event()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn:
            conn.settimeout(10)
            got = b""
            while b"\n" not in got and (chunk := conn.recv(256)):
                got += chunk
            self.watch.append(got)
            try:
                conn.sendall(VERSION)
                self.script(conn, n)
                self.closed.wait(30)  # hold the connection (a gpsd with nothing more to say) until the end
            except OSError:
                pass

    def close(self) -> None:
        self.closed.set()
        self.server.close()
        for t in self._threads:
            t.join(5)


@pytest.fixture
def fake_gpsd() -> Iterator[Callable[..., FakeGpsd]]:
    made: list[FakeGpsd] = []

    def make(script: Callable[[socket.socket, int], None]) -> FakeGpsd:
        made.append(FakeGpsd(script))
        return made[-1]

    yield make
    for g in made:
        g.close()


def source(g: GpsFake, max_age_s: float = 2.0) -> GpsdSource:
    s = GpsdSource("127.0.0.1", g.port, max_age_s=max_age_s, reconnect_max_s=0.5)
    s.start()
    return s


def test_a_fix_from_gpsd(gpsfake: Callable[..., GpsFake]) -> None:
    s = source(gpsfake("fix.nmea"))
    try:
        # the first cycle's RMC alone makes a 2D report; GGA/GSA of the same second make it 3D
        f = wait_for(lambda: (x := s.fix()).fix == FIX_3D and x, 10, "a 3D fix from gpsd")
        assert f.source == "gpsd"
        assert abs(f.lat - -6.9147) < 1e-6 and abs(f.lon - 107.6098) < 1e-6  # 06°54.882'S 107°36.588'E
        assert f.satellites_used == 8 or wait_for(lambda: s.fix().satellites_used == 8, 5, "SKY: 8 used")
        assert f.accuracy_m is not None and 1 < f.accuracy_m < 50  # gpsd's eph from HDOP 0.9
        assert 0 <= f.age_s < 2.0
        assert s.status()["connected"] is True
    finally:
        s.stop()


def test_no_fix_is_stated(gpsfake: Callable[..., GpsFake]) -> None:
    s = source(gpsfake("nofix.nmea"))
    try:
        wait_for(lambda: s.tracker.reports >= 3, 10, "gpsd reports without a fix")
        f = s.fix()
        assert f.fix == NO_FIX and f.reason == "no_fix" and f.lat is None and f.lon is None
        assert f.as_dict() == {"fix": "none", "reason": "no_fix", "source": "gpsd", "age_s": f.as_dict()["age_s"]}
    finally:
        s.stop()


def test_a_fix_lost_mid_run_then_the_receiver_gone(gpsfake: Callable[..., GpsFake]) -> None:
    # 20 s of fix then 10 s without, played at ~0.1 s per NMEA second
    g = gpsfake("lost.nmea")
    s = source(g, max_age_s=1.0)
    try:
        wait_for(lambda: s.fix().fix == FIX_3D, 10, "the fix at the start of the log")
        lost = wait_for(lambda: (x := s.fix()).fix == NO_FIX and x, 10, "the fix to be lost")
        assert lost.reason == "no_fix"  # gpsd still reports (mode 1): the receiver has no fix
        # the log is played once (~3.5 s): then gpsd has nothing more to report, and the last report ages out
        stale = wait_for(lambda: (x := s.fix()).reason == "stale" and x, 10, "the last report to age out")
        assert stale.fix == NO_FIX and stale.age_s > 1.0 and stale.lat is None  # never the old fix as current
        g.stop()  # gpsd gone: still no fix, and the source says it is not connected
        wait_for(lambda: not s.connected, 10, "the source to notice gpsd is gone")
        assert s.fix().fix == NO_FIX
    finally:
        s.stop()


def test_no_gpsd_is_no_receiver() -> None:
    s = GpsdSource("127.0.0.1", free_port(), max_age_s=1.0, reconnect_max_s=0.5)
    s.start()
    try:
        wait_for(lambda: s.error, 5, "the connection error")
        f = s.fix()
        assert f.fix == NO_FIX and f.reason == "no_receiver"
        assert s.status()["connected"] is False
    finally:
        s.stop()


def test_tracker_rules_on_recorded_gpsd_json() -> None:
    """gpsd's own report shapes (as gpsd 3.22 sent them for fix.nmea): max age, 2D without altitude, bad values."""
    now = [100.0]
    t = FixTracker(max_age_s=5.0, clock=lambda: now[0])
    tpv: dict[str, Any] = {"class": "TPV", "mode": 3, "lat": -6.9147, "lon": 107.6098, "altMSL": 712.4,
                           "eph": 17.1, "epx": 13.547, "epy": 11.674}
    t.feed({"class": "SKY", "uSat": 8, "nSat": 8})
    t.feed(tpv)
    now[0] += 4.9
    f = t.fix()
    assert (f.fix, f.satellites_used, f.accuracy_m, f.alt_m) == ("3d", 8, 17.1, 712.4)
    now[0] += 0.2  # 5.1 s: older than max age
    assert t.fix().fix == NO_FIX and t.fix().reason == "stale"
    t.feed({**tpv, "mode": 2, "eph": None})
    f = t.fix()
    assert f.fix == "2d" and f.alt_m is None and f.accuracy_m == 13.547  # the larger of epx/epy without eph
    t.feed({"class": "TPV", "mode": 3, "lat": 123.0, "lon": 0.0})  # impossible latitude
    assert t.fix().fix == NO_FIX
    t.feed({"class": "SKY", "satellites": [{"PRN": 1, "used": True}, {"PRN": 2, "used": False}]})  # no uSat
    t.feed(tpv)
    assert t.fix().satellites_used == 1


def test_simulated_receiver() -> None:
    f = SimulatedGnss("3d", -6.2, 106.8).fix()
    assert f.valid and (f.lat, f.lon, f.source) == (-6.2, 106.8, "sim") and 0 <= f.age_s < 1
    assert SimulatedGnss("none").fix().as_dict() == {"fix": "none", "reason": "no_fix", "source": "sim"}


def test_an_endless_line_drops_the_connection_then_the_source_recovers(
        fake_gpsd: Callable[..., FakeGpsd], caplog: pytest.LogCaptureFixture) -> None:
    # a peer sending megabytes without a newline: read at most MAX_LINE_BYTES (+ one recv), drop the connection,
    # reconnect with the backoff; the reader never holds the line (gpsdclient's readline() grew RSS by 300 MiB)
    took_it_all: list[bool] = []

    def script(conn: socket.socket, n: int) -> None:
        if n == 1:
            try:
                conn.sendall(b'{"class":"TPV","device":"' + b"A" * (24 << 20))  # 24 MiB, no newline
                took_it_all.append(True)
            except OSError:  # the client closed its end before reading it: EPIPE / ECONNRESET
                took_it_all.append(False)
            return
        conn.sendall(line({"class": "SKY", "uSat": 8}) + line(TPV))

    g = fake_gpsd(script)
    caplog.set_level(logging.DEBUG, "hw.gnss")
    s = GpsdSource("127.0.0.1", g.port, max_age_s=5.0, reconnect_max_s=0.5)
    s.start()
    try:
        f = wait_for(lambda: (x := s.fix()).fix == FIX_3D and x, 20, "a fix from the second connection")
        assert f.satellites_used == 8 and f.accuracy_m == 17.1
        assert took_it_all == [False], "the source read the endless line instead of dropping the connection"
        assert g.connections >= 2 and all(w == b'?WATCH={"enable":true,"json":true}\n' for w in g.watch)
        assert any("LineTooLong" in r.getMessage() and str(MAX_LINE_BYTES) in r.getMessage()
                   for r in caplog.records), [r.getMessage()[:200] for r in caplog.records]
    finally:
        s.stop()


def test_reports_that_do_not_parse_are_dropped_and_the_stream_goes_on(fake_gpsd: Callable[..., FakeGpsd]) -> None:
    bad = [
        '{"class":"TPV","x":' + "[" * 5000 + "]" * 5000 + "}",  # nested far beyond any gpsd report
        '{"class":"TPV","mode":3,"lat":NaN,"lon":0}',  # a constant no JSON document holds
        '["class","TPV"]',  # not an object
        '{"class":"TPV","mode":3,"lat":1,"lon":2',  # cut short
    ]

    def script(conn: socket.socket, n: int) -> None:
        conn.sendall(b"".join(line(b) for b in bad) + b'{"class":"TPV","dev":"\xff"}\n'  # not UTF-8
                     + line('{"class":"SKY","uSat":7,}')  # old gpsd's trailing comma: accepted
                     + line(TPV))

    g = fake_gpsd(script)
    s = GpsdSource("127.0.0.1", g.port, max_age_s=5.0, reconnect_max_s=0.5)
    s.start()
    try:
        f = wait_for(lambda: (x := s.fix()).fix == FIX_3D and x, 10, "the good report after the bad ones")
        assert (f.lat, f.satellites_used) == (-6.9147, 7)
        assert s.dropped_reports == 5 and g.connections == 1  # skipped, not a reconnect each
    finally:
        s.stop()


def test_something_else_than_gpsd_is_not_taken_for_it() -> None:
    # a server whose first line is not gpsd's VERSION (an HTTP or SSH port given as gpsd's by mistake)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + line(TPV))
            conn.recv(100)

    threading.Thread(target=serve, daemon=True).start()
    s = GpsdSource("127.0.0.1", port, max_age_s=5.0, reconnect_max_s=0.5)
    s.start()
    try:
        wait_for(lambda: "not gpsd" in s.error, 10, "the source to refuse the peer")
        assert s.fix().reason == "no_receiver" and s.tracker.reports == 0
    finally:
        s.stop()
        srv.close()


HUGE = 10 ** 4000  # a 4000-digit JSON integer: Python parses it; float() of it overflows


@pytest.mark.parametrize(("tpv", "sky", "expect"), [
    ({"eph": -50}, {"uSat": True}, {"accuracy_m": None, "satellites_used": None}),
    ({"eph": -50, "epx": -1.0, "epy": 6.5}, {"uSat": -7}, {"accuracy_m": 6.5, "satellites_used": None}),
    ({"eph": HUGE}, {"uSat": HUGE}, {"accuracy_m": None, "satellites_used": None}),
    ({"eph": True, "epx": float("inf")}, {"uSat": 256}, {"accuracy_m": None, "satellites_used": None}),
    ({"eph": "3"}, {"uSat": 12.0, "satellites": [{"used": True}, {"used": 1}, {"used": "yes"}, 3]},
     {"accuracy_m": None, "satellites_used": 1}),  # only "used": true counts
    ({"eph": 0.0}, {"uSat": None, "satellites": [{"used": True}] * 300}, {"accuracy_m": 0.0, "satellites_used": None}),
    ({"altMSL": -5000.0}, {"uSat": 0}, {"alt_m": None, "satellites_used": 0}),
    ({"altMSL": HUGE}, {"uSat": 255}, {"alt_m": None, "satellites_used": 255}),
    ({"altMSL": "712"}, {}, {"alt_m": None}),  # present but not a number: not "alt" instead
    ({"altMSL": None, "alt": None}, {}, {"alt_m": None}),
    ({"lat": HUGE}, {}, {"fix": NO_FIX}),
    ({"lon": -180.5}, {}, {"fix": NO_FIX}),
    ({"lat": True}, {}, {"fix": NO_FIX}),
    ({"mode": True}, {}, {"fix": NO_FIX}),
    ({"mode": 3.0}, {}, {"fix": NO_FIX}),
])
def test_implausible_values_never_reach_the_fix(tpv: dict[str, Any], sky: dict[str, Any],
                                                expect: dict[str, Any]) -> None:
    """Each value taken from gpsd into the position (sealed into the manifest) is checked or left out."""
    t = FixTracker(max_age_s=5.0)
    t.feed({"class": "SKY", **sky})
    t.feed({**TPV, **tpv})
    f = t.fix()
    for k, v in expect.items():
        assert getattr(f, k) == v, (k, f)
    d = f.as_dict()
    assert all(type(v) in (str, float, int) for v in d.values()), d  # never a bool, None, or a non-finite float
    assert d.get("accuracy_m", 0) >= 0 and 0 <= d.get("satellites_used", 0) <= 255


def test_implausible_values_over_gpsd_never_reach_the_fix(fake_gpsd: Callable[..., FakeGpsd]) -> None:
    # the same over the wire, as JSON text: a 4000-digit uSat, a negative eph, an absurd altitude
    digits = "9" * 4000

    def script(conn: socket.socket, n: int) -> None:
        conn.sendall(line('{"class":"SKY","uSat":' + digits + "}")
                     + line('{"class":"TPV","mode":3,"lat":-8.65,"lon":115.2167,"eph":-50,"altMSL":1e308}'))

    g = fake_gpsd(script)
    s = GpsdSource("127.0.0.1", g.port, max_age_s=5.0, reconnect_max_s=0.5)
    s.start()
    try:
        f = wait_for(lambda: (x := s.fix()).fix == FIX_3D and x, 10, "the fix")
        assert (f.lat, f.lon, f.accuracy_m, f.satellites_used, f.alt_m) == (-8.65, 115.2167, None, None, None)
        assert s.status()["fix"] == FIX_3D and "accuracy_m" not in s.status()
    finally:
        s.stop()
