"""`rekam-fleet import` of a stick prepared to hurt the data center (issue 13, finding 6).

A real kit store mirrors real records to the stick (plain folder, loop-mounted ext4, exFAT through the mount
helper); then the stick is doctored: symlinked records and kit folders pointing outside it, a FIFO, a
``/dev/zero`` symlink, a 3 GB sparse file, deeply nested kit.json / stick.json / index lines. Each must be one
refused line in the report, the good records still imported, and nothing may hang or read a whole file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from firmware.seal import identity
from firmware.store.store import Store
from firmware.wire import record_format
from provisioning import cli as fleet_cli
from provisioning.archive import Archive
from provisioning.usb_import import import_stick
from tests.store.conftest import make_config
from tests.store.test_hostile_stick import deep_json, mount_medium, payload  # noqa: F401 (mount_medium: a fixture)
from tests.store.test_record_format import _header, _with_header
from tests.system.test_usbstick import make_stick  # noqa: F401 (the loop-device fixture, shared)

FAKE_TIME = "20260101T000000Z"


@pytest.fixture(scope="module")
def dc_pub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data center's public key file (records are sealed to it; the import never needs the private half)."""
    d = tmp_path_factory.mktemp("dc")
    (d / "datacenter.pub").write_bytes(record_format.generate_datacenter_keypair()[1])
    return d / "datacenter.pub"


@dataclass
class KitStick:
    """A kit's stick with `ids` mirrored on it, the kit's SD in `sd`."""

    usb: Path
    kit_id: str
    ids: list[str]
    sd: Path

    @property
    def kdir(self) -> Path:
        return self.usb / "rekam" / self.kit_id

    def rec(self, rid: str) -> Path:
        return self.kdir / "records" / f"{rid}{record_format.FILE_SUFFIX}"

    def fake_id(self, seq: int) -> str:
        return f"{self.kit_id}-{seq:08d}-{FAKE_TIME}"


def kit_stick(root: Path, usb: Path, dc_pub: Path, n: int) -> KitStick:
    """`n` records committed by a real store with the stick at `usb` (so each is mirrored there), then ejected."""
    usb.mkdir(parents=True, exist_ok=True)
    cfg = make_config(root, dc_pub, usb={"mount_point": str(usb)})
    ident = identity.load_or_create(cfg.state_dir)
    with Store(cfg, ident) as s:
        ids = [s.commit(payload()).record_id for _ in range(n)]
        assert s.stick is not None and sorted(s.stick.record_files()) == sorted(ids)
        s.eject()
    return KitStick(usb, ident.kit_id, ids, cfg.state_dir / "records")


def _sparse(p: Path, size: int) -> None:
    with open(p, "wb") as f:
        f.truncate(size)  # no data block written: the test stays fast


# Each attack: plant(stick, tmp_path, dc_pub) -> (text a rejected line must contain, ids that must not be imported)
ATTACKS: dict[str, Callable[[KitStick, Path, Path], tuple[str, list[str]]]] = {}


def attack(fn: Callable[[KitStick, Path, Path], tuple[str, list[str]]]) -> Callable[..., Any]:
    ATTACKS[fn.__name__] = fn
    return fn


@attack
def record_symlink_out_of_the_stick(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    victim = k.ids[-1]  # the stick's copy replaced by a link to the kit's SD copy: a read outside the stick
    k.rec(victim).unlink()
    k.rec(victim).symlink_to(k.sd / f"{victim}{record_format.FILE_SUFFIX}")
    return "symlink", [victim]


@attack
def record_fifo(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    os.mkfifo(k.rec(k.fake_id(90)))  # opened the old way: blocks for ever waiting for a writer
    return "not a regular file", []


@attack
def record_dev_zero(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    k.rec(k.fake_id(91)).symlink_to("/dev/zero")  # read whole: endless, MemoryError
    return "symlink", []


@attack
def record_sparse_3gb(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    _sparse(k.rec(k.fake_id(92)), 3 << 30)
    return "the limit is", []


@attack
def kit_folder_symlink(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    other = kit_stick(tmp / "other-kit", tmp / "other-stick", dc_pub, 1)  # a whole kit folder elsewhere
    (k.usb / "rekam" / other.kit_id).symlink_to(other.kdir)
    return "kit folder is a symlink", other.ids


@attack
def kit_json_deep(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    d = k.usb / "rekam" / "rk-deep"
    (d / "records").mkdir(parents=True)
    (d / "kit.json").write_text(deep_json(5000))
    return "too_deep", []


@attack
def kit_json_fifo(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    d = k.usb / "rekam" / "rk-fifo"
    (d / "records").mkdir(parents=True)
    os.mkfifo(d / "kit.json")
    return "not a regular file", []


@attack
def stick_json_symlink(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    (tmp / "elsewhere.json").write_text(json.dumps({"stick_id": "stick-elsewhere"}))
    (k.usb / "rekam" / "stick.json").unlink()
    (k.usb / "rekam" / "stick.json").symlink_to(tmp / "elsewhere.json")
    return "symlink", []


@attack
def stick_json_deep(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    (k.usb / "rekam" / "stick.json").write_text(deep_json(1500))
    return "too_deep", []


@attack
def index_line_deep(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    with open(k.kdir / "index.jsonl", "a") as f:
        f.write('{"record_id": ' + "[" * 1500 + "]" * 1500 + "}\n")
    return "too_deep", []


@attack
def index_line_endless(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    with open(k.kdir / "index.jsonl", "a") as f:
        f.write('{"record_id": "' + "x" * 200_000 + '"}\n')
    return "longer than", []


@attack
def record_header_deep(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    # Parsed before the signature: json.loads alone ended in RecursionError and aborted the whole import.
    k.rec(k.fake_id(93)).write_bytes(_with_header(b"[" * 60_000))
    return "nested", []


@attack
def record_header_seq_overflow(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    k.rec(k.fake_id(94)).write_bytes(_with_header(_header(seq="SEQ")))  # 1e400: int(inf) raised OverflowError
    return "seq", []


@attack
def record_name_undecodable(k: KitStick, tmp: Path, dc_pub: Path) -> tuple[str, list[str]]:
    # A name that is no UTF-8: storing its rejection raised UnicodeEncodeError in SQLite and aborted the import.
    os.close(os.open(os.fsencode(k.kdir / "records") + b"/\xff" + os.fsencode(record_format.FILE_SUFFIX),
                     os.O_WRONLY | os.O_CREAT, 0o644))
    return "not named after a record id", []


def _import(k: KitStick, archive_dir: Path, capsys: Any, *extra: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = fleet_cli.main(["import", str(k.usb), "--archive", str(archive_dir), "--tofu", "--json", "--no-progress",
                         *extra])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.timeout(60)  # a FIFO read the old way hangs: this fails instead
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_each_hostile_file_is_refused_and_the_rest_imported(name: str, tmp_path: Path, dc_pub: Path,
                                                            capsys: Any) -> None:
    k = kit_stick(tmp_path / "kit", tmp_path / "usb", dc_pub, 3)
    needle, not_imported = ATTACKS[name](k, tmp_path, dc_pub)
    rc, summary = _import(k, tmp_path / "archive", capsys)
    assert rc == 1, summary  # partial: something was refused
    reasons = [f"{r['record']}: {r['reason']}" for r in summary["rejected"]]
    assert len(reasons) == 1 and needle in reasons[0], reasons
    good = sorted(set(k.ids) - set(not_imported))
    a = Archive(tmp_path / "archive")
    try:
        assert sorted(a.record_ids(k.kit_id)) == good and summary["new"] == len(good)
        for other in set(not_imported) - set(k.ids):  # another kit's records, from outside the stick
            assert a.has(other) is None
    finally:
        a.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("medium", ["dir", "ext4", "exfat"])
def test_a_stick_with_every_attack_at_once(medium: str, tmp_path: Path, dc_pub: Path, capsys: Any,
                                           mount_medium: Callable[[str, Path], Path]) -> None:  # noqa: F811
    usb = mount_medium(medium, tmp_path / "usb")
    k = kit_stick(tmp_path / "kit", usb, dc_pub, 4)
    # FAT and exFAT hold no symlinks or FIFOs, nor sparse files: there, the oversized record is a real 2 MiB file
    # against a 1 MiB cap.
    on_exfat = ["index_line_deep", "index_line_endless", "kit_json_deep", "stick_json_deep"]
    # (stick.json can be made deep or a symlink, not both at once)
    names = sorted(set(ATTACKS) - {"stick_json_symlink"}) if medium != "exfat" else on_exfat
    expected, not_imported = [], []
    for n in names:
        needle, skip = ATTACKS[n](k, tmp_path, dc_pub)
        expected.append(needle)
        not_imported += skip
    extra: tuple[str, ...] = ()
    if medium == "exfat":
        k.rec(k.fake_id(93)).write_bytes(os.urandom(2 << 20))
        expected.append("the limit is")
        extra = ("--max-record-mb", "1")
    rc, summary = _import(k, tmp_path / "archive", capsys, *extra)
    assert rc == 1
    reasons = [f"{r['record']}: {r['reason']}" for r in summary["rejected"]]
    assert len(reasons) == len(expected), reasons
    for needle in expected:
        assert any(needle in r for r in reasons), (needle, reasons)
    good = sorted(set(k.ids) - set(not_imported))
    assert summary["kits"] == [k.kit_id] and summary["new"] == len(good)
    a = Archive(tmp_path / "archive")
    try:
        assert sorted(a.record_ids(k.kit_id)) == good
    finally:
        a.close()
    # Importing the doctored stick again changes nothing and still reports each refusal.
    rc, again = _import(k, tmp_path / "archive", capsys, *extra)
    assert rc == 1 and again["new"] == 0 and again["already_had"] == len(good) and len(again["rejected"]) == len(
        expected)


def test_import_stick_api_caps_each_record(tmp_path: Path, dc_pub: Path) -> None:
    """The library call refuses a record over its cap by the size on the open file, before reading it."""
    k = kit_stick(tmp_path / "kit", tmp_path / "usb", dc_pub, 2)
    size = min(k.rec(r).stat().st_size for r in k.ids)
    a = Archive(tmp_path / "archive", tofu=True)
    try:
        s = import_stick(k.usb, a, tofu=True, progress=False, max_record_bytes=size - 1)
        assert s.new == [] and len(s.rejected) == 2
        assert all(f"limit is {size - 1}" in why for _rid, why in s.rejected)
    finally:
        a.close()


def test_a_symlinked_rekam_folder_is_refused_whole(tmp_path: Path, dc_pub: Path, capsys: Any) -> None:
    k = kit_stick(tmp_path / "kit", tmp_path / "usb", dc_pub, 2)
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "rekam").symlink_to(k.usb / "rekam")  # the whole layout lives elsewhere
    rc = fleet_cli.main(["import", str(stick), "--archive", str(tmp_path / "archive"), "--tofu", "--json",
                         "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 1 and summary["new"] == 0 and summary["kits"] == []
    assert [r["reason"] for r in summary["rejected"]] == ["is a symlink: not read"]


def test_an_index_of_millions_of_lines_is_bounded(tmp_path: Path, dc_pub: Path, capsys: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ids are kept from the index, at most MAX_RECORDS_PER_KIT, and refusals past MAX_REJECTED_SHOWN are
    counted, not listed (an index may be 1 GiB: parsed entries and one report line each were gigabytes)."""
    from provisioning import usb_import
    monkeypatch.setattr(usb_import, "MAX_RECORDS_PER_KIT", 50)
    monkeypatch.setattr(usb_import, "MAX_REJECTED_SHOWN", 10)
    k = kit_stick(tmp_path / "kit", tmp_path / "usb", dc_pub, 2)
    with open(k.kdir / "index.jsonl", "a") as f:
        for seq in range(100, 400):  # listed, no file: each a refusal
            f.write(json.dumps({"record_id": k.fake_id(seq)}) + "\n")
    rc, summary = _import(k, tmp_path / "archive", capsys)
    assert rc == 1 and summary["new"] == 2
    # The index is read up to 50 ids (the 2 real ones and 48 without a file), then one "more than 50" line;
    # the 48 missing files are one refusal each: 49 in all, 10 listed.
    assert len(summary["rejected"]) == 10 and summary["rejected_not_listed"] == 39
    assert "more than 50" in summary["rejected"][0]["reason"], summary["rejected"][0]
    rc = fleet_cli.main(["import", str(k.usb), "--archive", str(tmp_path / "archive"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and " 49\n" in out and "39" in out.splitlines()[-1], out
