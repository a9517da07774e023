"""Stick mounts and rekamd's mount namespace.

systemd builds ProtectSystem=strict as a slave mount namespace in which each ReadWritePaths= entry is
recursively bind-mounted onto itself. Emulated here with `unshare --propagation slave` + `mount --rbind`
under a shared tmpfs: a stick mounted on the host before the daemon started must really go away from
the daemon's view when the host unmounts it (else the file system stays alive after eject), and a stick
mounted later must show up.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import Tmpfs
from tests.system.conftest import SYSTEMD_DIR, need_root, need_tool


def _rw_path() -> str:
    vals = [ln.split("=", 1)[1] for ln in (SYSTEMD_DIR / "rekamd.service").read_text().splitlines()
            if ln.startswith("ReadWritePaths=")]
    assert len(vals) == 1
    return vals[0].lstrip("-")


def _sources_at(mountinfo: str, target: str) -> list[str]:
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == target:
            out.append(right.split()[1])
    return out


@pytest.mark.parametrize("bind, pinned", [(None, False), ("/media/rekam-usb", True)],
                         ids=["unit-ReadWritePaths", "mount-point-itself"])
def test_unmount_reaches_daemon_namespace(bind: str | None, pinned: bool, tmp_path: Path, tmpfs: Tmpfs) -> None:
    need_root("mount namespaces")
    need_tool("unshare", "util-linux")
    root = tmp_path / "root"
    img = tmp_path / "stick.img"
    with open(img, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    tmpfs.mount(root, None)
    ns = None
    try:
        subprocess.run(["mount", "--make-shared", str(root)], check=True)
        stick = root / "media" / "rekam-usb"
        stick.mkdir(parents=True)
        subprocess.run(["mount", dev, str(stick)], check=True)  # the stick was in before the daemon started
        rw = str(root) + (bind or _rw_path())
        script = f'mount --rbind "{rw}" "{rw}" && echo ready && read _ && cat /proc/self/mountinfo && read _ ' \
                 '&& echo === && cat /proc/self/mountinfo'
        ns = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c", script],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert ns.stdout is not None and ns.stdin is not None
        assert ns.stdout.readline().strip() == "ready"
        subprocess.run(["umount", str(stick)], check=True)  # eject on the host
        ns.stdin.write("\n")
        ns.stdin.flush()
        subprocess.run(["mount", dev, str(stick)], check=True)  # the next stick, while the daemon runs
        ns.stdin.write("\n")
        ns.stdin.close()
        out = ns.stdout.read()
        assert ns.wait(timeout=10) == 0
        after_eject, after_new = out.split("===\n")
        if pinned:
            assert dev in _sources_at(after_eject, str(stick))  # the trap the unit avoids
        else:
            assert dev not in _sources_at(after_eject, str(stick)), after_eject
            assert dev in _sources_at(after_new, str(stick))
    finally:
        if ns is not None and ns.poll() is None:
            ns.kill()
        tmpfs.cleanup()  # recursive and lazy, before the loop device goes
        subprocess.run(["losetup", "-d", dev], capture_output=True)
