"""rekamd as a real process with the control plane: claims, answers commands, exits 75 for a config
that needs a restart (systemd restarts it), comes back with it, exits 76 on `reboot`."""

from __future__ import annotations

import json
import signal
import time

from firmware.control.plane import EX_REBOOT, EX_RESTART
from firmware.seal import identity
from provisioning.fleet_ops import send_command
from tests.support import rekam

from .conftest import config_state, push_config, wait_event, wait_for, write_kit_config


def test_rekamd_with_control_plane(tmp_path, fleet, broker, service, fleet_link, corpus_dir, rekamd_factory) -> None:
    root = tmp_path / "kit"
    cfg = write_kit_config(root, fleet, broker, extra=f'[api]\nport = 0\n[simulation]\ncorpus_dir = "{corpus_dir}"\n'
                           'sensor_wire_speed = 0.0\n')
    kid = identity.load_or_create(root / "state").kit_id
    with open(fleet.data / "allowlist.txt", "a") as f:
        f.write(kid + "\n")
    # Every daemon started here is stopped at teardown (rekamd_factory); each logs to its own file.
    p = rekamd_factory(cfg, wait=False).proc
    wait_for(lambda: (fleet.kit(kid) or {"online": None})["online"] == "online", 60, "rekamd claimed and online")
    r = rekam("provision", "status", "--json", cfg=cfg)
    st = json.loads(r.stdout)
    assert st["claimed"] and st["kit_id"] == kid and st["config"]["current"] == 1
    res = send_command(fleet, kid, "status", {}, 60, 15)
    assert res["ok"] and "sensor" in res["data"]["health"] and "control" in res["data"]["health"]
    v = push_config(fleet, fleet_link, kid, {"daemon": {"status_interval_s": 7.0}})
    assert p.wait(timeout=20) == EX_RESTART
    p = rekamd_factory(cfg, wait=False).proc  # what systemd does (RestartForceExitStatus=75 76)
    wait_event(fleet, kid, v, "applied", timeout=60)
    assert config_state(fleet, kid)["running"] == v
    res = send_command(fleet, kid, "reboot", {}, 60, 15)
    assert res["ok"]
    assert p.wait(timeout=20) == EX_REBOOT
    p = rekamd_factory(cfg, wait=False).proc
    wait_for(lambda: fleet.kit(kid)["online"] == "online", 60, "back after reboot")
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    wait_for(lambda: fleet.kit(kid)["online"] == "offline", 10, "retained offline after a clean stop")
