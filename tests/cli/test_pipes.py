"""`rekam ... | head` and `rekam-fleet open ... | head`: a reader that goes away ends the command quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import REKAM, REPO, rekam, subprocess_env, write_daemon_config


def _into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` with stdout a pipe whose reader is already gone (as `| head` after its lines)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(argv, stdout=w, stderr=subprocess.PIPE, timeout=120, cwd=REPO, env=subprocess_env())
    finally:
        os.close(w)


def test_reader_gone_is_no_traceback(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path) -> None:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    assert rekam("sim", "commit", "2", cfg=cfg).returncode == 0
    rec = next((tmp_path / "sd" / "records").glob("*.rkm"))
    for argv in ([*REKAM, "--config", str(cfg), "records"],
                 [sys.executable, "-m", "provisioning.cli", "open", str(rec), "--key", str(dc_keys["key_path"])]):
        p = _into_closed_pipe(argv)
        err = p.stderr.decode()
        assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
        assert p.returncode == 0, (argv, p.returncode, err)
