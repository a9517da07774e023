"""`rekam usb eject` end to end: the real daemon mirrors to a loop-mounted ext4 stick mounted by the
helper; eject flushes through the daemon's API and then unmounts (root path)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from hw import usbstick
from tests.support import wait_for
from tests.system.conftest import REPO, need_root, write_kit_config


def _rekam(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", "--config", str(cfg), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_eject_flushes_then_unmounts(tmp_path: Path, corpus_dir: Path) -> None:
    need_root("eject with a real mount")
    img = tmp_path / "stick.img"
    with open(img, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-L", "REKAM", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    cfg = write_kit_config(tmp_path, corpus_dir)
    text = cfg.read_text().replace("require_mountpoint = false", "require_mountpoint = true")
    cfg.write_text(text)
    mp = tmp_path / "usb"
    p = None
    try:
        usbstick.mount(usbstick.probe(dev), usbstick.Settings(mp, "", 0, 0))
        p = subprocess.Popen([sys.executable, "-m", "firmware.daemon", "--config", str(cfg), "--sim"],
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
        def stick_seen() -> bool:
            assert p is not None and p.poll() is None, p.stderr.read() if p and p.stderr else ""
            r = _rekam(cfg, "status", "--json")
            return bool(r.returncode in (0, 2) and r.stdout and json.loads(r.stdout).get("stick", {}).get("present"))

        wait_for(stick_seen, 60, "the daemon to pick up the stick", step=0.3)
        r = _rekam(cfg, "sim", "commit", "2", "--json")
        assert r.returncode == 0, r.stderr
        ids = [d["record_id"] for d in json.loads(r.stdout)]
        assert all(d["mirrored"] for d in json.loads(r.stdout))

        r = _rekam(cfg, "usb", "eject")
        assert r.returncode == 0, r.stderr
        assert "it can be pulled out now" in r.stdout
        assert usbstick.mounted_at(mp) is None
        st = json.loads(_rekam(cfg, "status", "--json").stdout)
        assert st["stick"]["present"] is False
        # A second eject with nothing mounted says so and succeeds.
        r = _rekam(cfg, "usb", "eject")
        assert r.returncode == 0 and "no stick mounted" in r.stdout
    finally:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
        if usbstick.mounted_at(mp) is not None:
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)
    # What the daemon wrote survived the eject: mount again read-only and look.
    subprocess.run(["mount", "-o", "ro", dev, str(mp)], check=True)
    try:
        names = sorted(x.name for x in mp.glob("rekam/*/records/*.rkm"))
        assert names == sorted(i + ".rkm" for i in ids)
    finally:
        subprocess.run(["umount", str(mp)], check=True)
        subprocess.run(["losetup", "-d", dev], check=True)
