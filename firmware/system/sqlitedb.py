"""Opening a SQLite database in WAL mode that other processes may be opening at the same moment.

Switching a database to WAL takes an exclusive lock, and SQLite answers ``database is locked`` at once, without
waiting in its busy handler, when two connections both hold a shared lock and both want it: the deadlock it
avoids. Two ingest workers started together on a fresh archive hit exactly that, and one of them died at start
(seen in ``bench/bench_relay.py`` with two workers). `connect_wal` retries the switch, with the one backoff
helper, until `timeout_s`; every later statement waits in SQLite's own busy handler (``busy_timeout``).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from firmware.system.backoff import Backoff


def connect_wal(path: Path | str, timeout_s: float = 60.0, **kwargs: object) -> sqlite3.Connection:
    """`sqlite3.connect(path, timeout=timeout_s, check_same_thread=False, isolation_level=None, **kwargs)` with
    ``journal_mode=WAL`` set, retried while another process holds the lock (see module doc); raises the last
    `sqlite3.OperationalError` after `timeout_s`."""
    conn = sqlite3.connect(path, timeout=timeout_s, check_same_thread=False, isolation_level=None,
                           **kwargs)  # type: ignore[call-overload]
    deadline = time.monotonic() + timeout_s
    wait = Backoff(0.005, 0.25)
    try:
        conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return conn
            except sqlite3.OperationalError as e:
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() >= deadline:
                    raise
                time.sleep(wait.next())
    except BaseException:
        conn.close()
        raise
