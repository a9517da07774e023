"""A stick prepared to hurt the kit: symlinks, FIFOs and deep JSON where rekam's files belong (issue 13, finding 1).

Real media: plain folders, loop-mounted ext4 images (mounted *without* ``nosymfollow``, as a kernel older than
5.10 would: only the daemon's own ``O_NOFOLLOW`` stands between the stick and the state directory) and exFAT
images through the mount helper; real `rekamd --sim` processes where the attack is on the daemon's start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from firmware.seal import identity
from firmware.store.journal import Journal
from firmware.store.store import Store
from firmware.wire import record_format
from hw import usbstick
from tests.store.conftest import make_config
from tests.support import rekam, wait_for, write_daemon_config
from tests.system.test_usbstick import make_stick  # noqa: F401 (the loop-device fixture, shared)

MEDIA = ["dir", "ext4"]  # media that can hold symlinks and FIFOs (FAT and exFAT cannot)


@pytest.fixture
def mount_medium(make_stick: Callable[..., str]) -> Callable[[str, Path], Path]:  # noqa: F811
    """mount_medium(kind, at) -> `at` holding an empty stick: "dir" (a plain folder), "ext4" (a loop image mounted
    without nosymfollow) or "exfat" (a loop image mounted by hw.usbstick, FUSE where the kernel has no exfat).
    Unmounted and detached at teardown by `make_stick`."""

    def mount(kind: str, at: Path) -> Path:
        at.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            return at
        dev = make_stick(kind, "REKAM")
        if kind == "ext4":
            subprocess.run(["mount", "-t", "ext4", "-o", "nodev,nosuid,noexec", dev, str(at)], check=True,
                           capture_output=True)
        else:
            usbstick.mount(usbstick.probe(dev), usbstick.Settings(at, "", 0, 0))
        assert os.path.ismount(at)
        return at

    return mount


def tree(p: Path, *names: str) -> dict[str, str]:
    """Every file under `p` (or only those `names`) with its SHA-256 (what an attack might have changed)."""
    out = {}
    for f in sorted(p.rglob("*")) if not names else [p / n for n in names]:
        if f.is_file() and not f.is_symlink():
            out[str(f.relative_to(p))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def payload(n: int = 20_000) -> bytes:
    return record_format.Payload({"nik": "3273010101900001"}, [record_format.Attachment(
        "blob", "application/octet-stream", os.urandom(n))]).encode()


def deep_json(levels: int = 2000) -> str:
    """A JSON document nested `levels` deep in under 4.1 kB: json.loads alone ends in RecursionError."""
    return '{"stick_id": ' + "[" * levels + "]" * levels + "}"


# --- the daemon: a stick must never keep rekamd from starting ------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("medium", MEDIA)
def test_symlinked_index_cannot_write_into_the_identity(medium: str, tmp_path: Path, dc_keys: dict[str, Any],
                                                        corpus_dir: Path, rekamd_factory: Any,
                                                        mount_medium: Callable[[str, Path], Path]) -> None:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    state = tmp_path / "sd"
    ident = identity.load_or_create(state)  # what rekamd loads: the kit id is known before the stick is made
    usb = mount_medium(medium, tmp_path / "usb")
    kdir = usb / "rekam" / ident.kit_id
    (kdir / "records").mkdir(parents=True)
    target = state / "identity" / "kit.json"
    (kdir / "index.jsonl").symlink_to(target)
    before = tree(state / "identity", "kit.json", "kit.key")

    d = rekamd_factory(cfg, timeout=60)
    r = rekam("sim", "commit", "2", "--json", cfg=cfg)  # before the fix: two index lines appended to kit.json
    assert r.returncode == 0, r.stderr
    assert tree(state / "identity", "kit.json", "kit.key") == before, "the stick wrote into the kit's identity"
    assert all(c["stick_id"] is None for c in json.loads(r.stdout))  # capture went on, to the SD only
    st = json.loads(rekam("status", "--json", cfg=cfg).stdout)
    assert st["stick"]["present"] is False
    assert "index.jsonl" in st["stick"]["error"] and "symlink" in st["stick"]["error"]
    assert "usb stick unusable" in d.log_text() and "index.jsonl" in d.log_text()
    assert d.stop() == 0

    j = Journal(state / "journal.db")
    events = j.audit_events("usb_refused")
    j.close()
    assert events and "index.jsonl" in json.dumps(events)
    # The stick is pulled: the kit starts again, with its identity and both records.
    if medium == "dir":
        (kdir / "index.jsonl").unlink()
    else:
        subprocess.run(["umount", str(usb)], check=True)
    d2 = rekamd_factory(cfg, timeout=60)
    st = json.loads(rekam("status", "--json", cfg=cfg).stdout)
    assert st["kit_id"] == ident.kit_id and st["records"]["stored"]["records"] == 2
    d2.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("medium", ["dir", "exfat"])
def test_deeply_nested_stick_json_does_not_stop_the_daemon(medium: str, tmp_path: Path, dc_keys: dict[str, Any],
                                                          corpus_dir: Path, rekamd_factory: Any,
                                                          mount_medium: Callable[[str, Path], Path]) -> None:
    cfg = write_daemon_config(tmp_path, dc_keys["pub_path"], corpus_dir)
    usb = mount_medium(medium, tmp_path / "usb")
    (usb / "rekam").mkdir()
    (usb / "rekam" / "stick.json").write_text(deep_json())
    d = rekamd_factory(cfg, timeout=60)  # before the fix: exit 70 (RecursionError), a restart loop under systemd
    st = wait_for(lambda: (s := json.loads(rekam("status", "--json", cfg=cfg).stdout))["stick"]["error"] and s,
                  20, "the stick to be refused")
    assert st["stick"]["present"] is False
    assert "stick.json" in st["stick"]["error"] and "too_deep" in st["stick"]["error"]
    r = rekam("sim", "commit", "1", "--json", cfg=cfg)
    assert r.returncode == 0, r.stderr
    assert d.running
    assert (usb / "rekam" / "stick.json").read_text() == deep_json()  # not "repaired": the stick is left alone
    assert sorted(p.name for p in (usb / "rekam").iterdir()) == ["stick.json"]


# --- the store against each odd entry ------------------------------------------------------------------------------


def _fifo(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(p)


def _link(p: Path, to: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to(to)


# name -> (what it plants on the stick given (stick, kit folder, outside folder, state dir), the path the refusal names)
ODD: dict[str, tuple[Callable[[Path, Path, Path, Path], None], str]] = {
    "rekam-symlink": (lambda s, k, o, sd: _link(s / "rekam", o), "rekam"),
    "kit-folder-symlink": (lambda s, k, o, sd: _link(k, o), "rk-"),
    "records-symlink": (lambda s, k, o, sd: _link(k / "records", o), "records"),
    "records-fifo": (lambda s, k, o, sd: _fifo(k / "records"), "records"),
    "index-fifo": (lambda s, k, o, sd: (os.makedirs(k / "records"), _fifo(k / "index.jsonl")), "index.jsonl"),
    "stick-json-symlink": (lambda s, k, o, sd: _link(s / "rekam" / "stick.json", o / "stick.json"), "stick.json"),
    "stick-json-fifo": (lambda s, k, o, sd: _fifo(s / "rekam" / "stick.json"), "stick.json"),
    "stick-id-forged-log-line": (lambda s, k, o, sd: ((s / "rekam").mkdir(), (s / "rekam" / "stick.json").write_text(
        json.dumps({"stick_id": "x\nERROR forged"}))), "stick.json"),
    "kit-json-symlink": (lambda s, k, o, sd: (os.makedirs(k / "records"), _link(k / "kit.json",
                                                                                  sd / "identity" / "kit.json")),
                         "kit.json"),
    "kit-json-deep": (lambda s, k, o, sd: (os.makedirs(k / "records"), (k / "kit.json").write_text(
        deep_json(3000))), "kit.json"),
}


@pytest.mark.timeout(30)  # a FIFO opened the old way blocks forever: this fails instead of hanging the suite
@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_entry_on_the_stick_is_refused_and_nothing_outside_changes(case: str, tmp_path: Path,
                                                                       dc_keys: dict[str, Any]) -> None:
    cfg = make_config(tmp_path, dc_keys["pub_path"])
    ident = identity.load_or_create(cfg.state_dir)
    usb = tmp_path / "usb"
    usb.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "stick.json").write_text(json.dumps({"stick_id": "stick-outside"}))
    plant, names = ODD[case]
    plant(usb, usb / "rekam" / ident.kit_id, outside, cfg.state_dir)
    before_out, before_id = tree(outside), tree(cfg.state_dir / "identity")
    s = Store(cfg, ident)
    s.open()
    try:
        assert s.stick is None, f"{case}: the stick was taken"
        assert names in s.stick_error and "refused" in s.stick_error, s.stick_error
        res = s.commit(payload())
        assert res.stick_id is None and s.sd_path(res.record_id).exists()  # capture goes on to the SD
        assert [e["detail"] for e in s.audit_events("usb_refused")], "no audit event"
        s.poll_usb()
        assert len(s.audit_events("usb_refused")) == 1  # once per stick, not once per poll
        shutil.rmtree(usb)  # pulled (rmtree removes the links, never what they point to)
        s.poll_usb()
        assert s.stick_error == "" and s.status()["stick"]["error"] == ""
    finally:
        s.close()
    assert tree(outside) == before_out and sorted(os.listdir(outside)) == ["stick.json"]
    assert tree(cfg.state_dir / "identity") == before_id


@pytest.mark.parametrize("medium", MEDIA)
def test_symlinked_records_folder_gets_no_record(medium: str, tmp_path: Path, dc_keys: dict[str, Any],
                                                  mount_medium: Callable[[str, Path], Path]) -> None:
    cfg = make_config(tmp_path, dc_keys["pub_path"])
    ident = identity.load_or_create(cfg.state_dir)
    usb = mount_medium(medium, tmp_path / "usb")
    outside = tmp_path / "outside"
    outside.mkdir()
    _link(usb / "rekam" / ident.kit_id / "records", outside)
    with Store(cfg, ident) as s:
        ids = [s.commit(payload()).record_id for _ in range(3)]
        assert s.stick is None and "records" in s.stick_error
        assert all(s.sd_path(r).exists() for r in ids)
    assert os.listdir(outside) == []


def test_a_stick_made_hostile_after_insertion_fails_the_write_not_the_kit(store: Store, tmp_path: Path) -> None:
    """The stick was fine when taken; then (another process on the kit, a FUSE stick) index.jsonl becomes a symlink:
    the next write through it is refused, the stick dropped, the record safe on the SD."""
    assert store.stick is not None
    stick_id = store.stick.stick_id
    store.commit(payload())
    store.wait_mirror_idle()  # its index line is appended after the answer: let it land before the swap
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    store.stick.index_path.unlink()
    store.stick.index_path.symlink_to(victim)
    res = store.commit(payload())
    # The record file went to the records folder, which is still fine (durable, read back: a real copy); its index
    # line is appended after the commit has its answer (issue #17.3), where the symlink is refused, not followed.
    assert res.stick_id == stick_id and store.stick.record_path(res.record_id).is_file()
    assert store.sd_path(res.record_id).exists()
    # The refusal drops the stick at the next commit (or poll), before anything else is written to it.
    store.wait_mirror_idle()
    res2 = store.commit(payload())
    assert res2.stick_id is None and "symlink" in store.stick_error and store.stick is None
    assert not (tmp_path / "usb" / "rekam" / store.identity.kit_id / "records" / f"{res2.record_id}.rkm").exists()
    assert victim.read_text() == "precious\n"
    assert store.sd_path(res2.record_id).exists()


def test_a_hostile_index_found_by_the_poll_drops_the_stick(store: Store, tmp_path: Path) -> None:
    """The same, with the USB watcher's poll (not a commit) the first to act on the refused index line."""
    assert store.stick is not None
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    store.stick.index_path.unlink(missing_ok=True)  # (no line yet: the index is made by the first append)
    store.stick.index_path.symlink_to(victim)
    res = store.commit(payload())
    assert res.stick_id is not None
    store.poll_usb(backfill=False)
    assert store.stick is None and "symlink" in store.stick_error
    assert victim.read_text() == "precious\n"


# --- the mount helper ------------------------------------------------------------------------------------------------


def test_helper_mounts_ext4_nosymfollow(make_stick: Callable[..., str], tmp_path: Path) -> None:  # noqa: F811
    dev = make_stick("ext4", "REKAM")
    s = usbstick.Settings(tmp_path / "media", "", 0, 0)
    plan = usbstick.mount(usbstick.probe(dev), s)
    cur = usbstick.mounted_at(s.mount_point)
    assert cur is not None and {"nosymfollow", "nodev", "nosuid", "noexec"} <= set(cur.options), cur.options
    assert "nosymfollow" in plan.options
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (s.mount_point / "index.jsonl").symlink_to(victim)
    with pytest.raises(OSError) as e:  # the kernel itself refuses: even a plain open() cannot follow it
        os.open(s.mount_point / "index.jsonl", os.O_WRONLY | os.O_APPEND)
    assert e.value.errno == errno.ELOOP and victim.read_text() == "precious\n"
    assert usbstick.unmount(s.mount_point, dev)


def test_helper_mounts_without_nosymfollow_where_the_kernel_refuses_it(make_stick: Callable[..., str],  # noqa: F811
                                                                       tmp_path: Path, monkeypatch: Any,
                                                                       caplog: Any) -> None:
    """Kernels before 5.10 (util-linux before 2.36) refuse the option: the stick is still mounted, with a warning.
    This kernel has it, so `mount` is fronted by a script that answers as an old one does and passes the rest on."""
    real = subprocess.run(["which", "mount"], capture_output=True, text=True, check=True).stdout.strip()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mount").write_text(f'#!/bin/sh\ncase "$*" in *nosymfollow*) echo "mount: {tmp_path}: wrong fs type, '
                                   f'bad option, bad superblock" >&2; exit 32;; esac\nexec {real} "$@"\n')
    (bin_dir / "mount").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    dev = make_stick("ext4", "REKAM")
    s = usbstick.Settings(tmp_path / "media", "", 0, 0)
    with caplog.at_level(logging.WARNING, "hw.usbstick"):
        plan = usbstick.mount(usbstick.probe(dev), s)
    cur = usbstick.mounted_at(s.mount_point)
    assert cur is not None and "nosymfollow" not in cur.options and {"nodev", "nosuid", "noexec"} <= set(cur.options)
    assert "nosymfollow" not in plan.options
    assert "nosymfollow refused by this kernel" in caplog.text
    assert usbstick.unmount(s.mount_point, dev)
