"""`rekam-fleet` commands (ca, kits, config, cmd, status) and their errors, through provisioning.cli.main."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from firmware.system import i18n
from provisioning import cli


@pytest.fixture(autouse=True)
def _english(monkeypatch) -> Iterator[None]:
    monkeypatch.setenv("REKAM_LANG", "en")  # these checks read the English text (Indonesian is the default)
    yield
    i18n.set_language(i18n.DEFAULT_LANGUAGE)  # main() set the process's language: leave the default behind


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fleet_cli_offline(tmp_path, capsys) -> None:
    d = str(tmp_path / "fleet")
    rc, out, _ = run(capsys, "ca", "init", "--data", d, "--host", "broker.example.org", "--broker",
                     "broker.example.org:8883", "--claim-broker", "broker.example.org:8884", "--batch", "b7")
    assert rc == 0 and "fleet key" in out
    conf = (tmp_path / "fleet" / "broker" / "mosquitto.conf").read_text()
    assert "use_identity_as_username true" in conf and "crlfile" in conf and "{{" not in conf
    assert (tmp_path / "fleet" / "ca" / "claim-b7.crt").exists()
    assert (tmp_path / "fleet" / "fleet-signing.key").stat().st_mode & 0o077 == 0
    rc, _, err = run(capsys, "ca", "init", "--data", d, "--host", "x")
    assert rc == 1 and "refusing to replace" in err
    rc, _, err = run(capsys, "kits", "approve", "rk-nobody", "--data", d)
    assert rc == 1 and "no claim from rk-nobody" in err
    rc, out, _ = run(capsys, "kits", "issue", "rk-bench1", "--out", str(tmp_path / "bench"), "--data", d)
    assert rc == 0 and (tmp_path / "bench" / "kit.crt").exists()
    # A kit that claimed (made by hand here) so configs can be signed for it.
    from provisioning.registry import Fleet

    f = Fleet(tmp_path / "fleet")
    f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES ('rk-clikit1', 'AAAA', "
                 "'approved', 0)")
    rc, out, _ = run(capsys, "config", "push", "rk-clikit1", "--set", "operators.max_failures=7", "--offline",
                     "--data", d)
    assert rc == 0 and "config v1" in out
    rc, out, _ = run(capsys, "config", "push", "rk-clikit1", "--set", "daemon.log_level=debug", "--offline",
                     "--data", d)
    assert rc == 0 and "config v2" in out
    rc, out, _ = run(capsys, "config", "rollback", "rk-clikit1", "--offline", "--data", d)
    assert rc == 0 and "config v3" in out
    key = tmp_path / "dc-2027.pub"
    key.write_text("-----BEGIN PUBLIC KEY-----\n...\n")
    rc, out, _ = run(capsys, "config", "push", "rk-clikit1", "--attach", str(key), "--set",
                     'datacenter.public_key_files=["dc-2027.pub"]', "--offline", "--data", d)
    assert rc == 0 and "config v4" in out
    rc, out, _ = run(capsys, "config", "push", "rk-clikit1", "--set", "daemon.log_level=info", "--offline",
                     "--data", d)
    assert rc == 0 and "config v5" in out
    from firmware.wire import control_protocol as cp

    body, _, _ = cp.decode(f.latest_config("rk-clikit1")[1], "config")
    assert body["files"] == {"dc-2027.pub": key.read_text()}  # carried over with the sections
    assert body["sections"]["datacenter"] == {"public_key_files": ["dc-2027.pub"]}
    rc, out, _ = run(capsys, "config", "show", "rk-clikit1", "--data", d)
    versions = json.loads(out)["versions"][:3]
    # v2 merged onto v1; the rollback re-issues v1's sections as v3.
    assert versions[1]["sections"] == {"operators": {"max_failures": 7}, "daemon": {"log_level": "debug"}}
    assert versions[2]["sections"] == {"operators": {"max_failures": 7}} and "rollback to v1" in versions[2]["note"]
    rc, out, _ = run(capsys, "kits", "list", "--data", d)
    assert rc == 0 and "rk-clikit1" in out
    rc, out, _ = run(capsys, "status", "--data", d)
    assert rc == 0 and "rk-clikit1" in out and "never" in out
    rc, _, err = run(capsys, "kits", "revoke", "rk-clikit1", "--offline", "--data", d)
    assert rc == 0
    rc, _, err = run(capsys, "config", "push", "rk-clikit1", "--set", "daemon.log_level=info", "--offline",
                     "--data", d)
    assert rc == 1 and "revoked" in err


def test_cmd_send_through_the_broker(online_kit, fleet, capsys) -> None:
    kid = online_kit.identity.kit_id
    rc, out, _ = run(capsys, "cmd", "send", kid, "status", "--data", str(fleet.data), "--wait", "10")
    assert rc == 0 and json.loads(out)["ok"] is True
    rc, out, _ = run(capsys, "cmd", "send", kid, "sync", "--data", str(fleet.data), "--wait", "10")
    assert rc == 2 and json.loads(out)["code"] == "no_relay"
    rc, out, _ = run(capsys, "status", "--data", str(fleet.data), "--json")
    assert any(r["kit_id"] == kid and r["online"] == "online" for r in json.loads(out))


def test_config_push_through_the_broker(online_kit, fleet, capsys) -> None:
    from .conftest import wait_event

    kid = online_kit.identity.kit_id
    rc, out, _ = run(capsys, "config", "push", kid, "--set", "control.telemetry_interval_s=2.5", "--data",
                     str(fleet.data))
    assert rc == 0 and "published (retained) to 1 kit\n" in out
    v = int(out.split("config v")[1].split()[0])
    wait_event(fleet, kid, v, "applied")
    rc, out, _ = run(capsys, "config", "show", kid, "--data", str(fleet.data))
    assert json.loads(out)["kit_reports"]["running"] == v


def test_fleet_link_reports_refused_publishes(fleet, broker) -> None:
    from provisioning.fleet_link import FleetLink

    link = FleetLink(fleet, "fleet-refusal-probe").start()
    try:
        link.publish("outside/rekam", b"x")  # the fleet identity only has rekam/v1/#
        link.publish("rekam/v1/rk-refusal1/config", b"", retain=True)
        assert link.flush() == [("outside/rekam", "Not authorized")]
    finally:
        link.close()
