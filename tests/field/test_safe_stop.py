"""Battery-aware safe stop against a real `rekamd --sim` (issue #18): the simulated battery drains to critical
while an enrollment is under way; that enrollment completes and is stored, a new one is refused with the code,
the daemon stops cleanly (the store's clean-shutdown marker), runs the shutdown command (a test double writing a
marker file: never a real poweroff), and starts normally again on a charged battery with nothing lost."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from firmware import config
from firmware.enrollment.power import PowerGuard, assess
from hw.power import PowerReading
from tests.console.conftest import NIK_FEMALE, NIK_MALE, SUPERVISOR, enroll
from tests.field.conftest import clean_marker
from tests.support import rekam, wait_for

GNSS = {"enabled": True, "backend": "sim"}


def power(marker: Path, **kw: Any) -> dict[str, Any]:
    return {"enabled": True, "gauge": "sim", "poll_s": 0.2, "warn_percent": 20.0, "critical_percent": 10.0,
            "finish_grace_s": 30.0, "shutdown_command": ["touch", str(marker)], **kw}


def test_critical_battery_mid_enrollment_finishes_it_refuses_new_stops_cleanly(field_daemon: Any,
                                                                             tmp_path: Path) -> None:
    marker = tmp_path / "poweroff-ran"
    # 10.5 % falling 6 %/min: warn from the start, critical (10 %) 5 s after the kit is up
    d = field_daemon(power=power(marker), gnss=GNSS,
                     simulation={"battery_start_percent": 10.5, "battery_drain_per_min": 6.0})
    c = d.signin()
    r = c.post("/api/v1/enrollment", json={"nik": NIK_MALE})
    assert r.status_code == 200, r.text  # under way before the battery is critical
    st = c.get("/api/v1/status").json()
    assert st["power"]["level"] == "warn" and st["power"]["code"] == "power_low", st["power"]
    assert "Baterai lemah" in st["power"]["message"]  # the kit's language first: Bahasa Indonesia
    enroll(c, NIK_MALE, commit=False, start=False)  # capture everything, stop at review
    st = wait_for(lambda: (s := c.get("/api/v1/status").json())["power"]["level"] == "critical" and s, 15,
                  "the simulated battery to reach critical")
    assert st["power"]["code"] == "power_critical" and "hampir habis" in st["power"]["message"]
    # A new enrollment is refused with the code (another operator, so "busy" cannot answer first) ...
    s = d.signin(SUPERVISOR)
    r = s.post("/api/v1/enrollment", json={"nik": NIK_FEMALE})
    assert r.status_code == 423 and r.json()["detail"]["code"] == "power_critical", r.text
    assert "baterai hampir habis" in r.json()["detail"]["message"]
    # ... the one under way completes and is stored
    r = c.post("/api/v1/enrollment/commit")
    assert r.status_code == 200, r.text
    rid = r.json()["record_id"]
    # then the kit stops by itself: clean exit, store closed cleanly, the shutdown command ran
    wait_for(lambda: not d.rekamd.running, 20, "rekamd to stop after the critical battery")
    assert d.proc.returncode == 77, d.rekamd.log_tail()
    assert marker.exists(), d.rekamd.log_tail()
    assert clean_marker(d.sd) == "1"
    log = d.rekamd.log_text()
    assert "power level changed from=warn to=critical code=power_critical" in log
    assert "power stop done code=power_critical; running shutdown command" in log
    assert [p.stem for p in (d.sd / "records").glob("*.rkm")] == [rid]
    assert [p.stem for p in d.usb.rglob("*.rkm")] == [rid]

    # Power returns: the kit starts as usual, the record is there, enrollments are allowed.
    marker.unlink()
    text = d.cfg.read_text().replace("battery_start_percent = 10.5", "battery_start_percent = 90.0")
    d.cfg.write_text(text.replace("battery_drain_per_min = 6.0", "battery_drain_per_min = 0.0"))
    d.rekamd.start()
    c = d.signin()
    st = c.get("/api/v1/status").json()
    assert st["power"]["level"] == "ok" and st["power"]["message"] == ""
    assert [x["id"] for x in c.get("/api/v1/records").json()] == [rid]
    r = c.post("/api/v1/enrollment", json={"nik": NIK_FEMALE})
    assert r.status_code == 200, r.text
    assert not marker.exists()
    out = rekam("status", cfg=d.cfg).stdout
    assert "baterai: 90 %" in out and "OK" in out, out  # the technician's view, Indonesian first


def test_power_loss_without_enrollment_stops_at_once(field_daemon: Any, tmp_path: Path) -> None:
    marker = tmp_path / "poweroff-ran"
    d = field_daemon(power=power(marker), simulation={"battery_start_percent": 80.0, "power_loss_at_s": 1.0})
    wait_for(lambda: not d.rekamd.running, 15, "rekamd to stop after the power loss")
    assert d.proc.returncode == 77 and marker.exists(), d.rekamd.log_tail()
    assert clean_marker(d.sd) == "1"
    assert "code=power_lost" in d.rekamd.log_text()


def test_an_enrollment_not_finished_within_the_grace_is_cancelled(field_daemon: Any, tmp_path: Path) -> None:
    marker = tmp_path / "poweroff-ran"
    d = field_daemon(power=power(marker, finish_grace_s=1.0),
                     simulation={"battery_start_percent": 10.5, "battery_drain_per_min": 6.0})  # critical at 5 s
    c = d.signin()
    r = c.post("/api/v1/enrollment", json={"nik": NIK_MALE})
    assert r.status_code == 200, r.text  # ... and then the operator walks away
    wait_for(lambda: not d.rekamd.running, 20, "rekamd to stop after the grace")
    assert d.proc.returncode == 77 and marker.exists() and clean_marker(d.sd) == "1"
    assert not list((d.sd / "records").glob("*.rkm"))  # nothing was confirmed, nothing half-stored
    with sqlite3.connect(f"file:{d.sd / 'journal.db'}?mode=ro", uri=True) as db:
        kinds = [row[0] for row in db.execute("SELECT kind FROM audit ORDER BY rowid")]
    assert kinds.index("power_critical") < kinds.index("enrollment_cancel") < kinds.index("power_shutdown")


def test_policy_levels_and_recovery() -> None:
    """The guard's decisions on readings (a charger connected during the grace lifts the lock)."""
    readings = [PowerReading(50.0), PowerReading(19.0), PowerReading(9.0), PowerReading(10.5),
                PowerReading(13.0, charging=True)]
    mon = SimpleNamespace(read=lambda: readings.pop(0))
    enr = SimpleNamespace(power_lock="", active=SimpleNamespace(id="e1", cancel=None))
    stops: list[str] = []
    cfg = config.defaults(power={"poll_s": 0.1, "warn_percent": 20.0, "critical_percent": 10.0}).power
    now = [0.0]
    g = PowerGuard(mon, cfg, lambda: enr, stops.append, clock=lambda: now[0])
    seen = []
    for _ in range(5):
        g.tick()
        seen.append((g.level, g.code, enr.power_lock))
        now[0] += 1.0
    assert seen == [("ok", "", ""), ("warn", "power_low", ""), ("critical", "power_critical", "power_critical"),
                    ("critical", "power_critical", "power_critical"),  # 10.5 % is within the hysteresis
                    ("warn", "power_low", "")]  # charging: back, unlocked
    assert stops == []  # the enrollment under way kept the stop waiting within its grace
    assert assess(PowerReading(80.0, power_lost=True), 20, 10) == ("critical", "power_lost")
    assert assess(PowerReading(None), 20, 10) == ("ok", "")
