"""Our ISO/IEC 19794-4:2011 (FIR 020) and 19794-5:2011 (FAC 030) writer and reader, on the standards' byte layout."""

from __future__ import annotations

import datetime as dt
import struct

import numpy as np
import pytest

from firmware.errors import IsoRecordError
from provisioning.interchange import cbeff
from provisioning.interchange import iso19794 as iso

T = dt.datetime(2026, 11, 29, 4, 3, 12, 345000, tzinfo=dt.UTC)


def test_fir_header_fields_sit_at_the_offsets_of_the_standard() -> None:
    img = bytes(range(256)) * 3
    rec = iso.write_fir([iso.FingerImage(position=7, width=256, height=288, data=img, ppi=508, capture=T,
                                         quality=(iso.Quality(53, 0x0101, 0x18),), impression=0)])
    # General header: 16 bytes.
    assert rec[0:4] == b"FIR\0" and rec[4:8] == b"020\0"
    assert struct.unpack(">I", rec[8:12])[0] == len(rec) == 16 + 46 + len(img)
    assert struct.unpack(">H", rec[12:14])[0] == 1 and rec[14] == 0 and rec[15] == 1
    # Representation at 16: length, capture time (9), device (5), quality blocks, then the image header.
    assert struct.unpack(">I", rec[16:20])[0] == 46 + len(img)
    assert struct.unpack(">HBBBBBH", rec[20:29]) == (2026, 11, 29, 4, 3, 12, 345)
    assert rec[29] == 0 and rec[30:34] == b"\0\0\0\0"  # technology, vendor, type: unknown
    assert rec[34] == 1 and struct.unpack(">BHH", rec[35:40]) == (53, 0x0101, 0x18)
    assert (rec[40], rec[41], rec[42]) == (7, 0, 1)  # left index, representation 0, pixels per inch
    assert struct.unpack(">HHHH", rec[43:51]) == (508, 508, 508, 508)
    assert (rec[51], rec[52], rec[53]) == (8, iso.FIR_JP2_LOSSLESS, 0)  # 8 bit, JPEG 2000 lossless, live plain
    assert struct.unpack(">HHI", rec[54:62]) == (256, 288, len(img))
    assert rec[62:] == img
    (back,) = iso.read_fir(rec)
    assert back == iso.FingerImage(position=7, width=256, height=288, data=img, ppi=508, capture=T,
                                   quality=(iso.Quality(53, 0x0101, 0x18),))


def test_fac_header_fields_sit_at_the_offsets_of_the_standard() -> None:
    img = b"\xff\x4f\xff\x51" + bytes(100)
    rec = iso.write_fac([iso.FaceImage(width=413, height=531, data=img, capture=T, quality=(iso.Quality(91),))])
    assert rec[0:4] == b"FAC\0" and rec[4:8] == b"030\0"
    assert struct.unpack(">I", rec[8:12])[0] == len(rec) == 17 + 56 + len(img)
    assert struct.unpack(">HBH", rec[12:17]) == (1, 0, 0)  # one representation, no certification, no sequence
    assert struct.unpack(">I", rec[17:21])[0] == 56 + len(img)
    assert struct.unpack(">HBBBBBH", rec[21:30]) == (2026, 11, 29, 4, 3, 12, 345)
    assert rec[30] == 2  # static photograph from a digital still-image camera
    assert rec[35] == 1 and struct.unpack(">BHH", rec[36:41]) == (91, 0, 0)
    assert rec[41:58] == bytes(17)  # facial information: no landmarks, all unspecified
    assert struct.unpack(">BBHHBHBB", rec[58:69]) == (1, iso.FAC_JP2_LOSSLESS, 413, 531, 0, 0, 0, 1)
    # 19794-5:2011: the image data length (u32) before the image, as MOSIP's reader (bio-utils) takes it
    assert struct.unpack(">I", rec[69:73])[0] == len(img) and rec[73:] == img
    (back,) = iso.read_fac(rec)
    assert (back.width, back.height, back.data, back.capture, back.quality) == (413, 531, img, T, (iso.Quality(91),))


def test_unknown_capture_time_is_all_ff_and_reads_back_as_none() -> None:
    rec = iso.write_fir([iso.FingerImage(position=1, width=1, height=1, data=b"x")])
    assert rec[20:29] == b"\xff" * 9 and iso.read_fir(rec)[0].capture is None


@pytest.mark.parametrize("mangle, what", [
    (lambda r: r[:-1], "record length"),
    (lambda r: r[:-8], "record length"),
    (lambda r: r[:8] + struct.pack(">I", len(r) - 8) + r[12:-8], "needs 16 bytes"),  # image data cut short
    (lambda r: r[:8] + struct.pack(">I", len(r) + 1) + r[12:], "record length"),
    (lambda r: r[:4] + b"030\0" + r[8:], "version"),
    (lambda r: b"FAC\0" + r[4:], "format identifier"),
    (lambda r: r[:16] + struct.pack(">I", 1000) + r[20:], "length field"),
    (lambda r: r[:34] + b"\x05" + r[35:], "quality score 244"),  # 5 blocks claimed: image header read as one
    (lambda r: r[:35] + b"\x80" + r[36:], "quality score 128"),
    (lambda r: r[:15] + b"\x02" + r[16:], "finger positions"),
])
def test_the_fir_reader_names_what_is_wrong(mangle, what: str) -> None:
    rec = iso.write_fir([iso.FingerImage(position=2, width=4, height=4, data=bytes(16), quality=(iso.Quality(40),))])
    with pytest.raises(IsoRecordError, match=what):
        iso.read_fir(mangle(rec))


def test_the_fac_reader_refuses_a_truncated_record() -> None:
    rec = iso.write_fac([iso.FaceImage(width=2, height=2, data=b"abc")])
    with pytest.raises(IsoRecordError, match="record length"):
        iso.read_fac(rec[:-2])
    with pytest.raises(IsoRecordError, match="shorter than its fixed fields"):
        iso.read_fac(rec[:17] + struct.pack(">I", 10) + rec[21:])


def test_the_writer_refuses_what_the_layout_cannot_hold() -> None:
    with pytest.raises(IsoRecordError, match="position 99"):
        iso.write_fir([iso.FingerImage(position=99, width=1, height=1, data=b"")])
    with pytest.raises(IsoRecordError, match="70000x1"):
        iso.write_fir([iso.FingerImage(position=1, width=70000, height=1, data=b"")])
    with pytest.raises(IsoRecordError, match="quality score 101"):
        iso.write_fac([iso.FaceImage(width=1, height=1, data=b"", quality=(iso.Quality(101),))])


def test_jpeg2000_inside_round_trips_bit_exact() -> None:
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (288, 256), dtype=np.uint8)
    rgb = rng.integers(0, 256, (53, 41, 3), dtype=np.uint8)
    fir = iso.write_fir([iso.FingerImage(position=3, width=256, height=288,
                                         data=cbeff.jp2_lossless("L", (256, 288), gray.tobytes()))])
    mode, size, raw = cbeff.decode_pixels(iso.read_fir(fir)[0].data)
    assert (mode, size) == ("L", (256, 288)) and raw == gray.tobytes()
    fac = iso.write_fac([iso.FaceImage(width=41, height=53, data=cbeff.jp2_lossless("RGB", (41, 53), rgb.tobytes()))])
    mode, size, raw = cbeff.decode_pixels(iso.read_fac(fac)[0].data)
    assert (mode, size) == ("RGB", (41, 53)) and raw == rgb.tobytes()
    assert iso.read_fac(fac)[0].data[4:8] == b"jP  "  # a JP2 container (MOSIP reads JP2, not a raw codestream)


def test_fac_image_length_must_agree_with_the_representation_length() -> None:
    img = b"\xff\xd8" + bytes(20)
    rec = bytearray(iso.write_fac([iso.FaceImage(width=2, height=2, data=img, capture=T)]))
    at = len(rec) - len(img) - 4
    assert struct.unpack(">I", rec[at:at + 4])[0] == len(img)
    rec[at:at + 4] = struct.pack(">I", 12)  # a length that lies (the 2005 layout read as 2011 looks like this)
    with pytest.raises(IsoRecordError, match="image data length 12"):
        iso.read_fac(bytes(rec))
