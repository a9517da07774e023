"""Power, position and clock in the kit's signed telemetry, as the fleet receives it (issue #18): a real broker,
the fleet service, a claimed kit whose control plane publishes; the power guard reads the simulated battery,
the position comes from the simulated receiver, the clock part is the real corrections bookkeeping."""

from __future__ import annotations

import json
from typing import Any

from firmware import config
from firmware.daemon import GnssService
from firmware.enrollment.power import PowerGuard
from firmware.system.clock import ClockCorrections, ClockState
from firmware.wire import clock_correction
from hw.power import PowerMonitor, SimulatedPower
from tests.provisioning.conftest import push_config, wait_event
from tests.support import wait_for


def test_telemetry_carries_power_position_and_clock(online_kit: Any, fleet: Any, tmp_path: Any) -> None:
    k = online_kit
    cfg = config.defaults(power={"enabled": True, "gauge": "sim", "warn_percent": 30.0, "critical_percent": 5.0},
                          gnss={"enabled": True, "backend": "sim"})
    guard = PowerGuard(PowerMonitor(SimulatedPower(25.0)), cfg.power, lambda: k.enrollment, lambda code: None)
    guard.tick()  # one reading: 25 % is at or below warn
    key = k.identity.signing_key  # the daemon signs corrections with the kit key
    clock = ClockCorrections(tmp_path / "clock.json", k.identity.kit_id, lambda body: clock_correction.sign(body, key))
    clock.note(1, "r1", synced=False)
    clock.observe(ClockState(True, "gnss"))
    k.services.update({"power": guard, "gnss": GnssService(cfg, True), "clock": clock})
    kid = k.identity.kit_id

    def telemetry() -> dict[str, Any] | None:
        row = fleet.kit(kid)
        t = json.loads(row["telemetry"]) if row and row["telemetry"] else {}
        return t if "power" in t else None

    t = wait_for(telemetry, 15, "telemetry with the power part")
    assert t["power"]["level"] == "warn" and t["power"]["code"] == "power_low" and t["power"]["percent"] == 25.0
    assert t["power"]["source"] == "sim" and t["power"]["power_lost"] is False
    assert t["position"]["fix"] == "3d" and t["position"]["lat"] == -6.9147
    assert t["clock"]["synced"] is True and t["clock"]["source"] == "gnss"
    assert t["clock"]["corrections"][0]["segments"][0]["first_seq"] == 1
    assert "power" not in t["health"] and "clock" not in t["health"]  # once, under their own keys
    # The fleet registry kept the kit's correction, verified with the kit's registered key (the export applies it).
    kept = wait_for(lambda: fleet.clock_corrections(kid), 15, "the correction kept by the fleet registry")
    assert [(s["first_seq"], s["last_seq"]) for s in kept[0]["segments"]] == [(1, 1)]
    assert kept[0]["source"] == "gnss" and kept[0]["verified_key"].startswith("current:")


def test_fleet_config_cannot_set_the_commands_the_kit_runs(online_kit: Any, fleet: Any, fleet_link: Any) -> None:
    """A signed config may tune [power] and [gnss], but not the commands rekamd runs (no remote code execution
    with the fleet key)."""
    k, kid = online_kit, online_kit.identity.kit_id
    assert k.control is not None
    for sections, why in (({"power": {"shutdown_command": ["sh", "-c", "id"]}}, "power.shutdown_command"),
                          ({"gnss": {"chrony_command": ["sh", "-c", "id"]}}, "gnss.chrony_command")):
        v = push_config(fleet, fleet_link, kid, sections)
        ev = wait_event(fleet, kid, v, "rejected")
        assert f"{why} cannot be set remotely" in ev["reason"], ev
    v = push_config(fleet, fleet_link, kid, {"power": {"warn_percent": 30.0}})  # the levels are the fleet's to tune
    wait_event(fleet, kid, v, "pending_restart")


def test_the_fleet_hears_of_a_power_stop_before_the_kit_goes(online_kit: Any, fleet: Any) -> None:
    k, kid = online_kit, online_kit.identity.kit_id
    cfg = config.defaults(power={"enabled": True, "gauge": "sim", "critical_percent": 8.0}).power
    stops: list[str] = []
    guard = PowerGuard(PowerMonitor(SimulatedPower(5.0)), cfg, lambda: k.enrollment, stops.append,
                       lambda: k.control.telemetry_soon(wait_s=3.0))
    k.services["power"] = guard
    guard.tick()  # critical, nothing under way: lock, tell the fleet, stop
    assert stops == ["power_critical"] and k.enrollment.power_lock == "power_critical"

    def stopping() -> dict[str, Any] | None:
        row = fleet.kit(kid)
        t = json.loads(row["telemetry"]) if row and row["telemetry"] else {}
        return t if t.get("power", {}).get("stopping") else None

    t = wait_for(stopping, 5, "telemetry saying the kit is stopping")  # already sent: no new interval needed
    assert t["power"]["level"] == "critical" and t["power"]["code"] == "power_critical"
