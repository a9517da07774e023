"""Issue #13 finding 8: a stolen SD card (journal + nik.key) is no fast oracle for the NIKs.

Real SQLite journal. The attack of the finding is replayed at a bounded scale: an attacker holding
the card's key and journal guesses the NIKs of one district and birth date (both sexes, serials
1..N) and compares each guess with the stored digests. Before the fix a guess cost one HMAC; now
it costs one scrypt, measured against the HMAC in the same run (bench/bench_nik.py for the full figures).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

from firmware.enrollment.dedup import DIGEST_PREFIX, DuplicateChecker, legacy_digest, nik_key, slow_digest
from firmware.store.journal import Journal

NIK = "3201015505900007"  # Jawa Barat, a woman born 15.05.1990, serial 0007


def test_digest_is_slow_scrypt_not_hmac(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.sqlite")
    key = nik_key(tmp_path)
    dc = DuplicateChecker(j, key)
    dc.remember(None, NIK, "rk-abcdefghjk-00000001-20261129T040312Z", {})
    rows = [r[0] for r in j.conn.execute("SELECT digest FROM niks")]
    assert rows == [slow_digest(key, NIK)] and rows[0].startswith(DIGEST_PREFIX)
    assert legacy_digest(key, NIK) not in rows and NIK not in rows[0]
    assert dc.nik_enrolled(NIK) == ["rk-abcdefghjk-00000001-20261129T040312Z"]
    assert dc.nik_enrolled("3201015505900008") == []
    j.close()


def test_guessing_from_a_stolen_card_costs_one_scrypt_per_guess(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.sqlite")
    key = nik_key(tmp_path)
    DuplicateChecker(j, key).remember(None, NIK, "rk-abcdefghjk-00000001-20261129T040312Z", {})
    stored = {r[0] for r in j.conn.execute("SELECT digest FROM niks")}
    guesses = [f"320101{day}0590{serial:04d}" for day in ("15", "55") for serial in range(1, 9)]
    t0 = time.perf_counter()
    fast_hits = [g for g in guesses if hmac.new(key, g.encode(), hashlib.sha256).hexdigest() in stored]
    t_hmac = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow_hits = [g for g in guesses if slow_digest(key, g) in stored]
    t_scrypt = time.perf_counter() - t0
    print(f"{len(guesses)} guesses: hmac {t_hmac * 1e6 / len(guesses):.1f} us each, "
          f"scrypt {t_scrypt * 1e3 / len(guesses):.1f} ms each, ratio {t_scrypt / max(t_hmac, 1e-9):.0f}x")
    assert fast_hits == []  # the fast digest of the old versions no longer matches anything on the card
    assert slow_hits == [NIK]  # the card still answers, but only at scrypt's price per guess
    assert t_scrypt > 100 * t_hmac
    j.close()


def test_legacy_hmac_rows_are_rekeyed_on_match_and_old_ones_dropped(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.sqlite")
    key = nik_key(tmp_path)
    rid_old, rid_recent = "rk-abcdefghjk-00000001-20250101T000000Z", "rk-abcdefghjk-00000002-20261129T040312Z"
    other = "3578015505900002"
    # rows as an earlier version wrote them: one recent, one from 200 days ago
    j.add_nik(legacy_digest(key, NIK), rid_recent)
    j.set_library_page(0, rid_recent, legacy_digest(key, NIK), "R2")
    with j.transaction() as c:
        c.execute("INSERT INTO niks VALUES (?,?,?)", (legacy_digest(key, other), rid_old, "2026-05-01T00:00:00Z"))
    dc = DuplicateChecker(j, key, legacy_keep_days=90)  # start-up drops the legacy row older than 90 days
    assert j.nik_records(legacy_digest(key, other)) == []
    assert dc.nik_enrolled(NIK) == [rid_recent]  # the recent legacy row is still found ...
    digests = {r[0] for r in j.conn.execute("SELECT digest FROM niks")}
    assert digests == {slow_digest(key, NIK)}  # ... and re-keyed: no fast digest left on the card
    assert j.library_pages()[0]["nik_digest"] == slow_digest(key, NIK)
    assert dc.nik_enrolled(NIK) == [rid_recent]
    j.close()
