"""The bundle format's bounds and named errors (firmware/wire/update_bundle.py), and the version rules."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.control.update import check_rules, judge_status
from firmware.errors import BundleError, Refused
from firmware.wire import control_protocol as cp
from firmware.wire import update_bundle as ub
from tests.update.conftest import JOURNAL, RECORDS, make_bundle, tiny_wheel

KEY = Ed25519PrivateKey.generate()


def _open(data: bytes, key=KEY) -> ub.Manifest:
    return ub.open_manifest(io.BytesIO(data), len(data), key.public_key())


def _bundle(tmp_path: Path) -> bytes:
    return make_bundle(tmp_path, tiny_wheel(tmp_path, "0.3.0", "pass"), "0.3.0", KEY).read_bytes()


def _with_body(body: dict, tail: bytes = b"") -> bytes:
    env = cp.sign("release", body, KEY)
    return ub.HEADER.pack(ub.MAGIC, ub.FORMAT, len(env)) + env + tail


def test_round_trip_and_extract(tmp_path: Path) -> None:
    data = _bundle(tmp_path)
    m = _open(data)
    assert m.version == "0.3.0" and len(m.artifacts) == 1
    out = tmp_path / "x"
    out.mkdir()
    (w,) = ub.extract(io.BytesIO(data), m, out)
    assert w.read_bytes() == (tmp_path / "rekam-0.3.0-py3-none-any.whl").read_bytes()


@pytest.mark.parametrize("mutate,reason", [
    (lambda d: b"NOTABUNDLE" + d[10:], "bad_magic"),
    (lambda d: d[:8] + b"\x02" + d[9:], "malformed"),
    (lambda d: d[:12] + struct.pack(">I", 1 << 30) + d[16:], "too_large"),  # a manifest length past the cap
    (lambda d: d[:12] + struct.pack(">I", len(d)) + d[16:], "malformed"),  # past the end of the file
    (lambda d: d + b"x", "size_mismatch"),  # bytes the signed manifest does not account for
    (lambda d: d[:-1], "size_mismatch"),
    (lambda d: d[:10], "malformed"),
])
def test_bounded_and_named_errors(tmp_path: Path, mutate, reason: str) -> None:
    with pytest.raises(BundleError) as e:
        _open(mutate(_bundle(tmp_path)))
    assert e.value.reason == reason


def test_signature_kind_and_shape(tmp_path: Path) -> None:
    data = _bundle(tmp_path)
    with pytest.raises(BundleError) as e:
        _open(data, Ed25519PrivateKey.generate())
    assert e.value.reason == "bad_signature"
    body = ub.manifest_body("0.3.0", "0.1.0", [{"name": "a.whl", "sha256": "0" * 64, "size": 1}], JOURNAL, RECORDS)
    # a command envelope signed by the fleet is not a release manifest
    env = cp.sign("cmd", body, KEY)
    with pytest.raises(BundleError) as e:
        _open(ub.HEADER.pack(ub.MAGIC, ub.FORMAT, len(env)) + env + b"x")
    assert e.value.reason == "wrong_kind"
    bad = [
        {**body, "artifacts": [{"name": "../../etc/x.whl", "sha256": "0" * 64, "size": 1}]},
        {**body, "artifacts": [{"name": "a.whl", "sha256": "0" * 64, "size": ub.MAX_ARTIFACT_BYTES + 1}]},
        {**body, "artifacts": [{"name": f"a{i}.whl", "sha256": "0" * 64, "size": 1}
                               for i in range(ub.MAX_ARTIFACTS + 1)]},
        {**body, "version": "1.0-rc1"},
        {**body, "journal_schema": {"reads": [2], "writes": 3, "compatible_from": 2}},
        {**body, "extra": 1},
    ]
    for b in bad:
        with pytest.raises(BundleError):
            _open(_with_body(b, b"x" * 2))


def _manifest(version: str, min_from: str, journal=JOURNAL, records=RECORDS) -> ub.Manifest:
    body = ub.manifest_body(version, min_from, [{"name": "a.whl", "sha256": "0" * 64, "size": 1}], journal, records)
    return ub.Manifest(body, (), b"", 0)


@pytest.mark.parametrize("version,min_from,journal,records,code", [
    ("0.1.0", "0.1.0", JOURNAL, RECORDS, "already_installed"),
    ("0.0.9", "0.0.1", JOURNAL, RECORDS, "downgrade"),
    ("0.3.0", "0.2.0", JOURNAL, RECORDS, "wrong_from_version"),
    ("0.3.0", "0.1.0", {"reads": [3], "writes": 3, "compatible_from": 3}, RECORDS, "journal_unsupported"),
    ("0.3.0", "0.1.0", {"reads": [1], "writes": 1, "compatible_from": 1}, RECORDS, "journal_unsupported"),
    ("0.3.0", "0.1.0", {"reads": [2, 3], "writes": 3, "compatible_from": 3}, RECORDS, "journal_not_reversible"),
    ("0.3.0", "0.1.0", JOURNAL, {"reads": [2], "writes": 2}, "record_format_unsupported"),
])
def test_version_rules(version, min_from, journal, records, code) -> None:
    with pytest.raises(Refused) as e:
        check_rules(_manifest(version, min_from, journal, records), "0.1.0", 2, 2)
    assert e.value.reason == code


def test_version_rules_accept() -> None:
    check_rules(_manifest("0.10.0", "0.1.0"), "0.9.3", 2, 2)  # numeric, not string, order
    check_rules(_manifest("0.3.0", "0.1.0", {"reads": [2, 3], "writes": 3, "compatible_from": 2}), "0.1.0", 2, 2)


def test_self_test_judgement() -> None:
    st = {"daemon": {"version": "0.2.0", "services": {"relay": {"state": "running"}}},
          "records": {"stored": {"records": 1}}, "guard": {"level": "OK"}, "sensor": {"open": True, "error": ""},
          "relay": {"state": "connected"}}
    assert judge_status(st, "0.2.0", True) == (True, "ok", "")
    assert judge_status(st, "0.3.0", False)[1] == "wrong_version"
    assert judge_status({**st, "sensor": {"error": "no sensor"}}, "0.2.0", False)[1] == "sensor_missing"
    assert judge_status({**st, "relay": {"state": "connecting"}}, "0.2.0", True)[1] == "uplink_lost"
    assert judge_status({**st, "relay": {"state": "connecting"}}, "0.2.0", False)[0] is True
    failed = {**st, "daemon": {"version": "0.2.0", "services": {"store": {"state": "failed"}}}}
    assert judge_status(failed, "0.2.0", False)[1] == "service_failed"
    assert judge_status({k: v for k, v in st.items() if k != "records"}, "0.2.0", False)[1] == "store_failed"
    ready = {"face": {"state": "ready"}, "finger": {"state": "ready"}, "iris": {"state": "unused"}}
    assert judge_status({**st, "quality": ready}, "0.2.0", False)[0] is True
    broken = {**ready, "face": {"state": "unavailable", "error": "ModelError: face_landmark.tflite: hash"}}
    ok, code, why = judge_status({**st, "quality": broken}, "0.2.0", False)
    assert (ok, code) == (False, "quality_missing") and "face_landmark.tflite" in why
    assert judge_status({**st, "quality": {"finger": "odd"}}, "0.2.0", False)[1] == "quality_missing"


def test_units_run_real_commands() -> None:
    """The update units' command lines parse with the real `rekam` parser; the path unit watches the daemon's
    pending file; rekamd.service calls the crash-loop unit."""
    import shlex

    from firmware.cli.main import build_parser
    from tests.support import REPO

    units = REPO / "systemd"

    def lines(unit: str, key: str) -> list[str]:
        return [ln.split("=", 1)[1] for ln in (units / unit).read_text().splitlines() if ln.startswith(key + "=")]

    for unit, key in (("rekamd.service", "ExecStartPre"), ("rekam-rollback.service", "ExecStart"),
                      ("rekam-update.service", "ExecStart"), ("rekam-update-stick.service", "ExecStart")):
        (line,) = lines(unit, key)
        argv = shlex.split(line.lstrip("-+"))
        assert argv[0].startswith("/opt/rekam/") and argv[0].endswith("/bin/rekam")
        build_parser().parse_args(argv[1:])
    assert lines("rekamd.service", "OnFailure") == ["rekam-rollback.service"]
    assert "start --no-block rekam-update-stick.service" in lines("rekam-usb-mount@.service", "ExecStartPost")[0]
    assert lines("rekamd.service", "ExecStart")[0].startswith("/opt/rekam/current/bin/rekamd ")
    assert lines("rekam-update.path", "PathExists") == ["/var/lib/rekam/updates/pending.rkup"]
    assert "/var/lib/rekam/updates/pending.rkup" in lines("rekam-update.service", "ExecStart")[0]


def test_stick_hostile_files_and_swap_after_copy(tmp_path: Path) -> None:
    """A stick's update folder is read beneath the mount, regular files only, size-capped before a byte is read;
    what is verified and installed is the kit's own copy, whatever the stick holds afterwards."""
    import os

    from firmware.control.update import Updater
    from firmware.wire import stick_layout

    mount = tmp_path / "stick"
    folder = mount / stick_layout.ROOT / stick_layout.UPDATES
    folder.mkdir(parents=True)
    state = tmp_path / "sd"
    state.mkdir()
    up = Updater(tmp_path / "opt", state, KEY.public_key(), restart=lambda _t: (False, ""),
                 probe=lambda _v, _u, _t: (False, "", ""))
    os.mkfifo(folder / "a-fifo.rkup")  # would block a plain open()
    with open(folder / "b-huge.rkup", "wb") as f:
        f.truncate(ub.MAX_BUNDLE_BYTES + 1)  # sparse: refused by its size, not read
    assert up.stick_bundles(mount) == [f"rekam/updates/{n}" for n in ("a-fifo.rkup", "b-huge.rkup")]
    with pytest.raises(Refused) as e:
        up.stage_untrusted(mount, "rekam/updates/a-fifo.rkup")
    assert e.value.reason == "unsafe_file"
    with pytest.raises(Refused) as e:
        up.stage_untrusted(mount, "rekam/updates/b-huge.rkup")
    assert e.value.reason == "too_large"
    with pytest.raises(Refused) as e:
        up.apply_from_stick(mount)
    assert e.value.reason == "no_bundle" and "unsafe_file" in str(e.value) and "too_large" in str(e.value)
    # swap after the copy: the stick's file replaced by a forged one changes nothing in what is verified
    d = tmp_path / "w"
    d.mkdir()
    good = make_bundle(d, tiny_wheel(d, "0.3.0", "pass"), "0.3.0", KEY)
    os.replace(good, folder / "c-good.rkup")
    copy = up.stage_untrusted(mount, "rekam/updates/c-good.rkup")
    forged = make_bundle(d, tiny_wheel(d, "0.3.0", "pass"), "0.3.0", Ed25519PrivateKey.generate())
    os.replace(forged, folder / "c-good.rkup")
    assert up.verify(copy).version == "0.3.0"
    assert copy.parent == tmp_path / "opt" / "update" / "incoming" and (copy.parent.stat().st_mode & 0o077) == 0
    # a symlinked update folder is not followed
    (folder / "c-good.rkup").unlink()
    os.rename(folder, mount / "elsewhere")
    os.symlink(mount / "elsewhere", folder)
    with pytest.raises(Refused) as e:
        up.stick_bundles(mount)
    assert e.value.reason == "unsafe_file"
