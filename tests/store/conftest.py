"""Fixtures for store tests: a data-center key pair and a kit configuration in a temp folder (the `tmpfs`
fixture is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware import config
from firmware.seal import identity
from firmware.store.store import Store


def make_config(root: Path, dc_pub: Path, **sections: dict[str, Any]) -> config.Config:
    base: dict[str, dict[str, Any]] = {
        "kit": {"state_dir": str(root / "sd")},
        "datacenter": {"public_key_files": [str(dc_pub)]},
        "usb": {"mount_point": str(root / "usb"), "require_mountpoint": False},
        "store": {"reserve_floor_mb": 1, "journal_reserve_mb": 1, "max_record_mb": 2, "warn_records": 5,
                  "resume_records": 2},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return config.validate(base)


@pytest.fixture
def kit_cfg(tmp_path: Path, dc_keys: dict[str, Any]) -> config.Config:
    (tmp_path / "usb").mkdir()
    return make_config(tmp_path, dc_keys["pub_path"])


@pytest.fixture
def store(kit_cfg: config.Config) -> Iterator[Store]:
    s = Store(kit_cfg, identity.load_or_create(kit_cfg.state_dir))
    s.open()
    yield s
    s.close()
