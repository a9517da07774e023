"""rekamd with [relay] brokers: the relay starts with the daemon, drains, shows in `rekam status`, stops cleanly."""

from __future__ import annotations

import json
import signal
import time

from tests.relay.conftest import ACK_PUB, wait_for
from tests.support import rekam, write_daemon_config

EN = {"REKAM_LANG": "en"}  # these checks read the CLI's English text (the kit speaks Indonesian by default)


def test_daemon_runs_the_relay(mosquitto, make_ingest, rekamd_factory, tmp_path, dc_pub, corpus_dir):
    make_ingest(mosquitto.url)
    cfg = write_daemon_config(tmp_path, dc_pub, corpus_dir, f"""
[relay]
brokers = ["mqtt://127.0.0.1:1", "{mosquitto.url}"]
ack_timeout_s = 2.0
backoff_min_s = 0.1
backoff_max_s = 0.5
ack_public_keys = ["{ACK_PUB}"]
""")
    (tmp_path / "usb").rmdir()  # no stick: acked records stay on the SD (not purged), as this test counts them
    p = rekamd_factory(cfg, timeout=30).proc  # stopped at teardown whatever happens
    r = rekam("sim", "commit", "3", "--json", cfg=cfg)
    assert r.returncode == 0, r.stderr

    def status() -> dict:
        out = rekam("status", "--json", cfg=cfg)
        return json.loads(out.stdout)

    wait_for(lambda: status()["records"]["acked"]["records"] == 3, 30, "records acked through rekamd", step=0.5)
    st = status()
    assert st["relay"]["state"] == "connected" and st["relay"]["broker"] == mosquitto.url
    assert st["relay"]["broker_priority"] == 1  # the first broker does not exist
    text = rekam("status", cfg=cfg, env=EN).stdout
    assert f"uplink: connected to {mosquitto.url} (priority 1)" in text
    assert "acked 3" in text
    p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert p.wait(10) == 0
    assert time.monotonic() - t0 < 6
