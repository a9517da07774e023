"""Operator sign-in: per-operator PINs (scrypt hashes), lockout after repeated failures, idle sign-out.

Operators come from config (`[operators] list`), later from the fleet. A PIN hash is made with
`rekam operator hash-pin`. Lockout state is kept in memory and in the journal's audit log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware.errors import SignInError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


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


@dataclass
class _Attempts:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class Operators:
    """Sign-in with lockout. Thread safe; `clock` is injectable so lockout can be tested without waiting."""

    def __init__(self, operators: list[Operator], max_failures: int = 5, lockout_s: float = 900,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.by_id = {o.id: o for o in operators}
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self.clock = clock
        self._attempts: dict[str, _Attempts] = {}
        self._lock = threading.Lock()

    def replace(self, operators: list[Operator]) -> None:
        """New operator list (from the fleet); lockouts are kept."""
        with self._lock:
            self.by_id = {o.id: o for o in operators}

    def authenticate(self, operator_id: str, pin: str, role: str | None = None) -> Operator:
        """Check a PIN; raise `SignInError` (and count the failure) when it is wrong or the operator is locked."""
        now = self.clock()
        with self._lock:
            st = self._attempts.setdefault(operator_id, _Attempts())
            if st.locked_until > now:
                raise SignInError("locked", f"operator {operator_id} is locked after {self.max_failures} wrong PINs; "
                                  f"try again in {int(st.locked_until - now) // 60 + 1} min", st.locked_until - now)
            op = self.by_id.get(operator_id)
        # Hash even for unknown ids so timing does not reveal which ids exist.
        ok = check_pin(pin, op.pin_hash if op else hash_pin("0000", b"x" * 16))
        with self._lock:
            if op is None or not ok:
                st.failures = [t for t in st.failures if now - t < self.lockout_s] + [now]
                if len(st.failures) >= self.max_failures:
                    st.locked_until = now + self.lockout_s
                    st.failures.clear()
                    raise SignInError("locked", f"wrong PIN {self.max_failures} times: operator {operator_id} is "
                                      f"locked for {int(self.lockout_s // 60)} min", self.lockout_s)
                left = self.max_failures - len(st.failures)
                raise SignInError("bad_pin", f"wrong operator id or PIN ({left} tries left before lockout)")
            st.failures.clear()
        if role and op.role != role:
            raise SignInError("role", f"operator {operator_id} is not a {role}")
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
