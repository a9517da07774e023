"""The position in each sealed record's manifest and in status (issue #18), against a real `rekamd --sim` with the
simulated receiver; records opened with the data center's key. Off for privacy: no position in the record, the
fix type only in status. From gpsd: implausible values are left out of the sealed position."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from tests.console.conftest import NIK_MALE, enroll
from tests.console.test_enroll_api import fleet_open
from tests.field.test_gnss import FakeGpsd, line
from tests.support import rekam, wait_for


def test_position_sealed_in_the_manifest_and_shown(field_daemon: Any, dc_keys: dict[str, Any],
                                                   tmp_path: Path) -> None:
    d = field_daemon(gnss={"enabled": True, "backend": "sim"},
                     simulation={"gnss_fix": "3d", "gnss_lat": -8.65, "gnss_lon": 115.2167})
    c = d.signin()
    rid = enroll(c, NIK_MALE)["record_id"]
    m = fleet_open(d.sd / "records" / f"{rid}.rkm", dc_keys["key_path"], tmp_path / "opened")
    assert m["schema"] == "rekam.enrollment/3"
    pos = m["position"]
    assert (pos["fix"], pos["lat"], pos["lon"], pos["source"]) == ("3d", -8.65, 115.2167, "sim")
    # the simulator reports a fix every second: its age at sealing is up to ~1 s, more on a loaded machine
    assert pos["satellites_used"] == 9 and pos["accuracy_m"] == 4.0 and 0 <= pos["age_s"] <= 2.5
    st = d.client().get("/api/v1/status").json()
    assert st["gnss"]["fix"] == "3d" and st["gnss"]["lat"] == -8.65
    out = rekam("status", cfg=d.cfg, env={"LANG": "id_ID.UTF-8"})
    assert "-8.65000, 115.21670" in out.stdout, out.stdout


def test_no_fix_is_sealed_as_no_fix(field_daemon: Any, dc_keys: dict[str, Any], tmp_path: Path) -> None:
    d = field_daemon(gnss={"enabled": True, "backend": "sim"}, simulation={"gnss_fix": "none"})
    rid = enroll(d.signin(), NIK_MALE)["record_id"]
    m = fleet_open(d.sd / "records" / f"{rid}.rkm", dc_keys["key_path"], tmp_path / "opened")
    assert m["position"] == {"fix": "none", "reason": "no_fix", "source": "sim"}
    # a manifest of schema /1 (what `rekam sim commit` and earlier versions seal) still opens at the data center
    r = rekam("sim", "commit", "1", "--json", cfg=d.cfg)
    assert r.returncode == 0, r.stderr
    old = next(p for p in (d.sd / "records").glob("*.rkm") if p.stem != rid)
    m1 = fleet_open(old, dc_keys["key_path"], tmp_path / "opened-v1")
    assert m1["schema"] == "rekam.enrollment/1" and "position" not in m1


def test_positions_off_for_privacy(field_daemon: Any, dc_keys: dict[str, Any], tmp_path: Path) -> None:
    d = field_daemon(gnss={"enabled": True, "backend": "sim", "record_position": False, "report_position": False})
    rid = enroll(d.signin(), NIK_MALE)["record_id"]
    m = fleet_open(d.sd / "records" / f"{rid}.rkm", dc_keys["key_path"], tmp_path / "opened")
    assert "position" not in m and m["nik"] == NIK_MALE
    g = d.client().get("/api/v1/status").json()["gnss"]
    assert g["fix"] == "3d" and "lat" not in g and "lon" not in g


def test_implausible_gpsd_values_are_not_sealed(field_daemon: Any, dc_keys: dict[str, Any], tmp_path: Path) -> None:
    # gpsd (its address may come from a remote config) reporting a negative error estimate, a satellite count
    # that is a bool, an altitude of 1e308: the fix is sealed, those values are not
    def script(conn: socket.socket, n: int) -> None:
        conn.sendall(line('{"class":"SKY","uSat":true}')
                     + line('{"class":"TPV","mode":3,"lat":-8.65,"lon":115.2167,"eph":-50,"altMSL":1e308}'))

    g = FakeGpsd(script)
    try:
        d = field_daemon(gnss={"enabled": True, "backend": "gpsd", "host": "127.0.0.1", "port": g.port,
                               "max_age_s": 3600})
        c = d.signin()
        wait_for(lambda: d.client().get("/api/v1/status").json()["gnss"].get("fix") == "3d", 20, "the gpsd fix")
        rid = enroll(c, NIK_MALE)["record_id"]
        m = fleet_open(d.sd / "records" / f"{rid}.rkm", dc_keys["key_path"], tmp_path / "opened")
        pos = m["position"]
        assert (pos["fix"], pos["lat"], pos["lon"], pos["source"]) == ("3d", -8.65, 115.2167, "gpsd"), pos
        assert not {"accuracy_m", "satellites_used", "alt_m"} & pos.keys(), pos
    finally:
        g.close()
