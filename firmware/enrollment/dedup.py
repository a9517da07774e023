"""Local duplicate checks before a record is sealed.

* NIK: a NIK already enrolled on this kit is refused unless the operator gives a reason. The
  journal keeps only an HMAC of each NIK (key in the identity folder), never the NIK itself.
* Fingerprints: the index fingers of each enrollment go into the sensor's own template library;
  a new enrollment's fingers are searched there (the sensor's 1:N Search), and a hit that belongs
  to a *different* NIK flags a likely double enrollment for a supervisor's decision.

The sensor library is small (R307: 1,000 slots; R503: 200), so it holds the most recent
enrollments: with two fingers each, the last 500 residents on an R307. When it is full the
oldest slots are reused. Central de-duplication at the data center covers everything else.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from firmware.store.journal import Journal
from firmware.system.fsutil import atomic_write

log = logging.getLogger(__name__)


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

    def __init__(self, journal: Journal, key: bytes, library_capacity: int | Callable[[], int] = 0) -> None:
        self.j = journal
        self.key = key
        self._capacity = library_capacity

    @property
    def capacity(self) -> int:
        """Slots of the sensor library this kit uses (0: no fingerprint check)."""
        c = self._capacity
        return int(c() if callable(c) else c)

    def digest(self, nik: str) -> str:
        return hmac.new(self.key, nik.encode(), hashlib.sha256).hexdigest()

    def nik_enrolled(self, nik: str) -> list[str]:
        """Record ids already enrolled here under this NIK."""
        return self.j.nik_records(self.digest(nik))

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
