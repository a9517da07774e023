"""Mount and unmount the kit's USB mirror stick (run as root by systemd, see systemd/).

udev (systemd/99-rekam-usb.rules) starts ``rekam-usb-mount@<dev>.service`` for every USB block
device carrying a file system; that unit runs ``python -m hw.usbstick mount /dev/<dev>``, which

1. probes the device with ``blkid -p`` (no cache: a stick re-formatted elsewhere is seen as it is),
2. ignores it unless its type is vfat (FAT32), exfat or ext4 and, if ``[usb] label`` is set, its
   label matches,
3. repairs what a yank left behind (``fsck -p``-style automatic repair; FAT's dirty bit),
4. mounts it at ``[usb] mount_point`` with options chosen for sudden removal, owned by the
   ``rekam`` user so the unprivileged daemon can write it.

The daemon notices the mount by polling (`firmware.store.usb.detect`). Unmounting happens when the
device disappears (``BindsTo=`` stops the unit), on ``rekam usb eject`` (as root: directly or
through ``systemctl stop``), or on the daemon's request file handled by
``rekam-usb-eject.path`` (no polkit, no sudo). See docs/pi-setup.md.

This module is a hardware helper: it must not import `firmware` (it reads the ``[usb]`` keys
straight from the TOML file).
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from firmware.errors import EX_CONFIG, StickError

log = logging.getLogger("hw.usbstick" if __name__ == "__main__" else __name__)

SUPPORTED = ("vfat", "exfat", "ext4")
DEFAULT_CONFIG = Path("/etc/rekam/rekam.toml")
DEFAULT_MOUNT_POINT = Path("/media/rekam-usb")
DEFAULT_REQUEST = Path("/run/rekam/usb-eject")
UNIT_PREFIX = "rekam-usb-mount@"
NOSYMFOLLOW = "nosymfollow"


@dataclass(frozen=True)
class Volume:
    """What ``blkid -p`` says about one block device."""

    device: str
    fstype: str
    label: str
    uuid: str
    usage: str


@dataclass(frozen=True)
class MountPlan:
    """How one volume is (to be) mounted."""

    device: str
    fstype: str
    mount_point: Path
    options: tuple[str, ...]
    driver: str  # "kernel" or the FUSE program used when the kernel lacks the file system


@dataclass(frozen=True)
class Settings:
    """The ``[usb]`` keys this helper needs, plus who owns the mounted stick."""

    mount_point: Path = DEFAULT_MOUNT_POINT
    label: str = ""
    uid: int = 0
    gid: int = 0


# --- probing and choosing ------------------------------------------------------------------

def probe(device: str) -> Volume:
    """Low-level probe of `device` (``blkid -p``, bypassing the cache); raise `StickError` if unreadable."""
    if not os.path.exists(device):
        raise StickError(f"{device}: no such device (stick pulled out?)")
    blkid = _tool("blkid")
    r = subprocess.run([blkid, "-p", "-o", "export", device], capture_output=True, text=True, timeout=30)
    if r.returncode == 2:  # blkid: nothing recognised on the device
        return Volume(device, "", "", "", "")
    if r.returncode != 0:
        raise StickError(f"{device}: blkid failed rc={r.returncode}: {r.stderr.strip()}")
    tags = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return Volume(device, tags.get("TYPE", ""), tags.get("LABEL", ""), tags.get("UUID", ""), tags.get("USAGE", ""))


def why_not(vol: Volume, label: str = "") -> str | None:
    """None if `vol` is a stick the kit should mount; else the reason it is ignored."""
    if not vol.fstype:
        return f"{vol.device}: no file system found (format the stick as FAT32, exFAT or ext4)"
    if vol.usage and vol.usage != "filesystem":
        return f"{vol.device}: holds {vol.usage} ({vol.fstype}), not a file system"
    if vol.fstype not in SUPPORTED:
        return f"{vol.device}: file system {vol.fstype} not supported (use FAT32, exFAT or ext4)"
    # FAT labels are stored upper-case by most formatters; compare case-insensitively.
    if label and vol.label.casefold() != label.casefold():
        return f"{vol.device}: label {vol.label!r} is not the configured {label!r}"
    return None


def choose(volumes: Sequence[Volume], label: str = "") -> Volume:
    """The first volume worth mounting (device order), or `StickError` listing why each was ignored."""
    reasons = []
    for v in volumes:
        why = why_not(v, label)
        if why is None:
            return v
        reasons.append(why)
    raise StickError("no usable stick: " + ("; ".join(reasons) if reasons else "no USB block device"))


def usb_partitions(sys_block: Path = Path("/sys/class/block")) -> list[str]:
    """Device paths of USB block devices (partitions and whole disks), in name order; for a boot-time scan."""
    out = []
    for entry in sorted(sys_block.iterdir()) if sys_block.is_dir() else []:
        try:
            real = str(entry.resolve())
        except OSError:
            continue
        if "/usb" in real:
            out.append("/dev/" + entry.name)
    return out


# --- mount options -------------------------------------------------------------------------

def mount_options(fstype: str, uid: int, gid: int) -> tuple[str, ...]:
    """Mount options for `fstype`, chosen for a stick that may be pulled at any moment.

    Every file system: ``noatime`` (no write per read), ``nodev,nosuid,noexec`` (a stick is data,
    never code), ``nosymfollow`` (the kernel follows no symlink on the stick: a stick prepared with
    ``rekam/<kit>/index.jsonl -> /var/lib/rekam/...`` cannot redirect a write; Linux 5.10+, dropped with a
    warning by `mount` where the kernel refuses it; the daemon opens everything with ``O_NOFOLLOW``
    anyway), ``errors=remount-ro`` where supported (a failing stick stops taking writes rather
    than corrupting more). FAT/exFAT have no owners: ``uid/gid`` make the files the rekam user's,
    ``umask=0077`` hides them from everyone else. ``flush`` (vfat) writes a file's data back as
    soon as it is closed instead of on the 30 s writeback timer. ext4 keeps owners on disk (the
    helper chowns the root directory) and runs with ``data=journal``: data goes through the journal
    so a yank never leaves a file with stale blocks; the store fsyncs every record anyway.
    """
    common = ("rw", "noatime", "nodev", "nosuid", "noexec", NOSYMFOLLOW)
    if fstype == "vfat":
        return (*common, "flush", f"uid={uid}", f"gid={gid}", "umask=0077", "shortname=mixed", "utf8",
                "errors=remount-ro")
    if fstype == "exfat":
        return (*common, f"uid={uid}", f"gid={gid}", "umask=0077", "errors=remount-ro")
    if fstype == "ext4":
        return (*common, "data=journal", "errors=remount-ro")
    raise StickError(f"file system {fstype} not supported (use FAT32, exFAT or ext4)")


# FUSE driver used only when the running kernel has no exfat support (some CI and cloud kernels).
# Raspberry Pi OS kernels have vfat and exfat; a fallback mount is logged as a warning. (fusefat,
# the only FUSE FAT driver in Debian, cannot create directories reliably, so vfat has no fallback.)
_FUSE = {
    "exfat": ("mount.exfat-fuse", lambda uid, gid: ("noatime", "nodev", "nosuid", "noexec", f"uid={uid}",
                                                     f"gid={gid}", "umask=0077")),
}


def plan(vol: Volume, settings: Settings) -> MountPlan:
    """The kernel mount of `vol` at the configured mount point."""
    return MountPlan(vol.device, vol.fstype, settings.mount_point, mount_options(vol.fstype, settings.uid,
                                                                                  settings.gid), "kernel")


# --- mount table ---------------------------------------------------------------------------

def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    return field.encode().decode("unicode_escape") if "\\" in field else field


@dataclass(frozen=True)
class Mounted:
    """One entry of the mount table."""

    mount_point: str
    source: str
    fstype: str
    options: tuple[str, ...]


def mounted_at(mount_point: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> Mounted | None:
    """The top-most mount at `mount_point`, or None."""
    target = os.path.realpath(mount_point)
    found = None
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) < 6 or len(r) < 3:
            continue
        if _unescape(f[4]) == target:
            found = Mounted(target, _unescape(r[1]), r[0], tuple(f[5].split(",")) + tuple(r[2].split(",")))
    return found


def _same_device(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _devnum(device: str) -> tuple[int, int]:
    st = os.stat(device)
    if not stat.S_ISBLK(st.st_mode):
        raise StickError(f"{device} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _disk_of(devnum: tuple[int, int], sys_dev: Path = Path("/sys/dev/block")) -> str | None:
    """Kernel name of the whole disk holding block device `devnum` (itself if it is not a partition)."""
    p = sys_dev / f"{devnum[0]}:{devnum[1]}"
    if not p.exists():
        return None
    real = p.resolve()
    return real.parent.name if (real / "partition").exists() else real.name


def in_use(device: str, mount_point: Path, mountinfo: Path = Path("/proc/self/mountinfo"),
           sys_dev: Path = Path("/sys/dev/block")) -> str | None:
    """Why `device` must not be touched, or None.

    A Pi booting from a USB SSD has its root, boot and data partitions on ``ID_BUS=usb`` too: the
    rule starts the unit for them. Refuse any device that is mounted elsewhere, used as swap, or on
    the same disk as any mounted file system other than the stick's mount point.
    """
    dn = _devnum(device)
    disk = _disk_of(dn, sys_dev)
    target = os.path.realpath(mount_point)
    for line in mountinfo.read_text().splitlines():
        f = line.split()
        if len(f) < 5 or _unescape(f[4]) == target:
            continue
        major, _, minor = f[2].partition(":")
        mm = (int(major), int(minor))
        if mm == dn:
            return f"{device} is already mounted at {_unescape(f[4])}"
        if disk is not None and major != "0" and _disk_of(mm, sys_dev) == disk:
            return f"{device} is on disk {disk}, which also holds {_unescape(f[4])} (the system disk?)"
    try:
        for line in Path("/proc/swaps").read_text().splitlines()[1:]:
            if line.split() and os.path.exists(line.split()[0]) and _same_device(line.split()[0], device):
                return f"{device} is in use as swap"
    except OSError:
        pass
    return None


# --- mount / unmount -----------------------------------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pkg = {"fsck.vfat": "dosfstools", "fsck.exfat": "exfatprogs", "e2fsck": "e2fsprogs",
               "mount.exfat-fuse": "exfat-fuse"}.get(name, "util-linux")
        raise StickError(f"{name} not found (apt-get install {pkg})")
    return path


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    log.debug("run cmd=%s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def repair(vol: Volume) -> str:
    """Automatic, non-interactive repair of what a yank leaves (FAT dirty bit, orphaned clusters).

    Returns a short note; raises `StickError` when the checker finds damage it will not fix
    (the stick is then left unmounted for a technician).
    """
    if vol.fstype == "vfat":
        cmd = [_tool("fsck.vfat"), "-a", "-w", vol.device]
        ok = (0, 1)  # 1: errors found and corrected
    elif vol.fstype == "exfat":
        cmd = [_tool("fsck.exfat"), "-p", vol.device]
        ok = (0, 1)
    else:
        cmd = [_tool("e2fsck"), "-p", vol.device]
        ok = (0, 1)
    r = _run(cmd, timeout=300)
    if r.returncode not in ok:
        raise StickError(f"{vol.device}: {Path(cmd[0]).name} rc={r.returncode}, damage not repaired automatically: "
                         f"{(r.stdout + r.stderr).strip()[-300:]}")
    return "repaired" if r.returncode == 1 else "clean"


def mount(vol: Volume, settings: Settings, check: bool = True, fuse_fallback: bool = True) -> MountPlan:
    """Mount `vol` at the configured mount point (idempotent for the same device)."""
    if why := why_not(vol, settings.label):
        raise StickError(why)
    mp = settings.mount_point
    mp.mkdir(parents=True, exist_ok=True)
    cur = mounted_at(mp)
    if cur is not None:
        if _same_device(cur.source, vol.device):
            log.info("stick already mounted device=%s mount=%s", vol.device, mp)
            return MountPlan(vol.device, vol.fstype, mp, cur.options, "kernel")
        raise StickError(f"{mp} already holds {cur.source} ({cur.fstype}); eject it before using {vol.device}")
    if busy := in_use(vol.device, mp):
        raise StickError(busy)  # checked before fsck: never check or mount a file system in use
    note = repair(vol) if check else "not checked"
    p = plan(vol, settings)
    r = _run([_tool("mount"), "-t", vol.fstype, "-o", ",".join(p.options), vol.device, str(mp)])
    if r.returncode != 0 and NOSYMFOLLOW in p.options and "unknown filesystem type" not in r.stderr:
        # Kernels before 5.10 (or util-linux before 2.36) refuse the option: mount without it rather than
        # not at all; the daemon never follows a symlink on the stick either way (O_NOFOLLOW everywhere).
        without = tuple(o for o in p.options if o != NOSYMFOLLOW)
        r2 = _run([_tool("mount"), "-t", vol.fstype, "-o", ",".join(without), vol.device, str(mp)])
        if r2.returncode == 0:
            log.warning("mount option %s refused by this kernel; mounted without it (the daemon still follows no "
                        "symlink on the stick) device=%s error=%s", NOSYMFOLLOW, vol.device, r.stderr.strip())
            p, r = MountPlan(p.device, p.fstype, p.mount_point, without, p.driver), r2
    if r.returncode != 0 and fuse_fallback and "unknown filesystem type" in r.stderr and vol.fstype in _FUSE:
        prog, opts = _FUSE[vol.fstype]
        fopts = opts(settings.uid, settings.gid)
        log.warning("kernel has no %s driver; mounting with FUSE program=%s (development machines only)",
                    vol.fstype, prog)
        r = _run([_tool(prog), "-o", ",".join(fopts), vol.device, str(mp)])
        p = MountPlan(vol.device, vol.fstype, mp, fopts, prog)
    if r.returncode != 0:
        raise StickError(f"mounting {vol.device} ({vol.fstype}) on {mp} failed: {r.stderr.strip()}")
    if vol.fstype == "ext4":
        # ext4 keeps owners on disk: hand the stick's root to the daemon's user.
        os.chown(mp, settings.uid, settings.gid)
        os.chmod(mp, 0o700)
    log.info("stick mounted device=%s fstype=%s label=%r uuid=%s mount=%s driver=%s fsck=%s options=%s",
             vol.device, vol.fstype, vol.label, vol.uuid, mp, p.driver, note, ",".join(p.options))
    return p


def unmount(mount_point: Path, device: str | None = None, retries: int = 5) -> bool:
    """Flush and unmount the stick at `mount_point`; False if nothing was mounted there.

    With `device`, only that device is unmounted (a unit stopping for a stick that was never
    mounted must not unmount another one). A busy mount is retried, then lazily detached only
    if the device is already gone (nothing more can be written to it anyway).
    """
    cur = mounted_at(mount_point)
    if cur is None:
        log.info("nothing mounted mount=%s", mount_point)
        return False
    # FUSE mounts may name the program rather than the device: those are matched by mount point only.
    if device is not None and not cur.fstype.startswith("fuse") and not _same_device(cur.source, device):
        log.info("not unmounting mount=%s: it holds %s, not %s", mount_point, cur.source, device)
        return False
    os.sync()
    err = ""
    for attempt in range(retries):
        r = _run([_tool("umount"), str(mount_point)])
        if r.returncode == 0:
            log.info("stick unmounted source=%s mount=%s", cur.source, mount_point)
            return True
        err = r.stderr.strip()
        if "not mounted" in err:
            return False
        log.warning("umount failed attempt=%d mount=%s error=%s", attempt + 1, mount_point, err)
        time.sleep(0.5)
    if device is not None and not os.path.exists(device):
        _run([_tool("umount"), "--lazy", str(mount_point)])
        log.warning("device gone; lazily detached mount=%s", mount_point)
        return True
    raise StickError(f"cannot unmount {mount_point}: {err} (a process still has files open on the stick)")


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def _unit_for(source: str) -> str:
    return f"{UNIT_PREFIX}{Path(source).name}.service"


def release(mount_point: Path) -> bool:
    """Root-side eject: stop the mount unit (so systemd's view stays right) or unmount directly."""
    cur = mounted_at(mount_point)
    if cur is None:
        return False
    if _systemd_running() and cur.source.startswith("/dev/"):
        unit = _unit_for(cur.source)
        if subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0:
            r = _run(["systemctl", "stop", unit])
            if r.returncode != 0:
                raise StickError(f"systemctl stop {unit} failed: {r.stderr.strip()}")
            log.info("stick released unit=%s", unit)
            return mounted_at(mount_point) is None or unmount(mount_point)
    return unmount(mount_point)


def request_release(mount_point: Path, request: Path = DEFAULT_REQUEST, timeout: float = 15.0) -> bool:
    """Unprivileged eject: create `request` (rekam-usb-eject.path runs the unmount) and wait for it.

    Returns True when the mount point is free within `timeout`; False if nothing was mounted.
    """
    if mounted_at(mount_point) is None:
        return False
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_text(f"{mount_point}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mounted_at(mount_point) is None:
            return True
        time.sleep(0.1)
    raise StickError(f"stick at {mount_point} still mounted {timeout:.0f} s after the eject request "
                     f"({request}); is rekam-usb-eject.path enabled?")


def eject(mount_point: Path, request: Path = DEFAULT_REQUEST, timeout: float = 15.0) -> bool:
    """Unmount the stick: directly as root, through the request file otherwise. False if none mounted."""
    if os.geteuid() == 0:
        return release(mount_point)
    return request_release(mount_point, request, timeout)


# --- configuration and command line --------------------------------------------------------

def read_settings(config: Path | None, mount_point: str | None = None, label: str | None = None,
                  owner: str = "rekam") -> Settings:
    """``[usb] mount_point`` and ``label`` from the kit's TOML config (overridable), and the owner's ids."""
    usb: dict[str, object] = {}
    base = Path("/")
    if config is not None:
        try:
            usb = tomllib.loads(config.read_text(encoding="utf-8")).get("usb", {})
        except FileNotFoundError:
            log.warning("config not found path=%s; using defaults mount=%s", config, DEFAULT_MOUNT_POINT)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise StickError(f"{config}: cannot read [usb]: {e}") from e
        base = config.resolve().parent
        if not isinstance(usb, dict):
            raise StickError(f"{config}: [usb] must be a table")
    mp = mount_point if mount_point is not None else usb.get("mount_point", str(DEFAULT_MOUNT_POINT))
    lb = label if label is not None else usb.get("label", "")
    if not isinstance(mp, str) or not mp:
        raise StickError(f"{config}: [usb] mount_point must be a non-empty string, got {mp!r}")
    if not isinstance(lb, str):
        raise StickError(f"{config}: [usb] label must be a string, got {lb!r}")
    uid, gid = _owner_ids(owner)
    return Settings(base / mp, lb, uid, gid)


def _owner_ids(owner: str) -> tuple[int, int]:
    if ":" in owner:
        u, g = owner.split(":", 1)
        if u.isdigit() and g.isdigit():
            return int(u), int(g)
        raise StickError(f"--owner {owner!r}: expected USER or UID:GID")
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise StickError(f"user {owner!r} does not exist (make install creates 'rekam')") from None
    return pw.pw_uid, pw.pw_gid


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m hw.usbstick``."""
    ap = argparse.ArgumentParser(prog="python -m hw.usbstick", description="mount/unmount the rekam USB stick")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="kit config for [usb] mount_point/label")
    ap.add_argument("--mount-point", help="override [usb] mount_point")
    ap.add_argument("--label", help="override [usb] label")
    ap.add_argument("--owner", default="rekam", help="user (or UID:GID) that owns the mounted files")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="print what blkid sees and whether it would be mounted")
    p.add_argument("device")
    p = sub.add_parser("mount", help="check and mount DEVICE (or the first usable USB stick with --scan)")
    p.add_argument("device", nargs="?")
    p.add_argument("--scan", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the automatic file-system repair")
    p = sub.add_parser("unmount", help="flush and unmount (only DEVICE, if given)")
    p.add_argument("device", nargs="?")
    p = sub.add_parser("release", help="root side of an eject (rekam-usb-eject.service)")
    p.add_argument("--request", type=Path, help="request file to consume first")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 0 when done or nothing to do, 1 on a stick error, 78 on a config error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = read_settings(args.config, args.mount_point, args.label,
                          args.owner if args.cmd == "mount" else "0:0")
    except StickError as e:
        log.error("config error: %s", e)
        return EX_CONFIG
    try:
        if args.cmd == "probe":
            v = probe(args.device)
            print(f"device={v.device} type={v.fstype or '-'} label={v.label!r} uuid={v.uuid or '-'} "
                  f"verdict={why_not(v, s.label) or 'mount'}")
        elif args.cmd == "mount":
            if args.scan:
                vol = choose([probe(d) for d in usb_partitions() if not in_use(d, s.mount_point)], s.label)
            elif args.device:
                vol = probe(args.device)
            else:
                raise StickError("mount needs DEVICE or --scan")
            if why := why_not(vol, s.label) or in_use(vol.device, s.mount_point):
                # Not ours (a technician's stick, wrong label, a system disk on USB): leave it alone
                # without failing the unit.
                log.info("stick ignored: %s", why)
                return 0
            mount(vol, s, check=not args.no_check)
        elif args.cmd == "unmount":
            unmount(s.mount_point, args.device)
        elif args.cmd == "release":
            if args.request is not None:
                args.request.unlink(missing_ok=True)  # consume first: the path unit re-fires while it exists
            release(s.mount_point)
    except (StickError, subprocess.TimeoutExpired) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
