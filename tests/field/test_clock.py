"""The clock's synchronisation from chrony (`chronyc -c tracking`) and the signed corrections of records sealed
before it: parsing of real tracking reports, a real chronyd (-x: it never sets this machine's clock) before and
after it reaches an NTP server, the correction arithmetic, and end to end in a real `rekamd --sim`."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.system.clock import ClockCorrections, ClockState, parse_chrony_tracking, read_clock_state
from firmware.wire import clock_correction
from firmware.wire.clock_correction import verify as verify_correction
from tests.field.conftest import Chrony
from tests.support import free_port, rekam, wait_for

# Real `chronyc -c tracking` lines (chrony 4.3): captured from chronyd on this machine, and the chronyc manual's
# tracking example (Reference ID CB00710F foo.example.net, 6.523 us slow) in its CSV form.
UNSYNCED = "00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,0.000,0.000,1.000000000,1.000000000,0.0,Not synchronised"  # noqa: E501
LOCAL = "7F7F0101,,8,1796162264.097600753,0.000000000,0.000000000,0.000000000,0.000,0.000,0.000,0.000000000,0.000000000,0.0,Normal"  # noqa: E501
NTP_LOCALHOST = "7F000001,127.0.0.1,9,1796162268.168330662,-0.000002240,0.000000261,0.000000493,0.276,0.027,0.958,0.000006211,0.000002088,0.5,Normal"  # noqa: E501
MANUAL = "CB00710F,foo.example.net,3,1485510557.000000000,0.000006523,-0.000006747,0.000035822,-3.225,-0.000,0.129,0.013639022,0.001100737,64.2,Normal"  # noqa: E501
# A GNSS reference clock (refclock PPS through gpsd): its reference id is the refid "PPS" as ASCII.
PPS = "50505300,PPS,1,1796162300.000000000,0.000000120,0.000000080,0.000000300,-1.204,0.001,0.010,0.000000001,0.000010000,16.0,Normal"  # noqa: E501


def test_tracking_reports() -> None:
    t = parse_chrony_tracking(UNSYNCED + "\n")
    assert not t.synced and t.source == "none" and t.leap == "Not synchronised"
    t = parse_chrony_tracking(LOCAL)
    assert not t.synced and t.source == "local"  # its own clock is not a source of true time
    t = parse_chrony_tracking(NTP_LOCALHOST)
    assert t.synced and t.source == "ntp" and t.stratum == 9 and t.correction_s == -0.00000224  # 2.24 us fast
    t = parse_chrony_tracking(MANUAL)
    assert t.synced and t.source == "ntp" and t.ref_name == "foo.example.net" and t.correction_s == 6.523e-06
    t = parse_chrony_tracking(PPS)
    assert t.synced and t.source == "gnss" and t.stratum == 1
    for bad in ("506 Cannot talk to daemon", "", "a,b,c", MANUAL.replace("64.2", "x")):
        try:
            parse_chrony_tracking(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_chrony_without_then_with_a_server(chrony: Callable[..., Chrony]) -> None:
    port = free_port()
    client = chrony("client", upstream=port).start()
    st = read_clock_state(client.command)
    assert st == ClockState(False, "none", 0.0, st.detail) and "leap=Not synchronised" in st.detail
    chrony("server", port=port).start()  # an NTP server appears (chronyd serving its local clock)
    st = wait_for(lambda: (x := read_clock_state(client.command)).synced and x, 15, "chrony to synchronise")
    assert st.source == "ntp" and "ref=127.0.0.1" in st.detail and abs(st.correction_s) < 0.01


def test_chrony_unavailable_falls_back_to_the_kernel(tmp_path: Path) -> None:
    st = read_clock_state([str(tmp_path / "no-chronyc"), "-c", "tracking"])
    assert st.source == "kernel" and "chrony unavailable" in st.detail
    st = read_clock_state(["chronyc", "-h", str(tmp_path / "none.sock"), "-c", "tracking"])  # no chronyd there
    assert st.source == "kernel"


class Clocks:
    """A wall clock that is wrong until "chrony" steps it, and a monotonic clock, both set by the test."""

    def __init__(self) -> None:
        # a Pi without RTC boots at its last saved time (fake-hwclock), 2026-09-21 here: behind, but plausible
        self.mono, self.wall = 1000.0, 1_790_000_000.0

    def tick(self, s: float) -> None:
        self.mono += s
        self.wall += s


def corrections(path: Path, c: Clocks, key: Ed25519PrivateKey, boot: str = "boot-1") -> ClockCorrections:
    return ClockCorrections(path, "RKM-TEST", lambda body: clock_correction.sign(body, key), wall=lambda: c.wall,
                            mono=lambda: c.mono, boot=lambda: boot)


def test_correction_of_records_sealed_before_sync(tmp_path: Path) -> None:
    key, c, path = Ed25519PrivateKey.generate(), Clocks(), tmp_path / "clock.json"
    cc = corrections(path, c, key)
    cc.note(1, "r1", synced=False)
    c.tick(60)
    cc.note(2, "r2", synced=False)
    cc.note(3, "r3", synced=True)  # sealed synced: nothing to correct
    c.tick(30)
    # a daemon restart in the same boot keeps the open run (the monotonic clock goes on)
    cc = corrections(path, c, key)
    assert cc.status()["awaiting_correction"] == 2
    assert cc.observe(ClockState(False, "none")) is None
    c.tick(10)
    c.wall += 100_000_000.0  # chrony steps the clock to the true time
    doc = cc.observe(ClockState(True, "gnss", correction_s=0.25))
    assert doc is not None and doc["source"] == "gnss" and doc["kit_id"] == "RKM-TEST"
    assert doc["type"] == "rekam.clock-correction/1"
    assert [(s["first_seq"], s["last_seq"], s["records"], s["offset_s"]) for s in doc["segments"]] == \
        [(1, 2, 2, 100_000_000.25)]
    assert verify_correction(doc, key.public_key())
    assert not verify_correction({**doc, "segments": [{**doc["segments"][0], "offset_s": 0.0}]}, key.public_key())
    assert not verify_correction(doc, Ed25519PrivateKey.generate().public_key())
    # sealed flagged unsynced after chrony set the clock but before the watcher saw it: its wall time is already
    # true, so it is corrected at once by chrony's remaining correction only
    cc.note(4, "r4", synced=False)
    assert cc.status()["awaiting_correction"] == 0
    assert [s["offset_s"] for s in cc.status()["corrections"][-1]["segments"]] == [0.25]
    assert json.loads(path.read_text())["pending"] == []


def test_clock_set_by_hand_before_sync_makes_two_runs(tmp_path: Path) -> None:
    key, c = Ed25519PrivateKey.generate(), Clocks()
    cc = corrections(tmp_path / "clock.json", c, key)
    cc.note(1, "r1", synced=False)
    c.wall += 3600  # someone set the date by hand, still unsynced
    cc.note(2, "r2", synced=False)
    c.wall += 10.0
    doc = cc.observe(ClockState(True, "ntp"))
    assert [(s["first_seq"], s["offset_s"]) for s in doc["segments"]] == [(1, 3610.0), (2, 10.0)]


def test_reboot_before_sync_cannot_be_corrected(tmp_path: Path) -> None:
    key, c, path = Ed25519PrivateKey.generate(), Clocks(), tmp_path / "clock.json"
    corrections(path, c, key).note(7, "r7", synced=False)
    cc = corrections(path, Clocks(), key, boot="boot-2")  # power cut, new boot: the monotonic link is gone
    doc = cc.status()["corrections"][-1]
    assert doc["reason"] == "rebooted_before_sync" and doc["segments"][0]["offset_s"] is None
    assert doc["segments"][0]["first_seq"] == 7 and verify_correction(doc, key.public_key())
    assert cc.status()["awaiting_correction"] == 0
    assert cc.drain() == [doc] and cc.drain() == []  # handed once to the journal


def test_rekamd_corrects_records_sealed_before_chrony_synced(chrony: Callable[..., Chrony], field_daemon: Any,
                                                             dc_keys: dict[str, Any]) -> None:
    port = free_port()
    client = chrony("client", upstream=port).start()
    d = field_daemon(gnss={"chrony_command": client.command, "clock_poll_s": 0.3})
    wait_for(lambda: d.client().get("/api/v1/status").json()["clock"]["detail"].startswith("chrony"), 10,
             "the clock watcher's first reading")
    r = rekam("sim", "commit", "2", "--json", cfg=d.cfg)
    assert r.returncode == 0, r.stderr
    st = d.client().get("/api/v1/status").json()["clock"]
    assert st["synced"] is False and st["awaiting_correction"] == 2
    chrony("server", port=port).start()
    st = wait_for(lambda: (s := d.client().get("/api/v1/status").json()["clock"])["corrections"] and s, 20,
                  "the correction after chrony synchronised")
    assert st["synced"] is True and st["source"] == "ntp" and st["awaiting_correction"] == 0
    doc = st["corrections"][-1]
    assert [(s["first_seq"], s["last_seq"], s["records"]) for s in doc["segments"]] == [(1, 2, 2)]
    assert abs(doc["segments"][0]["offset_s"]) < 1.0  # chronyd -x never stepped the clock: ~0 here
    # signed with the kit's key (the one in every sealed record's header)
    from firmware.seal import identity

    assert verify_correction(doc, identity.load(d.sd).signing_key.public_key())
    r = rekam("sim", "commit", "1", "--json", cfg=d.cfg)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(f"file:{d.sd / 'journal.db'}?mode=ro", uri=True) as c:
        synced = [row[0] for row in c.execute("SELECT clock_synced FROM records ORDER BY seq")]
        audit = [row[0] for row in c.execute("SELECT kind FROM audit WHERE kind = 'clock_correction'")]
    assert synced == [0, 0, 1] and audit == ["clock_correction"]  # the records themselves are never rewritten


# --- chrony's word is bounded: finite numbers, true times in the plausible range ---------------------------------

TRUE_NOW = 1_796_162_300.0  # 2026-12-01T06:38:20Z: the PPS line's reference time


def fake_chronyc(line: str) -> list[str]:
    """A `chronyc -c tracking` command that prints `line` (the daemon runs it as an argv list, as here)."""
    return [sys.executable, "-c", f"print({line!r})"]


def pps(system_time: str = "0.000000120", **fields: str) -> str:
    """The PPS (GNSS) tracking line with its "System time" (field 4) and any field by index (f3=..) replaced."""
    f = PPS.split(",")
    f[4] = system_time
    for k, v in fields.items():
        f[int(k[1:])] = v
    return ",".join(f)


@pytest.mark.parametrize("system_time,other", [("nan", {}), ("inf", {}), ("-inf", {}), ("NaN", {}),
                                               ("0.000000120", {"f11": "nan"}), ("0.000000120", {"f3": "inf"})])
def test_non_finite_numbers_from_chronyc_are_not_synchronised(system_time: str, other: dict[str, str],
                                                              tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    line = pps(system_time, **other)
    with pytest.raises(ValueError, match="non-finite"):
        parse_chrony_tracking(line)
    st = read_clock_state(fake_chronyc(line), wall=lambda: TRUE_NOW)
    # not synchronised, and not the kernel's flag either (chronyd sets it: the same untrusted verdict)
    assert (st.synced, st.source, st.correction_s) == (False, "none", 0.0) and "non-finite" in st.implausible
    assert "nan" in st.detail.lower() or "inf" in st.detail.lower()
    key, c = Ed25519PrivateKey.generate(), Clocks()
    cc = corrections(tmp_path / "clock.json", c, key)
    cc.note(1, "r1", synced=False)
    with caplog.at_level(logging.WARNING, "firmware.system.clock"):
        assert cc.observe(st) is None and cc.observe(st) is None
    warned = [r.getMessage() for r in caplog.records if "implausible" in r.getMessage()]
    assert len(warned) == 1 and "awaiting_correction=1" in warned[0], warned  # once per episode, not per poll
    name = "System time" if system_time != "0.000000120" else ("Root dispersion" if "f11" in other else "Ref time")
    assert f"{name}={line.split(',')[int(next(iter(other), 'f4')[1:])]}" in warned[0], warned
    assert cc.status()["implausible"] == 1 and cc.status()["synced"] is False
    assert cc.status()["awaiting_correction"] == 1 and cc.drain() == []


def test_a_spoofed_gnss_time_is_not_trusted_nor_signed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The review's case: chrony synced to a GNSS simulator reports System time = 1.9e9 s."""
    key, c, path = Ed25519PrivateKey.generate(), Clocks(), tmp_path / "clock.json"
    c.wall = TRUE_NOW - 3600  # fake-hwclock: an hour behind
    cc = corrections(path, c, key)
    cc.note(1, "r1", synced=False)
    c.tick(60)
    cc.note(2, "r2", synced=False)
    spoof = fake_chronyc(pps("1900000000.123"))
    with caplog.at_level(logging.WARNING, "firmware.system.clock"):
        st = read_clock_state(spoof, wall=lambda: c.wall)  # would be 2087
        assert (st.synced, st.source) == (False, "none") and "after 2056-01-01" in st.implausible
        assert cc.observe(st) is None
        # a state that claims synced (any other caller) is checked by the corrections themselves too
        assert cc.observe(ClockState(True, "gnss", correction_s=1_900_000_000.123)) is None
        # chrony already stepped the clock to the spoofed time: the wall clock itself is implausible
        assert not read_clock_state(fake_chronyc(pps()), wall=lambda: c.wall + 1.9e9).synced
    assert not cc.drain() and cc.corrections == [] and json.loads(path.read_text())["corrections"] == []
    st = cc.status()
    assert st["synced"] is False and st["awaiting_correction"] == 2 and st["implausible"] == 1
    assert "after 2056-01-01" in st["implausible_reason"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "reason=" in warned[0] and "GNSS_antenna" in warned[0], warned
    # the spoof ends, chrony is synced to the real sky: the runs kept open are corrected then
    c.tick(10)
    doc = cc.observe(read_clock_state(fake_chronyc(pps("3600.25")), wall=lambda: c.wall))
    assert doc is not None and [(s["first_seq"], s["last_seq"], s["offset_s"]) for s in doc["segments"]] == \
        [(1, 2, 3600.25)]
    assert verify_correction(doc, key.public_key()) and "first_wall" not in doc["segments"][0]
    assert cc.status()["implausible_reason"] == "" and cc.status()["implausible"] == 1


def test_a_large_offset_after_a_boot_at_1970_is_the_right_one(tmp_path: Path) -> None:
    """No saved time (first boot, a new SD card): the Pi starts at 1970 and chrony corrects it by 56 years."""
    key, c = Ed25519PrivateKey.generate(), Clocks()
    c.mono, c.wall = 12.0, 12.0
    cc = corrections(tmp_path / "clock.json", c, key)
    cc.note(1, "r1", synced=False)
    c.tick(600)
    cc.note(2, "r2", synced=False)
    c.tick(30)
    st = read_clock_state(fake_chronyc(pps(f"{TRUE_NOW - c.wall:.9f}")), wall=lambda: c.wall)
    assert st.synced and st.source == "gnss" and not st.implausible
    doc = cc.observe(st)
    assert doc is not None and verify_correction(doc, key.public_key())
    [seg] = doc["segments"]
    assert (seg["first_seq"], seg["last_seq"]) == (1, 2) and seg["offset_s"] == round(TRUE_NOW - c.wall, 3)
    assert seg["offset_s"] > 56 * 365 * 86400 and cc.status()["implausible"] == 0


def test_a_correction_moving_a_run_before_the_release_is_refused(tmp_path: Path) -> None:
    """The clock now is plausible (just after the floor) but the run's first record would land before it: both
    ends are checked, not only the time now."""
    from firmware.wire.clock_correction import NOT_BEFORE

    key, c = Ed25519PrivateKey.generate(), Clocks()
    c.mono, c.wall = 12.0, 12.0
    cc = corrections(tmp_path / "clock.json", c, key)
    cc.note(1, "r1", synced=False)
    c.tick(7200)  # two hours of enrollments on the 1970 clock
    cc.note(2, "r2", synced=False)
    st = ClockState(True, "gnss", correction_s=NOT_BEFORE + 60 - c.wall)  # "now" is a minute after the floor
    assert cc.observe(st) is None and cc.observe(st) is None
    status = cc.status()
    assert status["synced"] is True and status["implausible"] == 1 and status["awaiting_correction"] == 2
    assert "segment=1..2" in status["implausible_reason"] and "record r1" in status["implausible_reason"]
    assert "before 2026-01-01" in status["implausible_reason"] and cc.drain() == []
