"""The export as an ABIS queue: cursor, idempotence, failures reported by id, hostile manifests, 1,000 records."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from firmware.wire import record_format as rf
from provisioning.interchange.export import STATE_FILE, Exporter, Options
from tests.provisioning.export_support import AGENCY, Kit, export, shared_sim_kit


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, dc_keys: dict[str, Any], corpus_dir: Path) -> Kit:
    return shared_sim_kit(tmp_path_factory, dc_keys, corpus_dir)


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.glob("*.an2"))}


def test_the_cursor_exports_only_what_arrived_and_a_second_run_writes_nothing(kit: Kit, tmp_path: Path) -> None:
    a = kit.archive(tmp_path / "archive", [kit.records["full"]])
    out = tmp_path / "out"
    r = export(a.root, kit, out, "an2k")
    assert r.returncode == 0, r.stdout + r.stderr
    first = json.loads(r.stdout)
    assert len(first["written"]) == 1 and first["cursor"]
    before = _files(out)
    r = export(a.root, kit, out, "an2k")  # nothing new: nothing written, the cursor stays
    assert r.returncode == 0 and json.loads(r.stdout) == {"written": [], "unchanged": [], "failed": [],
                                                          "cursor": first["cursor"], "corrected": []}
    a.store(kit.records["two_exceptions"], kit.ident.kit_id, "test")
    r = export(a.root, kit, out, "an2k")
    new = json.loads(r.stdout)
    assert new["written"] == [kit.open(kit.records["two_exceptions"])[0].record_id], new
    assert _files(out)[f"{first['written'][0]}.an2"] == before[f"{first['written'][0]}.an2"]  # untouched
    # Re-exported from the start (a lost state file, or --since): identical bytes, nothing rewritten.
    everything = _files(out)
    (out / STATE_FILE).unlink()
    r = export(a.root, kit, out, "an2k")
    again = json.loads(r.stdout)
    assert r.returncode == 0 and again["written"] == [] and len(again["unchanged"]) == 2, again
    assert _files(out) == everything
    r = export(a.root, kit, out, "an2k", "--since", first["cursor"])
    assert json.loads(r.stdout)["unchanged"] == new["written"]
    # CBEFF into the same folder keeps its own cursor; two worker processes write the same bytes as one.
    r = export(a.root, kit, out, "cbeff", "--jobs", "2")
    assert r.returncode == 0 and len(json.loads(r.stdout)["written"]) == 2, r.stdout + r.stderr
    assert export(a.root, kit, tmp_path / "one", "cbeff").returncode == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.xml")} == {
        p.name: p.read_bytes() for p in (tmp_path / "one").glob("*.xml")}
    assert sorted(p.suffix for p in out.iterdir() if not p.name.startswith(".")) == [".an2"] * 2 + [".xml"] * 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    a.close()


def test_a_queue_folder_belongs_to_one_archive(kit: Kit, tmp_path: Path) -> None:
    """Another archive's cursor would skip or repeat records: a folder keeps the archive it queued for."""
    a = kit.archive(tmp_path / "a", [kit.records["full"]])
    b = kit.archive(tmp_path / "b", [kit.records["two_exceptions"]])
    out = tmp_path / "out"
    assert export(a.root, kit, out, "an2k").returncode == 0
    r = export(b.root, kit, out, "an2k")
    assert r.returncode != 0 and "another archive" in r.stderr, r.stdout + r.stderr
    assert not (out / f"{kit.open(kit.records['two_exceptions'])[0].record_id}.an2").exists()
    assert export(a.root, kit, out, "an2k").returncode == 0  # its own archive still goes on
    a.close()
    b.close()


def _tiny_png(w: int, h: int, claimed: tuple[int, int] | None = None) -> bytes:
    """A valid 8-bit gray PNG of w x h; `claimed` rewrites the IHDR's size (a decompression bomb's header)."""
    cw, ch = claimed or (w, h)
    raw = b"".join(b"\0" + bytes(range(w)) for _ in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", cw, ch, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_records_that_cannot_be_exported_are_named_and_do_not_stop_the_others(kit: Kit, tmp_path: Path) -> None:
    full = kit.records["full"]
    _h, p = kit.open(full)
    m = p.manifest

    def variant(seq: int, fingers: list[dict[str, Any]], atts: list[rf.Attachment] | None = None) -> bytes:
        return kit.reseal(full, seq, manifest=dict(m, fingers=fingers), attachments=atts)

    f0 = m["fingers"][0]
    absurd_manifest = variant(901, [dict(f0, width=100000, height=100000)] + m["fingers"][1:])
    bomb_atts = [a if a.name != f0["image"] else rf.Attachment(a.name, "image/png", _tiny_png(8, 8, (60000, 60000)))
                 for a in p.attachments]
    bomb = variant(902, [dict(f0, width=60000, height=60000)] + m["fingers"][1:], bomb_atts)
    lying = variant(903, [dict(f0, width=128)] + m["fingers"][1:])
    wrong_code = variant(904, [dict(f0, finger="R9")] + m["fingers"][1:])
    # Sealed to another data center: this key cannot open it.
    _priv, other_pub = rf.generate_datacenter_keypair()
    hdr = kit.open(full)[0]
    other = rf.seal(p.encode(), record_id=f"{kit.ident.kit_id}-00000905-20261201T000000Z", kit_id=kit.ident.kit_id,
                    seq=905, created=hdr.created, clock_synced=False, signing_key=kit.ident.signing_key,
                    recipients=[rf.load_recipient_key(other_pub)])
    bad = [absurd_manifest, bomb, lying, wrong_code, other]
    a = kit.archive(tmp_path / "archive", [full, *bad, kit.records["two_exceptions"]])
    r = export(a.root, kit, tmp_path / "out", "cbeff")
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads(r.stdout)
    codes = {f["record_id"].split("-")[2]: f["code"] for f in res["failed"]}
    assert codes == {"00000901": "image_too_large", "00000902": "image_too_large",
                     "00000903": "image_size_mismatch", "00000904": "bad_finger_code", "00000905": "wrong_key"}
    assert len(res["written"]) == 2  # the good ones before and after the bad ones
    for f in res["failed"]:  # the technicians' log names each one too
        assert f"export failed record_id={f['record_id']} format=cbeff code={f['code']}" in r.stderr
    assert "R9" in next(f["reason"] for f in res["failed"] if f["code"] == "bad_finger_code")
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())["cbeff"]
    assert sorted(state["failed"]) == sorted(f["record_id"] for f in res["failed"])
    # The next run retries the failed ones first (and reports them again): never silently skipped.
    r = export(a.root, kit, tmp_path / "out", "cbeff")
    assert r.returncode == 1 and len(json.loads(r.stdout)["failed"]) == 5 and not json.loads(r.stdout)["written"]
    a.close()


def test_unknown_record_and_human_summary(kit: Kit, tmp_path: Path) -> None:
    a = kit.archive(tmp_path / "archive", [kit.records["full"]])
    rid = f"{kit.ident.kit_id}-00000777-20261201T000000Z"
    r = export(a.root, kit, tmp_path / "out", "an2k", rid)
    assert r.returncode == 1 and json.loads(r.stdout)["failed"][0]["code"] == "not_archived"
    r = export(a.root, kit, tmp_path / "out", "an2k", "--since", "bogus")
    assert r.returncode == 1 and "'bogus' is not a cursor of this archive" in r.stderr, r.stderr
    import subprocess
    import sys

    from tests.support import subprocess_env

    r = subprocess.run([sys.executable, "-m", "provisioning.cli", "export", "--archive", str(a.root), "--key",
                        str(kit.dc_key), "--format", "an2k", "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=60, env=subprocess_env({"REKAM_AGENCY": ""}))
    assert r.returncode == 2 and "--agency" in r.stderr  # no agency: refused before anything is written
    r = subprocess.run([sys.executable, "-m", "provisioning.cli", "export", "--archive", str(a.root), "--key",
                        str(kit.dc_key), "--format", "an2k", "--out", str(tmp_path / "out"), "--agency", AGENCY],
                       capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert r.returncode == 0 and "diekspor ke" in r.stdout, r.stdout + r.stderr  # Indonesian by default
    a.close()


def _small_record(kit: Kit, seq: int, template: dict[str, Any]) -> bytes:
    """A real-shaped v2 record with one small finger (the 1,000-record run stays fast)."""
    finger = dict(template["fingers"][0], width=32, height=24, image="finger-R1.png")
    m = dict(template, fingers=[finger], face={"exception": "camera unavailable"})
    hdr = kit.open(kit.records["full"])[0]
    created = hdr.created
    rid = f"{kit.ident.kit_id}-{seq:08d}-{created.replace('-', '').replace(':', '')}"
    payload = rf.Payload(m, [rf.Attachment("finger-R1.png", "image/png", _tiny_png(32, 24))]).encode()
    return rf.seal(payload, record_id=rid, kit_id=kit.ident.kit_id, seq=seq, created=created, clock_synced=False,
                   signing_key=kit.ident.signing_key, recipients=[rf.load_recipient_key(kit.dc_pub.read_bytes())])


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_export_of_1000_archived_records_with_a_progress_bar_and_a_resumable_cursor(kit: Kit, tmp_path: Path) -> None:
    template = kit.open(kit.records["full"])[1].manifest
    a = kit.archive(tmp_path / "archive", [_small_record(kit, 1000 + i, template) for i in range(1000)])
    key = rf.load_datacenter_private_key(kit.dc_key.read_bytes())
    out = tmp_path / "out"
    opts = Options("an2k", AGENCY, uncompressed=True)
    # Interrupted after 300 (limit): the next run continues from the saved cursor.
    s = Exporter(a, key, out, opts, stream=io.StringIO(), progress=False).run_queue(limit=300)
    assert len(s.written) == 300 and not s.failed
    bar = _Tty()
    s2 = Exporter(a, key, out, opts, stream=bar).run_queue()
    assert len(s2.written) == 700 and not s2.failed and not s2.unchanged
    assert not set(s.written) & set(s2.written)
    assert len(list(out.glob("*.an2"))) == 1000
    assert "[##############################] 700/700" in bar.getvalue()
    log = io.StringIO()
    s3 = Exporter(a, key, out, opts, stream=log, progress=False).run_queue(since="")  # from the start again
    assert len(s3.unchanged) == 1000 and not s3.written and "export progress format=an2k done=1000" in log.getvalue()
    assert os.path.exists(out / STATE_FILE)
    a.close()


def test_kit_text_and_broken_images(kit: Kit, tmp_path: Path) -> None:
    """Free text of the kit: Unicode kept in CBEFF, "?" in AN2K; control characters (AN2K separators) refused;
    a JPEG whose header is fine but whose data is not fails that record only (convert_failed)."""
    import nistitl

    from provisioning.interchange import cbeff

    two = kit.records["two_exceptions"]
    _h, p = kit.open(two)
    m = p.manifest
    fingers = [dict(f, exception="diperban — luka") if f.get("exception") == "bandaged" else f for f in m["fingers"]]
    unicode_reason = kit.reseal(two, 910, manifest=dict(m, fingers=fingers))
    control = kit.reseal(two, 911, manifest=dict(m, operator_id="demo\x1d2.004:3201011505900009"))
    atts = [rf.Attachment(a.name, a.content_type, a.data[:600] + bytes(len(a.data) - 600)) if a.name == "face.jpg"
            else a for a in p.attachments]
    broken_face = kit.reseal(two, 912, attachments=atts)
    a = kit.archive(tmp_path / "archive", [unicode_reason, control, broken_face])
    key = rf.load_datacenter_private_key(kit.dc_key.read_bytes())
    ids = [kit.open(r)[0].record_id for r in (unicode_reason, control, broken_face)]
    s = Exporter(a, key, tmp_path / "x", Options("cbeff"), stream=io.StringIO()).run_ids(ids)
    assert [(r, c) for r, c, _m in s.failed] == [(ids[1], "bad_manifest"), (ids[2], "convert_failed")], s.failed
    xml = (tmp_path / "x" / f"{ids[0]}.xml").read_bytes()
    cbeff.validate(xml)
    assert "diperban — luka" in xml.decode()
    s = Exporter(a, key, tmp_path / "n", Options("an2k", AGENCY), stream=io.StringIO()).run_ids([ids[0], ids[2]])
    assert not s.failed  # AN2K carries the kit's JPEG as it is: the ABIS judges it
    msg = nistitl.Message()
    msg.parse((tmp_path / "n" / f"{ids[0]}.an2").read_bytes())
    assert msg[1]._12 == [["6", "missing"], ["7", "diperban ? luka"]]
    a.close()
