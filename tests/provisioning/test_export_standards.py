"""Fields the standards require or define, checked on records built from `Enrollment` values (fast, no kit) and
read back by third-party code where one exists (nistitl for AN2K, NBIS's WSQ decoder in `wsq`), by our ISO
reader otherwise; and hostile kit text through the real export."""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware.errors import ExportError, IsoRecordError
from firmware.wire import record_format as rf
from provisioning.interchange import an2k, cbeff
from provisioning.interchange import iso19794 as iso
from provisioning.interchange.enrollment import Enrollment, Face, Finger, Iris, Signature
from provisioning.interchange.export import Exporter, Options
from tests.provisioning.export_support import AGENCY, Kit, shared_sim_kit

T = dt.datetime(2026, 11, 29, 4, 3, 12, tzinfo=dt.UTC)
RNG = np.random.default_rng(20)


def _jpeg(mode: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _finger(code: str, fgp: int, ppi: int | None, side: tuple[int, int] = (192, 192)) -> Finger:
    px = RNG.integers(0, 256, (side[1], side[0]), dtype=np.uint8).tobytes()
    return Finger(code, fgp, pixels=px, width=side[0], height=side[1], ppi=ppi, score=60.0, attempts=1)


def _enrollment(**kw: Any) -> Enrollment:
    values: dict[str, Any] = dict(
        record_id="rk-test-00000001-20261129T040312Z", kit_id="rk-test", schema="rekam.enrollment/3",
        nik="3201011505900009", operator_id="demo", site="Desa Sukamaju", software="rekam 1.0", started=T,
        captured=T, clock_synced=True, face=Face(jpeg=_jpeg("RGB", (41, 53)), width=41, height=53, score=80.0,
                                                 attempts=1),
        fingers=(_finger("R1", 1, 500),))
    values.update(kw)
    return Enrollment(**values)


def _parse(data: bytes):  # -> nistitl.Message
    import nistitl

    msg = nistitl.Message()
    msg.parse(data)
    return msg


def test_type1_names_rekams_type2_domain() -> None:
    """1.013 DOM: rekam's user-defined Type-2, not the default domain (NORAM) a receiver assumes without it."""
    data = an2k.build(_enrollment(), AGENCY)
    assert _parse(data)[0].DOM == [[an2k.DOMAIN_NAME, an2k.DOMAIN_VERSION]] == [["REKAM", "1"]]
    assert b"\x1d1.013:REKAM\x1f1\x1d1.014:" in data  # in tag order, between NTR and GMT


def test_type10_face_has_a_subject_acquisition_profile() -> None:
    """10.013 SAP is mandatory with IMT FACE: 13, ISO full frontal (as the FAC's face image type 1)."""
    for face in (Face(jpeg=_jpeg("RGB", (41, 53)), width=41, height=53),
                 Face(jpeg=_jpeg("L", (41, 53)), width=41, height=53, gray=True)):
        (t10,) = list(_parse(an2k.build(_enrollment(face=face), AGENCY)).iter(10))
        csp = "GRAY" if face.gray else "YCC"
        assert ["FACE", "13", csp] == [t10.IMT, t10.SAP, t10.CSP]


def test_empty_optional_fields_are_left_out_of_type2() -> None:
    """A record without `started`, operator, site or software: those Type-2 fields are absent, not empty."""
    e = _enrollment(started=None, operator_id="", site="", software="")
    data = an2k.build(e, AGENCY)
    for tag in (b"2.006:", b"2.007:", b"2.010:", b"2.014:"):
        assert tag not in data, tag
    t2 = _parse(data)[1]
    assert (t2._8, t2._9, t2._15) == ("20261129040312Z", "Y", "rekam.enrollment/3")
    # Every field of Type-1 and Type-2 has a value (no "n.nnn:" directly followed by a separator).
    head = data[:data.index(b"\x1c", data.index(b"\x1c") + 1) + 1]
    assert b":\x1d" not in head and b":\x1c" not in head
    full = an2k.build(_enrollment(), AGENCY)
    assert b"2.010:20261129040312Z\x1d" in full and b"2.006:demo\x1d" in full  # present when known


def test_signature_isr_does_not_point_at_the_finger_sensor_resolution() -> None:
    """8.005 ISR 1 would mean "the resolution in 1.011 NSR": the finger sensor's, or 00.00 when no finger was
    captured; ISR 0 is the standard's nominal 19.69 ppmm (the pad's own resolution is unknown)."""
    px = bytes([255] * 60 * 20)
    e = _enrollment(fingers=(Finger("R1", 1, exception="missing"),),
                    signature=Signature(png=b"png", pixels=px, width=60, height=20, attempts=1))
    msg = _parse(an2k.build(e, AGENCY))
    assert msg[0].NSR == "00.00"  # no finger image: no native scanning resolution
    (t8,) = list(msg.iter(8))
    sig, srt, isr, w, h, data = t8.unpack("!BBBHH")
    assert (sig, srt, isr, w, h, data) == (0, 0, 0, 60, 20, px)


@pytest.mark.parametrize("ppi, nistcom", [(508, 508), (500, 500), (None, -1)])
def test_wsq_declares_the_real_resolution_everywhere(ppi: int | None, nistcom: int) -> None:
    """The WSQ's own NISTCOM PPI (the encoder always writes 500) says what 14.009/14.010, 1.011 and the FIR say;
    an unknown resolution (schema 1) is NBIS's -1, never a guessed 500."""
    import _wsq  # NBIS's decoder in the `wsq` package: width, height, ppi from the NISTCOM block
    from PIL import Image

    f = _finger("R1", 1, ppi)
    msg = _parse(an2k.build(_enrollment(fingers=(f,)), AGENCY))
    (t14,) = list(msg.iter(14))
    buf, w, h, got = _wsq.decompress(t14.DATA)
    assert (w, h, got) == (192, 192, nistcom)
    scale = ["1", str(ppi), str(ppi)] if ppi else ["0", "1", "1"]
    assert scale == [t14.SLC, t14.THPS, t14.TVPS]
    assert msg[0].NSR == msg[0].NTR == (f"{ppi / 25.4:05.2f}" if ppi else "00.00")
    # Only the comment changed: the coded image decodes to the same pixels as the encoder's own output.
    plain = io.BytesIO()
    Image.frombytes("L", (192, 192), f.pixels).save(plain, "WSQ")
    assert _wsq.decompress(plain.getvalue())[0] == buf
    same = plain.getvalue() == t14.DATA
    assert same is (ppi == 500)  # 500 ppi prints keep their bytes
    if ppi:
        (rep,) = iso.read_fir(cbeff.finger_fir(f, _enrollment(fingers=(f,))))
        assert rep.ppi == ppi


def test_a_grey_face_is_stored_as_rgb_colour_space_1() -> None:
    """A one-channel JPEG: the FAC holds R = G = B of its pixels, colour space 1 (24-bit RGB), the only one
    MOSIP's validator accepts; a colour JPEG is unchanged (colour space 1)."""
    from PIL import Image

    jpeg = _jpeg("L", (41, 53))
    e = _enrollment(face=Face(jpeg=jpeg, width=41, height=53, gray=True))
    (rep,) = iso.read_fac(cbeff.face_fac(e))
    assert rep.colour_space == 1  # 24-bit RGB (iso.FAC_RGB24); 3 would be 8-bit greyscale
    mode, size, raw = cbeff.decode_pixels(rep.data)
    grey = np.array(Image.open(io.BytesIO(jpeg)))
    assert (mode, size) == ("RGB", (41, 53))
    rgb = np.frombuffer(raw, np.uint8).reshape(53, 41, 3)
    assert all(np.array_equal(rgb[:, :, k], grey) for k in range(3))
    (colour,) = iso.read_fac(cbeff.face_fac(_enrollment()))
    assert colour.colour_space == 1


def test_iris_image_type_follows_the_frame() -> None:
    """ISO/IEC 19794-6:2011 image type of an eye the kit did not localise (no K3 crop): the whole frame, 2 (VGA)
    only for a 640x480 frame, 1 (uncropped) for any other frame."""
    for (w, h), want in (((640, 480), iso.IIR_VGA), ((320, 240), iso.IIR_UNCROPPED),
                         ((480, 640), iso.IIR_UNCROPPED)):
        i = Iris("left", pixels=bytes(w * h), width=w, height=h, attempts=1)
        (rep,) = iso.read_iir(cbeff.iris_iir(i, _enrollment(irises=(i,))))
        assert (rep.width, rep.height, rep.image_type) == (w, h, want)


def test_the_fac_reader_keeps_landmark_points() -> None:
    marks = (iso.Landmark(1, 0x31, 12, 20), iso.Landmark(1, 0x32, 30, 21), iso.Landmark(2, 0x05, 21, 40, 7))
    facial = struct.pack(">H", len(marks)) + bytes(15)
    img = b"\xff\x4f" + bytes(30)
    rec = iso.write_fac([iso.FaceImage(width=41, height=53, data=img, capture=T, facial=facial, landmarks=marks)])
    assert struct.unpack(">BBHHH", rec[53:61]) == (1, 0x31, 12, 20, 0)  # right after the facial information (36:53)
    (back,) = iso.read_fac(rec)
    assert back.landmarks == marks and back.data == img and back.facial == facial
    assert iso.write_fac([back]) == rec
    # A count that promises more points than the record holds: named, never read past the record.
    lying = bytearray(rec)
    lying[36:38] = struct.pack(">H", 0xFFFF)
    with pytest.raises(IsoRecordError, match="landmark point"):
        iso.read_fac(bytes(lying))
    with pytest.raises(IsoRecordError, match="counts 0 landmark points, 3 given"):
        iso.write_fac([iso.FaceImage(width=1, height=1, data=b"", landmarks=marks)])
    # Bounded: a record of two representations with 40,000 points each (640 KB) is refused, not read into
    # 80,000 objects (a 64 MiB record could otherwise hold 8 million).
    many = tuple(iso.Landmark(2, 1, k % 41, k % 53) for k in range(40_000))
    face = iso.FaceImage(width=41, height=53, data=img, facial=struct.pack(">H", len(many)) + bytes(15),
                         landmarks=many)
    assert len(iso.read_fac(iso.write_fac([face]))[0].landmarks) == 40_000
    with pytest.raises(IsoRecordError, match="80000 landmark points in the record, more than 65535"):
        iso.read_fac(iso.write_fac([face, face]))


@pytest.mark.parametrize("mangle, what", [
    (lambda r: b"FIR\0" + r[4:], "format identifier"),
    (lambda r: r[:4] + b"010\0" + r[8:], "version"),
    (lambda r: r[:8] + struct.pack(">I", len(r) - 1) + r[12:], "record length"),
    (lambda r: r[:17] + struct.pack(">I", len(r)) + r[21:], "the representation leaves"),
])
def test_the_fac_reader_checks_identifier_version_and_lengths(mangle, what: str) -> None:
    """(Already so before the review: `_read_general` is shared with FIR and IIR; here for FAC too.)"""
    rec = iso.write_fac([iso.FaceImage(width=2, height=2, data=b"abcd")])
    with pytest.raises(IsoRecordError, match=what):
        iso.read_fac(mangle(rec))


HOSTILE = ["Budi\ufffe", "Budi\uffff", "Budi\ud800", "\udfffBudi", "Budi\ufdd0", "Budi\U0001fffe", "Budi\x85",
           "Budi\x1e"]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, dc_keys: dict[str, Any], corpus_dir: Path) -> Kit:
    return shared_sim_kit(tmp_path_factory, dc_keys, corpus_dir)


def test_hostile_kit_text_is_refused_by_name_in_both_formats(kit: Kit, tmp_path: Path) -> None:
    """Noncharacters, lone surrogates and controls in an operator id, a site or an exception reason: the record
    fails with bad_manifest naming the character (before, U+FFFE/U+FFFF/surrogates reached lxml or became "?");
    text XML and AN2K can carry (accents, RTL mark, emoji) still exports."""
    two = kit.records["two_exceptions"]
    _h, p = kit.open(two)
    m = p.manifest
    records = []
    for n, bad in enumerate(HOSTILE):
        where = n % 3
        if where == 0:
            mm = dict(m, operator_id=bad)
        elif where == 1:
            mm = dict(m, site=bad)
        else:
            mm = dict(m, fingers=[dict(f, exception=bad) if f.get("exception") else f for f in m["fingers"]])
        # A lone surrogate travels as its JSON escape (a kit's UTF-8 encoder cannot write the character itself):
        # a same-length placeholder, swapped for the escape in the encoded payload.
        text, raw = json.dumps(mm), {}
        for k, c in enumerate(c for c in bad if 0xD800 <= ord(c) <= 0xDFFF):
            esc, ph = f"\\u{ord(c):04x}", f"@@S{k:03d}"
            text = text.replace(esc, ph)
            raw[ph.encode()] = esc.encode()
        records.append(kit.reseal(two, 930 + n, manifest=json.loads(text), raw=raw or None))
    fine = kit.reseal(two, 950, manifest=dict(m, site="Cibeureum \u200f\u00e9 \U0001f600"))
    a = kit.archive(tmp_path / "archive", [*records, fine])
    key = rf.load_datacenter_private_key(kit.dc_key.read_bytes())
    ids = [kit.open(r)[0].record_id for r in records]
    fine_id = kit.open(fine)[0].record_id
    for fmt, opts in (("cbeff", Options("cbeff")), ("an2k", Options("an2k", AGENCY))):
        s = Exporter(a, key, tmp_path / fmt, opts, stream=io.StringIO()).run_ids([*ids, fine_id])
        assert [(r, c) for r, c, _m in s.failed] == [(i, "bad_manifest") for i in ids], (fmt, s.failed)
        for (_r, _c, msg), bad in zip(s.failed, HOSTILE, strict=True):
            c = next(c for c in bad if c not in "Budi")
            assert f"U+{ord(c):04X}" in msg, msg
        assert (tmp_path / fmt / f"{fine_id}.{'xml' if fmt == 'cbeff' else 'an2'}").exists()
    cbeff.validate((tmp_path / "cbeff" / f"{fine_id}.xml").read_bytes())
    a.close()


def test_text_rules_on_their_own() -> None:
    from provisioning.interchange.enrollment import _text

    for bad in HOSTILE:
        with pytest.raises(ExportError) as ei:
            _text(bad, "operator_id", "r")
        assert ei.value.code == "bad_manifest"
    for ok in ("Ni Luh Putu Ayu", "Siti \u00e9\u200f\U0001f600", "\ufffd", "\U0010fffd"):
        assert _text(ok, "operator_id", "r") == ok


def test_a_localised_iris_is_cropped_k3_and_one_near_the_edge_is_sent_whole() -> None:
    """K3 (cropped, MOSIP's registration type): the iris centred with margins of 0.6 radius left/right and 0.2
    above/below, cut from the kit's pixels; when those margins leave the frame nothing is padded: the whole frame
    goes as type 2 and the BIR says why."""
    from lxml import etree

    w, h = 640, 480
    frame = np.random.default_rng(3).integers(0, 256, (h, w), np.uint8)
    ok = Iris("left", pixels=frame.tobytes(), width=w, height=h, attempts=1, centre=(300, 250), diameter=200)
    (rep,) = iso.read_iir(cbeff.iris_iir(ok, _enrollment(irises=(ok,))))
    assert (rep.image_type, rep.width, rep.height) == (iso.IIR_CROPPED, 320, 240)
    assert rep.centre == (160, 160, 120, 120) and rep.diameter == (200, 200)
    mode, size, raw = cbeff.decode_pixels(rep.data)
    assert (mode, size) == ("L", (320, 240))
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(240, 320), frame[130:370, 140:460])
    odd = Iris("left", pixels=frame.tobytes(), width=w, height=h, attempts=1, centre=(321, 239), diameter=211)
    (rep,) = iso.read_iir(cbeff.iris_iir(odd, _enrollment(irises=(odd,))))
    assert rep.image_type == iso.IIR_CROPPED
    assert min(rep.centre[0], rep.width - rep.centre[0]) >= 1.6 * 105.5
    assert min(rep.centre[2], rep.height - rep.centre[2]) >= 1.2 * 105.5
    for near in ((150, 240), (320, 100), (600, 240), (320, 400)):  # a margin would leave the frame
        edge = Iris("left", pixels=frame.tobytes(), width=w, height=h, attempts=1, centre=near, diameter=200)
        assert cbeff.iris_crop(edge) is None
        (rep,) = iso.read_iir(cbeff.iris_iir(edge, _enrollment(irises=(edge,))))
        assert (rep.image_type, rep.width, rep.height) == (iso.IIR_VGA, w, h)
        assert rep.centre == (near[0], near[0], near[1], near[1])
        doc = etree.fromstring(cbeff.build(_enrollment(irises=(edge,))))
        (bir,) = [b for b in doc.findall(f"{{{cbeff.NS}}}BIR")
                  if b.findtext(f"{{{cbeff.NS}}}BDBInfo/{{{cbeff.NS}}}Type") == "Iris"]
        keys = {o.findtext(f"{{{cbeff.NS}}}Key") for o in bir.findall(f"{{{cbeff.NS}}}Others")}
        assert "IRIS_IMAGE" in keys
