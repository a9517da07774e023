"""Replay protection for fleet commands: every command id is admitted at most once, ever.

Signed commands carry an id, an issue time and an expiry. `CommandGuard` keeps the ids it admitted
(in SQLite, fsync'd) until they expire, and a watermark for the ones it forgot.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from firmware.errors import Refused

ANSWERED_REFUSALS = ("expired", "future", "ttl_too_long", "too_old")  # refusals the fleet is told about


class CommandGuard:
    """Persistent replay protection: seen command ids (until they expire) and a watermark.

    A command is refused if its id was seen, it has expired, it claims to be issued in the future
    (beyond the allowed clock skew), its lifetime is longer than allowed, or it was issued at or
    before the watermark: the newest issue time of any command forgotten from the table, so a
    clock that jumps back cannot resurrect one.
    """

    def __init__(self, path: Path, max_skew_s: int, max_ttl_s: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (cmd_id TEXT PRIMARY KEY, name TEXT, issued_at INTEGER, "
                        "expires_at INTEGER, received_at INTEGER, outcome TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        self.max_skew_s, self.max_ttl_s = max_skew_s, max_ttl_s
        self._lock = threading.Lock()

    def watermark(self) -> int:
        row = self.db.execute("SELECT v FROM meta WHERE k = 'watermark'").fetchone()
        return int(row[0]) if row else 0

    def admit(self, body: dict[str, Any], now: float | None = None) -> None:
        """Record the command as seen, or raise `Refused`. Recorded before it runs: at most once."""
        now = int(now if now is not None else time.time())
        issued, expires = body["issued_at"], body["expires_at"]
        with self._lock:
            self._prune(now)
            if self.db.execute("SELECT 1 FROM seen WHERE cmd_id = ?", (body["cmd_id"],)).fetchone():
                raise Refused("replayed", f"command {body['cmd_id']} was already received")
            if expires <= now:
                raise Refused("expired", f"expired {now - expires} s ago")
            if issued > now + self.max_skew_s:
                raise Refused("future", f"issued {issued - now} s in the future (clock skew > {self.max_skew_s} s)")
            if expires - issued > self.max_ttl_s:
                raise Refused("ttl_too_long", f"lifetime {expires - issued} s > {self.max_ttl_s} s")
            if issued <= self.watermark():
                raise Refused("too_old", "issued before the replay window (older than forgotten commands)")
            self.db.execute("INSERT INTO seen VALUES (?,?,?,?,?,?)",
                            (body["cmd_id"], body["name"], issued, expires, now, "received"))

    def done(self, cmd_id: str, outcome: str) -> None:
        with self._lock:
            self.db.execute("UPDATE seen SET outcome = ? WHERE cmd_id = ?", (outcome[:200], cmd_id))

    def _prune(self, now: int) -> None:
        cutoff = now - self.max_skew_s
        row = self.db.execute("SELECT MAX(issued_at) FROM seen WHERE expires_at < ?", (cutoff,)).fetchone()
        if row and row[0] is not None:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO meta VALUES ('watermark', ?) ON CONFLICT(k) DO UPDATE SET v = MAX(v, ?)",
                            (row[0], row[0]))
            self.db.execute("DELETE FROM seen WHERE expires_at < ?", (now - self.max_skew_s,))
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

