"""rekamd as a real process: start, API, CLI through it, SIGTERM within 5 s with nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_for, write_daemon_config

REPO = Path(__file__).resolve().parents[2]


def rekam(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", "--config", str(cfg), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


@pytest.fixture
def daemon(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path) -> Any:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    p = subprocess.Popen([sys.executable, "-m", "firmware.daemon", "--config", str(cfg), "--sim"],
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
    api = tmp_path / "sd" / "api.json"

    def started() -> bool:
        assert p.poll() is None, p.stderr.read()
        return api.exists()

    wait_for(started, 30, "rekamd to start (its api.json)")
    yield p, cfg, tmp_path
    if p.poll() is None:
        p.kill()
        p.wait()


def test_cli_through_daemon_and_clean_stop(daemon: Any) -> None:
    p, cfg, root = daemon
    r = rekam(cfg, "sim", "commit", "3", "--json")
    assert r.returncode == 0, r.stderr
    ids = [d["record_id"] for d in json.loads(r.stdout)]
    assert len(ids) == 3
    r = rekam(cfg, "status", "--json")
    st = json.loads(r.stdout)
    assert st["records"]["stored"]["records"] == 3 and st["daemon"]["simulation"] is True
    assert st["guard"]["level"] == "OK" and st["mirror_lag"]["records"] == 0
    # One supervisor runs the services, in data-path order, and reports each one.
    svcs = st["daemon"]["services"]
    assert list(svcs) == ["store", "enrollment", "usb", "api", "watchdog"]
    assert all(v["state"] == "running" and v["restarts"] == 0 and v["last_error"] == "" for v in svcs.values())
    r = rekam(cfg, "status")
    assert "capture: OK" in r.stdout and "stored 3" in r.stdout
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 5
    assert "stopped" in p.stderr.read()


def test_sigterm_during_commits_leaves_nothing_half_written(daemon: Any) -> None:
    p, cfg, root = daemon
    out: dict[str, Any] = {}

    def commit() -> None:
        out["r"] = rekam(cfg, "sim", "commit", "200", "--json")

    t = threading.Thread(target=commit)
    t.start()
    time.sleep(1.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == 0
    t.join(60)
    assert not list((root / "sd" / "records").glob("*.tmp"))
    # After the stop the store opens cleanly with nothing to repair.
    from firmware import config
    from firmware.seal import identity
    from firmware.store.store import Store

    s = Store(config.load(cfg), identity.load_or_create(root / "sd"))
    rep = s.open()
    try:
        assert not rep.adopted and not rep.quarantined and not rep.missing and rep.temp_removed == 0
        assert s.j.counts()["stored"]["records"] >= 1
    finally:
        s.close()


def test_cli_without_daemon_opens_store_directly(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path) -> None:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    r = rekam(cfg, "sim", "commit", "2")
    assert r.returncode == 0 and r.stdout.count("captured ") == 2, r.stderr
    r = rekam(cfg, "records", "--json")
    assert len(json.loads(r.stdout)) == 2
    r = rekam(cfg, "status")
    assert "daemon: not running" in r.stdout
    assert os.stat(tmp_path / "sd" / "identity" / "kit.key").st_mode & 0o777 == 0o600
