"""Several processes opening one fresh SQLite database in WAL mode at the same moment (two ingest workers
started together on a new archive): none of them fails with "database is locked" (firmware/system/sqlitedb.py).
Without the retry, plain ``PRAGMA journal_mode=WAL`` fails some of them (bench/bench_sqlite_open.py: 3 to 13 of 60)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from firmware.system.sqlitedb import connect_wal

PROCS, ROUNDS = 4, 5


def _open_archive(root: str, barrier: Any, out: Any) -> None:
    from provisioning.archive import Archive
    from provisioning.staging import Staging

    barrier.wait(30)
    try:
        Archive(Path(root)).close()
        Staging(Path(root) / "staging.db").conn.close()
        out.put("ok")
    except Exception as e:  # noqa: BLE001  (reported to the parent)
        out.put(repr(e))


def test_processes_opening_a_fresh_archive_together_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # the test's own imports, no re-import per process
    results: list[str] = []
    for r in range(ROUNDS):
        barrier, out = ctx.Barrier(PROCS), ctx.Queue()
        procs = [ctx.Process(target=_open_archive, args=(str(tmp_path / f"a{r}"), barrier, out))
                 for _ in range(PROCS)]
        for p in procs:
            p.start()
        results += [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
    assert results == ["ok"] * (PROCS * ROUNDS), [x for x in results if x != "ok"]


def test_other_errors_are_not_retried(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="unable to open"):
        connect_wal(tmp_path / "missing" / "x.db", 5)
    conn = connect_wal(tmp_path / "x.db", 5)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
