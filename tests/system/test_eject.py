"""`rekam usb eject` end to end: the real daemon mirrors to a loop-mounted ext4 stick mounted by the
helper; eject flushes through the daemon's API and then unmounts (root path)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hw import usbstick
from tests.support import Rekamd, rekam, wait_for
from tests.system.conftest import need_root, write_kit_config


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
    d = Rekamd(cfg, tmp_path / "rekamd.log")
    try:
        usbstick.mount(usbstick.probe(dev), usbstick.Settings(mp, "", 0, 0))
        d.start()

        def stick_seen() -> bool:
            assert d.running, d.log_tail()
            r = rekam("status", "--json", cfg=cfg)
            return bool(r.returncode in (0, 2) and r.stdout and json.loads(r.stdout).get("stick", {}).get("present"))

        wait_for(stick_seen, 60, "the daemon to pick up the stick", step=0.3)
        r = rekam("sim", "commit", "2", "--json", cfg=cfg)
        assert r.returncode == 0, r.stderr
        ids = [d["record_id"] for d in json.loads(r.stdout)]
        assert all(d["mirrored"] for d in json.loads(r.stdout))

        r = rekam("usb", "eject", cfg=cfg)
        assert r.returncode == 0, r.stderr
        assert "it can be pulled out now" in r.stdout
        assert usbstick.mounted_at(mp) is None
        st = json.loads(rekam("status", "--json", cfg=cfg).stdout)
        assert st["stick"]["present"] is False
        # A second eject with nothing mounted says so and succeeds.
        r = rekam("usb", "eject", cfg=cfg)
        assert r.returncode == 0 and "no stick mounted" in r.stdout
    finally:
        d.stop(timeout=10)
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
