"""Fixtures for the update tests: real venv slots under a temporary install prefix, real rekamd processes, and
a small process supervisor standing in for systemd (it does what rekamd.service says: start
``<prefix>/current/bin/rekamd``, wait for READY=1 on a notify socket, TimeoutStartSec kills it).

Kept fast: the real rekam wheel (version 0.2.0) is built once per session; the factory slot is a venv without
pip whose path points at the checkout; new slots get pip from the test interpreter (``pip --python``), and the
dependencies through a ``.pth`` (the dev venv's site-packages) instead of a wheelhouse.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.control.update import Updater, slot_env
from firmware.wire import control_protocol as cp
from firmware.wire import update_bundle as ub
from tests.support import REPO, Rekamd, rekam
from tests.system.conftest import write_kit_config

SITE = sysconfig.get_path("purelib")  # the dev venv's dependencies
JOURNAL = {"reads": [1, 2], "writes": 2, "compatible_from": 2}
RECORDS = {"reads": [1], "writes": 1}


def tiny_wheel(out: Path, version: str, daemon_body: str) -> Path:
    """A minimal wheel named rekam `version` whose ``rekamd`` runs `daemon_body` (a broken release)."""
    files = {
        "firmware/__init__.py": f'__version__ = "{version}"\n',
        "firmware/daemon.py": "import sys, time\n\ndef run():\n" + "".join(f"    {ln}\n" for ln in
                                                                         daemon_body.splitlines()),
        f"rekam-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: rekam\nVersion: {version}\n",
        f"rekam-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                           "Tag: py3-none-any\n",
        f"rekam-{version}.dist-info/entry_points.txt": "[console_scripts]\nrekamd = firmware.daemon:run\n",
    }
    return write_wheel(out / f"rekam-{version}-py3-none-any.whl", {k: v.encode() for k, v in files.items()})


def write_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel at `path` holding `files` (archive name -> bytes, a ``*.dist-info/`` among them) and the RECORD
    that lists them with their hashes."""
    info = next(name.split("/")[0] for name in files if name.split("/")[0].endswith(".dist-info"))
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def build_rekam_wheel(root: Path, version: str, edits: dict[str, tuple[str, str]] | None = None) -> Path:
    """The real rekam wheel from this checkout at `version`, with `edits` (file -> (old, new) text) applied."""
    src = root / "src"
    src.mkdir(parents=True)
    for name in ("firmware", "hw", "provisioning"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    edits = {"pyproject.toml": ('version = "0.1.0"', f'version = "{version}"'),
             "firmware/__init__.py": ('__version__ = "0.1.0"', f'__version__ = "{version}"'), **(edits or {})}
    for rel, (old, new) in edits.items():
        f = src / rel
        text = f.read_text()
        assert old in text, (rel, old)
        f.write_text(text.replace(old, new, 1))
    out = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", "-w",
                    str(out), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob(f"rekam-{version}-*.whl")
    return whl


@pytest.fixture(scope="session")
def rekam_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real rekam wheel, from this checkout with its version set to 0.2.0 (built once per session)."""
    return build_rekam_wheel(tmp_path_factory.mktemp("wheel-src"), "0.2.0")


@pytest.fixture(scope="session")
def fleet_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def make_bundle(out: Path, wheel: Path, version: str, key: Ed25519PrivateKey | None, min_from: str = "0.1.0",
                journal: dict[str, Any] | None = None) -> Path:
    """A bundle of one wheel, signed with `key`."""
    body = ub.manifest_body(version, min_from, [ub.describe_wheel(wheel)], journal or JOURNAL, RECORDS)
    path = out / f"rekam-{version}.rkup"
    ub.write_bundle(path, body, {wheel.name: wheel}, key)
    return path


class Supervisor:
    """The test's stand-in for systemd running rekamd.service: one rekamd from ``<prefix>/current``."""

    def __init__(self, prefix: Path, cfg: Path, log: Path) -> None:
        self.prefix, self.cfg, self.log = prefix, cfg, log
        self.sock_path = f"/tmp/rekam-upd-{os.getpid()}-{id(self)}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.daemon: Rekamd | None = None
        self.starts = 0

    def restart(self, timeout: float) -> tuple[bool, str]:
        """Like ``systemctl restart``: stop, start, wait for READY=1; a start that exits or times out fails."""
        self.stop()
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv(4096):  # what the stopped daemon said last
                pass
        self.starts += 1
        d = Rekamd(self.cfg, self.log, command=[str(self.prefix / "current" / "bin" / "rekamd")],
                   env={"PYTHONPATH": None, "NOTIFY_SOCKET": self.sock_path})
        self.daemon = d.start(wait=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if d.proc is not None and d.proc.poll() is not None:
                return False, f"rekamd exited with status {d.proc.returncode} before READY"
            self.sock.settimeout(0.2)
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return True, ""
            except TimeoutError:
                pass
        d.stop(timeout=2)  # TimeoutStartSec: systemd kills a start that never became ready
        return False, f"no READY within {timeout:.0f} s"

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def close(self) -> None:
        self.stop()
        self.sock.close()
        os.unlink(self.sock_path)


class Kit:
    """A simulated kit with an install prefix: factory slot, config, pinned fleet key, records."""

    def __init__(self, root: Path, corpus: Path, key: Ed25519PrivateKey, extra: str = "") -> None:
        self.root = root
        self.prefix = root / "opt"
        self.prefix.mkdir()
        self.cfg = write_kit_config(root, corpus, extra=extra)
        self.state_dir = root / "sd"
        (self.state_dir / "control").mkdir(parents=True)
        (self.state_dir / "control" / "fleet.pub").write_text(cp.public_b64(key))
        # The root-owned pin beside the config (`firmware.control.update.pin_path`): what `rekam update apply`
        # verifies with (rekam-fleet-pin.service makes it on a kit; the daemon's control/fleet.pub never counts).
        self.pin = self.cfg.parent / "fleet.pub"
        self.pin.write_text(cp.public_b64(key) + "\n")
        self._factory_slot()
        self.sup = Supervisor(self.prefix, self.cfg, root / "rekamd.log")

    def _factory_slot(self) -> None:
        """``venv``: what `make install` makes, here a venv running the checkout (version 0.1.0)."""
        venv = self.prefix / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
        site = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path("
                               "'purelib'))"], capture_output=True, text=True, check=True, env=slot_env()).stdout
        Path(site.strip(), "_rekam_site.pth").write_text(f"{REPO}\n{SITE}\n")
        for name, target in (("rekamd", "firmware.daemon import run as main"), ("rekam", "firmware.cli.main import "
                                                                                          "main")):
            p = venv / "bin" / name
            p.write_text(f"#!{venv}/bin/python\nimport sys\nfrom {target}\nsys.exit(main())\n")
            p.chmod(0o755)
        os.symlink("venv", self.prefix / "current")

    def updater(self, **kw: Any) -> Updater:
        from firmware.cli.update import api_probe

        kw.setdefault("ready_timeout_s", 45.0)
        kw.setdefault("selftest_timeout_s", 30.0)
        return Updater(self.prefix, self.state_dir, cp.load_public_b64((self.state_dir / "control/fleet.pub")
                                                                       .read_text()),
                       restart=self.sup.restart, probe=lambda v, up, t: api_probe(self.state_dir, v, up, t),
                       python=sys.executable, with_pip=False, site_paths=[SITE], **kw)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return rekam("update", *args, "--prefix", str(self.prefix), cfg=self.cfg, timeout=timeout)

    def records(self, with_state: bool = True) -> dict[str, Any]:
        """Every record's journal row and the hash of its file on the SD (what no update may change; the state
        too unless a relay is moving records on meanwhile)."""
        conn = sqlite3.connect(f"file:{self.state_dir / 'journal.db'}?mode=ro", uri=True)
        try:
            cols = "id, seq, sha256, size" + (", state" if with_state else "")
            rows = conn.execute(f"SELECT {cols} FROM records ORDER BY seq").fetchall()
        finally:
            conn.close()
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(self.state_dir.rglob("*.rkm"))}
        return {"rows": rows, "files": files}

    def running_version(self) -> str:
        st = rekam("status", "--json", cfg=self.cfg)
        import json

        return str(json.loads(st.stdout)["daemon"]["version"]) if st.returncode == 0 else ""


def _started(k: Kit) -> Kit:
    ok, why = k.sup.restart(60)
    assert ok, why + (k.root / "rekamd.log").read_text()[-2000:]
    r = rekam("sim", "commit", "3", cfg=k.cfg)
    assert r.returncode == 0, r.stderr
    return k


@pytest.fixture
def kit(tmp_path: Path, corpus_dir: Path, fleet_key: Ed25519PrivateKey) -> Iterator[Kit]:
    """A kit running the factory slot with 3 committed records."""
    k = _started(Kit(tmp_path, corpus_dir, fleet_key))
    yield k
    k.sup.close()


@pytest.fixture
def relay_kit(tmp_path: Path, corpus_dir: Path, fleet_key: Ed25519PrivateKey, mosquitto: Any) -> Iterator[Kit]:
    """The same kit with its record relay connected to a real broker (the uplink a trial must see again)."""
    from tests.relay.conftest import ACK_PUB

    extra = f'[relay]\nbrokers = ["{mosquitto.url}"]\nbackoff_min_s = 0.1\nbackoff_max_s = 0.5\n' \
            f'ack_public_keys = ["{ACK_PUB}"]\n'
    k = _started(Kit(tmp_path, corpus_dir, fleet_key, extra))
    yield k
    k.sup.close()
