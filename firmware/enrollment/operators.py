"""Operator sign-in: per-operator PINs (scrypt hashes), lockout after repeated failures, idle sign-out.

Operators come from config (`[operators] list`), later from the fleet. A PIN hash is made with
`rekam operator hash-pin`.

Lockout state lives in SQLite (`lockout.sqlite` in the state directory; in memory when no path is
given), so a locked operator stays locked across a daemon restart until the lock time passes. Each
attempt is counted as a failure *before* its PIN is checked, in one `BEGIN IMMEDIATE` transaction,
and cleared only when the PIN proves right: 40 concurrent wrong PINs get at most `max_failures`
PINs checked (the others are refused as locked without a check), and a crash in the middle of a
check counts as a failure. Times are wall-clock seconds (a restart resets the monotonic clock).

Lockouts grow on repeat: the k-th lockout of an operator lasts `lockout_s` * 2**(k-1), at most
`MAX_LOCKOUT_S` (a day), so guessing a PIN is bounded over days (about `max_failures` guesses a day once
the lockouts are a day long), not ~480 a day per id forever. The count of lockouts is forgotten after
`STRIKE_MEMORY_S` (a week) without a new one, so an operator who mistypes now and then keeps the short
first lockout; a right PIN clears the wrong PINs counted so far but not the count of lockouts (else an
attacker's lockouts would shrink back to 15 minutes each time the real operator signs in).

At most `PIN_CHECKS` PINs are hashed at once (scrypt with N=2**14, r=8 takes 16 MiB each and releases
the GIL; the API's 40 worker threads could otherwise take ~640 MiB against the unit's MemoryMax=1G); an
attempt that cannot start its check within `PIN_CHECK_WAIT_S` is refused as ``pin_busy`` ("try again")
and does not count as a wrong PIN. How often one client may fail is limited before any of this, in the
console's gate (`firmware.console.guard`, per client address).

Recovering a locked operator (a supervisor too): the lock runs out by itself (at most a day), or a
technician clears it on the kit, while the daemon runs (SQLite, one short transaction): ``sudo rekam operator
unlock spv`` (`firmware.cli.operator`, `Operators.unlock`; ``rekam operator locks`` lists who is locked).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.errors import SignInError
from firmware.system.i18n import gettext

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

#: PIN hashes computed at once (each scrypt check holds 128 * N * r bytes = 16 MiB while it runs).
PIN_CHECKS = 2
#: How long an attempt waits for a free check before it is refused as busy (one check: ~0.1-0.3 s on a Pi).
PIN_CHECK_WAIT_S = 2.0
#: The longest lockout, however often an operator was locked out (the first lasts `lockout_s`).
MAX_LOCKOUT_S = 24 * 3600.0
#: Lockouts are counted (to double the next one) until this long after the last one ended.
STRIKE_MEMORY_S = 7 * 24 * 3600.0


def hash_pin(pin: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` of a PIN (4-12 digits)."""
    if not (pin.isdigit() and 4 <= len(pin) <= 12):
        raise ValueError("a PIN is 4 to 12 digits")
    salt = salt or os.urandom(16)
    h = hashlib.scrypt(pin.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${base64.b64encode(salt).decode()}${base64.b64encode(h).decode()}"


def check_pin(pin: str, stored: str) -> bool:
    """Constant-time check of a PIN against its stored hash."""
    try:
        kind, n, r, p, salt, h = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(pin.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(h))


@dataclass
class Operator:
    """One person allowed to enroll (role `operator`) or to decide flagged cases (`supervisor`)."""

    id: str
    name: str
    pin_hash: str
    role: str = "operator"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pin_failures (operator_id TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS pin_failures_op ON pin_failures (operator_id, at);
CREATE INDEX IF NOT EXISTS pin_failures_at ON pin_failures (at);
CREATE TABLE IF NOT EXISTS pin_locks (operator_id TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pin_strikes (operator_id TEXT PRIMARY KEY, strikes INTEGER NOT NULL, until REAL NOT NULL);
"""


class Operators:
    """Sign-in with a persistent lockout. Thread safe; `clock` (wall seconds) is injectable for tests."""

    def __init__(self, operators: list[Operator], max_failures: int = 5, lockout_s: float = 900,
                 clock: Callable[[], float] = time.time, db_path: Path | str | None = None, *,
                 max_lockout_s: float = MAX_LOCKOUT_S, strike_memory_s: float = STRIKE_MEMORY_S,
                 pin_checks: int = PIN_CHECKS, check_wait_s: float = PIN_CHECK_WAIT_S) -> None:
        self.by_id = {o.id: o for o in operators}
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self.max_lockout_s = max(lockout_s, max_lockout_s)  # a configured lockout longer than the cap is kept
        self.strike_memory_s = strike_memory_s
        self.check_wait_s = check_wait_s
        self.clock = clock
        self._lock = threading.Lock()
        self._checks = threading.BoundedSemaphore(pin_checks)  # bounds scrypt's memory, see the module doc
        self._hasher = ThreadPoolExecutor(pin_checks, thread_name_prefix="pin-check")
        # One connection, serialised by the lock; BEGIN IMMEDIATE also serialises another process on the file.
        self._db = sqlite3.connect(str(db_path) if db_path else ":memory:", timeout=10, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL" if db_path else "PRAGMA journal_mode=MEMORY")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._dummy = hash_pin("0000", b"x" * 16)

    def replace(self, operators: list[Operator]) -> None:
        """New operator list (from the fleet); lockouts are kept."""
        with self._lock:
            self.by_id = {o.id: o for o in operators}

    def close(self) -> None:
        """Close the lockout database."""
        self._hasher.shutdown(wait=False)
        with self._lock:
            self._db.close()

    def _tx(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out

    def locked_for(self, operator_id: str) -> float:
        """Seconds the operator stays locked (0: not locked)."""
        now = self.clock()
        with self._lock:
            row = self._db.execute("SELECT until FROM pin_locks WHERE operator_id=?", (operator_id,)).fetchone()
        return max(0.0, row[0] - now) if row else 0.0

    def locks(self) -> list[tuple[str, float]]:
        """(operator id, locked until: wall-clock seconds) of every operator locked out now, soonest end first."""
        with self._lock:
            return [(str(r[0]), float(r[1])) for r in self._db.execute(
                "SELECT operator_id, until FROM pin_locks WHERE until > ? ORDER BY until", (self.clock(),))]

    def unlock(self, operator_id: str) -> bool:
        """Clear an operator's lock, wrong PINs and count of lockouts (a technician's recovery, see the module
        doc); True if the operator was locked."""
        now = self.clock()

        def clear(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT until FROM pin_locks WHERE operator_id=?", (operator_id,)).fetchone()
            db.execute("DELETE FROM pin_locks WHERE operator_id=?", (operator_id,))
            db.execute("DELETE FROM pin_failures WHERE operator_id=?", (operator_id,))
            db.execute("DELETE FROM pin_strikes WHERE operator_id=?", (operator_id,))
            return bool(row and row[0] > now)

        return bool(self._tx(clear))

    def lock_duration(self, strikes: int) -> float:
        """How long the `strikes`-th lockout in a row lasts: doubling from `lockout_s`, at most `max_lockout_s`."""
        return min(self.lockout_s * 2.0 ** min(max(strikes, 1) - 1, 40), self.max_lockout_s)

    def _strikes(self, db: sqlite3.Connection, operator_id: str, now: float) -> int:
        """Lockouts of the operator still remembered (0 after `strike_memory_s` without one)."""
        row = db.execute("SELECT strikes, until FROM pin_strikes WHERE operator_id=?", (operator_id,)).fetchone()
        return int(row[0]) if row and now - row[1] < self.strike_memory_s else 0

    def authenticate(self, operator_id: str, pin: str, role: str | None = None) -> Operator:
        """Check a PIN; raise `SignInError` (and count the failure) when it is wrong or the operator is locked,
        or (``pin_busy``, not counted) when too many PINs are being checked at this moment."""
        now = self.clock()

        def reserve(db: sqlite3.Connection) -> tuple[float, int, int]:
            row = db.execute("SELECT until FROM pin_locks WHERE operator_id=?", (operator_id,)).fetchone()
            if row and row[0] > now:
                return row[0] - now, 0, 0
            # expired rows of every id go (an attacker trying made-up ids must not grow the file)
            db.execute("DELETE FROM pin_locks WHERE until<=?", (now,))
            db.execute("DELETE FROM pin_failures WHERE at<=?", (now - self.lockout_s,))
            db.execute("DELETE FROM pin_strikes WHERE until<=?", (now - self.strike_memory_s,))
            n = db.execute("SELECT count(*) FROM pin_failures WHERE operator_id=?", (operator_id,)).fetchone()[0]
            if n >= self.max_failures:  # the limit is taken by checks under way: refuse without checking
                return self.lock_duration(self._strikes(db, operator_id, now) + 1), 0, 0
            cur = db.execute("INSERT INTO pin_failures (operator_id, at) VALUES (?, ?)", (operator_id, now))
            return 0.0, n + 1, int(cur.lastrowid or 0)

        locked, nth, reserved = self._tx(reserve)
        if locked:
            raise SignInError("locked", gettext("operator {id} is locked after {n} wrong PINs; try again in {minutes} "
                                                "min", id=operator_id, n=self.max_failures,
                                                minutes=int(locked) // 60 + 1), locked)
        # Bounded memory: wait briefly for a free check, else give the reserved failure back and say "busy".
        if not self._checks.acquire(timeout=self.check_wait_s):
            self._tx(lambda db: db.execute("DELETE FROM pin_failures WHERE rowid=?", (reserved,)))
            raise SignInError("pin_busy", gettext("the kit is busy checking other PINs; try again in a moment"), 1)
        try:
            with self._lock:
                op = self.by_id.get(operator_id)
            # Hash even for unknown ids so timing does not reveal which ids exist.
            stored = op.pin_hash if op is not None else self._dummy
            # On the checks' own threads: each reuses the 16 MiB its malloc arena kept from its last check,
            # where 40 request threads would each leave their own behind.
            ok = self._hasher.submit(check_pin, pin, stored).result() and op is not None
        finally:
            self._checks.release()
        if ok:
            self._tx(lambda db: db.execute("DELETE FROM pin_failures WHERE operator_id=?", (operator_id,)))
        else:
            def fail(db: sqlite3.Connection) -> tuple[int, float]:
                n = db.execute("SELECT count(*) FROM pin_failures WHERE operator_id=?", (operator_id,)).fetchone()[0]
                if n < self.max_failures:
                    return int(n), 0.0
                at = self.clock()
                strikes = self._strikes(db, operator_id, at) + 1
                until = at + self.lock_duration(strikes)
                db.execute("INSERT OR REPLACE INTO pin_locks (operator_id, until) VALUES (?, ?)", (operator_id, until))
                db.execute("INSERT OR REPLACE INTO pin_strikes (operator_id, strikes, until) VALUES (?, ?, ?)",
                           (operator_id, min(strikes, 1000), until))
                db.execute("DELETE FROM pin_failures WHERE operator_id=?", (operator_id,))
                return int(n), until - at

            n, lock_s = self._tx(fail)
            if n >= self.max_failures:
                raise SignInError("locked", gettext("wrong PIN {n} times: operator {id} is locked for {minutes} min",
                                                    n=self.max_failures, id=operator_id,
                                                    minutes=int(lock_s // 60)), lock_s)
            left = max(0, self.max_failures - nth)
            raise SignInError("bad_pin", gettext("wrong operator id or PIN ({n} tries left before lockout)", n=left),
                              tries_left=left)
        assert op is not None
        if role and op.role != role:
            raise SignInError("role", gettext("operator {id} is not a supervisor", id=operator_id)
                              if role == "supervisor" else gettext("operator {id} is not an operator", id=operator_id))
        return op


@dataclass
class SignedIn:
    """A signed-in operator's session token and idle timer."""

    operator: Operator
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    last_active: float = field(default_factory=time.monotonic)

    def touch(self, now: float) -> None:
        self.last_active = now


def operators_from_config(entries: list[dict[str, Any]]) -> list[Operator]:
    """Build operators from the validated `[operators] list` config entries."""
    return [Operator(str(e["id"]), str(e.get("name", e["id"])), str(e["pin_hash"]), str(e.get("role", "operator")))
            for e in entries]
