"""`rekam-fleet ingest` as a real process: unknown kit -> retry acks, register it, then everything is stored."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from provisioning import cli as fleet_cli
from tests.relay.conftest import assert_delivered_once, wait_for

REPO = Path(__file__).resolve().parents[2]


def test_ingest_cli_unknown_kit_then_registered(mosquitto, make_kit, tmp_path, capsys, ack_key_file):
    arch = tmp_path / "archive"
    p = subprocess.Popen([sys.executable, "-m", "provisioning.cli", "ingest", "--broker", mosquitto.url,
                          "--archive", str(arch), "--workers", "2", "--ack-key", str(ack_key_file)],
                         cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        kit = make_kit([mosquitto.url])
        ids = kit.capture(5)
        relay = kit.start_relay()
        wait_for(lambda: kit.counts()["sent"] == 5, 20, "records sent")
        wait_for(lambda: (arch / "index.db").exists(), 10, "archive created")
        # Not registered and no --tofu: nothing is acked, nothing quarantined.
        # (a resend alone proves nothing: chunks sent before the ingest subscribed are resent after the ack
        # timeout; wait for the data center's own "retry" answer)
        wait_for(lambda: relay.status()["counters"]["retry_acks"] >= 1, 20, "a retry ack from the data center")
        assert kit.counts()["acked"] == 0 and kit.counts()["quarantined"] == 0
        assert fleet_cli.main(["archive", "register-kit", kit.kit_id, kit.public_key, "--archive", str(arch)]) == 0
        wait_for(lambda: kit.counts()["acked"] == 5, 30, "all acked once the kit is registered")
        assert_delivered_once(kit, arch, ids)
        capsys.readouterr()
        assert fleet_cli.main(["archive", "kits", "--archive", str(arch)]) == 0
        assert f"{kit.kit_id}" in capsys.readouterr().out
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    err = p.stderr.read() if p.stderr else ""
    assert "is not registered" in err  # the operator is told what to run
