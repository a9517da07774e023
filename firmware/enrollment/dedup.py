"""Local duplicate checks before a record is sealed.

* NIK: a NIK already enrolled on this kit is refused unless the operator gives a reason. The
  journal keeps only a slow keyed digest of each NIK, never the NIK itself: scrypt (N=2^14, r=8,
  p=1: 16 MiB and tens of ms per NIK) salted with the kit's `nik.key`, stored as ``s1:<hex>``.
  A stolen SD card holds the key too, so the slowness is what protects the NIKs: each guess costs
  the attacker one scrypt instead of one HMAC (docs/security.md gives the figures and
  `bench/bench_nik.py` measures them). Digests made by earlier versions (HMAC-SHA256, no prefix)
  cannot be re-hashed without the NIK: they are still found, and re-keyed the moment their NIK is
  typed again (`nik_enrolled`); those older than `legacy_keep_days` are dropped at start-up.
* Fingerprints: the index fingers of each enrollment go into the sensor's own template library;
  a new enrollment's fingers are searched there (the sensor's 1:N Search), and a hit that belongs
  to a *different* NIK flags a likely double enrollment for a supervisor's decision.

The sensor library is small (R307: 1,000 slots; R503: 200), so it holds the most recent
enrollments: with two fingers each, the last 500 residents on an R307. When it is full the
oldest slots are reused. Central de-duplication at the data center covers everything else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from firmware.store.journal import Journal
from firmware.system.clock import iso, utc_now
from firmware.system.fsutil import atomic_write

log = logging.getLogger(__name__)

# scrypt cost of one NIK digest: 16 MiB (128 * r * N bytes) and ~40 ms here, ~4x that on a Pi 4 core.
NIK_SCRYPT_N, NIK_SCRYPT_R, NIK_SCRYPT_P = 2**14, 8, 1
DIGEST_PREFIX = "s1:"
LEGACY_KEEP_DAYS = 90


def slow_digest(key: bytes, nik: str, n: int = NIK_SCRYPT_N, r: int = NIK_SCRYPT_R, p: int = NIK_SCRYPT_P) -> str:
    """The journal's NIK digest: ``s1:`` + hex scrypt(NIK, salt = the kit's NIK key)."""
    h = hashlib.scrypt(nik.encode(), salt=key, n=n, r=r, p=p, dklen=32, maxmem=2 * 128 * r * n + (1 << 20))
    return DIGEST_PREFIX + h.hex()


def legacy_digest(key: bytes, nik: str) -> str:
    """The digest of versions before issue #13 (HMAC-SHA256, fast: an oracle for a stolen card)."""
    return hmac.new(key, nik.encode(), hashlib.sha256).hexdigest()


class TemplateLibrary(Protocol):
    """What the check needs from the sensor driver (`hw.sensor.driver.FingerprintSensor`)."""

    def download_template(self, data: bytes, buffer: int = 1) -> None: ...
    def search(self, buffer: int = 1, start: int = 0, count: int | None = None,
               high_speed: bool = False) -> Any: ...
    def store(self, page: int, buffer: int = 1) -> None: ...


def nik_key(state_dir: Path) -> bytes:
    """The kit's secret for NIK digests, created on first use (mode 0600)."""
    path = state_dir / "identity" / "nik.key"
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = os.urandom(32)
    old = os.umask(0o077)
    try:
        atomic_write(path, key)
    finally:
        os.umask(old)
    return key


@dataclass(frozen=True)
class FingerHit:
    """A library slot that matched one of the new prints."""

    finger: str
    page: int
    score: int
    record_id: str
    other_finger: str


class DuplicateChecker:
    """NIK and fingerprint checks against this kit's earlier enrollments."""

    def __init__(self, journal: Journal, key: bytes, library_capacity: int | Callable[[], int] = 0,
                 legacy_keep_days: float = LEGACY_KEEP_DAYS) -> None:
        self.j = journal
        self.key = key
        self._capacity = library_capacity
        # one enrollment asks for the same NIK's digest several times (check, search, remember): hash it once
        self._digest = lru_cache(maxsize=8)(lambda nik: slow_digest(self.key, nik))
        self.drop_legacy(older_than_days=legacy_keep_days)

    @property
    def capacity(self) -> int:
        """Slots of the sensor library this kit uses (0: no fingerprint check)."""
        c = self._capacity
        return int(c() if callable(c) else c)

    def digest(self, nik: str) -> str:
        """The NIK's slow keyed digest as the journal keeps it."""
        return str(self._digest(nik))

    def nik_enrolled(self, nik: str) -> list[str]:
        """Record ids already enrolled here under this NIK (re-keys rows of the old, fast digest on a match)."""
        new = self.digest(nik)
        found = self.j.nik_records(new)
        old = legacy_digest(self.key, nik)
        legacy = self.j.nik_records(old)
        if legacy:
            self._rekey(old, new, legacy)
            found += [r for r in legacy if r not in found]
        return found

    def _rekey(self, old: str, new: str, records: list[str]) -> None:
        """Move the rows of a fast legacy digest to the slow one (the NIK is known now, so it can be re-hashed)."""
        for rid in records:
            self.j.add_nik(new, rid)
        with self.j.transaction() as c:
            c.execute("DELETE FROM niks WHERE digest = ?", (old,))
            c.execute("UPDATE fp_library SET nik_digest = ? WHERE nik_digest = ?", (new, old))
        log.info("nik digests re-keyed from the legacy HMAC to scrypt records=%d", len(records))

    def drop_legacy(self, older_than_days: float) -> int:
        """Delete legacy (fast HMAC) NIK rows older than `older_than_days`; returns how many went.

        They cannot be re-hashed without the NIK, and each one is a fast oracle on a stolen card; a
        resident enrolled that long ago is still found by the data center's de-duplication.
        """
        cutoff = iso(utc_now() - dt.timedelta(days=older_than_days))
        with self.j.transaction() as c:
            n = c.execute("DELETE FROM niks WHERE digest NOT LIKE ? AND at < ?", (DIGEST_PREFIX + "%", cutoff)).rowcount
        if n:
            log.info("legacy nik digests dropped rows=%d older_than_days=%s", n, older_than_days)
        return int(n)

    def search_fingers(self, sensor: TemplateLibrary, nik: str, templates: dict[str, bytes]) -> list[FingerHit]:
        """Search each template in the sensor library; return hits that belong to another NIK."""
        capacity = self.capacity
        if not capacity:
            return []
        pages = self.j.library_pages()
        mine = self.digest(nik)
        hits = []
        for finger, tpl in templates.items():
            sensor.download_template(tpl, 1)
            res = sensor.search(1, 0, capacity)
            if res is None:
                continue
            owner = pages.get(res.page)
            if owner is None:
                log.warning("sensor library hit on a slot this kit did not assign page=%d", res.page)
                continue
            if owner["nik_digest"] != mine:
                hits.append(FingerHit(finger, res.page, res.score, owner["record_id"], owner["finger"]))
        return hits

    def remember(self, sensor: TemplateLibrary | None, nik: str, record_id: str, templates: dict[str, bytes]) -> None:
        """After a commit: index the NIK and put the templates into the sensor library."""
        digest = self.digest(nik)
        self.j.add_nik(digest, record_id)
        if sensor is None or not self.capacity:
            return
        for finger, tpl in templates.items():
            page = self._free_page()
            try:
                sensor.download_template(tpl, 1)
                sensor.store(page, 1)
            except Exception as e:  # the record is committed; a library failure only weakens later checks
                log.warning("could not store template in sensor library page=%d error=%s", page, e)
                continue
            self.j.set_library_page(page, record_id, digest, finger)

    def _free_page(self) -> int:
        pages = self.j.library_pages()
        for p in range(self.capacity):  # noqa: B007
            if p not in pages:
                return p
        # Full: reuse the oldest slot (the library is a window over recent enrollments).
        return min(pages.values(), key=lambda r: (r["at"], r["page"]))["page"]
