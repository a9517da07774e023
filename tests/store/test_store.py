"""The durable store on real files, real SQLite and real size-limited tmpfs mounts."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from firmware.seal import identity
from firmware.store.capacity import CaptureHalted
from firmware.store.store import Store
from firmware.wire import record_format
from tests.store.conftest import make_config
from tests.support import Tmpfs


def payload(n: int = 300_000, tag: str = "") -> bytes:
    return record_format.Payload({"nik": "3273010101900001", "tag": tag},
                                 [record_format.Attachment("blob", "application/octet-stream", os.urandom(n))]).encode()


def open_store(cfg: Any) -> Store:
    s = Store(cfg, identity.load_or_create(cfg.state_dir))
    s.open()
    return s


def test_commit_is_on_sd_and_stick_and_opens(store: Store, dc_keys: dict[str, Any]) -> None:
    res = store.commit(payload(tag="a"), operator_id="op1")
    assert res.stick_id is not None
    sd = store.sd_path(res.record_id).read_bytes()
    usb = store.stick.record_path(res.record_id).read_bytes()
    assert sd == usb and record_format.sha256_hex(sd) == res.sha256
    hdr, plain = record_format.open_record(sd, dc_keys["sk"], store.identity.public_key_raw)
    assert record_format.Payload.decode(plain).manifest["tag"] == "a" and hdr.seq == 1
    row = store.j.get(res.record_id)
    assert row.state == "stored" and row.operator_id == "op1"
    store.wait_mirror_idle()  # the index line is appended after the commit's answer (issue #17.3)
    index = list(__import__("firmware.store.usb", fromlist=["read_index"]).read_index(store.stick.kit_dir))
    assert [e["record_id"] for e in index] == [res.record_id]
    assert store.status()["mirror_lag"]["records"] == 0


def test_no_stick_then_backfill(kit_cfg: Any) -> None:
    shutil.rmtree(kit_cfg.usb_dir)
    s = open_store(kit_cfg)
    try:
        ids = [s.commit(payload(50_000)).record_id for _ in range(3)]
        st = s.status()
        assert st["mirror_lag"]["records"] == 3 and st["guard"]["level"] == "WARN"
        assert "no_stick" in st["guard"]["codes"]
        assert any("tidak ada stik USB" in r for r in st["guard"]["reasons"])
        kit_cfg.usb_dir.mkdir()
        s.poll_usb()
        assert s.stick is not None
        assert sorted(s.stick.record_files()) == sorted(ids)
        assert s.status()["mirror_lag"]["records"] == 0
    finally:
        s.close()


def test_required_stick_halts_capture(tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    cfg = make_config(tmp_path, dc_keys["pub_path"], usb={"required": True})
    s = open_store(cfg)
    try:
        with pytest.raises(CaptureHalted, match=r"stik wajib ada") as exc:  # Indonesian, the default
            s.begin()
        assert exc.value.code == "stick_required"
    finally:
        s.close()


def test_stick_disappears_mid_mirror(store: Store) -> None:
    """The stick's folder vanishes while records are being written: every commit still succeeds on the SD."""
    results, errors = [], []
    stop = threading.Event()

    def writer() -> None:
        try:
            while not stop.is_set() and len(results) < 400:
                results.append(store.commit(payload(200_000)))
        except Exception:  # pragma: no cover - would fail the test below
            import traceback

            errors.append(traceback.format_exc())

    t = threading.Thread(target=writer)
    t.start()
    while len(results) < 5:
        time.sleep(0.001)
    gone = store.cfg.usb_dir.with_name("usb-pulled")
    store.cfg.usb_dir.rename(gone)  # the stick's folder vanishes at once, as when it is pulled
    n = len(results)
    while len(results) < n + 10 and t.is_alive():
        time.sleep(0.01)
    stop.set()
    t.join(timeout=60)
    assert not errors
    assert store.stick is None
    assert any(r.stick_id is None for r in results) and any(r.stick_id for r in results)
    for r in results:
        assert record_format.sha256_hex(store.sd_path(r.record_id).read_bytes()) == r.sha256
    lag = store.status()["mirror_lag"]["records"]
    assert lag == sum(1 for r in results if r.stick_id is None)
    gone.rename(store.cfg.usb_dir)  # plugged back in
    store.poll_usb()
    assert store.status()["mirror_lag"]["records"] == 0


def test_fill_tmpfs_until_halt_then_swap_stick(tmp_path: Path, dc_keys: dict[str, Any], tmpfs: Tmpfs) -> None:
    sd = tmpfs.mount(tmp_path / "sdfs", 40 * 1024)
    usb = tmpfs.mount(tmp_path / "usbfs", 12 * 1024)
    cfg = make_config(tmp_path, dc_keys["pub_path"], kit={"state_dir": str(sd)}, usb={"mount_point": str(usb)})
    s = open_store(cfg)
    try:
        committed = []
        with pytest.raises(CaptureHalted) as halt:
            for _ in range(200):
                committed.append(s.commit(payload(500_000)))
        assert halt.value.reason.startswith("usb penuh: ") and halt.value.code.startswith("usb_")
        assert 10 <= len(committed) < 24
        # Nothing partial: every confirmed record is whole on both media; no temp files.
        for r in committed:
            assert record_format.sha256_hex(s.sd_path(r.record_id).read_bytes()) == r.sha256
            assert r.stick_id
        assert not list(Path(usb).rglob("*.tmp")) and not list(Path(sd).rglob("*.tmp"))
        assert s.status()["guard"]["level"] == "HALT"
        # Swap in a bigger, empty stick: everything is backfilled and capture resumes.
        s.eject()
        tmpfs.umount(usb)
        tmpfs.mount(usb, 64 * 1024)
        s.poll_usb()
        assert len(s.stick.record_files()) == len(committed)
        more = []
        with pytest.raises(CaptureHalted) as halt:
            for _ in range(200):
                more.append(s.commit(payload(500_000)))
        assert halt.value.reason.startswith("sd penuh: ") and halt.value.code.startswith("sd_") and more
        assert s.status()["records"]["stored"]["records"] == len(committed) + len(more)
    finally:
        s.close()


def test_reservation_lets_a_started_enrollment_finish(tmp_path: Path, dc_keys: dict[str, Any],
                                                      tmpfs: Tmpfs) -> None:
    sd = tmpfs.mount(tmp_path / "sdfs", 16 * 1024)
    cfg = make_config(tmp_path, dc_keys["pub_path"], kit={"state_dir": str(sd)})
    s = open_store(cfg)
    try:
        s.commit(payload(500_000))
        held = []
        with pytest.raises(CaptureHalted):
            for _ in range(100):
                held.append(s.begin())  # enrollments starting; each holds max_record_mb
        assert held
        done = [s.commit(payload(500_000), reservation=r) for r in held]  # all of them can still commit
        for r in done:
            assert record_format.sha256_hex(s.sd_path(r.record_id).read_bytes()) == r.sha256
        assert s.guard.outstanding == 0
    finally:
        s.close()


def test_purge_only_acknowledged_and_mirrored(store: Store) -> None:
    a, b, c = (store.commit(payload(10_000)) for _ in range(3))
    store.mark(a.record_id, "sent")
    store.mark(a.record_id, "acked")
    store.mark(b.record_id, "sent")
    assert store.purge_acknowledged() == 1
    assert not store.sd_path(a.record_id).exists()
    assert store.sd_path(b.record_id).exists() and store.sd_path(c.record_id).exists()
    assert store.j.get(a.record_id).state == "purged"


def test_purge_waits_for_a_stick_copy(kit_cfg: Any) -> None:
    shutil.rmtree(kit_cfg.usb_dir)
    s = open_store(kit_cfg)
    try:
        r = s.commit(payload(10_000))
        s.mark(r.record_id, "acked")
        assert s.purge_acknowledged() == 0 and s.sd_path(r.record_id).exists()
        kit_cfg.usb_dir.mkdir()
        s.poll_usb()
        assert s.purge_acknowledged() == 1
    finally:
        s.close()


def test_recovery_quarantines_tampered_adopts_orphan_restores_missing(kit_cfg: Any) -> None:
    s = open_store(kit_cfg)
    a, b, c = (s.commit(payload(20_000)) for _ in range(3))
    orphan_bytes = s.sd_path(c.record_id).read_bytes()
    s.close()
    # a: tampered on SD (same size) -> caught when read for relay; b: deleted from SD (stick has it);
    # c: the journal row is lost (crash before the journal commit) -> adopted after verification.
    pa = kit_cfg.state_dir / "records" / (a.record_id + ".rkm")
    data = bytearray(pa.read_bytes())
    data[100] ^= 1
    pa.write_bytes(bytes(data))
    (kit_cfg.state_dir / "records" / (b.record_id + ".rkm")).unlink()
    import sqlite3

    db = sqlite3.connect(kit_cfg.state_dir / "journal.db")
    db.execute("DELETE FROM records WHERE id = ?", (c.record_id,))
    db.execute("UPDATE meta SET value = '0' WHERE key = 'clean_shutdown'")  # as a crash leaves it
    db.commit()
    db.close()
    (kit_cfg.state_dir / "records" / "rk-zzzzzzzzzz-00000099-20261129T000000Z.rkm.tmp").write_bytes(b"half")
    junk = kit_cfg.state_dir / "records" / "rk-zzzzzzzzzz-00000050-20261129T000000Z.rkm"
    junk.write_bytes(b"garbage that is not a record")
    s = open_store(kit_cfg)
    try:
        st = s.status()
        assert s.j.get(c.record_id).state == "stored"
        assert s.sd_path(c.record_id).read_bytes() == orphan_bytes
        assert s.sd_path(b.record_id).exists()  # restored from the stick
        assert s.j.get("rk-zzzzzzzzzz-00000050-20261129T000000Z").state == "quarantined"
        assert (kit_cfg.state_dir / "quarantine" / junk.name).exists()  # kept, not deleted
        # The tampered SD copy is quarantined and the stick's verified copy restored (it stayed quarantined before).
        assert record_format.sha256_hex(s.read_verified(a.record_id)) == a.sha256
        assert s.j.get(a.record_id).state == "stored"
        assert list((kit_cfg.state_dir / "quarantine").glob(a.record_id + "*"))
        assert st["records"]["quarantined"]["records"] >= 1
        # The sequence never goes back, even past numbers only seen in temp or quarantined files.
        assert s.commit(payload(1000)).seq == 100
    finally:
        s.close()


def test_second_process_cannot_open_the_same_store(store: Store) -> None:
    from firmware.store.store import StoreLocked

    other = Store(store.cfg, store.identity)
    with pytest.raises(StoreLocked, match="in use by another process"):
        other.open()


def test_ejected_stick_is_not_readopted_but_another_is(store: Store, tmp_path: Path) -> None:
    store.commit(payload(10_000))
    first = store.stick.stick_id
    store.eject()
    store.poll_usb()
    assert store.stick is None  # still mounted, but released: not taken back
    assert store.status()["stick"]["present"] is False
    # A different stick at the same mount point is taken at once (and backfilled).
    usb = store.cfg.usb_dir
    usb.rename(tmp_path / "old-stick")
    usb.mkdir()
    store.poll_usb()
    assert store.stick is not None and store.stick.stick_id != first
    assert len(store.stick.record_files()) == 1


def test_key_material_prepared_at_begin_is_used_once(store: Store, dc_keys: dict[str, Any]) -> None:
    # begin() prepares one record's key material (issue #17: off the commit's serial path); each set seals one
    # record only, whether the enrollment commits, cancels, or a caller commits without a reservation.
    r1, r2, r3 = store.begin(), store.begin(), store.begin()
    store.release(r3)  # cancelled: its set stays prepared but is never used twice
    ids = [store.commit(b"a" * 2000, r1).record_id, store.commit(b"b" * 2000, r2).record_id,
           store.commit(b"c" * 2000).record_id, store.commit(b"d" * 2000).record_id]
    epks, deks_wrapped = set(), set()
    for rid in ids:
        data = store.sd_path(rid).read_bytes()
        hdr, _ = record_format.open_record(data, dc_keys["sk"], trusted_kit_key=store.identity.public_key_raw)
        epks.add(hdr.recipients[0]["epk"])
        deks_wrapped.add(hdr.recipients[0]["wrapped"])
    assert len(epks) == len(deks_wrapped) == len(ids)


def test_stick_without_an_inode_count_is_not_full(kit_cfg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel's vfat and exfat drivers report f_files = f_ffree = f_favail = 0 (FUSE's exfat, used by the
    # mount tests, invents counts): such a stick has room by its bytes alone, it is not "out of inodes".
    usb = str(kit_cfg.usb.mount_point)
    real = os.statvfs

    def fat_statvfs(path: Any) -> os.statvfs_result:
        st = real(path)
        if not os.fspath(path).startswith(usb):
            return st
        f = list(st)
        f[5] = f[6] = f[7] = 0  # f_files, f_ffree, f_favail
        return os.statvfs_result(f)

    monkeypatch.setattr(os, "statvfs", fat_statvfs)
    s = Store(kit_cfg, identity.load_or_create(kit_cfg.state_dir))
    s.open()
    try:
        st = s.status()
        assert st["guard"]["level"] == "OK", st["guard"]
        usb_medium = next(m for m in st["media"] if m["name"] == "usb")
        assert usb_medium["level"] == "OK" and usb_medium["code"] == "", usb_medium
        res = s.commit(payload(tag="fat"))
        assert res.stick_id is not None and s.stick.record_path(res.record_id).exists()
    finally:
        s.close()


def test_a_planted_stick_name_with_a_huge_number_does_not_fence_the_numbering(kit_cfg: Any) -> None:
    # The kit id is on every stick: a file name carrying the largest number a record id allows, found by the
    # reconcile after an unclean stop, must not become the high-water mark (the next id would be unwritable).
    s = open_store(kit_cfg)
    first = s.commit(payload(1000))
    rdir = s.stick.records_dir
    s.close()
    (rdir / f"{s.identity.kit_id}-99999999999999999999-20250101T000000Z.rkm").write_bytes(b"junk")
    import sqlite3

    db = sqlite3.connect(kit_cfg.state_dir / "journal.db")
    db.execute("UPDATE meta SET value = '0' WHERE key = 'clean_shutdown'")  # as a power cut leaves it
    db.commit()
    db.close()
    s = open_store(kit_cfg)
    try:
        assert s.commit(payload(1000)).seq == first.seq + 1
    finally:
        s.close()
    s = open_store(kit_cfg)
    try:
        assert s.commit(payload(1000)).seq == first.seq + 2
    finally:
        s.close()


def test_begin_reserves_the_next_numbers_so_the_commit_does_not(store: Store) -> None:
    """With few reserved numbers left, begin() (the enrollment's start) reserves the next block durably in the
    journal and the floor file; the commit that follows then writes no reservation of its own."""
    for _ in range(24):
        store.commit(payload(500))
    assert (store._seq, store._hwm) == (24, 32)
    r = store.begin()
    hwm = int(store.j.get_meta("seq_high_water") or 0)
    assert hwm == store._hwm == 24 + 32
    assert (store.state_dir / "seq.floor").read_text().split()[0] == f"{hwm:020d}"
    store.commit(payload(500), r)
    assert int(store.j.get_meta("seq_high_water") or 0) == hwm  # no reservation inside the commit
    r = store.begin()  # plenty left: nothing written
    assert store._hwm == hwm
    store.release(r)
