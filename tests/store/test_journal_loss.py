"""The journal lost, rolled back or corrupt, the SD full at start, bit rot with a good stick copy, a stick that
fails again and again: the record files stay the truth and nothing is lost, overwritten or numbered twice.

Real SQLite, real files, real tmpfs mounts and a real USB watcher thread; each test fails on the code before this
change (see the report of the fix): an overwritten record #1, a crash at open, a stick that flapped every poll."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from firmware.errors import CaptureHalted, StoreError
from firmware.seal import identity
from firmware.store.service import UsbWatcher
from firmware.store.store import STICK_FAULTED, Store, seq_of
from firmware.system.backoff import Backoff
from firmware.system.i18n import gettext
from firmware.wire import record_format
from firmware.wire import stick_layout as L
from tests.faults.harness import kit_config, payload
from tests.support import Tmpfs


def open_store(cfg: Any, defer: bool = True) -> Store:
    s = Store(cfg, identity.load_or_create(cfg.state_dir))
    s.open(defer_reconcile=defer)  # as the daemon opens it: the reconcile is the USB watcher's, later
    return s


def files(cfg: Any) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (cfg.state_dir / "records").glob("*.rkm")}


def drop_journal(cfg: Any) -> None:
    for suffix in ("", "-wal", "-shm"):
        (cfg.state_dir / f"journal.db{suffix}").unlink(missing_ok=True)


def die(s: Store) -> None:
    """The process gone without a clean stop: its descriptors closed (the lock released), nothing written."""
    s.closing.set()
    assert s.journal is not None
    s.journal.close()
    s.journal = None
    for fd in (s._floor_fd, s._lockfile):
        if fd is not None:
            os.close(fd)
    s._floor_fd = s._lockfile = None


def assert_all_live_and_unique(s: Store, before: dict[str, bytes]) -> None:
    """Every earlier file is still there byte for byte and journaled live; no number is held by two ids."""
    now = files(s.cfg)
    for name, data in before.items():
        assert now.get(name) == data, f"{name} overwritten or lost"
        row = s.j.get(name[: -len(record_format.FILE_SUFFIX)])
        assert row is not None and row.state in ("stored", "sent", "acked"), name
    seqs = [seq_of(n.split(".")[0]) for n in now]
    assert len(seqs) == len(set(seqs)), sorted(now)


@pytest.mark.parametrize("lost", ["journal", "journal_and_stick_only", "wal"])
def test_a_lost_journal_never_reuses_a_number(lost: str, kit_cfg: Any) -> None:
    """journal.db (or only its WAL: the journal rolled back to an older state that says "clean") gone while
    records/ holds #1..#4: the next commit, before any reconcile, gets #5 and every record is adopted."""
    s = open_store(kit_cfg, defer=False)
    s.commit(payload(2000))
    s.close()
    old_db = (kit_cfg.state_dir / "journal.db").read_bytes()  # checkpointed by the clean close: says clean
    s = open_store(kit_cfg, defer=False)
    for _ in range(3):
        s.commit(payload(2000))
    stick_top = s.stick.record_files() if s.stick is not None else {}
    s.close()
    before = files(kit_cfg)
    if lost == "journal_and_stick_only":
        # The newest record survives only on the stick (its SD copy was purged after its ack, say).
        newest = max(before)
        (kit_cfg.state_dir / "records" / newest).unlink()
        del before[newest]
        assert newest[:-4] in stick_top
    drop_journal(kit_cfg)
    if lost == "wal":
        (kit_cfg.state_dir / "journal.db").write_bytes(old_db)
    s = open_store(kit_cfg)
    try:
        assert s.reconcile_pending  # also for the rolled-back journal whose marker said "clean"
        r = s.commit(payload(2000))  # the old code: seq 1 (or 2), same second -> record #1 overwritten
        assert r.seq == 5, r.record_id
        s.recover()  # the USB watcher's background reconcile
        assert not s.reconcile_pending
        assert_all_live_and_unique(s, before)
        assert s.commit(payload(2000)).seq == 6
    finally:
        s.close()


def four_records_and_an_old_journal(kit_cfg: Any, clean: bool) -> bytes:
    """A kit without a stick that committed #1, stopped cleanly (the journal then: returned), committed #2-#4 and
    stopped cleanly or died."""
    shutil.rmtree(kit_cfg.usb_dir)
    s = open_store(kit_cfg, defer=False)
    s.commit(payload(2000))
    s.close()
    old_db = (kit_cfg.state_dir / "journal.db").read_bytes()
    s = open_store(kit_cfg, defer=False)
    for _ in range(3):
        s.commit(payload(2000))
    if clean:
        s.close()
    else:
        die(s)
    return old_db


def test_a_journal_behind_the_floor_file_continues_above_it_with_no_file_left(kit_cfg: Any) -> None:
    """The journal rolled back (an old copy, a lost WAL) and no file shows the numbers any more (purged after
    their acks, no stick): the floor file, written at each reservation before a number is used, still fences."""
    old_db = four_records_and_an_old_journal(kit_cfg, clean=False)  # only the reservation wrote the floor file
    drop_journal(kit_cfg)
    (kit_cfg.state_dir / "journal.db").write_bytes(old_db)
    for p in (kit_cfg.state_dir / "records").iterdir():
        p.unlink()
    s = open_store(kit_cfg)
    try:
        assert s.reconcile_pending
        assert s.commit(payload(2000)).seq > 4  # the old code: 2 (the old journal's mark)
    finally:
        s.close()


@pytest.mark.parametrize("damage", ["garbage", "missing", "edited"])
def test_a_damaged_floor_file_costs_a_check_of_the_names_never_a_number(damage: str, kit_cfg: Any) -> None:
    """Without a usable floor file the names in records/ decide: a rolled-back journal is still caught. An
    edited number (a smaller one with the old check value) is read as damaged, not believed."""
    old_db = four_records_and_an_old_journal(kit_cfg, clean=True)
    floor = kit_cfg.state_dir / "seq.floor"
    assert floor.read_text().split()[0] == "00000000000000000004"
    if damage == "garbage":
        floor.write_bytes(b"\xff\x00 torn")
    elif damage == "missing":
        floor.unlink()
    else:
        floor.write_text(floor.read_text().replace("04 ", "01 "))
    drop_journal(kit_cfg)
    (kit_cfg.state_dir / "journal.db").write_bytes(old_db)
    s = open_store(kit_cfg)
    try:
        assert s.reconcile_pending
        assert s.commit(payload(2000)).seq == 5
        s.recover()
        assert {r.seq for r in s.j.records()} == {1, 2, 3, 4, 5}
    finally:
        s.close()
    assert floor.read_text().split()[0] == "00000000000000000005"  # written back at the clean stop


def test_a_file_whose_number_is_taken_does_not_jam_the_reconcile(kit_cfg: Any) -> None:
    """A kit that already reused a number (the old code) holds two files with seq 2: the reconcile logs the one it
    cannot adopt by name, keeps it, and adopts every other file (the old code raised on it at every poll)."""
    s = open_store(kit_cfg, defer=False)
    ids = [s.commit(payload(2000)).record_id for _ in range(4)]
    s.close()
    twin = kit_cfg.state_dir / "records" / (ids[1] + record_format.FILE_SUFFIX)
    clash = ids[1].rsplit("-", 1)[0] + "-20200101T000000Z"  # seq 2 again, another time: a genuine other record
    drop_journal(kit_cfg)
    s = open_store(kit_cfg)
    try:
        s.j.add_record(record_id=clash, seq=2, created="2020-01-01T00:00:00Z", clock_synced=False, size=1,
                       sha256="0" * 64)  # the journal already holds seq 2 under the other id
        s.reconcile_pending = True
        s.recover()
        assert not s.reconcile_pending
        assert twin.exists() and s.j.get(ids[1]) is None  # kept, not adopted, not quarantined over the other row
        assert s.j.get(clash) is not None
        for rid in (ids[0], ids[2], ids[3]):
            assert s.j.get(rid).state == "stored"
        assert [e["detail"]["record_id"] for e in s.audit_events("seq_conflict")] == [ids[1]]
    finally:
        s.close()


def test_a_commit_never_replaces_an_existing_record_file(kit_cfg: Any) -> None:
    """The last line of defence: a file already under the commit's name is never replaced; the commit fails with
    nothing written and the number skipped; the retry captures."""
    s = open_store(kit_cfg, defer=False)
    try:
        first = s.commit(payload(2000))
        nxt = s.sd_path(first.record_id.replace(f"-{first.seq:08d}-", f"-{first.seq + 1:08d}-"))
        nxt.write_bytes(b"someone's record")
        s._seq = first.seq  # as if the numbering lagged behind the files (what the floor at open prevents)
        with pytest.raises(StoreError, match="already in use"):
            s.commit(payload(2000))
        assert nxt.read_bytes() == b"someone's record"
        assert s.reconcile_pending
        assert s.commit(payload(2000)).seq == first.seq + 2
    finally:
        s.close()


@pytest.mark.parametrize("damage", ["garbage", "header"])
def test_a_corrupt_journal_is_quarantined_and_rebuilt_from_the_records(damage: str, kit_cfg: Any) -> None:
    s = open_store(kit_cfg, defer=False)
    ids = [s.commit(payload(2000)).record_id for _ in range(3)]
    s.close()
    before = files(kit_cfg)
    db = kit_cfg.state_dir / "journal.db"
    raw = bytearray(db.read_bytes())
    if damage == "garbage":
        raw = bytearray(os.urandom(len(raw)))  # "file is not a database"
    else:
        raw[16:100] = os.urandom(84)  # the header's page size and counters: "malformed" / "not a database"
    db.write_bytes(bytes(raw))
    s = open_store(kit_cfg)  # the old code: sqlite3.DatabaseError here, at every start (crash loop)
    try:
        quarantined = [p.name for p in (kit_cfg.state_dir / "quarantine").iterdir()]
        assert any(n.startswith("journal.db.corrupt-") for n in quarantined), quarantined
        kept = next(p for p in (kit_cfg.state_dir / "quarantine").iterdir() if p.name.startswith("journal.db."))
        assert kept.read_bytes() == bytes(raw)  # moved aside, never deleted
        assert s.commit(payload(2000)).seq == 4
        s.recover()
        assert_all_live_and_unique(s, before)
        assert {e["kind"] for e in s.audit_events()} >= {"journal_rebuilt"}
        assert all(s.j.get(rid).state == "stored" for rid in ids)
    finally:
        s.close()


def test_sd_full_at_start_the_kit_starts_halted_and_acks_free_it(tmp_path: Path, dc_keys: dict[str, Any],
                                                                 tmpfs: Tmpfs) -> None:
    """A small real tmpfs SD filled to the last byte while the kit was stopped (clean stop: no WAL file): SQLite
    cannot create its WAL, so the old code died at open. Now the spare file is released, the kit starts, reports
    full (HALT), the relay's acks and the purge still work, and capture resumes once room is back."""
    sd = tmpfs.mount(tmp_path / "sdfs", 12 * 1024)
    usb = tmp_path / "usb"
    usb.mkdir()
    cfg = kit_config(sd, usb, dc_keys["pub_path"], max_record_mb=1, warn_records=2, resume_records=1,
                     reserve_records=1)
    s = open_store(cfg, defer=False)
    ids = [s.commit(payload(300_000)).record_id for _ in range(6)]
    s.close()
    assert not (sd / "journal.db-wal").exists()
    filler = sd / "other-data"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    s = open_store(cfg)
    try:
        st = s.status()
        assert st["guard"]["level"] == "HALT" and "sd_full" in st["guard"]["codes"]
        with pytest.raises(CaptureHalted):
            s.begin()
        free = os.statvfs(sd).f_bavail
        s.mark_delivery(sent=ids, acked=ids)  # the relay's acks: a journal write on the full SD
        assert s.purge_acknowledged() == 6  # (the stick holds them all)
        assert os.statvfs(sd).f_bavail > free
        filler.unlink()  # the other writer's data goes too: capture resumes
        assert s.commit(payload(2000)).seq == 7
    finally:
        s.close()
        filler.unlink(missing_ok=True)


def test_a_bit_rotted_sd_copy_is_restored_from_the_stick(kit_cfg: Any) -> None:
    s = open_store(kit_cfg, defer=False)
    try:
        r = s.commit(payload(20_000))
        assert r.stick_id is not None
        p = s.sd_path(r.record_id)
        raw = bytearray(p.read_bytes())
        raw[500] ^= 0x40  # one flipped bit, same size: only the hash notices
        p.write_bytes(bytes(raw))
        data = s.read_verified(r.record_id)  # the old code: StoreError, and the record quarantined for good
        assert record_format.sha256_hex(data) == r.sha256 and p.read_bytes() == data
        assert s.j.get(r.record_id).state == "stored"
        assert list((kit_cfg.state_dir / "quarantine").glob(r.record_id + "*"))  # the bad copy is kept aside
        # A stick copy that does not verify is never restored.
        raw = bytearray(p.read_bytes())
        raw[500] ^= 0x40
        p.write_bytes(bytes(raw))
        sp = s.stick.record_path(r.record_id)
        sp.write_bytes(bytes(raw))
        with pytest.raises(StoreError, match="quarantined"):
            s.read_verified(r.record_id)
        assert s.j.get(r.record_id).state == "quarantined"
    finally:
        s.close()


@pytest.mark.parametrize("fault", ["huge_index", "dir_as_record"])
def test_a_stick_that_fails_again_is_left_out_until_pulled(fault: str, kit_cfg: Any,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    usb = kit_cfg.usb_dir
    shutil.rmtree(usb)
    s = open_store(kit_cfg, defer=False)
    try:
        ids = [s.commit(payload(2000)).record_id for _ in range(3)]
        usb.mkdir()
        kit = usb / L.ROOT / s.identity.kit_id
        (kit / L.RECORDS).mkdir(parents=True)
        if fault == "huge_index":
            with open(kit / L.INDEX, "wb") as f:
                f.truncate(L.MAX_INDEX_BYTES + 1)  # sparse: over the cap without the bytes
        else:
            (kit / L.RECORDS / (ids[1] + record_format.FILE_SUFFIX)).mkdir()  # a folder under a record's name
        w = UsbWatcher(s, 0.05, auto_purge=False)
        w.start()
        time.sleep(1.5)  # ~30 polls: the old code took it and dropped it at each one
        w.stop()
        assert len(s.audit_events("usb_inserted")) == 1
        assert len(s.audit_events("usb_removed")) == 1
        assert len(s.audit_events("usb_faulted")) == 1
        st = s.status()["stick"]
        assert s.stick is None and "left out after a fault" in st["error"]
        # The operator's words, in the kit's language (Indonesian by default).
        assert st["code"] == "usb_stick_faulted" and st["message"] == gettext(STICK_FAULTED) != STICK_FAULTED
        assert sum("left out after a fault" in r.getMessage() for r in caplog.records) == 1
        # Capture goes on (the stick is optional), and the stick pulled, repaired and inserted again is taken.
        assert s.commit(payload(2000)).stick_id is None
        shutil.rmtree(usb)
        s.poll_usb(backfill=False)
        usb.mkdir()
        s.poll_usb(backfill=True)
        assert s.stick is not None and s.stick_error == ""
        assert s.status()["stick"]["code"] == ""
        assert s.status()["mirror_lag"]["records"] == 0
    finally:
        s.close()


def test_a_purged_file_that_cannot_be_deleted_is_retried(kit_cfg: Any) -> None:
    """unlink fails (here EROFS: the records folder bind-mounted read-only, a real failing unlink): the purge does
    not lose track of the file; a later purge, once the medium lets it, deletes it."""
    s = open_store(kit_cfg, defer=False)
    rdir = kit_cfg.state_dir / "records"
    try:
        ids = [s.commit(payload(2000)).record_id for _ in range(2)]
        s.mark_delivery(sent=ids, acked=ids)
        subprocess.run(["mount", "--bind", str(rdir), str(rdir)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(rdir)], check=True)
            assert s.purge_acknowledged() == 2  # journaled purged; the unlinks fail (EROFS), logged by name
        finally:
            subprocess.run(["umount", str(rdir)], check=True)
        assert all(s.j.get(rid).state == "purged" for rid in ids)
        assert all(s.sd_path(rid).exists() for rid in ids)  # left behind ...
        assert s.purge_acknowledged() == 0
        assert not any(s.sd_path(rid).exists() for rid in ids)  # ... and removed by the next pass
    finally:
        s.close()


def test_journal_open_errors_other_than_corruption_are_not_a_rebuild(kit_cfg: Any) -> None:
    """A journal that cannot be opened for another reason (here: a folder in its place) is a clear StoreError;
    nothing is moved aside as "corrupt"."""
    s = open_store(kit_cfg, defer=False)
    s.commit(payload(2000))
    s.close()
    drop_journal(kit_cfg)
    (kit_cfg.state_dir / "journal.db").mkdir()
    with pytest.raises(StoreError, match="cannot open the journal"):
        open_store(kit_cfg)
    assert not list((kit_cfg.state_dir / "quarantine").iterdir())
    (kit_cfg.state_dir / "journal.db").rmdir()


def test_a_failed_commits_stick_copy_that_cannot_be_removed_is_removed_later(kit_cfg: Any,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal write fails (injected, as in test_commit_path.py) and the stick's copy cannot be removed (real:
    the stick's records folder remounted read-only at that moment). The operator was told the commit failed: the
    copy is remembered, never adopted by the next start's reconcile, and removed once the stick lets it."""
    s = open_store(kit_cfg, defer=False)
    rdir = s.stick.records_dir
    real_add = s.j.add_record

    def fail(**k: Any) -> None:  # the stick's copy is durable by now; then the journal fails and the stick goes ro
        subprocess.run(["mount", "--bind", str(rdir), str(rdir)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(rdir)], check=True)
        raise sqlite3.OperationalError("database or disk is full")

    mounted = True
    try:
        monkeypatch.setattr(s.j, "add_record", fail)
        with pytest.raises(StoreError, match="journal"):
            s.commit(payload(2000))
        monkeypatch.setattr(s.j, "add_record", real_add)
        s.wait_mirror_idle()
        left = [p.name for p in rdir.iterdir()]
        assert len(left) == 1 and not list(s.records_dir.iterdir())  # the SD copy went; the stick's could not
        s.close()  # a stop before the stick lets go: the next start must not adopt it
        subprocess.run(["umount", str(rdir)], check=True)
        mounted = False
        s = open_store(kit_cfg, defer=False)  # reconcile (the stop was not clean), then the stick is taken
        assert not list(rdir.iterdir()), "the failed commit's copy survived"
        assert s.j.get(left[0][: -len(record_format.FILE_SUFFIX)]) is None
        assert s.commit(payload(2000)).seq == 2  # its number is never handed out again
    finally:
        if mounted:
            subprocess.run(["umount", str(rdir)], check=False)
        s.close()


def test_a_faulted_stick_pulled_and_inserted_again_between_two_polls_is_retried(kit_cfg: Any) -> None:
    """The console says "pull it out and insert it again"; done within one poll, the stick looks as if it never
    left (same id, same folder). It is tried again after the retry delay (30 s at first, doubling to 15 min),
    and a stick that fails again waits longer."""
    now = [1000.0]
    usb = kit_cfg.usb_dir
    s = open_store(kit_cfg, defer=False)
    try:
        s._fault_retry = Backoff(30, 900, clock=lambda: now[0])
        sid = s.stick.stick_id
        ids = [s.commit(payload(2000)).record_id for _ in range(2)]
        bad = usb / L.ROOT / s.identity.kit_id / L.RECORDS / (ids[1] + record_format.FILE_SUFFIX)
        bad.unlink()
        bad.mkdir()  # the backfill's copy of #2 fails
        s.backfill_due = True
        s.poll_usb(backfill=True)
        s.poll_usb(backfill=True)
        assert s.stick is None and s.status()["stick"]["code"] == "usb_stick_faulted"
        now[0] += 31
        s.poll_usb(backfill=True)  # tried again: fails again, now left out for longer
        assert s.stick is None and s._fault_retry.failures == 2
        now[0] += 31
        s.poll_usb(backfill=True)
        assert s.stick is None  # (15-60 s now: not yet)
        bad.rmdir()  # repaired
        now[0] += 61
        s.poll_usb(backfill=True)
        assert s.stick is not None and s.stick.stick_id == sid
        assert s.status()["stick"]["code"] == "" and s.status()["mirror_lag"]["records"] == 0
        assert len(s.audit_events("usb_faulted")) == 1
    finally:
        s.close()
