"""rekamd with [relay] brokers: the relay starts with the daemon, drains, shows in `rekam status`, stops cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.relay.conftest import wait_for
from tests.support import write_daemon_config

REPO = Path(__file__).resolve().parents[2]


def rekam(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", "--config", str(cfg), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_daemon_runs_the_relay(mosquitto, make_ingest, tmp_path, dc_pub, corpus_dir):
    make_ingest(mosquitto.url)
    cfg = write_daemon_config(tmp_path, dc_pub, corpus_dir, f"""
[relay]
brokers = ["mqtt://127.0.0.1:1", "{mosquitto.url}"]
ack_timeout_s = 2.0
backoff_min_s = 0.1
backoff_max_s = 0.5
""")
    (tmp_path / "usb").rmdir()  # no stick: acked records stay on the SD (not purged), as this test counts them
    p = subprocess.Popen([sys.executable, "-m", "firmware.daemon", "--config", str(cfg), "--sim"],
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lambda: (tmp_path / "sd" / "api.json").exists() or p.poll() is not None, 30, "rekamd up")
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        r = rekam(cfg, "sim", "commit", "3", "--json")
        assert r.returncode == 0, r.stderr

        def status() -> dict:
            out = rekam(cfg, "status", "--json")
            return json.loads(out.stdout)

        wait_for(lambda: status()["records"]["acked"]["records"] == 3, 30, "records acked through rekamd", step=0.5)
        st = status()
        assert st["relay"]["state"] == "connected" and st["relay"]["broker"] == mosquitto.url
        assert st["relay"]["broker_priority"] == 1  # the first broker does not exist
        text = rekam(cfg, "status").stdout
        assert f"uplink: connected to {mosquitto.url} (priority 1)" in text
        assert "acked 3" in text
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert p.wait(10) == 0
        assert time.monotonic() - t0 < 6
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
