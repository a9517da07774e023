"""Issue 19's findings, each reproduced first: numbers never reused after a kill (SD temp, stick-only copy,
journal row lost), no overflow at WARN, a stick smaller than the backlog kept and reported, stick-only files
reconciled. Real kill -9 (tests/store/crash_writer.py), real tmpfs mounts, real SQLite."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from firmware.errors import CaptureHalted
from firmware.seal import identity
from firmware.store.service import UsbWatcher
from firmware.store.store import Store, seq_of
from firmware.system.i18n import use_language
from firmware.wire import record_format
from tests.faults.harness import kit_config, payload, wait_ready, writer
from tests.support import Tmpfs


def open_store(cfg: Any) -> Store:
    s = Store(cfg, identity.load_or_create(cfg.state_dir))
    s.open()
    return s


@pytest.mark.parametrize("point", ["sd_tmp", "stick_only", "journal"])
def test_a_number_seen_on_any_medium_is_never_reused(point: str, tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    sd, usb = tmp_path / "sd", tmp_path / "usb"
    usb.mkdir()
    child = writer(sd, usb, dc_keys["pub_path"], "count=2", "size=5000")
    assert wait_ready(child)
    child.wait()
    child = writer(sd, usb, dc_keys["pub_path"], f"kill={point}", "size=5000")  # SIGKILL at `point`
    assert wait_ready(child)
    assert child.wait() == -9
    names = os.listdir(sd / "records") + [p.name for p in usb.glob("rekam/rk-*/records/*")]
    killed = max(seq_of(n.split(".")[0]) or 0 for n in names if n.startswith("rk-"))
    assert killed == 3, names
    cfg = kit_config(sd, usb, dc_keys["pub_path"])
    # `rekam status` with the daemon stopped: recovers (removes the temp file), closes cleanly.
    s = open_store(cfg)
    s.close()
    # A start killed right after recovery, then SIGTERM-like clean starts: the number still never comes back.
    s = open_store(cfg)
    try:
        r = s.commit(payload(1000))
        assert r.seq > killed
        rows = [x for x in s.records() if x.seq == killed]
        # A complete record on one medium is adopted (verified), not dropped behind the kit's back; with
        # `sd_tmp` the stick copy (written in parallel) may or may not have been complete at the kill.
        assert len(rows) == 1 if point != "sd_tmp" else len(rows) <= 1
        for row in rows:
            assert row.state == "stored"
            data = s.sd_path(row.id).read_bytes()
            assert record_format.sha256_hex(data) == row.sha256
            record_format.parse(data, trusted_kit_key=s.identity.public_key_raw)
        assert not list((sd / "records").glob("*.tmp")) and not list(usb.glob("rekam/*/records/*.tmp"))
    finally:
        s.close()


def test_a_bad_stick_only_file_is_removed_and_its_number_fenced(kit_cfg: Any) -> None:
    s = open_store(kit_cfg)
    s.commit(payload(2000))
    rid = f"{s.identity.kit_id}-00000040-20261201T000000Z"
    planted = s.stick.record_path(rid)
    s.close()
    planted.write_bytes(b"not a record, or a record signed by someone else")
    import sqlite3

    db = sqlite3.connect(kit_cfg.state_dir / "journal.db")
    db.execute("UPDATE meta SET value = '0' WHERE key = 'clean_shutdown'")  # as a kill leaves it
    db.commit()
    db.close()
    s = open_store(kit_cfg)
    try:
        assert not planted.exists()
        assert s.j.get(rid) is None
        assert s.commit(payload(1000)).seq == 41
        assert s.audit_events("usb_orphan_removed")
    finally:
        s.close()


def test_no_overflow_at_warn_a_maximal_record_must_fit(tmp_path: Path, dc_keys: dict[str, Any],
                                                      tmpfs: Tmpfs) -> None:
    """6.7 MiB free beyond nothing, guard at WARN under the old rule, max_record_mb = 8: a 7.2 MiB record must be
    refused (CaptureHalted) before a number is used, not hit ENOSPC (HTTP 500, number gone)."""
    sd = tmpfs.mount(tmp_path / "sdfs", 20 * 1024)
    cfg = kit_config(sd, tmp_path / "usb", dc_keys["pub_path"], max_record_mb=8, warn_records=50,
                     resume_records=5, reserve_records=2)
    s = open_store(cfg)
    try:
        first = s.commit(payload(100_000))
        st = os.statvfs(sd)
        fill = st.f_bavail * st.f_frsize - int(6.7 * 1024 * 1024)
        (sd / "other-data").write_bytes(b"\0" * fill)  # the SD filled by something else, 6.7 MiB left
        with pytest.raises(CaptureHalted, match="^sd penuh: ") as exc:  # the kit's language (id) by default
            s.commit(payload(int(7.2 * 1024 * 1024)))
        assert exc.value.code == "sd_full"
        with pytest.raises(CaptureHalted, match="^sd penuh: ") as exc:
            s.begin()
        assert exc.value.code == "sd_full"
        assert s.status()["guard"]["level"] == "HALT"
        # A reservation taken while there was room does not let it through either (checked before the number).
        (sd / "other-data").unlink()
        held = s.begin()
        (sd / "other-data").write_bytes(b"\0" * fill)
        with use_language("en"), pytest.raises(CaptureHalted, match="^sd is full: "):
            s.commit(payload(int(7.2 * 1024 * 1024)), reservation=held)
        s.release(held)
        (sd / "other-data").unlink()
        assert s.commit(payload(1000)).seq == first.seq + 1  # no number was used up by the refusals
        assert not list(Path(sd).rglob("*.tmp"))
    finally:
        s.close()


def test_stick_smaller_than_backlog_is_filled_to_its_reserve_kept_and_reported(
        tmp_path: Path, dc_keys: dict[str, Any], tmpfs: Tmpfs) -> None:
    sd = tmpfs.mount(tmp_path / "sdfs", 40 * 1024)
    usb = tmp_path / "usb"
    cfg = kit_config(sd, usb, dc_keys["pub_path"], max_record_mb=1, warn_records=5, resume_records=2)
    s = open_store(cfg)
    try:
        for _ in range(14):  # ~7 MiB backlog, no stick
            s.commit(payload(500_000))
        tmpfs.mount(usb, 4 * 1024)  # a 4 MiB stick
        w = UsbWatcher(s, 0.05, auto_purge=True)
        w.start()
        time.sleep(2.0)  # ~40 polls: the old code flapped ~29 times in 7 s
        w.stop()
        assert len(s.audit_events("usb_inserted")) == 1
        assert len(s.audit_events("usb_removed")) == 0
        full = s.audit_events("usb_full")
        assert len(full) == 1
        st = s.status()
        assert st["stick"]["present"] and st["stick"]["full"]
        n = st["stick"]["not_mirrored"]
        assert 0 < n < 14 and n == st["mirror_lag"]["records"]
        assert f"Stik USB penuh: {n} rekaman belum tersalin" in " ".join(st["guard"]["reasons"])
        assert "usb_stick_full" in st["guard"]["codes"] and "no_stick" not in st["guard"]["codes"]
        assert len(st["guard"]["codes"]) == len(st["guard"]["reasons"])
        free = os.statvfs(usb)
        assert free.f_bavail * free.f_frsize >= s.guard.reserve_bytes("usb")  # the reserve stays free
        assert len(s.stick.record_files()) == 14 - n
        for rid in s.stick.record_files():
            assert record_format.sha256_hex(s.stick.record_path(rid).read_bytes()) == s.j.get(rid).sha256
    finally:
        s.close()
