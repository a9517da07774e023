"""rekamd as a real process: start, API, CLI through it, SIGTERM within 5 s with nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import Rekamd, rekam, write_daemon_config

EN = {"REKAM_LANG": "en"}  # these checks read the CLI's English text (the kit speaks Indonesian by default)


@pytest.fixture
def daemon(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path, rekamd_factory: Any) -> tuple[Rekamd, Path, Path]:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    return rekamd_factory(cfg, timeout=30), cfg, tmp_path


def test_cli_through_daemon_and_clean_stop(daemon: tuple[Rekamd, Path, Path]) -> None:
    d, cfg, root = daemon
    p = d.proc
    r = rekam("sim", "commit", "3", "--json", cfg=cfg)
    assert r.returncode == 0, r.stderr
    ids = [d["record_id"] for d in json.loads(r.stdout)]
    assert len(ids) == 3
    r = rekam("status", "--json", cfg=cfg)
    st = json.loads(r.stdout)
    assert st["records"]["stored"]["records"] == 3 and st["daemon"]["simulation"] is True
    assert st["guard"]["level"] == "OK" and st["mirror_lag"]["records"] == 0
    # One supervisor runs the services, in data-path order, and reports each one.
    svcs = st["daemon"]["services"]
    assert list(svcs) == ["store", "clock", "enrollment", "usb", "api", "watchdog"]
    assert all(v["state"] == "running" and v["restarts"] == 0 and v["last_error"] == "" for v in svcs.values())
    r = rekam("status", cfg=cfg, env=EN)
    assert "capture: OK" in r.stdout and "stored 3" in r.stdout
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 5
    assert "stopped" in d.log_text()


def test_sigterm_during_commits_leaves_nothing_half_written(daemon: tuple[Rekamd, Path, Path]) -> None:
    d, cfg, root = daemon
    p = d.proc
    out: dict[str, Any] = {}

    def commit() -> None:
        out["r"] = rekam("sim", "commit", "200", "--json", cfg=cfg)

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
    r = rekam("sim", "commit", "2", cfg=cfg, env=EN)
    assert r.returncode == 0 and r.stdout.count("captured ") == 2, r.stderr
    r = rekam("records", "--json", cfg=cfg)
    assert len(json.loads(r.stdout)) == 2
    r = rekam("status", cfg=cfg, env=EN)
    assert "daemon: not running" in r.stdout
    assert os.stat(tmp_path / "sd" / "identity" / "kit.key").st_mode & 0o777 == 0o600
