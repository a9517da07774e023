"""`rekam status`, `rekam records`, `rekam sim commit` as an operator reads them (real rekamd --sim)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.console.conftest import Daemon
from tests.support import REKAMD, Tmpfs, rekam, subprocess_env, wait_for

EN = {"REKAM_LANG": "en"}


def test_second_rekamd_leaves_the_running_ones_api_files(daemon: Daemon) -> None:
    sd = daemon.rekamd.state_dir
    before = {n: (sd / n).read_bytes() for n in ("api.json", "api.token")}
    r = subprocess.run([*REKAMD, "--config", str(daemon.cfg), "--sim"], capture_output=True, text=True,
                       timeout=60, env=subprocess_env())
    assert r.returncode == 70, r.stderr
    assert {n: (sd / n).read_bytes() for n in before} == before
    st = rekam("status", "--json", cfg=daemon.cfg)
    assert json.loads(st.stdout)["daemon"]["version"], st.stdout + st.stderr


def test_status_names_the_stick_and_records_have_a_header(daemon: Daemon) -> None:
    assert rekam("sim", "commit", "3", cfg=daemon.cfg).returncode == 0
    wait_for(lambda: json.loads(rekam("status", "--json", cfg=daemon.cfg).stdout)["mirror_lag"]["records"] == 0,
             20, "the stick to hold every record", step=0.3)
    out = rekam("status", cfg=daemon.cfg, env=EN).stdout
    assert "on no stick" not in out, out
    sid = json.loads(rekam("status", "--json", cfg=daemon.cfg).stdout)["stick"]["stick_id"]
    assert re.search(rf"stick {re.escape(sid)}: present; every record is on a stick", out), out
    size = r"\d[\d.,]* (KiB|MiB|GiB)"
    assert re.search(rf"{size} free of {size}, room for about \d{{1,3}}(,\d{{3}})* records", out), out
    lines = rekam("records", cfg=daemon.cfg).stdout.splitlines()
    assert lines[0].split()[:4] == ["REKAMAN", "STATUS", "UKURAN", "DIBUAT"], lines  # Indonesian by default
    assert len(lines) == 4 and all(re.search(r"\d,\d KiB ", ln) for ln in lines[1:]), lines  # 347,0 KiB
    assert all(re.search(r" \d{1,2} \w{3} \d{4} \d\d\.\d\d\.\d\d UTC", ln) for ln in lines[1:]), lines
    assert rekam("records", cfg=daemon.cfg, env=EN).stdout.split()[:4] == ["RECORD", "STATE", "SIZE", "CREATED"]
    # The stick pulled: the status says so and counts what is on none.
    daemon.usb.rename(daemon.root / "usb-pulled")
    wait_for(lambda: not json.loads(rekam("status", "--json", cfg=daemon.cfg).stdout)["stick"]["present"], 10,
             "the daemon to see the stick gone", step=0.2)
    assert rekam("sim", "commit", "1", cfg=daemon.cfg).returncode == 0
    out = rekam("status", cfg=daemon.cfg, env=EN).stdout
    assert re.search(r"stick: absent( \(removed\))?; 1 record is on no stick yet", out), out
    out = rekam("status", cfg=daemon.cfg).stdout
    assert re.search(r"stik: tidak ada( \(removed\))?; 1 rekaman belum ada di stik mana pun", out), out


def test_status_with_the_daemon_stopped_says_capture_is_not_possible(daemon: Daemon) -> None:
    daemon.stop()
    r = rekam("status", cfg=daemon.cfg, env=EN)
    assert "capture: NOT POSSIBLE (the daemon is not running)" in r.stdout, r.stdout
    assert "capture: OK" not in r.stdout and "daemon: not running" in r.stdout
    r = rekam("status", cfg=daemon.cfg)
    assert "perekaman: TIDAK BISA (daemon tidak berjalan)" in r.stdout and "daemon: tidak berjalan" in r.stdout


def test_sim_commit_into_halt_lists_the_records_and_says_what_to_do(make_daemon, tmp_path: Path) -> None:
    t = Tmpfs()
    try:
        sd = t.mount(tmp_path / "sd", 20 * 1024)
        d = make_daemon(sd=sd, max_record_mb=1)
        r = rekam("sim", "commit", "200", cfg=d.cfg, env=EN)
        assert r.returncode == 2, r.stdout + r.stderr
        assert len(r.stdout) + len(r.stderr) < 20_000 and "{'" not in r.stdout + r.stderr
        n = r.stdout.count("captured ")
        assert 0 < n < 200, r.stdout
        m = re.search(r"capture halted after (\d+) records?: sd is full", r.stderr)
        assert m and int(m.group(1)) == n, r.stderr
        assert "> To do: connect the kit to the uplink" in r.stderr, r.stderr
        assert "To do:" not in r.stderr.split("\n  > ")[0]  # the action once, on its own line
        out = rekam("status", cfg=d.cfg)
        assert out.returncode == 2 and "> Yang harus dilakukan: sambungkan kit ke jaringan" in out.stdout, out.stdout
        assert out.stdout.count("Yang harus dilakukan") == 1, out.stdout
        d.stop()
    finally:
        t.cleanup()


def test_quality_face_prints_no_litert_info_line(corpus_dir: Path) -> None:
    face = sorted((corpus_dir / "faces").iterdir())[0]
    r = rekam("quality", "face", str(face))
    assert r.returncode in (0, 1), r.stderr
    assert "XNNPACK" not in r.stderr and "INFO:" not in r.stderr, r.stderr


def test_capacity_count_does_not_jump_after_the_first_records(tmp_path: Path, dc_keys, corpus_dir: Path) -> None:
    from tests.support import write_daemon_config

    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    left = lambda: json.loads(rekam("status", "--json", cfg=cfg).stdout)["media"][0]["records_left"]  # noqa: E731
    before = left()
    assert rekam("sim", "commit", "5", cfg=cfg).returncode == 0
    after = left()
    assert 0.75 < after / before < 1.25, (before, after)  # was ~20x (8 MiB assumed, ~350 KiB seen)
