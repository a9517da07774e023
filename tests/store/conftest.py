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
from firmware.wire import record_format


@pytest.fixture(scope="session")
def dc_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("dc")
    priv, pub = record_format.generate_datacenter_keypair()
    (d / "datacenter.key").write_bytes(priv)
    (d / "datacenter.pub").write_bytes(pub)
    return {"dir": d, "priv": priv, "pub": pub, "pub_path": d / "datacenter.pub", "key_path": d / "datacenter.key",
            "sk": record_format.load_datacenter_private_key(priv)}


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
