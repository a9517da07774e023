"""The commit's serial path (issue #17.3): the signature is computed while both media already write the sealed body,
and the stick's index line is appended after the commit has its answer. What "captured" means does not change: the
whole record, signature included, is durable and read back on the SD and the stick before `commit()` returns, a
failed commit leaves no copy and no index line, and an eject or close waits for the last line."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from firmware.errors import StoreError
from firmware.store import usb
from firmware.store.store import Store
from firmware.wire import record_format


def payload(n: int = 200_000) -> bytes:
    return record_format.Payload({"nik": "3273010101900001"},
                                 [record_format.Attachment("blob", "application/octet-stream", os.urandom(n))]).encode()


def index_ids(store: Store) -> list[str]:
    assert store.stick is not None
    return [e["record_id"] for e in usb.read_index(store.stick.kit_dir)]


def leftovers(folder: Path, seq: int) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if f"-{seq:08d}-" in p.name)


def test_the_commit_answer_does_not_wait_for_the_index_line_but_eject_does(store: Store, monkeypatch: Any) -> None:
    stick = store.stick
    assert stick is not None
    gate = threading.Event()
    real = stick.add_to_index

    def held(*a: Any) -> None:
        assert gate.wait(10)
        real(*a)

    monkeypatch.setattr(stick, "add_to_index", held)
    res = store.commit(payload())
    # Answered while the index line is still held back: the record file itself is durable and read back on the stick.
    assert res.stick_id == stick.stick_id and index_ids(store) == []
    assert stick.record_path(res.record_id).read_bytes() == store.sd_path(res.record_id).read_bytes()
    threading.Timer(0.3, gate.set).start()
    store.eject()  # waits for the mirror thread's line, then fsyncs the index
    assert gate.is_set() and [e["record_id"] for e in usb.read_index(stick.kit_dir)] == [res.record_id]
    assert not stick.index_dirty


def test_a_failed_signature_leaves_no_copy_and_no_line(store: Store, monkeypatch: Any) -> None:
    def broken(*a: Any, **k: Any) -> str:
        raise RuntimeError("signer failed")

    monkeypatch.setattr(record_format, "sign_body", broken)
    with pytest.raises(RuntimeError, match="signer failed"):
        store.commit(payload())
    store.wait_mirror_idle()
    assert store.stick is not None
    # The body had been written to both temp files: both are gone, nothing was renamed, the number is used up.
    assert leftovers(store.records_dir, 1) == [] and leftovers(store.stick.records_dir, 1) == []
    assert index_ids(store) == [] and store.counts()["stored"]["records"] == 0
    monkeypatch.undo()
    res = store.commit(payload())
    assert res.seq == 2 and res.stick_id is not None


def test_a_failed_journal_write_leaves_no_copy_and_no_line(store: Store, monkeypatch: Any) -> None:
    def full(**k: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store.j, "add_record", full)
    with pytest.raises(StoreError, match="journal"):
        store.commit(payload())
    store.wait_mirror_idle()
    assert store.stick is not None
    # Both copies were durable; the operator is told it failed, so neither stays, and no index line names it.
    assert leftovers(store.records_dir, 1) == [] and leftovers(store.stick.records_dir, 1) == []
    assert index_ids(store) == []


def test_the_whole_file_is_what_was_read_back_on_both_media(store: Store, dc_keys: dict[str, Any]) -> None:
    """The signature arrives after the body was written: both files hold it, verify and open."""
    for _ in range(3):
        res = store.commit(payload())
        assert store.stick is not None
        sd = store.sd_path(res.record_id).read_bytes()
        assert store.stick.record_path(res.record_id).read_bytes() == sd
        assert record_format.sha256_hex(sd) == res.sha256 == store.record(res.record_id).sha256
        record_format.open_record(sd, dc_keys["sk"], trusted_kit_key=store.identity.public_key_raw)
    store.wait_mirror_idle()
    assert len(index_ids(store)) == 3


def test_an_sd_failure_is_not_blamed_on_the_stick(store: Store, monkeypatch: Any) -> None:
    """The SD fills up before its copy starts: the commit fails, the stick's copy (waiting for the signature the
    SD side computes) gives up and leaves nothing, and the stick is neither called full nor dropped."""
    import errno

    from firmware.store import store as store_mod

    def sd_full(path: Path, data: bytes, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "atomic_write", sd_full)
    with pytest.raises(StoreError, match="SD"):
        store.commit(payload())
    store.wait_mirror_idle()
    assert store.stick is not None and not store.stick_full and store.stick_error == ""
    assert leftovers(store.stick.records_dir, 1) == [] and index_ids(store) == []
    monkeypatch.undo()
    assert store.commit(payload()).stick_id == store.stick.stick_id
