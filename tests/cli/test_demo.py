"""`make demo` (tools/demo.py): its own state, records it makes itself and says so, delivered end to end."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support import REPO, subprocess_env


def test_demo_keeps_to_its_own_folder_and_delivers_its_records(tmp_path: Path, corpus_dir: Path) -> None:
    root = tmp_path / "demo"
    r = subprocess.run([sys.executable, "tools/demo.py", "--root", str(root), "--records", "3", "--api-port", "0",
                        "--until-delivered"], capture_output=True, text=True, timeout=180, cwd=REPO,
                       env=subprocess_env({"REKAM_CORPUS": str(corpus_dir)}))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo: committed 3 simulated enrollments" in r.stdout and "all 3 records delivered" in r.stdout
    assert ".venv/bin/rekam --config" in r.stdout and ".venv/bin/rekam-fleet open" in r.stdout
    cfg = tomllib.loads((root / "rekam-demo.toml").read_text())
    for key, value in (("state_dir", cfg["kit"]["state_dir"]), ("mount_point", cfg["usb"]["mount_point"]),
                       ("public_key_files", cfg["datacenter"]["public_key_files"][0])):
        assert (root / value).resolve().is_relative_to(root.resolve()), (key, value)
    assert cfg["api"]["port"] != 8470  # `make run`'s console port
    assert len(list((root / "archive" / "records").rglob("*.rkm"))) == 3


def test_readme_commands_are_on_path() -> None:
    """README command lines (code blocks, and inline commands with a path or a VAR=value) run the CLIs through
    .venv/bin, never a bare `rekam` that is not on PATH after `make run` (the table of command names is exempt)."""
    import re

    text = (REPO / "README.md").read_text()
    lines = [ln for b in re.findall(r"```\n(.*?)```", text, re.S) for ln in b.splitlines()]
    lines += [c for c in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
              if re.search(r"(^|\s)[A-Z_]+=|var/|--config", c)]
    bare = [ln for ln in lines if re.search(r"(^|[\s;|&(])(rekam|rekam-fleet|rekamd) [a-z]", ln)]
    assert not bare, f"README runs bare commands (use .venv/bin/... or a make target): {bare}"
