"""The shared set-up helpers (tests/support.py) do what the other tests rely on."""

from __future__ import annotations

import json
import os
import socket
import tomllib
from pathlib import Path

import pytest

from firmware import config
from firmware.wire import record_format
from tests.support import Mosquitto, Rekamd, free_port, rekam, subprocess_env, wait_for, write_daemon_config


def test_wait_for_returns_the_value_and_names_what_timed_out() -> None:
    calls: list[int] = []
    assert wait_for(lambda: calls.append(1) or len(calls) >= 3 and "done", 5, step=0) == "done"
    with pytest.raises(AssertionError, match=r"timed out after 0.1 s waiting for the moon"):
        wait_for(lambda: False, 0.1, "the moon")


def test_free_port_can_be_bound() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_broker_with_claim_listener_listens_on_both_ports(mosquitto_factory) -> None:
    b = mosquitto_factory(claim_listener=True)
    assert b.claim_port and b.claim_port != b.port and b.url == f"mqtt://127.0.0.1:{b.port}"
    for port in b.ports:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    b.restart()
    assert b.running
    b.stop()
    assert not b.running


def test_broker_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    b = Mosquitto(tmp_path / "m", extra="no_such_option 1\n")
    with pytest.raises(pytest.fail.Exception, match="no_such_option"):
        b.start(timeout=5)
    assert not b.running


def test_sim_config_merges_sections_and_loads(tmp_path: Path) -> None:
    cfg = write_daemon_config(tmp_path, tmp_path / "dc.pub", tmp_path / "corpus", "[camera]\nbackend = \"sim\"\n",
                              kit={"site": "x"}, usb={"poll_seconds": 1.0})
    doc = tomllib.loads(cfg.read_text())
    assert doc["kit"] == {"state_dir": str(tmp_path / "sd"), "site": "x"}
    assert doc["usb"]["poll_seconds"] == 1.0 and doc["camera"] == {"backend": "sim"}
    assert (tmp_path / "usb").is_dir()
    (tmp_path / "dc.pub").write_bytes(record_format.generate_datacenter_keypair()[1])
    assert config.load(cfg).state_dir == tmp_path / "sd"


def _sim_config(tmp_path: Path, corpus: Path) -> Path:
    (tmp_path / "dc.pub").write_bytes(record_format.generate_datacenter_keypair()[1])
    return write_daemon_config(tmp_path, tmp_path / "dc.pub", corpus)


def test_rekamd_comes_up_answers_the_cli_and_stops(tmp_path: Path, corpus_dir: Path, rekamd_factory) -> None:
    cfg = _sim_config(tmp_path, corpus_dir)
    d = rekamd_factory(cfg)
    assert d.running and d.url.startswith("http://127.0.0.1:") and d.state_dir == tmp_path / "sd"
    r = rekam("status", "--json", cfg=cfg)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["daemon"]["simulation"] is True
    assert d.stop(10) == 0 and not d.running
    assert "stopped" in d.log_text()
    d.start()  # again, on the same log
    assert d.running and d.log_text().count("stopped") == 1


def test_rekamd_that_exits_at_start_fails_with_its_log(tmp_path: Path) -> None:
    cfg = tmp_path / "rekam.toml"
    cfg.write_text(f'[kit]\nstate_dir = "{tmp_path / "sd"}"\n[store]\nreserve_floor_mb = "lots"\n')
    d = Rekamd(cfg, tmp_path / "rekamd.log")
    with d, pytest.raises(pytest.fail.Exception, match=r"(?s)exited with 78.*lots"):
        d.start(timeout=30)
    assert not d.running


def test_rekam_runs_the_checkout_without_a_stray_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REKAM_CONFIG", str(tmp_path / "nowhere.toml"))
    env = subprocess_env({"EXTRA": "1", "HOME": None})
    assert "REKAM_CONFIG" not in env and "HOME" not in env and env["EXTRA"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parent.parent)
    r = rekam("--help")
    assert r.returncode == 0 and "--config" in r.stdout  # the help, in whatever language the kit speaks
