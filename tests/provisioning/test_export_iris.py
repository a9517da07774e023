"""Irises and the signature in the export (issue #20): records sealed by a real `rekamd --sim` with synthetic NIR
eyes, archived, exported by `rekam-fleet export`, read back by nistitl (Type-17, Type-8), lxml + MOSIP's XSD
(Iris BIRs) and our ISO/IEC 19794-6 reader, pixels compared bit for bit with what the kit sealed."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware.seal import identity
from provisioning.interchange import cbeff
from provisioning.interchange import iso19794 as iso
from tests.console.conftest import NIK_FEMALE, NIK_MALE, write_config
from tests.iris.conftest import IRIS_TOML, drive
from tests.provisioning.export_support import Kit, export, pixels
from tests.support import Rekamd

NS = {"c": cbeff.NS}


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, dc_keys: dict[str, Any], corpus_dir: Path) -> Kit:
    """Two enrollments with irises and signature: everything captured; the left eye and the signature excepted."""
    import httpx

    root = tmp_path_factory.mktemp("iriskit")
    cfg = write_config(root, dc_keys["pub_path"], corpus_dir, fingers=["R1", "L1"], dedup=[], extra=IRIS_TOML)
    with Rekamd(cfg, root / "rekamd.log") as d:
        d.start()
        c = httpx.Client(base_url=d.url, timeout=60)
        r = c.post("/api/v1/auth/signin", json={"operator_id": "demo", "pin": "123456"})
        c.headers["Authorization"] = f"Bearer {r.json()['token']}"
        assert c.post("/api/v1/enrollment", json={"nik": NIK_MALE}).status_code == 200
        drive(c, NIK_MALE)
        full = c.post("/api/v1/enrollment/commit").json()["record_id"]
        assert c.post("/api/v1/enrollment", json={"nik": NIK_FEMALE}).status_code == 200
        c.post("/api/v1/enrollment/face")
        assert c.post("/api/v1/enrollment/iris/left/exception", json={"reason": "buta sejak lahir"}).status_code == 200
        drive(c, NIK_FEMALE, sign=False)
        assert c.post("/api/v1/enrollment/signature/exception", json={"reason": "cap jempol"}).status_code == 200
        drive(c, NIK_FEMALE)
        exc = c.post("/api/v1/enrollment/commit").json()["record_id"]
    sd = root / "sd"
    recs = {"full": (sd / "records" / f"{full}.rkm").read_bytes(), "exceptions": (sd / "records" / f"{exc}.rkm")
            .read_bytes()}
    return Kit(root, identity.load_or_create(sd), dc_keys["sk"], dc_keys["pub_path"], dc_keys["key_path"], recs)


def v2_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """The same enrollment as `rekam.enrollment/2` wrote it (no irises, no signature)."""
    return {k: v for k, v in m.items() if k not in ("irises", "signature")} | {"schema": "rekam.enrollment/2"}


@pytest.fixture(scope="module")
def archived(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    hdr, p = kit.open(kit.records["full"])
    names = {a.name for a in p.attachments}
    old = kit.reseal(kit.records["full"], 901, manifest=v2_manifest(p.manifest),
                     attachments=[a for a in p.attachments if not a.name.startswith(("iris-", "signature"))])
    assert {"iris-left.png", "iris-right.png", "signature.png"} <= names
    path = tmp_path_factory.mktemp("archive")
    a = kit.archive(path, [kit.records["full"], kit.records["exceptions"], old])
    ids = {"full": hdr.record_id, "exceptions": kit.open(kit.records["exceptions"])[0].record_id,
           "v2": kit.open(old)[0].record_id}
    a.close()
    yield path, ids


def _atts(kit: Kit, name: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    _h, p = kit.open(kit.records[name])
    return p.manifest, {a.name: a.data for a in p.attachments}


def test_an2k_carries_type17_irises_and_type8_signature(kit: Kit, archived: tuple[Path, dict[str, str]],
                                                        tmp_path: Path) -> None:
    import nistitl

    path, ids = archived
    r = export(path, kit, tmp_path, "an2k")
    assert r.returncode == 0, r.stderr + r.stdout
    m, atts = _atts(kit, "full")
    msg = nistitl.Message()
    msg.parse((tmp_path / f"{ids['full']}.an2").read_bytes())
    t17 = list(msg.iter(17))
    assert [x._3 for x in t17] == ["2", "1"]  # left (2) then right (1), in the capture order
    for rec, doc in zip(t17, m["irises"], strict=True):
        assert rec._11 == "PNG" and (rec._6, rec._7) == ("640", "480")
        assert np.array_equal(pixels(rec._999), pixels(atts[doc["image"]]))  # the kit's pixels, unchanged
    (t8,) = list(msg.iter(8))
    sig, srt, isr, w, h, data = t8.unpack("!BBBHH")
    # ISR 0 (19.69 ppmm nominal): 1 would tie the pad's pixels to 1.011 NSR, the finger sensor's resolution
    assert (sig, srt, isr) == (0, 0, 0) and (w, h) == (m["signature"]["width"], m["signature"]["height"])
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(h, w), pixels(atts["signature.png"]))
    assert [list(x) for x in msg[1]._16] == [["L", str(round(m["irises"][0]["attempts"][m["irises"][0]["kept"]]
                                                               ["score"])), str(len(m["irises"][0]["attempts"])),
                                              "Y" if m["irises"][0]["forced"] else "N", ""],
                                             list(msg[1]._16[1])]
    # The record with exceptions: the left eye as DME "UC" without an image, no Type-8, the reasons in Type-2.
    ex = nistitl.Message()
    ex.parse((tmp_path / f"{ids['exceptions']}.an2").read_bytes())
    left, right = list(ex.iter(17))
    assert left._28 == "UC" and left._3 == "2" and right._3 == "1" and right._11 == "PNG"
    assert not list(ex.iter(8))
    assert ex[1]._17[0][0] == "N" and ex[1]._17[0][2] == "cap jempol"
    # A v2 record (before irises) still exports, without Type-17 or Type-8.
    old = nistitl.Message()
    old.parse((tmp_path / f"{ids['v2']}.an2").read_bytes())
    assert not list(old.iter(17)) and not list(old.iter(8)) and len(list(old.iter(14))) == 2


def test_cbeff_iris_birs_validate_and_round_trip_bit_exact(kit: Kit, archived: tuple[Path, dict[str, str]],
                                                           tmp_path: Path) -> None:
    from lxml import etree

    from provisioning.interchange.cbeff import decode_pixels

    path, ids = archived
    r = export(path, kit, tmp_path, "cbeff")
    assert r.returncode == 0, r.stderr + r.stdout
    m, atts = _atts(kit, "full")
    xml = (tmp_path / f"{ids['full']}.xml").read_bytes()
    cbeff.validate(xml)  # MOSIP's XSD
    doc = etree.fromstring(xml)
    birs = [b for b in doc.findall("c:BIR", NS) if b.findtext("c:BDBInfo/c:Type", namespaces=NS) == "Iris"]
    assert [b.findtext("c:BDBInfo/c:Subtype", namespaces=NS) for b in birs] == ["Left", "Right"]
    for b, idoc in zip(birs, m["irises"], strict=True):
        assert b.findtext("c:BDBInfo/c:Format/c:Type", namespaces=NS) == "9"
        bdb = base64.b64decode(b.findtext("c:BDB", namespaces=NS))
        (rep,) = iso.read_iir(bdb)
        assert iso.write_iir([rep]) == bdb  # our reader and writer agree byte for byte
        assert rep.eye == (iso.EYE_LEFT if idoc["eye"] == "left" else iso.EYE_RIGHT)
        # ISO/IEC 19794-6 K3 (cropped), the only type MOSIP takes for registration: the kit's own pixels around
        # the localised iris, centred, margins >= 0.6 radius left/right and >= 0.2 radius above/below.
        assert (rep.image_format, rep.image_type) == (iso.IIR_JP2, iso.IIR_CROPPED)
        mode, size, px = decode_pixels(rep.data)
        assert mode == "L" and size == (rep.width, rep.height)
        pos = idoc["position"]
        d = pos["iris_diameter"]
        assert rep.diameter == (d, d) and d > 0
        cx, cy = round(320 + pos["dx"] * 640), round(240 + pos["dy"] * 480)
        x0, y0 = cx - rep.centre[0], cy - rep.centre[2]
        assert rep.centre[0] == rep.centre[1] and rep.centre[2] == rep.centre[3]
        frame = pixels(atts[idoc["image"]])
        assert np.array_equal(np.frombuffer(px, np.uint8).reshape(rep.height, rep.width),
                              frame[y0:y0 + rep.height, x0:x0 + rep.width])
        r = d / 2
        assert min(rep.centre[0], rep.width - rep.centre[0]) >= 1.6 * r
        assert min(rep.centre[2], rep.height - rep.centre[2]) >= 1.2 * r
        assert abs(rep.width - 3.2 * r) <= 2 and abs(rep.height - 2.4 * r) <= 2  # no more than the margins
        others = {o.findtext("c:Key", namespaces=NS) for o in b.findall("c:Others", NS)}
        assert "IRIS_IMAGE" not in others
    ex = etree.fromstring((tmp_path / f"{ids['exceptions']}.xml").read_bytes())
    left = [b for b in ex.findall("c:BIR", NS) if b.findtext("c:BDBInfo/c:Subtype", namespaces=NS) == "Left"][0]
    assert left.find("c:BDB", NS) is None
    others = {o.findtext("c:Key", namespaces=NS): o.findtext("c:Value", namespaces=NS)
              for o in left.findall("c:Others", NS)}
    assert others["EXCEPTION"] == "true" and others["EXCEPTION_REASON"] == "buta sejak lahir"
    old = etree.fromstring((tmp_path / f"{ids['v2']}.xml").read_bytes())
    assert not [b for b in old.findall("c:BIR", NS) if b.findtext("c:BDBInfo/c:Type", namespaces=NS) == "Iris"]


def test_iir_reader_refuses_damaged_records() -> None:
    img = iso.IrisImage(eye=iso.EYE_RIGHT, width=640, height=480, data=b"\0" * 64)
    rec = iso.write_iir([img])
    assert rec[:8] == b"IIR\x00020\x00" and iso.read_iir(rec)[0] == img
    for bad in (rec[:-1], rec + b"\0", rec[:8] + b"\0\0\0\1" + rec[12:], b"FIR\0" + rec[4:],
                rec[:4] + b"010\0" + rec[8:]):
        with pytest.raises(iso.IsoRecordError):
            iso.read_iir(bad)
    with pytest.raises(iso.IsoRecordError):
        iso.write_iir([iso.IrisImage(eye=7, width=1, height=1, data=b"")])
