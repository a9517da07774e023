"""MOSIP's CBEFF XML (ISO/IEC 19785-3 patron format, `cbeff-mosip.xsd`): one BIR per biometric.

Each finger: a BIR whose BDB is an ISO/IEC 19794-4:2011 FIR (v020) with a lossless JPEG 2000 image; the
face: a BIR whose BDB is an ISO/IEC 19794-5:2011 FAC (v030) with a lossless JPEG 2000 image; each iris (schema 3):
a BIR of type Iris (format 9, subtype Left/Right) whose BDB is an ISO/IEC 19794-6:2011 IIR (v020) with a lossless
JPEG 2000 image; a finger, face or eye not captured: a BIR with `EXCEPTION` true and no BDB. The signature has
no BIR: MOSIP's BDB format registry has no signature format (it travels in the AN2K Type-8 and the sealed
record). Deterministic: the dates are the record's.

A record sealed before the kit's clock was synchronised and covered by its signed clock correction (issue #18)
carries the corrected time in every date (`CreationDate`, the ISO records' capture time) and, on the outer BIR
only, ``Others`` entries ``CLOCK_CORRECTION_S`` (seconds added, 3 decimals), ``CLOCK_CORRECTION_SOURCE`` and
``CAPTURE_TIME_AS_SEALED``; none of these when no correction applied (the bytes stay as before).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from firmware.errors import ExportError
from provisioning.clock_corrections import format_offset
from provisioning.interchange import iso19794 as iso
from provisioning.interchange.enrollment import Enrollment, Finger, Iris

NS = "http://standards.iso.org/iso-iec/19785/-3/ed-2/"
XSD = Path(__file__).with_name("cbeff-mosip.xsd")
#: BDBInfo/Format/Type of MOSIP: 7 finger, 8 face, 9 iris.
FORMAT_FINGER, FORMAT_FACE, FORMAT_IRIS = "7", "8", "9"
IRIS_QUALITY_TYPE = "ISO29794-6-iris-iqm"  # iris-iqm's ISO/IEC 29794-6 overall score
QUALITY_ORG, QUALITY_TYPE = "rekam", "NFIQ2-estimate"  # the kit's score on NFIQ 2's 0-100 scale (not NFIQ 2)
FACE_QUALITY_TYPE = "ICAO-estimate"
#: What a record without a declared resolution (schema 1) is written with in the FIR, and said so in Others.
NOMINAL_PPI = 500


def jp2_lossless(mode: str, size: tuple[int, int], pixels: bytes) -> bytes:
    """Lossless (reversible 5/3 wavelet) JPEG 2000 in a JP2 container, by Pillow's OpenJPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes(mode, size, pixels).save(buf, "JPEG2000", irreversible=False, no_jp2=False)
    return buf.getvalue()


def decode_pixels(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    """(mode, size, raw pixels) of an image (JPEG 2000, JPEG, PNG): what a reader of the BDB gets back."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.mode, im.size, im.tobytes()


def finger_fir(f: Finger, e: Enrollment) -> bytes:
    """The ISO/IEC 19794-4:2011 record of one captured finger."""
    score = iso.Quality(round(f.score)) if f.score is not None else iso.Quality(255)
    return iso.write_fir([iso.FingerImage(
        position=f.fgp, width=f.width, height=f.height, data=jp2_lossless("L", (f.width, f.height), f.pixels),
        compression=iso.FIR_JP2_LOSSLESS, ppi=f.ppi or NOMINAL_PPI, capture=e.captured, quality=(score,))])


def face_fac(e: Enrollment) -> bytes:
    """The ISO/IEC 19794-5:2011 record of the face (decoded from the kit's JPEG, re-encoded losslessly).

    Always 24-bit RGB (colour space 1): a grey JPEG is stored as RGB with R = G = B. The standard's code for
    8-bit greyscale (3, Table 21) is what such an image would otherwise declare, but MOSIP's validator (bio-utils
    `FaceISOStandardsValidator.isValidImageColourSpace`) accepts only 1, and an RGB image with equal channels
    loses nothing."""
    from PIL import Image

    im = Image.open(io.BytesIO(e.face.jpeg)).convert("RGB")
    score = iso.Quality(round(e.face.score)) if e.face.score is not None else iso.Quality(255)
    return iso.write_fac([iso.FaceImage(
        width=im.width, height=im.height, data=jp2_lossless("RGB", im.size, im.tobytes()),
        data_type=iso.FAC_JP2_LOSSLESS, colour_space=iso.FAC_RGB24, capture=e.captured, quality=(score,))])


#: ISO/IEC 19794-6:2011 cropped image (K3): the iris centred with margins of at least 0.6 of its radius left and
#: right and 0.2 above and below, i.e. 3.2 x 2.4 radii (4:3). MOSIP's validator takes only this type for
#: registration (bio-utils `IrisISOStandardsValidator.isValidImageType`).
K3_MARGIN_X, K3_MARGIN_Y = 0.6, 0.2


def iris_crop(i: Iris) -> tuple[int, int, int, int] | None:
    """The K3 box (x0, y0, x1, y1) of the kit's frame around the localised iris, or None when the kit found no
    iris or the margins do not fit in the frame (the eye near an edge: padding would invent pixels)."""
    if i.centre is None or not i.diameter or not i.width or not i.height:
        return None
    r = i.diameter / 2
    cx, cy = i.centre
    x0, x1 = math.floor(cx - r * (1 + K3_MARGIN_X)), math.ceil(cx + r * (1 + K3_MARGIN_X))
    y0, y1 = math.floor(cy - r * (1 + K3_MARGIN_Y)), math.ceil(cy + r * (1 + K3_MARGIN_Y))
    if x0 < 0 or y0 < 0 or x1 > i.width or y1 > i.height:
        return None
    return x0, y0, x1, y1


def iris_image_type(i: Iris) -> int:
    """ISO/IEC 19794-6:2011 image type of the kit's whole frame (used when no K3 crop fits): 2 (VGA) for a
    640x480 frame, else 1 (uncropped); all 2011 types are rectilinear (the 2005 edition's polar images are gone)."""
    return iso.IIR_VGA if (i.width, i.height) == (640, 480) else iso.IIR_UNCROPPED


def iris_iir(i: Iris, e: Enrollment) -> bytes:
    """The ISO/IEC 19794-6:2011 record of one captured eye, lossless JPEG 2000: the K3 crop around the localised
    iris (`iris_crop`; the pixels are the kit's, none resampled), else the kit's whole frame (type 1 or 2)."""
    score = iso.Quality(round(i.score)) if i.score is not None else iso.Quality(255)
    box = iris_crop(i)
    if box is None:
        width, height, pixels, itype = i.width, i.height, i.pixels, iris_image_type(i)
        origin = (0, 0)
    else:
        x0, y0, x1, y1 = box
        width, height, itype, origin = x1 - x0, y1 - y0, iso.IIR_CROPPED, (x0, y0)
        rows = memoryview(i.pixels)
        pixels = b"".join(rows[y * i.width + x0:y * i.width + x1] for y in range(y0, y1))
    centre = (0, 0, 0, 0)
    if i.centre:
        cx, cy = i.centre[0] - origin[0], i.centre[1] - origin[1]
        centre = (cx, cx, cy, cy)
    diameter = (i.diameter, i.diameter) if i.diameter else (0, 0)
    return iso.write_iir([iso.IrisImage(
        eye=iso.EYE_LEFT if i.eye == "left" else iso.EYE_RIGHT, width=width, height=height,
        data=jp2_lossless("L", (width, height), pixels), image_type=itype, capture=e.captured,
        quality=(score,), centre=centre, diameter=diameter)])


def _iso_time(e: Enrollment) -> str:
    return e.captured.strftime("%Y-%m-%dT%H:%M:%SZ")


def _bir(parent, *, btype: str, fmt: str, subtype: str | None, score: float | None, quality_type: str,
         created: str, bdb: bytes | None, others: list[tuple[str, str]]) -> None:
    from lxml import etree

    def el(p, tag: str, text: str | None = None):
        x = etree.SubElement(p, f"{{{NS}}}{tag}")
        if text is not None:
            x.text = text
        return x

    b = el(parent, "BIR")
    v = el(b, "Version")
    el(v, "Major", "1")
    el(v, "Minor", "1")
    v = el(b, "CBEFFVersion")
    el(v, "Major", "1")
    el(v, "Minor", "1")
    el(el(b, "BIRInfo"), "Integrity", "false")
    info = el(b, "BDBInfo")
    f = el(info, "Format")
    el(f, "Organization", "Mosip")
    el(f, "Type", fmt)
    el(info, "CreationDate", created)
    el(info, "Type", btype)
    if subtype:
        el(info, "Subtype", subtype)
    el(info, "Level", "Raw")
    el(info, "Purpose", "Enroll")
    q = el(info, "Quality")
    a = el(q, "Algorithm")
    el(a, "Organization", QUALITY_ORG)
    el(a, "Type", quality_type)
    el(q, "Score", str(round(score)) if score is not None else "0")
    if bdb is not None:
        el(b, "BDB", base64.b64encode(bdb).decode("ascii"))
    for k, val in others:
        o = el(b, "Others")
        el(o, "Key", k)
        el(o, "Value", val)


def build(e: Enrollment) -> bytes:
    """The CBEFF XML document of enrollment `e` (UTF-8, with an XML declaration)."""
    from lxml import etree

    root = etree.Element(f"{{{NS}}}BIR", nsmap={None: NS})
    v = etree.SubElement(root, f"{{{NS}}}Version")
    etree.SubElement(v, f"{{{NS}}}Major").text = "1"
    etree.SubElement(v, f"{{{NS}}}Minor").text = "1"
    v = etree.SubElement(root, f"{{{NS}}}CBEFFVersion")
    etree.SubElement(v, f"{{{NS}}}Major").text = "1"
    etree.SubElement(v, f"{{{NS}}}Minor").text = "1"
    bi = etree.SubElement(root, f"{{{NS}}}BIRInfo")
    etree.SubElement(bi, f"{{{NS}}}Creator").text = f"rekam {e.kit_id}"
    etree.SubElement(bi, f"{{{NS}}}Integrity").text = "false"
    etree.SubElement(bi, f"{{{NS}}}CreationDate").text = _iso_time(e)
    created = _iso_time(e)
    for f in e.fingers:
        others = [("EXCEPTION", "true" if f.exception else "false"), ("RETRIES", str(f.retries)),
                  ("FORCE_CAPTURED", "true" if f.forced else "false")]
        if f.exception:
            others.append(("EXCEPTION_REASON", f.exception))
        elif f.ppi is None:
            others.append(("RESOLUTION", f"unknown; FIR declares {NOMINAL_PPI} ppi"))
        _bir(root, btype="Finger", fmt=FORMAT_FINGER, subtype=f.subtype, score=None if f.exception else f.score,
             quality_type=QUALITY_TYPE, created=created, bdb=None if f.exception else finger_fir(f, e), others=others)
    face = e.face
    others = [("EXCEPTION", "true" if face.exception else "false"), ("RETRIES", str(max(face.attempts - 1, 0))),
              ("FORCE_CAPTURED", "true" if face.forced else "false")]
    if face.exception:
        others.append(("EXCEPTION_REASON", face.exception))
    _bir(root, btype="Face", fmt=FORMAT_FACE, subtype=None, score=None if face.exception else face.score,
         quality_type=FACE_QUALITY_TYPE, created=created, bdb=None if face.exception else face_fac(e), others=others)
    for i in e.irises:
        others = [("EXCEPTION", "true" if i.exception else "false"), ("RETRIES", str(i.retries)),
                  ("FORCE_CAPTURED", "true" if i.forced else "false")]
        if i.exception:
            others.append(("EXCEPTION_REASON", i.exception))
        elif iris_crop(i) is None:  # said in the BIR: MOSIP's validator refuses a whole frame for registration
            others.append(("IRIS_IMAGE", "whole frame: no ISO/IEC 19794-6 cropped (K3) image, the iris was not "
                                         "localised or lies too near the frame edge for its margins"))
        _bir(root, btype="Iris", fmt=FORMAT_IRIS, subtype=i.subtype, score=None if i.exception else i.score,
             quality_type=IRIS_QUALITY_TYPE, created=created, bdb=None if i.exception else iris_iir(i, e),
             others=others)
    if e.clock_offset_s is not None and e.captured_as_sealed is not None:
        sealed = e.captured_as_sealed.strftime("%Y-%m-%dT%H:%M:%SZ")
        for k, val in (("CLOCK_CORRECTION_S", format_offset(e.clock_offset_s)),
                       ("CLOCK_CORRECTION_SOURCE", e.clock_source), ("CAPTURE_TIME_AS_SEALED", sealed)):
            o = etree.SubElement(root, f"{{{NS}}}Others")
            etree.SubElement(o, f"{{{NS}}}Key").text = k
            etree.SubElement(o, f"{{{NS}}}Value").text = val
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


_SCHEMA = None


def validate(xml: bytes) -> None:
    """Check `xml` against MOSIP's CBEFF schema; raises `ExportError` (code cbeff_invalid) naming the error."""
    global _SCHEMA
    from lxml import etree

    if _SCHEMA is None:
        _SCHEMA = etree.XMLSchema(etree.parse(str(XSD)))
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    doc = etree.fromstring(xml, parser)
    if not _SCHEMA.validate(doc):
        raise ExportError("cbeff_invalid", f"CBEFF does not validate: {_SCHEMA.error_log.last_error}")
