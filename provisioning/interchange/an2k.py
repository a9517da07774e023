"""ANSI/NIST-ITL 1-2011 Update:2015 transactions (`.an2`) with `nistitl` (records) and `wsq` (Type-14 images).

One transaction per enrollment: Type-1 (header), Type-2 (rekam's user-defined fields, numbers below),
one Type-14 per captured finger, one Type-10 for the face, one Type-17 per eye (schema 3; an eye not captured is
a Type-17 with 17.028 DME "UC" and no image) and one Type-8 for the signature (scanned, uncompressed 8-bit grey).
Every value comes from the record: the output is a function of the record alone (no "now"), so a second export
writes the same bytes.

Type-2 fields (user-defined; docs/interchange.md has the full table):

    2.003 record id     2.004 NIK          2.005 kit id          2.006 operator id     2.007 site
    2.008 capture time (YYYYMMDDHHMMSSZ)   2.009 clock synchronised (Y/N)              2.010 started
    (2.006, 2.007, 2.010 and 2.014 are absent when the record has no value: AN2K has no empty field)
    2.011 finger quality, one subfield per captured finger: FGP, score 0-100, attempts, forced (Y/N)
    2.012 finger exceptions, one subfield per exception: FGP, reason
    2.013 face: score 0-100 or empty, attempts, forced (Y/N), exception reason or empty
    2.014 software of the kit   2.015 manifest schema
    2.016 irises, one subfield per eye: eye (L/R), score 0-100 or empty, attempts, forced (Y/N), exception or empty
    2.017 signature: captured (Y/N), attempts, exception reason or empty
    2.018 clock correction applied (issue #18; only when one was): offset added in seconds (3 decimals), its source
          (gnss/ntp), the capture time as sealed (YYYYMMDDHHMMSSZ). 2.008/2.010 and every date below are then the
          corrected times; 2.009 stays as sealed (N). Absent when none applied, so records without one keep the
          bytes they always had.
"""

from __future__ import annotations

import datetime as dt
import io
import struct

from firmware.errors import ExportError
from provisioning.clock_corrections import format_offset
from provisioning.interchange.enrollment import Enrollment, Finger, Iris

VERSION = "0502"
#: 1.013 DOM: the Type-2 fields are rekam's own (table above), not the default domain (NORAM, the FBI's EBTS);
#: the version names this layout of 2.003-2.018 (raise it when a field changes meaning, not when one is added).
DOMAIN_NAME, DOMAIN_VERSION = "REKAM", "1"
#: 10.013 SAP, Table 19 of ANSI/NIST-ITL 1-2011: 13 "ISO Full Frontal facial image (ISO/IEC 19794-5)", the
#: profile the kit's portrait is cut to (ICAO geometry, frontal pose) and what the FAC's face image type 1 says.
SAP_ISO_FULL_FRONTAL = "13"
#: 8.005 ISR: 0 = the minimum scanning resolution (19.69 ppmm). 1 would mean 1.011 NSR, which is the finger
#: sensor's resolution (or 00.00 when no finger was captured), not the pad's; the pad's real resolution is unknown
#: (the console's canvas pixels) and Type-8 has no code for "unknown".
SIGNATURE_ISR = 0
#: Quality algorithm of 14.024 (FQM): rekam's NFIQ 2 estimate has no IBIA-registered vendor/product id.
QUALITY_VENDOR, QUALITY_PRODUCT = "0000", "1"


def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d%H%M%SZ")


def _ascii(s: str) -> str:
    """AN2K text fields here are ASCII (no 1.015 character-set directory): other characters become "?"
    (the CBEFF keeps the kit's text exactly)."""
    return s.encode("ascii", "replace").decode("ascii")


def _yn(b: bool) -> str:
    return "Y" if b else "N"


def _score(s: float | None) -> str:
    return "" if s is None else str(round(s))


def _wsq_ppi(data: bytes, ppi: int | None) -> bytes:
    """`data` (the `wsq` encoder's output) with its NISTCOM comment's PPI set to `ppi` (-1: unknown, NBIS's
    convention). The encoder always writes "PPI 500"; the comment segment (FFA8) is not part of the coded
    image, so only its text and length change."""
    want = b"PPI %d" % (ppi if ppi is not None else -1)
    pos = 2  # after SOI (FFA0)
    while pos + 4 <= len(data) and data[pos] == 0xFF and 0xA3 <= data[pos + 1] <= 0xA8:
        (n,) = struct.unpack(">H", data[pos + 2:pos + 4])
        body = data[pos + 4:pos + 2 + n]
        if data[pos + 1] == 0xA8 and body.startswith(b"NIST_COM"):
            lines = body.split(b"\n")
            if b"PPI 500" not in lines:
                break
            body = b"\n".join(want if line == b"PPI 500" else line for line in lines)
            return data[:pos + 2] + struct.pack(">H", len(body) + 2) + body + data[pos + 2 + n:]
        pos += 2 + n
    raise ExportError("an2k_failed", "the WSQ encoder wrote no NISTCOM PPI 500 to correct")


def wsq_encode(f: Finger) -> bytes:
    """The finger's pixels as WSQ (NBIS, 0.75 bpp; 8-bit gray), its NISTCOM PPI the finger's real resolution."""
    import wsq  # noqa: F401  (registers the WSQ plugin with Pillow)
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("L", (f.width, f.height), f.pixels).save(buf, "WSQ")
    data = buf.getvalue()
    return data if f.ppi == 500 else _wsq_ppi(data, f.ppi)


def _type2(e: Enrollment):  # -> nistitl.AsciiRecord
    import nistitl

    r = nistitl.AsciiRecord(2)
    r.IDC = 0
    face = e.face
    values: dict[int, object] = {
        3: e.record_id, 4: e.nik, 5: e.kit_id, 6: _ascii(e.operator_id), 7: _ascii(e.site), 8: _ts(e.captured),
        9: _yn(e.clock_synced), 10: _ts(e.started) if e.started else "",
        13: [[_score(face.score), str(face.attempts), _yn(face.forced), _ascii(face.exception)]],
        14: _ascii(e.software), 15: e.schema,
    }
    if e.irises:
        values[16] = [[i.eye[0].upper(), _score(i.score), str(i.attempts), _yn(i.forced), _ascii(i.exception)]
                      for i in e.irises]
    if e.clock_offset_s is not None and e.captured_as_sealed is not None:
        values[18] = [[format_offset(e.clock_offset_s), _ascii(e.clock_source), _ts(e.captured_as_sealed)]]
    if e.signature is not None:
        values[17] = [[_yn(bool(e.signature.png)), str(e.signature.attempts), _ascii(e.signature.exception)]]
    quality = [[str(f.fgp), _score(f.score), str(f.attempts), _yn(f.forced)] for f in e.captured_fingers]
    exceptions = [[str(f.fgp), _ascii(f.exception)] for f in e.fingers if f.exception]
    if quality:
        values[11] = quality
    if exceptions:
        values[12] = exceptions
    for tag, v in sorted(values.items()):
        if v == "":  # a field without a value is not allowed in AN2K: an unknown value is an absent field
            continue
        r += nistitl.Field(2, tag, v)
    return r


def _type14(f: Finger, idc: int, e: Enrollment, agency: str, uncompressed: bool):
    import nistitl

    r = nistitl.AsciiRecord(14)
    r.IDC = idc
    r.IMP = "0"  # live-scan plain
    r.SRC = agency
    r.FCD = e.captured.strftime("%Y%m%d")
    r.HLL, r.VLL = str(f.width), str(f.height)
    if f.ppi is None:  # a v1 record: resolution unknown; SLC 0 = only the aspect ratio is given
        r.SLC, r.THPS, r.TVPS = "0", "1", "1"
    else:
        r.SLC, r.THPS, r.TVPS = "1", str(f.ppi), str(f.ppi)
    r.CGA = "NONE" if uncompressed else "WSQ20"
    r.BPX = "8"
    r.FGP = str(f.fgp)
    if f.score is not None:
        r += nistitl.Field(14, 24, [[str(f.fgp), _score(f.score), QUALITY_VENDOR, QUALITY_PRODUCT]], alias="FQM")
    r.DATA = f.pixels if uncompressed else wsq_encode(f)
    return r


def _type10(e: Enrollment, idc: int, agency: str):
    import nistitl

    r = nistitl.AsciiRecord(10)
    r.IDC = idc
    r.IMT = "FACE"
    r.SRC = agency
    r.PHD = e.captured.strftime("%Y%m%d")
    r.HLL, r.VLL = str(e.face.width), str(e.face.height)
    r.SLC, r.THPS, r.TVPS = "0", "1", "1"  # no scale: square pixels
    r.CGA = "JPEGB"
    r.CSP = "GRAY" if e.face.gray else "YCC"  # a colour JPEG (JFIF) is YCbCr
    r.SAP = SAP_ISO_FULL_FRONTAL  # mandatory for IMT FACE
    r.POS = "F"
    r.DATA = e.face.jpeg  # the kit's own JPEG, unchanged
    return r


#: 17.003 eye label (ELR): 1 right, 2 left (0 undefined); 17.028 DME: "UC" unable to capture.
ELR = {"right": "1", "left": "2"}


def _type17(i: Iris, idc: int, e: Enrollment, agency: str):
    """One eye: the kit's lossless PNG unchanged (CGA PNG), or DME UC for an eye not captured."""
    import nistitl

    r = nistitl.AsciiRecord(17)
    r.IDC = idc
    r += nistitl.Field(17, 3, ELR[i.eye], alias="ELR")
    r += nistitl.Field(17, 4, agency, alias="SRC")
    r += nistitl.Field(17, 5, e.captured.strftime("%Y%m%d"), alias="ICD")
    if i.exception:
        r += nistitl.Field(17, 28, "UC", alias="DME")
        return r
    for tag, v in ((6, str(i.width)), (7, str(i.height)), (8, "0"), (9, "1"), (10, "1"), (11, "PNG"), (12, "8"),
                   (13, "GRAY")):
        r += nistitl.Field(17, tag, v)
    if i.score is not None:  # 17.024 IQS: score, algorithm vendor, product (unregistered, as 14.024)
        r += nistitl.Field(17, 24, [[_score(i.score), QUALITY_VENDOR, QUALITY_PRODUCT]], alias="IQS")
    if i.diameter:
        r += nistitl.Field(17, 26, str(i.diameter), alias="IRD")
    r += nistitl.BinaryField(17, 999, i.png, alias="DATA")
    return r


def _type8(e: Enrollment, idc: int):
    """The signature: SIG 0 (the subject's), SRT 0 (scanned, uncompressed), ISR 0 (see `SIGNATURE_ISR`)."""
    import nistitl

    s = e.signature
    r = nistitl.BinaryRecord(8)
    r.IDC = idc
    r.pack("!BBBHH", 0, 0, SIGNATURE_ISR, s.width, s.height, s.pixels)
    return r


def build(e: Enrollment, agency: str, tot: str = "ENR", uncompressed: bool = False) -> bytes:
    """The AN2K transaction of enrollment `e`, from originating agency `agency` (Type-1 DAI and ORI)."""
    import nistitl

    if not agency or not agency.isascii() or len(agency) > 40:
        raise ExportError("bad_agency", f"agency {agency[:40]!r} must be 1-40 ASCII characters")
    msg = nistitl.Message()
    t1 = msg[0]
    t1.VER = VERSION
    t1.TOT = tot
    t1.DAT = e.captured.strftime("%Y%m%d")
    t1.DAI = agency
    t1.ORI = agency
    t1.TCN = e.record_id  # unique per enrollment, the same on every export
    ppi = next((f.ppi for f in e.captured_fingers if f.ppi), None)
    ppmm = f"{ppi / 25.4:05.2f}" if ppi else "00.00"  # 1.011/1.012: native and nominal resolution, ppmm
    t1.NSR = ppmm
    t1.NTR = ppmm
    t1 += nistitl.Field(1, 13, [[DOMAIN_NAME, DOMAIN_VERSION]], alias="DOM")
    t1.GMT = _ts(e.captured)
    msg += _type2(e)
    idc = 1
    for f in e.captured_fingers:
        msg += _type14(f, idc, e, agency, uncompressed)
        idc += 1
    if not e.face.exception:
        msg += _type10(e, idc, agency)
        idc += 1
    for i in e.irises:
        msg += _type17(i, idc, e, agency)
        idc += 1
    if e.signature is not None and e.signature.png:
        msg += _type8(e, idc)
    try:
        return msg.NIST
    except (nistitl.NistException, UnicodeEncodeError) as ex:
        raise ExportError("an2k_failed", f"record {e.record_id}: cannot build the AN2K transaction: {ex}") from None
