"""`rekam-fleet ingest` as a real process: unknown kit -> retry acks, register it, then everything is stored."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ingest_exits_within_2s_of_sigint_with_transfers_in_flight(mosquitto, make_kit, tmp_path, ack_key_file,
                                                                    sig):
    # Issue 17: bench_relay.py crashed because workers did not exit within 10 s of SIGINT. Two processes of two
    # workers each share one archive and staging.db (the contended case), with transfers staged half-way.
    # SIGTERM (systemd's stop) must be the same clean exit (exit 0, DISCONNECT sent), not a kill.
    arch = tmp_path / "archive"
    procs = [subprocess.Popen([sys.executable, "-m", "provisioning.cli", "ingest", "--broker", mosquitto.url,
                               "--archive", str(arch), "--workers", "2", "--tofu", "--ack-key", str(ack_key_file)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        kit = make_kit([mosquitto.url], chunk_kb=16, bytes_per_s=6_000_000)
        kit.capture(40, size=200_000)  # ~13 chunks each
        kit.start_relay()
        wait_for(lambda: kit.counts()["acked"] >= 4, 30, "ingest archiving")
        assert kit.counts()["acked"] < 40, "everything already archived: nothing in flight to test"
        t = time.monotonic()
        for p in procs:
            p.send_signal(sig)
        took = []
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            took.append(time.monotonic() - t)
        assert [p.returncode for p in procs] == [0, 0], f"ingest did not exit cleanly after {sig.name}"
        assert max(took) < 2.0, f"ingest took {max(took):.1f} s to exit after {sig.name}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p in procs:
        err = p.stderr.read() if p.stderr else ""
        assert "Traceback" not in err, err[-2000:]
