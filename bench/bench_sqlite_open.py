"""Several processes opening one fresh SQLite database in WAL mode at the same moment (two ingest workers started
together on a new archive): how many opens fail with a plain ``PRAGMA journal_mode=WAL`` and with
`firmware.system.sqlitedb.connect_wal`, in the same run.

    .venv/bin/python bench/bench_sqlite_open.py [--procs 4] [--rounds 15]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware.system.sqlitedb import connect_wal  # noqa: E402


def plain(path: str, barrier: Any, out: Any) -> None:
    barrier.wait(30)
    try:
        c = sqlite3.connect(path, timeout=60, isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE IF NOT EXISTS t (a)")
        out.put("ok")
    except sqlite3.Error as e:
        out.put(repr(e))


def retried(path: str, barrier: Any, out: Any) -> None:
    barrier.wait(30)
    try:
        c = connect_wal(path, 20)
        c.execute("CREATE TABLE IF NOT EXISTS t (a)")
        out.put("ok")
    except sqlite3.Error as e:
        out.put(repr(e))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        for fn in (plain, retried):
            bad = 0
            for r in range(a.rounds):
                path = str(Path(d) / f"{fn.__name__}-{r}.db")
                barrier, out = ctx.Barrier(a.procs), ctx.Queue()
                procs = [ctx.Process(target=fn, args=(path, barrier, out)) for _ in range(a.procs)]
                for p in procs:
                    p.start()
                bad += sum(out.get(timeout=60) != "ok" for _ in procs)
                for p in procs:
                    p.join(30)
            print(f"{fn.__name__:8} {bad} of {a.procs * a.rounds} opens failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
