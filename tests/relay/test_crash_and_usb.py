"""Kit killed with SIGKILL mid-transfer; USB import next to the MQTT path; the import CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from firmware import config
from firmware.capture.simulated import SimulatedCapture
from firmware.seal import identity
from firmware.store.store import Store
from provisioning import cli as fleet_cli
from provisioning.archive import Archive
from tests.relay.conftest import FAST_RELAY, KitUnderTest, assert_delivered_once, kit_config, wait_for
from tests.support import render_toml

REPO = Path(__file__).resolve().parents[2]


def _toml(cfg: config.Config) -> str:
    return render_toml(cfg.raw)  # the one TOML writer of the tests (inline tables too)


def test_kit_killed_mid_transfer_and_restarted(mosquitto, make_ingest, tmp_path, dc_pub):
    make_ingest(mosquitto.url)
    root = tmp_path / "kit"
    cfg = kit_config(root, dc_pub, [mosquitto.url], bytes_per_s=1_000_000, chunk_kb=32, ack_timeout_s=3.0)
    ident = identity.load_or_create(cfg.state_dir)
    with Store(cfg, ident) as store:
        cap = SimulatedCapture(None, seed=5, pad_to=150_000)
        ids = [store.commit(cap.capture().encode()).record_id for _ in range(24)]
    conf = root / "rekam.toml"
    conf.write_text(_toml(cfg))
    cmd = [sys.executable, "-m", "firmware.relay", "--config", str(conf)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    archive = Archive(tmp_path / "archive")
    try:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: archive.count() >= 4, 30, "some records archived before the kill")
        finally:
            p.send_signal(signal.SIGKILL)  # no clean shutdown: chunks in flight, marks unflushed
            p.wait(10)
        assert archive.count() < 24, "the drain finished before the kill; slow it down"
        p = subprocess.Popen(cmd + ["--exit-when-drained"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        try:
            assert p.wait(60) == 0, p.stderr.read().decode()[-2000:] if p.stderr else ""
        finally:
            if p.poll() is None:
                p.kill()
    finally:
        archive.close()
    with Store(cfg, identity.load(cfg.state_dir)) as store:
        assert_delivered_once(KitUnderTest(cfg, store), tmp_path / "archive", ids)


def _stick_kit(make_kit, url: str) -> KitUnderTest:
    kit = make_kit([url], name="stick-kit")
    return kit


def test_usb_import_is_idempotent_with_mqtt(mosquitto, make_kit, make_ingest, tmp_path):
    (tmp_path / "stick-kit" / "usb").mkdir(parents=True)  # a present stick (plain folder in simulation)
    make_ingest(mosquitto.url)
    kit = _stick_kit(make_kit, mosquitto.url)
    assert kit.store.stick is not None
    ids = kit.capture(10)
    kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 10, 20, "all acked over MQTT")
    kit.stop_relay()
    more = kit.capture(3)  # captured after the uplink died: only on the stick and the SD
    kit.store.eject()
    stick = tmp_path / "stick-kit" / "usb"
    archive = Archive(tmp_path / "archive")
    try:
        from provisioning.usb_import import import_stick

        s = import_stick(stick, archive, progress=False)
        assert (len(s.new), len(s.already), s.rejected) == (3, 10, [])
        s2 = import_stick(stick / "rekam" / kit.kit_id, archive, progress=False)  # twice, via the kit folder
        assert (len(s2.new), len(s2.already), s2.rejected) == (0, 13, [])
        archived = archive.record_ids(kit.kit_id)
        assert sorted(archived) == sorted(ids + more)
        assert len(list((tmp_path / "archive" / "records" / kit.kit_id).glob("*.rkm"))) == 13
        assert all(archive.has(r) == kit.store.j.get(r).sha256 for r in ids + more)
    finally:
        archive.close()


def test_usb_import_of_stick_with_a_corrupted_record(make_kit, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REKAM_LANG", "en")  # this test reads rekam-fleet's English report
    (tmp_path / "stick-kit" / "usb").mkdir(parents=True)
    kit = make_kit(["mqtt://127.0.0.1:1"], name="stick-kit")  # never connects: the stick is the only way
    ids = kit.capture(6)
    kit.store.eject()
    kdir = tmp_path / "stick-kit" / "usb" / "rekam" / kit.kit_id
    bad = kdir / "records" / f"{ids[3]}.rkm"
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0x01  # inside the signature
    bad.write_bytes(bytes(data))
    (kdir / "records" / f"{ids[5]}.rkm").write_bytes(bad.read_bytes()[:1000])  # a torn copy
    arch = tmp_path / "archive"
    # Unknown kit without --tofu: refused with the command to run.
    rc = fleet_cli.main(["import", str(tmp_path / "stick-kit" / "usb"), "--archive", str(arch), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "not registered" in out and "register-kit" in out
    assert fleet_cli.main(["archive", "register-kit", kit.kit_id, kit.public_key, "--archive", str(arch)]) == 0
    capsys.readouterr()
    rc = fleet_cli.main(["import", str(tmp_path / "stick-kit" / "usb"), "--archive", str(arch), "--json",
                         "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert summary["new"] == 4 and summary["already_had"] == 0
    reasons = {r["record"]: r["reason"] for r in summary["rejected"]}
    assert set(reasons) == {ids[3], ids[5]}
    assert "BadSignature" in reasons[ids[3]] and "Truncated" in reasons[ids[5]]
    a = Archive(arch)
    try:
        assert sorted(a.record_ids(kit.kit_id)) == sorted(set(ids) - {ids[3], ids[5]})
    finally:
        a.close()


def test_fast_relay_settings_are_valid_config():
    # The test timers must stay inside the schema's limits (validate raises otherwise).
    config.validate({"relay": {"brokers": ["mqtt://127.0.0.1:1883"], **FAST_RELAY}})


def test_records_already_imported_from_usb_are_not_sent_again(mosquitto, make_kit, make_ingest, tmp_path):
    (tmp_path / "stick-kit" / "usb").mkdir(parents=True)
    kit = make_kit([mosquitto.url], name="stick-kit", chunk_kb=16, bytes_per_s=400_000)
    ids = kit.capture(4, size=250_000)  # ~16 chunks each
    kit.store.eject()
    archive = Archive(tmp_path / "archive", tofu=True)
    from provisioning.usb_import import import_stick

    assert len(import_stick(tmp_path / "stick-kit" / "usb", archive, tofu=True, progress=False).new) == 4
    archive.close()
    w = make_ingest(mosquitto.url)
    kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 4, 20, "acked by announce")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    # The announce got a 'duplicate' ack, so the relay stopped sending the rest of each record.
    assert w.counters.chunks < 4 * 16 // 2, f"{w.counters.chunks} chunks sent for records the center already had"
