"""NIK digest benchmark (issue #13 finding 8): what one guess costs an attacker holding a stolen SD card.

The card holds `nik.key` and the journal's digests, so every guess is one digest. This measures, in
the same run, the old digest (HMAC-SHA256, the baseline) and the new one (scrypt N=2^14 r=8 p=1,
`firmware.enrollment.dedup.slow_digest`), prints ms per digest, the ratio, and what that implies:

* one NIK whose district and birth year are known: 366 days x 2 sexes x serials, and the 1.38 M
  guesses after which the finding's NIK fell;
* a whole district: every birth date of 100 years x 2 x serials (one pass finds every NIK of that
  district on the card: the salt is kit-wide, as the check must find a NIK by its digest).

    .venv/bin/python bench/bench_nik.py [--trials N] [--serials S]

Costs are CPU core-hours at this machine's speed (one core per digest: scrypt is memory-hard, 16 MiB
per guess, so a GPU gains far less than it does on HMAC). Run it on the kit (a Pi) for the kit's figure.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware.enrollment.dedup import NIK_SCRYPT_N, NIK_SCRYPT_P, NIK_SCRYPT_R, slow_digest  # noqa: E402

FINDING_TRIES = 1_380_000  # the finding: one NIK fell after 1.38 M guesses (district and birth year known)


def per_digest_s(fn, trials: int, batch: int) -> float:
    """Median seconds per call of `fn(i)` over `trials` batches of `batch` calls."""
    runs = []
    for t in range(trials):
        t0 = time.perf_counter()
        for i in range(batch):
            fn(t * batch + i)
        runs.append((time.perf_counter() - t0) / batch)
    return statistics.median(runs)


def hours(tries: float, s: float) -> str:
    """Core time for `tries` digests of `s` seconds each, in a readable unit."""
    t = tries * s
    if t < 120:
        return f"{t:,.1f} core-s"
    if t < 3 * 3600:
        return f"{t / 60:,.0f} core-min"
    return f"{t / 3600:,.1f} core-h" if t < 3 * 86400 else f"{t / 86400:,.0f} core-days"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5, help="batches per digest (median taken)")
    ap.add_argument("--serials", type=int, default=9999, help="serials per birth date and district to assume")
    a = ap.parse_args()
    key = os.urandom(32)
    nik = "3201015505900007"
    t_hmac = per_digest_s(lambda i: hmac.new(key, f"{nik[:12]}{i % 10000:04d}".encode(), hashlib.sha256).digest(),
                          a.trials, 20_000)
    t_scrypt = per_digest_s(lambda i: slow_digest(key, f"{nik[:12]}{i % 10000:04d}"), a.trials, 8)
    print(f"scrypt N=2^{NIK_SCRYPT_N.bit_length() - 1} r={NIK_SCRYPT_R} p={NIK_SCRYPT_P} "
          f"({128 * NIK_SCRYPT_R * NIK_SCRYPT_N // 2**20} MiB per digest)")
    print(f"hmac-sha256 (old, baseline): {t_hmac * 1e6:8.2f} us/digest  ({1 / t_hmac:,.0f} per s per core)")
    print(f"scrypt (new):                {t_scrypt * 1e3:8.2f} ms/digest  ({1 / t_scrypt:,.1f} per s per core)")
    print(f"ratio scrypt/hmac: {t_scrypt / t_hmac:,.0f}x")
    one = 366 * 2 * a.serials
    district = 100 * 366 * 2 * a.serials
    print(f"one NIK, district + birth year known, {FINDING_TRIES:,} guesses (the finding): "
          f"old {hours(FINDING_TRIES, t_hmac)}, new {hours(FINDING_TRIES, t_scrypt)}")
    print(f"one NIK, whole year searched ({one:,} guesses, serials 1..{a.serials}): "
          f"old {hours(one, t_hmac)}, new {hours(one, t_scrypt)}")
    print(f"whole district, 100 birth years ({district:,} guesses): "
          f"old {hours(district, t_hmac)}, new {hours(district, t_scrypt)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
