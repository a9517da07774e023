"""`rekam enroll` sign-in refusals and `rekam usb export` beside the daemon's own backfill (real rekamd --sim)."""

from __future__ import annotations

import re

from tests.console.conftest import Daemon
from tests.support import rekam

EN = {"REKAM_LANG": "en"}


def test_lockout_is_said_once_with_the_right_plural(daemon: Daemon) -> None:
    r = rekam("enroll", "--operator", "demo", cfg=daemon.cfg, input="111111\n222222\n333333\n", env=EN)
    assert r.returncode == 1
    assert [int(n) for n in re.findall(r"\((\d+) tries left before lockout\)", r.stdout)] == [4, 3, 2], r.stdout
    r = rekam("enroll", "--operator", "demo", cfg=daemon.cfg, input="444444\n555555\n", env=EN)
    assert "(1 try left before lockout)" in r.stdout and "1 tries" not in r.stdout, r.stdout
    out = r.stdout + r.stderr
    assert out.count("try again in 15 minutes") == 1, out  # the fifth wrong PIN locks: said once, on stderr
    assert "(try again" not in out and "min (" not in out
    r = rekam("enroll", "--operator", "demo", cfg=daemon.cfg, input="123456\n")  # Indonesian, still locked
    assert r.returncode == 1 and (r.stdout + r.stderr).count("coba lagi dalam") == 1, r.stdout + r.stderr
    assert "rekam enroll: petugas terkunci" in r.stderr and "terkunci" not in r.stdout


def test_usb_export_beside_the_background_backfill_tells_the_truth(daemon: Daemon) -> None:
    usb = daemon.usb
    usb.rename(daemon.root / "usb-out")  # no stick while records are captured
    assert rekam("sim", "commit", "40", cfg=daemon.cfg).returncode == 0
    (daemon.root / "usb-out").rename(usb)  # the stick is back: the daemon's watcher starts its backfill
    r = rekam("usb", "export", "--batch", "2", cfg=daemon.cfg, env=EN)
    assert r.returncode == 0, r.stdout + r.stderr
    bars = re.findall(r"\] (\d+)/(\d+)", r.stdout)
    done, total = map(int, bars[-1])
    assert done == total, r.stdout  # the bar ends full
    assert all(int(a) <= int(b) for a, b in bars) and [int(a) for a, _ in bars] == sorted(int(a) for a, _ in bars)
    m = re.search(r"all (\d+) records are on it; (\d+) copied now(?:; (\d+) by the kit's background copy)?",
                  r.stdout)
    assert m and int(m.group(1)) == 40, r.stdout
    assert int(m.group(2)) + int(m.group(3) or 0) == total, r.stdout  # every record the bar counted, by whom
    assert len(list(usb.rglob("*.rkm"))) == 40


def test_terminal_enrollment_speaks_indonesian_by_default(daemon: Daemon) -> None:
    from tests.console.conftest import NIK_MALE

    r = rekam("enroll", cfg=daemon.cfg, input="demo\n123456\n" + NIK_MALE + "\n" + "\n" * 12)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "Masuk sebagai: Demo Operator (demo, operator)" in out and "dimulai untuk NIK 320101******0001" in out
    assert "[Enter] ambil  [x] pengecualian  [c] batal" in out and "TERSIMPAN rekaman " in out, out
    assert "Signed in" not in out and "STORED" not in out
