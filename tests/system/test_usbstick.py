"""hw/usbstick.py against real file systems on loop devices: FAT32, exFAT and ext4 sticks.

Each image is made with the real mkfs, attached with losetup, probed with blkid, checked with
fsck, mounted by the helper, written through firmware.store.usb (the daemon's own stick code, with
fsync and rename), unmounted, and mounted again to read the record back.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw import usbstick
from hw.usbstick import Settings, StickError, Volume
from tests.system.conftest import REPO, need_root, need_tool

NOBODY = 65534
MKFS = {
    "vfat": (["mkfs.vfat", "-F", "32", "-n"], "dosfstools"),
    "exfat": (["mkfs.exfat", "-L"], "exfatprogs"),
    "ext4": (["mkfs.ext4", "-q", "-L"], "e2fsprogs"),
    "ext2": (["mkfs.ext2", "-q", "-L"], "e2fsprogs"),
}


@pytest.fixture
def make_stick(tmp_path: Path) -> Iterator[object]:
    """make_stick(fstype, label) -> /dev/loopN holding a fresh file system; detached afterwards."""
    need_root("loop-device stick tests")
    attached: list[str] = []

    def make(fstype: str, label: str = "REKAM") -> str:
        argv, pkg = MKFS[fstype]
        need_tool(argv[0], pkg)
        img = tmp_path / f"{fstype}-{len(attached)}.img"
        with open(img, "wb") as f:
            f.truncate(64 * 1024 * 1024)  # FAT32 needs >= 33 MiB with 512-byte sectors
        subprocess.run([*argv, label, str(img)], check=True, capture_output=True)
        dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                             text=True).stdout.strip()
        attached.append(dev)
        return dev

    yield make
    for dev in attached:
        for m in Path("/proc/self/mounts").read_text().splitlines():
            if m.split()[0] == dev:
                subprocess.run(["umount", "-l", m.split()[1]], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def _kernel_has(fstype: str) -> bool:
    return any(line.split()[-1] == fstype for line in Path("/proc/filesystems").read_text().splitlines())


def _settings(tmp_path: Path, label: str = "") -> Settings:
    return Settings(tmp_path / "media" / "rekam-usb", label, NOBODY, NOBODY)


@pytest.mark.parametrize("fstype", ["vfat", "exfat", "ext4"])
def test_mount_write_unmount_remount(fstype: str, make_stick: object, tmp_path: Path) -> None:
    from firmware.store import usb

    dev = make_stick(fstype, "REKAM")  # type: ignore[operator]
    vol = usbstick.probe(dev)
    assert (vol.fstype, vol.label, vol.usage) == (fstype, "REKAM", "filesystem")
    s = _settings(tmp_path, label="rekam")  # FAT labels are upper case: matched case-insensitively
    try:
        plan = usbstick.mount(vol, s)
    except StickError as e:
        if "unknown filesystem type" in str(e) and not _kernel_has(fstype):
            # This machine's kernel has no driver (probe and fsck above still ran for real).
            pytest.skip(f"kernel {os.uname().release} has no {fstype} driver; mount part runs on the Pi/CI kernels")
        raise
    mp = s.mount_point
    cur = usbstick.mounted_at(mp)
    assert cur is not None and os.path.ismount(mp)
    if plan.driver == "kernel":
        assert cur.fstype == fstype
        assert {"nodev", "nosuid", "noexec"} <= set(cur.options)
        if fstype == "vfat":
            assert "flush" in cur.options
        if fstype == "ext4":
            assert "data=journal" in cur.options
    else:
        assert fstype in ("vfat", "exfat") and cur.fstype.startswith("fuse")
    st = os.stat(mp)
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY) and st.st_mode & 0o077 == 0
    # Mounting the same device again is a no-op, not an error (the unit may be restarted).
    assert usbstick.mount(vol, s).device == dev

    # The daemon's own stick code sees it and writes a record through it (atomic rename + fsync).
    assert usb.detect(mp, require_mountpoint=True)
    stick = usb.open_stick(mp, "rk-test", "cHVibGljLWtleQ==")
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    stick.write_record("r-000001", 1, data, sha, verify=False)
    stick.flush_index()

    assert usbstick.unmount(mp, dev) is True
    assert usbstick.mounted_at(mp) is None and not usb.detect(mp, require_mountpoint=True)
    assert usbstick.unmount(mp, dev) is False  # nothing left to unmount

    usbstick.mount(usbstick.probe(dev), s)
    again = usb.open_stick(mp, "rk-test", "cHVibGljLWtleQ==")
    assert again.stick_id == stick.stick_id
    assert hashlib.sha256(again.record_path("r-000001").read_bytes()).hexdigest() == sha
    assert [e["record_id"] for e in usb.read_index(again.kit_dir)] == ["r-000001"]
    assert usbstick.unmount(mp, dev)


def test_label_filter_and_unsupported_fs(make_stick: object, tmp_path: Path) -> None:
    other = usbstick.probe(make_stick("ext4", "HOLIDAY"))  # type: ignore[operator]
    assert "label 'HOLIDAY' is not the configured 'REKAM'" in (usbstick.why_not(other, "REKAM") or "")
    assert usbstick.why_not(other, "") is None
    ext2 = usbstick.probe(make_stick("ext2", "REKAM"))  # type: ignore[operator]
    assert "ext2 not supported" in (usbstick.why_not(ext2) or "")
    with pytest.raises(StickError, match="ext2 not supported"):
        usbstick.mount(ext2, _settings(tmp_path))
    assert usbstick.mounted_at(_settings(tmp_path).mount_point) is None
    # choose(): the first usable one, or every reason.
    good = usbstick.probe(make_stick("ext4", "REKAM"))  # type: ignore[operator]
    assert usbstick.choose([ext2, other, good], "REKAM") == good
    with pytest.raises(StickError, match="HOLIDAY.*|.*ext2"):
        usbstick.choose([ext2, other], "REKAM")


def test_blank_device_is_reported(make_stick: object, tmp_path: Path) -> None:
    dev = make_stick("ext4")  # type: ignore[operator]
    subprocess.run(["wipefs", "-a", "-q", dev], check=True)
    vol = usbstick.probe(dev)
    assert vol.fstype == ""
    assert "no file system found" in (usbstick.why_not(vol) or "")


def test_one_stick_at_a_time_and_unmount_only_own_device(make_stick: object, tmp_path: Path) -> None:
    a, b = make_stick("ext4", "A"), make_stick("ext4", "B")  # type: ignore[operator]
    s = _settings(tmp_path)
    usbstick.mount(usbstick.probe(a), s)
    with pytest.raises(StickError, match="already holds"):
        usbstick.mount(usbstick.probe(b), s)
    # Stopping the unit of the stick that was refused must not unmount the one in use.
    assert usbstick.unmount(s.mount_point, b) is False
    assert usbstick.mounted_at(s.mount_point) is not None
    assert usbstick.unmount(s.mount_point, a) is True


def test_busy_mount_is_not_pulled_from_under_a_writer(make_stick: object, tmp_path: Path) -> None:
    dev = make_stick("ext4")  # type: ignore[operator]
    s = _settings(tmp_path)
    usbstick.mount(usbstick.probe(dev), s)
    with open(s.mount_point / "open.bin", "wb") as f:
        f.write(b"x")
        with pytest.raises(StickError, match="still has files open"):
            usbstick.unmount(s.mount_point, dev, retries=2)
    assert usbstick.unmount(s.mount_point, dev)


def test_dirty_fat_is_repaired_before_mount(make_stick: object, tmp_path: Path) -> None:
    """A yank leaves FAT's dirty bit set; fsck.vfat -a clears it before the mount."""
    dev = make_stick("vfat")  # type: ignore[operator]
    # FAT32 boot sector byte 0x41 (BS_Reserved1 / NT flags) bit 0: volume dirty.
    with open(dev, "r+b") as f:
        f.seek(0x41)
        f.write(bytes([0x01]))
    vol = usbstick.probe(dev)
    assert usbstick.repair(vol) in ("repaired", "clean")
    with open(dev, "rb") as f:
        f.seek(0x41)
        assert f.read(1)[0] & 1 == 0


def test_cli_mount_ignores_foreign_stick_and_config_is_read(make_stick: object, tmp_path: Path) -> None:
    dev = make_stick("ext4", "HOLIDAY")  # type: ignore[operator]
    cfg = tmp_path / "rekam.toml"
    cfg.write_text('[usb]\nmount_point = "stick"\nlabel = "REKAM"\n')
    r = subprocess.run([sys.executable, "-m", "hw.usbstick", "--config", str(cfg), "--owner", "65534:65534",
                        "mount", dev], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and "stick ignored" in r.stderr, r.stderr
    assert usbstick.mounted_at(tmp_path / "stick") is None
    cfg.write_text('[usb]\nmount_point = "stick"\nlabel = ""\n')
    r = subprocess.run([sys.executable, "-m", "hw.usbstick", "--config", str(cfg), "--owner", "65534:65534",
                        "mount", dev], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert usbstick.mounted_at(tmp_path / "stick") is not None  # relative to the config file's folder
    cfg.write_text('[usb]\nmount_point = 5\n')
    r = subprocess.run([sys.executable, "-m", "hw.usbstick", "--config", str(cfg), "unmount", dev],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == usbstick.EX_CONFIG and "mount_point must be a non-empty string" in r.stderr
    usbstick.unmount(tmp_path / "stick", dev)


def test_unprivileged_eject_request_is_served_by_release(make_stick: object, tmp_path: Path) -> None:
    """The daemon's side writes the request file; the root side (what rekam-usb-eject.path runs) unmounts."""
    dev = make_stick("ext4")  # type: ignore[operator]
    s = _settings(tmp_path)
    usbstick.mount(usbstick.probe(dev), s)
    req = tmp_path / "run" / "usb-eject"
    result: dict[str, object] = {}

    def daemon_side() -> None:
        try:
            result["ok"] = usbstick.request_release(s.mount_point, req, timeout=20)
        except StickError as e:
            result["err"] = e

    t = threading.Thread(target=daemon_side)
    t.start()
    for _ in range(100):
        if req.exists():
            break
        threading.Event().wait(0.05)
    assert req.exists()
    r = subprocess.run([sys.executable, "-m", "hw.usbstick", "--config", "/nonexistent",
                        "--mount-point", str(s.mount_point), "release", "--request", str(req)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    t.join(timeout=25)
    assert result == {"ok": True}
    assert not req.exists()  # consumed, so the path unit does not fire again
    assert usbstick.mounted_at(s.mount_point) is None


def test_request_times_out_when_nobody_serves_it(make_stick: object, tmp_path: Path) -> None:
    dev = make_stick("ext4")  # type: ignore[operator]
    s = _settings(tmp_path)
    usbstick.mount(usbstick.probe(dev), s)
    with pytest.raises(StickError, match="rekam-usb-eject.path"):
        usbstick.request_release(s.mount_point, tmp_path / "req", timeout=0.5)
    assert usbstick.unmount(s.mount_point, dev)


def test_mount_options_table() -> None:
    vfat = usbstick.mount_options("vfat", 1001, 1002)
    assert {"flush", "noatime", "nodev", "nosuid", "noexec", "uid=1001", "gid=1002", "umask=0077"} <= set(vfat)
    exfat = usbstick.mount_options("exfat", 1, 2)
    assert {"noatime", "uid=1", "gid=2", "umask=0077"} <= set(exfat) and "flush" not in exfat
    ext4 = usbstick.mount_options("ext4", 1, 2)
    assert "data=journal" in ext4 and not any(o.startswith("uid=") for o in ext4)
    with pytest.raises(StickError, match="ntfs not supported"):
        usbstick.mount_options("ntfs", 0, 0)


def test_mountinfo_escapes(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text("36 35 8:1 / /media/my\\040stick rw,noatime shared:1 - vfat /dev/sda1 rw,uid=1000\n")
    m = usbstick.mounted_at(Path("/media/my stick"), mi)
    assert m is not None and m.source == "/dev/sda1" and m.fstype == "vfat" and "noatime" in m.options
    assert usbstick.mounted_at(Path("/media/other"), mi) is None


def test_volume_without_usage_is_fine() -> None:
    assert usbstick.why_not(Volume("/dev/x", "ext4", "", "", "")) is None


def test_devices_in_use_are_never_touched(make_stick: object, tmp_path: Path) -> None:
    """A Pi booting from a USB SSD: its partitions match the udev rule too and must be left alone."""
    root_src = next((ln.split(" - ")[1].split()[1] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                     if ln.split()[4] == "/"), "")
    if root_src.startswith("/dev/") and os.path.exists(root_src):
        assert "already mounted at /" in (usbstick.in_use(root_src, Path("/media/rekam-usb")) or "")
    dev = make_stick("ext4")  # type: ignore[operator]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", dev, str(elsewhere)], check=True)
    try:
        s = _settings(tmp_path)
        with pytest.raises(StickError, match="already mounted at"):
            usbstick.mount(usbstick.probe(dev), s)
        assert usbstick.mounted_at(s.mount_point) is None
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)


def test_other_partition_of_a_mounted_disk_is_refused(make_stick: object, tmp_path: Path) -> None:
    """Partition 2 of the disk whose partition 1 is /boot/firmware (a Pi booting from a USB SSD).

    This kernel does not scan partitions on loop devices, so the device is a real loop device and the
    sysfs links that place it on a disk are laid out as the kernel does (/sys/dev/block/M:m ->
    .../sdz/sdz2 with a `partition` file).
    """
    dev = make_stick("ext4")  # type: ignore[operator]
    st = os.stat(dev)
    mm = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    sysfs = tmp_path / "sys"
    for part in ("sdz1", "sdz2"):
        (sysfs / "devices/usb1/sdz" / part).mkdir(parents=True)
        (sysfs / "devices/usb1/sdz" / part / "partition").write_text(part[-1])
    (sysfs / "dev/block").mkdir(parents=True)
    (sysfs / "dev/block/8:1").symlink_to(sysfs / "devices/usb1/sdz/sdz1")
    (sysfs / f"dev/block/{mm}").symlink_to(sysfs / "devices/usb1/sdz/sdz2")
    mi = tmp_path / "mountinfo"
    mi.write_text("20 1 8:1 / /boot/firmware rw,relatime - vfat /dev/sdz1 rw\n"
                  "21 1 0:22 / /run rw - tmpfs tmpfs rw\n")
    why = usbstick.in_use(dev, tmp_path / "media/rekam-usb", mi, sysfs / "dev/block") or ""
    assert "on disk sdz, which also holds /boot/firmware" in why
    # The same partition on a disk of its own is free.
    mi.write_text("21 1 0:22 / /run rw - tmpfs tmpfs rw\n")
    assert usbstick.in_use(dev, tmp_path / "media/rekam-usb", mi, sysfs / "dev/block") is None
