"""The GNSS position source against a real gpsd fed by gpsfake (Debian gpsd-clients) with the recorded NMEA logs
of tests/field/data (written by tests/field/make_nmea.py): a fix, no fix, a fix lost mid-run; a stale fix is
never current; no gpsd at all is "no receiver"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hw.gnss import FIX_3D, NO_FIX, FixTracker, GpsdSource, SimulatedGnss
from tests.field.conftest import GpsFake
from tests.support import free_port, wait_for


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
