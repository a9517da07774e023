"""`rekam-fleet import` of an unknown kit's stick prints a register-kit command that works pasted as printed."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import REPO, rekam, subprocess_env, write_daemon_config

FLEET = (sys.executable, "-m", "provisioning.cli")


def _fleet(*args: str, lang: str | None = "en") -> subprocess.CompletedProcess[str]:
    """Run rekam-fleet; `lang` None: no $REKAM_LANG (the default language, Indonesian)."""
    return subprocess.run([*FLEET, *args], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=subprocess_env({"REKAM_LANG": lang}))


def test_printed_register_kit_command_runs_as_printed(tmp_path: Path, dc_keys: dict[str, Any],
                                                      corpus_dir: Path) -> None:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    assert rekam("sim", "commit", "2", cfg=cfg).returncode == 0
    archive = tmp_path / "my archive"  # a space: the printed command must quote it
    r = _fleet("import", str(tmp_path / "usb"), "--archive", str(archive), "--no-progress")
    assert r.returncode == 1, r.stdout + r.stderr
    m = re.search(r"then: (rekam-fleet archive register-kit .+?) ; or --tofu", r.stdout)
    assert m, r.stdout
    argv = shlex.split(m.group(1))
    assert argv[:3] == ["rekam-fleet", "archive", "register-kit"] and "--archive" in argv
    done = _fleet(*argv[1:])  # exactly as printed (rekam-fleet = python -m provisioning.cli)
    assert done.returncode == 0, done.stdout + done.stderr
    r = _fleet("import", str(tmp_path / "usb"), "--archive", str(archive), "--no-progress")
    assert r.returncode == 0 and re.search(r"new:\s+2", r.stdout), r.stdout + r.stderr


def test_import_report_is_indonesian_by_default_and_json_stays_english(tmp_path: Path, dc_keys: dict[str, Any],
                                                                       corpus_dir: Path) -> None:
    """Data-center staff read Indonesian: the report lines and the rejection reason (with its command, which is
    the same in every language); `--json` keeps its English keys and reason text for scripts."""
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    assert rekam("sim", "commit", "1", cfg=cfg).returncode == 0
    archive = tmp_path / "archive"
    r = _fleet("import", str(tmp_path / "usb"), "--archive", str(archive), "--no-progress", lang=None)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^diimpor dari .+: perangkat -$", r.stdout, re.M), r.stdout
    assert re.search(r"^  baru:\s+0$", r.stdout, re.M) and re.search(r"^  ditolak:\s+1$", r.stdout, re.M), r.stdout
    assert "belum terdaftar" in r.stdout and "rekam-fleet archive register-kit rk-" in r.stdout, r.stdout
    assert "imported from" not in r.stdout and "not registered" not in r.stdout, r.stdout
    js = _fleet("import", str(tmp_path / "usb"), "--archive", str(archive), "--no-progress", "--json", lang=None)
    doc = json.loads(js.stdout)
    assert doc["new"] == 0 and "is not registered" in doc["rejected"][0]["reason"], js.stdout
    en = _fleet("import", str(tmp_path / "usb"), "--archive", str(archive), "--no-progress", lang="en")
    assert en.stdout.startswith("imported from ") and "is not registered" in en.stdout, en.stdout
