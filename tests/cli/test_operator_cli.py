"""`rekam operator hash-pin | locks | unlock` against a real `rekamd --sim` and its lockout database."""

from __future__ import annotations

import json

import httpx

from firmware.enrollment.operators import check_pin
from tests.console.conftest import OPERATOR, Daemon
from tests.support import rekam

EN = {"REKAM_LANG": "en"}


def _signin(url: str, pin: str) -> int:
    with httpx.Client(timeout=60) as c:
        return c.post(url + "/api/v1/auth/signin", json={"operator_id": OPERATOR[0], "pin": pin}).status_code


def test_hash_pin_makes_a_hash_that_signs_in_and_refuses_a_bad_pin() -> None:
    r = rekam("operator", "hash-pin", "--stdin", input="246813\n")
    assert r.returncode == 0 and check_pin("246813", r.stdout.strip()) and not check_pin("246814", r.stdout.strip())
    bad = rekam("operator", "hash-pin", "--stdin", input="12ab\n", env=EN)
    assert bad.returncode == 2 and "4 to 12 digits" in bad.stderr


def test_a_locked_operator_is_listed_and_unlocked_while_the_daemon_runs(daemon: Daemon) -> None:
    """A supervisor locked out by wrong PINs is recovered at once (not after up to a day of doubled lockouts),
    through the daemon's own lockout database while it runs."""
    codes = [_signin(daemon.url, "000000") for _ in range(6)]
    assert codes[-1] == 423, codes  # locked
    assert _signin(daemon.url, OPERATOR[1]) == 423  # even the right PIN, while locked
    locks = json.loads(rekam("operator", "locks", "--json", cfg=daemon.cfg).stdout)
    assert [x["operator_id"] for x in locks] == [OPERATOR[0]]
    r = rekam("operator", "unlock", OPERATOR[0], cfg=daemon.cfg, env=EN)
    assert r.returncode == 0 and "unlocked" in r.stdout, r.stdout + r.stderr
    assert _signin(daemon.url, OPERATOR[1]) == 200
    assert "no operator is locked out" in rekam("operator", "locks", cfg=daemon.cfg, env=EN).stdout
    assert "was not locked" in rekam("operator", "unlock", OPERATOR[0], cfg=daemon.cfg, env=EN).stdout
