"""Fixtures for the OS-integration tests: a kit config in a temp folder, root and tool checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from firmware.wire import record_format
from tests.support import write_daemon_config

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"


def need_tool(name: str, package: str) -> str:
    """Path of `name`, or fail naming the Debian package to install (never a silent skip)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} not found: apt-get install -y {package} (make system-deps does it as root)")
    return path


def need_root(what: str) -> None:
    """These tests drive loop devices and mounts; CI and the dev container run as root."""
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (loop devices, mount)")


def write_kit_config(root: Path, corpus: Path, **extra: str) -> Path:
    """A sim kit config under `root` with a fresh data-center key; returns its path."""
    priv, pub = record_format.generate_datacenter_keypair()
    (root / "dc.pub").write_bytes(pub)
    return write_daemon_config(root, root / "dc.pub", corpus, "".join(f"{v}\n" for v in extra.values()))
