"""The udev rule, run by udev's own rule engine (`udevadm test`) on loop devices with real file systems.

A loop device is not on USB, so a first rule file (test only, in /run/udev/rules.d) gives one chosen
loop device ID_BUS=usb, as the kernel's USB storage path would; the rule under test is copied unchanged.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.conftest import SYSTEMD_DIR, need_root, need_tool

RUN_RULES = Path("/run/udev/rules.d")


def _loop(tmp_path: Path, mkfs: list[str], name: str) -> str:
    img = tmp_path / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run([*mkfs, str(img)], check=True, capture_output=True)
    return subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def rules(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    need_root("udevadm test")
    need_tool("udevadm", "udev")
    ext4 = _loop(tmp_path, ["mkfs.ext4", "-q"], "ext4")
    ext2 = _loop(tmp_path, ["mkfs.ext2", "-q"], "ext2")
    not_usb = _loop(tmp_path, ["mkfs.ext4", "-q"], "notusb")
    RUN_RULES.mkdir(parents=True, exist_ok=True)
    fake = RUN_RULES / f"00-rekam-test-{os.getpid()}.rules"
    real = RUN_RULES / "99-rekam-usb.rules"
    fake.write_text("".join(f'KERNEL=="{Path(d).name}", ENV{{ID_BUS}}="usb"\n' for d in (ext4, ext2)))
    real.write_text((SYSTEMD_DIR / "99-rekam-usb.rules").read_text())
    try:
        yield ext4, ext2, not_usb
    finally:
        fake.unlink(missing_ok=True)
        real.unlink(missing_ok=True)
        for d in (ext4, ext2, not_usb):
            subprocess.run(["losetup", "-d", d], capture_output=True)


def _props(dev: str) -> dict[str, str]:
    r = subprocess.run(["udevadm", "test", "--action=add", f"/sys/class/block/{Path(dev).name}"],
                       capture_output=True, text=True, timeout=60)
    tail = r.stdout.split("some values may be different, or not available at a simulation run.")[-1]
    return dict(line.split("=", 1) for line in tail.splitlines() if "=" in line)


def test_rule_wants_the_mount_unit(rules: tuple[str, str, str]) -> None:
    ext4, ext2, not_usb = rules
    p = _props(ext4)
    assert p.get("ID_BUS") == "usb" and p.get("ID_FS_TYPE") == "ext4"
    assert p.get("SYSTEMD_WANTS") == f"rekam-usb-mount@{Path(ext4).name}.service"
    assert p.get("UDISKS_IGNORE") == "1" and ":systemd:" in p.get("TAGS", "")
    # Unsupported file system, or not on USB: no unit.
    assert "SYSTEMD_WANTS" not in _props(ext2)
    assert "SYSTEMD_WANTS" not in _props(not_usb)
