"""kill -9 a process writing records at random moments; every confirmed record must survive intact."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from firmware.seal import identity
from firmware.store.store import Store
from firmware.wire import record_format
from tests.faults.harness import Ledger, wait_ready, writer
from tests.store.conftest import make_config

ROUNDS = 12  # bounded: ~1 s each; longer campaigns: bench/bench_faults.py


def test_kill_minus_nine_loses_nothing_confirmed(tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    rng = random.Random(1234)
    state, usb = tmp_path / "sd", tmp_path / "usb"
    usb.mkdir()
    led = Ledger(state, usb, dc_keys["pub_path"])  # the fault harness's child and confirmation rules
    for _ in range(ROUNDS):
        child = writer(state, usb, dc_keys["pub_path"])
        assert wait_ready(child)
        time.sleep(rng.uniform(0.02, 0.4))
        child.kill()
        led.read_child(child)
    confirmed = led.confirmed
    assert len(confirmed) > ROUNDS  # the writer did make progress between kills
    cfg = make_config(tmp_path, dc_keys["pub_path"])
    s = Store(cfg, identity.load_or_create(cfg.state_dir))
    s.open()
    try:
        for rid, (sha, mirrored) in confirmed.items():
            row = s.j.get(rid)
            assert row is not None and row.state == "stored", rid
            assert record_format.sha256_hex(s.sd_path(rid).read_bytes()) == sha
            if mirrored:
                assert record_format.sha256_hex(s.stick.record_path(rid).read_bytes()) == sha
        assert not list((state / "records").glob("*.tmp"))
        assert not list(s.stick.records_dir.glob("*.tmp"))
        # Every file left on the SD is journaled (adopted) or was quarantined, never silently dropped.
        on_disk = {p.name[:-4] for p in (state / "records").glob("*.rkm")}
        journaled = {r.id for r in s.j.records()}
        assert on_disk <= journaled
        seqs = [r.seq for r in s.j.records()]
        assert len(seqs) == len(set(seqs))
        s.backfill()  # open() never backfills (the USB watcher does, in the background)
        assert s.status()["mirror_lag"]["records"] == 0
    finally:
        s.close()
