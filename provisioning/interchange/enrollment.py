"""An opened rekam record read once into what the interchange formats need, every value checked.

The manifest comes from a kit (firmware/enrollment/payload.py): its fields are validated here, never trusted.
Schema `rekam.enrollment/1` (before the export), `/2` (adds the sensor resolution per finger) and `/3` (adds
both irises and the signature) all read; what an older record lacks is `None` ("unknown") or empty, never
guessed (see docs/interchange.md).
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from firmware.errors import ExportError
from firmware.wire import record_format as rf

SCHEMAS = ("rekam.enrollment/1", "rekam.enrollment/2", "rekam.enrollment/3")
#: rekam finger codes -> ANSI/NIST-ITL FGP = ISO/IEC 19794-4 finger position.
FGP = {"R1": 1, "R2": 2, "R3": 3, "R4": 4, "R5": 5, "L1": 6, "L2": 7, "L3": 8, "L4": 9, "L5": 10}
FINGER_NAMES = {"1": "Thumb", "2": "IndexFinger", "3": "MiddleFinger", "4": "RingFinger", "5": "LittleFinger"}
#: Largest finger image accepted (a 1000 ppi 1.6 x 1.5 inch platen is 1600 x 1500).
MAX_FINGER_SIDE = 2000
MAX_FACE_SIDE = 4000
PPI_RANGE = (250, 2000)
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MAX_TEXT = 200


@dataclass(frozen=True)
class Finger:
    """One finger of the enrollment: captured (image) or an exception (reason, no image)."""

    code: str
    fgp: int
    exception: str = ""
    png: bytes = b""
    pixels: bytes = b""  # 8-bit gray, row-major, width x height
    width: int = 0
    height: int = 0
    ppi: int | None = None  # None: the record predates schema 2 (resolution unknown)
    score: float | None = None
    attempts: int = 0
    forced: bool = False

    @property
    def retries(self) -> int:
        """Captures taken beyond the first (0 for an exception)."""
        return max(self.attempts - 1, 0)

    @property
    def subtype(self) -> str:
        """The CBEFF subtype, e.g. "Right IndexFinger"."""
        return ("Right " if self.code[0] == "R" else "Left ") + FINGER_NAMES[self.code[1]]


@dataclass(frozen=True)
class Face:
    """The face: the kit's JPEG portrait, or an exception."""

    exception: str = ""
    jpeg: bytes = b""
    width: int = 0
    height: int = 0
    gray: bool = False  # a one-channel JPEG
    score: float | None = None
    attempts: int = 0
    forced: bool = False


@dataclass(frozen=True)
class Iris:
    """One eye: the kit's lossless PNG of the NIR frame, or an exception (missing, blind, prosthesis...)."""

    eye: str  # "left" / "right"
    exception: str = ""
    png: bytes = b""
    pixels: bytes = b""  # 8-bit grey, row-major
    width: int = 0
    height: int = 0
    score: float | None = None
    attempts: int = 0
    forced: bool = False
    centre: tuple[int, int] | None = None  # iris centre, px (from the kit's localisation)
    diameter: int | None = None  # iris diameter, px

    @property
    def retries(self) -> int:
        return max(self.attempts - 1, 0)

    @property
    def subtype(self) -> str:
        """The CBEFF subtype: "Left" / "Right"."""
        return self.eye.capitalize()


@dataclass(frozen=True)
class Signature:
    """The resident's signature: a grey PNG (and the pad strokes), or an exception (cannot sign)."""

    exception: str = ""
    png: bytes = b""
    pixels: bytes = b""
    width: int = 0
    height: int = 0
    attempts: int = 0


@dataclass(frozen=True)
class Enrollment:
    """Everything the formats take from one record (header + manifest + attachments)."""

    record_id: str
    kit_id: str
    schema: str
    nik: str
    operator_id: str
    site: str
    software: str
    started: dt.datetime | None
    captured: dt.datetime
    clock_synced: bool
    face: Face
    fingers: tuple[Finger, ...]
    irises: tuple[Iris, ...] = ()  # schema 3; () for older records and sites that do not capture irises
    signature: Signature | None = None  # schema 3; None: not captured at this site (or an older record)
    # The kit's signed clock correction applied to `started`/`captured` (issue #18): seconds added, its source
    # (gnss/ntp) and the capture time as sealed; None / "" / None when none applied (`clock_synced` stays as sealed).
    clock_offset_s: float | None = None
    clock_source: str = ""
    captured_as_sealed: dt.datetime | None = None

    @property
    def captured_fingers(self) -> list[Finger]:
        return [f for f in self.fingers if not f.exception]


def _fail(code: str, record_id: str, message: str) -> ExportError:
    return ExportError(code, f"record {record_id}: {message}")


def _time(value: Any, what: str, rid: str) -> dt.datetime:
    if not isinstance(value, str) or not _TIME.match(value):
        raise _fail("bad_manifest", rid, f"{what} {str(value)[:40]!r} is not a UTC time like 2026-11-29T04:03:12Z")
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise _fail("bad_manifest", rid, f"{what} {value!r} is not a date") from None


def _forbidden(c: str) -> bool:
    """A character no exported text field may hold: a control character (AN2K's separators are 0x1c-0x1f;
    XML 1.0 allows none but tab/LF/CR, and those would break a one-line field), a surrogate (cannot be encoded
    in UTF-8 at all) or a noncharacter (U+FDD0-U+FDEF and U+xxFFFE/U+xxFFFF of every plane: U+FFFE/U+FFFF are
    outside XML 1.0's Char production, the others are not for interchange)."""
    o = ord(c)
    return unicodedata.category(c) in ("Cc", "Cs") or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE


def _text(value: Any, what: str, rid: str, default: str = "") -> str:
    """`value` as free text of the kit (operator, site, exception reasons...), refused (bad_manifest, naming the
    first bad character) when any exported format could not carry it; `default` when absent."""
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _fail("bad_manifest", rid, f"{what} {str(value)[:40]!r} is not text of at most {MAX_TEXT} "
                                         "characters")
    bad = next((i for i, c in enumerate(value) if _forbidden(c)), None)
    if bad is not None:
        raise _fail("bad_manifest", rid, f"{what} {value[:40]!r} has U+{ord(value[bad]):04X} at {bad}: no control "
                                         "characters, surrogates or noncharacters in exported text")
    return value


def _kept(doc: dict[str, Any], what: str, rid: str) -> tuple[float | None, int, bool]:
    """(score of the kept attempt, number of attempts, forced) of a capture's summary."""
    attempts = doc.get("attempts", [])
    kept = doc.get("kept")
    if not isinstance(attempts, list) or len(attempts) > 1000:
        raise _fail("bad_manifest", rid, f"{what}: attempts is not a list")
    score = None
    if kept is not None:
        if not isinstance(kept, int) or isinstance(kept, bool) or not 0 <= kept < len(attempts):
            raise _fail("bad_manifest", rid, f"{what}: kept attempt {kept!r} is not one of {len(attempts)}")
        s = attempts[kept].get("score") if isinstance(attempts[kept], dict) else None
        if not isinstance(s, int | float) or isinstance(s, bool) or not 0 <= s <= 100:
            raise _fail("bad_manifest", rid, f"{what}: quality score {s!r} is not 0-100")
        score = float(s)
    return score, len(attempts), bool(doc.get("forced", False))


def _gray_image(data: bytes, what: str, rid: str, want: tuple[int, int] | None) -> tuple[bytes, int, int]:
    """Decode a finger PNG to 8-bit gray pixels, its size checked BEFORE the pixels are decoded."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=["PNG"])
    except Exception as e:  # Pillow raises many types for a bad file
        raise _fail("bad_image", rid, f"{what} is not a PNG ({type(e).__name__})") from None
    w, h = im.size
    if not (0 < w <= MAX_FINGER_SIDE and 0 < h <= MAX_FINGER_SIDE):
        raise _fail("image_too_large", rid, f"{what} is {w}x{h}, larger than {MAX_FINGER_SIDE}x{MAX_FINGER_SIDE}")
    if want is not None and want != (w, h):
        raise _fail("image_size_mismatch", rid, f"{what}: the manifest says {want[0]}x{want[1]}, the PNG is {w}x{h}")
    if im.mode != "L":
        raise _fail("bad_image", rid, f"{what} is {im.mode}, not 8-bit gray")
    try:
        im.load()
    except Exception as e:
        raise _fail("bad_image", rid, f"{what} does not decode ({type(e).__name__}: {e})") from None
    return im.tobytes(), w, h


def _dimension(value: Any, what: str, rid: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_FINGER_SIDE:
        raise _fail("image_too_large", rid, f"{what} {str(value)[:20]!r} is not 1..{MAX_FINGER_SIDE}")
    return value


def _finger(doc: Any, atts: dict[str, rf.Attachment], schema: str, rid: str) -> Finger:
    if not isinstance(doc, dict):
        raise _fail("bad_manifest", rid, "a finger entry is not an object")
    code = doc.get("finger")
    if code not in FGP:
        raise _fail("bad_finger_code", rid, f"finger code {str(code)[:20]!r} is not one of {', '.join(FGP)}")
    if doc.get("exception"):
        return Finger(code, FGP[code], exception=_text(doc["exception"], f"finger {code} exception", rid))
    name = doc.get("image")
    att = atts.get(name) if isinstance(name, str) else None
    if att is None:
        raise _fail("missing_attachment", rid, f"finger {code}: no exception and no image attachment "
                                               f"{str(name)[:40]!r}")
    if att.content_type != "image/png":
        raise _fail("bad_image", rid, f"finger {code}: attachment type {att.content_type[:40]!r}, not image/png")
    want = (_dimension(doc.get("width"), f"finger {code} width", rid),
            _dimension(doc.get("height"), f"finger {code} height", rid))
    pixels, w, h = _gray_image(att.data, f"finger {code} image", rid, want)
    ppi = None
    if schema != "rekam.enrollment/1":
        ppi = doc.get("ppi")
        if not isinstance(ppi, int) or isinstance(ppi, bool) or not PPI_RANGE[0] <= ppi <= PPI_RANGE[1]:
            raise _fail("bad_manifest", rid, f"finger {code}: ppi {str(ppi)[:20]!r} is not {PPI_RANGE[0]}.."
                                             f"{PPI_RANGE[1]}")
    score, attempts, forced = _kept(doc, f"finger {code}", rid)
    return Finger(code, FGP[code], png=att.data, pixels=pixels, width=w, height=h, ppi=ppi, score=score,
                  attempts=attempts, forced=forced)


def _face(doc: Any, atts: dict[str, rf.Attachment], rid: str) -> Face:
    if not isinstance(doc, dict):
        raise _fail("bad_manifest", rid, "face is not an object")
    if doc.get("exception"):
        return Face(exception=_text(doc["exception"], "face exception", rid))
    name = doc.get("attachment")
    if name is None:
        return Face(exception="not captured")  # a kit configured without a camera
    att = atts.get(name) if isinstance(name, str) else None
    if att is None or att.content_type != "image/jpeg":
        raise _fail("missing_attachment", rid, f"face: no JPEG attachment {str(name)[:40]!r}")
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(att.data), formats=["JPEG"])
    except Exception as e:
        raise _fail("bad_image", rid, f"face image is not a JPEG ({type(e).__name__})") from None
    w, h = im.size
    if not (0 < w <= MAX_FACE_SIDE and 0 < h <= MAX_FACE_SIDE):
        raise _fail("image_too_large", rid, f"face image is {w}x{h}, larger than {MAX_FACE_SIDE}x{MAX_FACE_SIDE}")
    score, attempts, forced = _kept(doc, "face", rid)
    return Face(jpeg=att.data, width=w, height=h, gray=im.mode == "L", score=score, attempts=attempts, forced=forced)


MAX_IRIS_SIDE = 2000
MAX_SIGNATURE_SIDE = 2000


def _png_gray(att: rf.Attachment | None, what: str, rid: str, want: tuple[int, int], side: int) -> bytes:
    """The 8-bit grey pixels of a PNG attachment whose size the manifest states, checked before decoding."""
    from PIL import Image

    if att is None or att.content_type != "image/png":
        raise _fail("missing_attachment", rid, f"{what}: no PNG attachment")
    try:
        im = Image.open(io.BytesIO(att.data), formats=["PNG"])
    except Exception as e:
        raise _fail("bad_image", rid, f"{what} is not a PNG ({type(e).__name__})") from None
    if not (0 < im.width <= side and 0 < im.height <= side):
        raise _fail("image_too_large", rid, f"{what} is {im.width}x{im.height}, larger than {side}x{side}")
    if im.size != want:
        raise _fail("image_size_mismatch", rid, f"{what}: the manifest says {want[0]}x{want[1]}, the PNG is "
                                                f"{im.width}x{im.height}")
    if im.mode != "L":
        raise _fail("bad_image", rid, f"{what} is {im.mode}, not 8-bit gray")
    try:
        im.load()
    except Exception as e:
        raise _fail("bad_image", rid, f"{what} does not decode ({type(e).__name__}: {e})") from None
    return im.tobytes()


def _side(value: Any, what: str, rid: str, side: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= side:
        raise _fail("image_too_large", rid, f"{what} {str(value)[:20]!r} is not 1..{side}")
    return value


def _iris(doc: Any, atts: dict[str, rf.Attachment], rid: str) -> Iris:
    if not isinstance(doc, dict) or doc.get("eye") not in ("left", "right"):
        raise _fail("bad_manifest", rid, "an iris entry is not an object with eye left or right")
    eye = doc["eye"]
    if doc.get("exception"):
        return Iris(eye, exception=_text(doc["exception"], f"{eye} iris exception", rid))
    want = (_side(doc.get("width"), f"{eye} iris width", rid, MAX_IRIS_SIDE),
            _side(doc.get("height"), f"{eye} iris height", rid, MAX_IRIS_SIDE))
    name = doc.get("image")
    pixels = _png_gray(atts.get(name) if isinstance(name, str) else None, f"{eye} iris image", rid, want,
                       MAX_IRIS_SIDE)
    score, attempts, forced = _kept(doc, f"{eye} iris", rid)
    centre = diameter = None
    pos = doc.get("position")
    if isinstance(pos, dict) and pos.get("found"):
        dx, dy, d = pos.get("dx"), pos.get("dy"), pos.get("iris_diameter")
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in (dx, dy, d)) \
                and abs(dx) <= 0.5 and abs(dy) <= 0.5 and 0 < d <= MAX_IRIS_SIDE:
            centre = (round(want[0] / 2 + dx * want[0]), round(want[1] / 2 + dy * want[1]))
            diameter = int(d)
    return Iris(eye, png=atts[name].data, pixels=pixels, width=want[0], height=want[1], score=score,
                attempts=attempts, forced=forced, centre=centre, diameter=diameter)


def _signature(doc: Any, atts: dict[str, rf.Attachment], rid: str) -> Signature | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise _fail("bad_manifest", rid, "signature is not an object")
    attempts = doc.get("attempts", 0)
    attempts = attempts if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 0 else 0
    if doc.get("exception"):
        return Signature(exception=_text(doc["exception"], "signature exception", rid), attempts=attempts)
    want = (_side(doc.get("width"), "signature width", rid, MAX_SIGNATURE_SIDE),
            _side(doc.get("height"), "signature height", rid, MAX_SIGNATURE_SIDE))
    name = doc.get("image")
    pixels = _png_gray(atts.get(name) if isinstance(name, str) else None, "signature image", rid, want,
                       MAX_SIGNATURE_SIDE)
    return Signature(png=atts[name].data, pixels=pixels, width=want[0], height=want[1], attempts=attempts)


def read_enrollment(header: rf.Header, payload: rf.Payload, clock_offset_s: float | None = None,
                    clock_source: str = "") -> Enrollment:
    """Check and extract an opened record; raises `ExportError` with a code naming what is wrong.

    `clock_offset_s`: the offset of the kit's clock correction covering this record (the caller checked that it
    covers the header's seq and that the header says ``clock_synced: false``); added to `started` and `captured`,
    whole seconds (the sealed times have no fraction), the sealed capture time kept in `captured_as_sealed`."""
    rid = header.record_id
    m = payload.manifest
    schema = m.get("schema")
    if schema not in SCHEMAS:
        raise _fail("unsupported_schema", rid, f"manifest schema {str(schema)[:40]!r} (this build reads "
                                               f"{', '.join(SCHEMAS)})")
    if m.get("simulated"):
        raise _fail("simulated", rid, "a simulated record (rekam sim commit) is not sent to an ABIS")
    nik = m.get("nik")
    if not isinstance(nik, str) or not re.fullmatch(r"\d{16}", nik):
        raise _fail("bad_manifest", rid, "NIK is not 16 digits")
    atts = {a.name: a for a in payload.attachments}
    fingers_doc = m.get("fingers")
    if not isinstance(fingers_doc, list) or len(fingers_doc) > len(FGP):
        raise _fail("bad_manifest", rid, "fingers is not a list of at most 10")
    fingers = tuple(_finger(d, atts, schema, rid) for d in fingers_doc)
    codes = [f.code for f in fingers]
    if len(set(codes)) != len(codes):
        raise _fail("bad_finger_code", rid, f"finger codes repeat: {', '.join(codes)}")
    irises: tuple[Iris, ...] = ()
    signature = None
    if schema == "rekam.enrollment/3":
        idoc = m.get("irises", [])
        if not isinstance(idoc, list) or len(idoc) > 2:
            raise _fail("bad_manifest", rid, "irises is not a list of at most 2")
        irises = tuple(_iris(d, atts, rid) for d in idoc)
        if len({i.eye for i in irises}) != len(irises):
            raise _fail("bad_manifest", rid, "an eye repeats in irises")
        signature = _signature(m.get("signature"), atts, rid)
    captured = _time(m.get("committed", header.created), "committed", rid)
    started = _time(m["started"], "started", rid) if m.get("started") is not None else None
    sealed = None
    if clock_offset_s is not None:
        shift = dt.timedelta(seconds=math.floor(clock_offset_s + 0.5))
        try:
            sealed, captured = captured, captured + shift
            started = started + shift if started is not None else None
        except OverflowError:
            raise _fail("bad_clock_correction", rid, f"offset {clock_offset_s} s moves {captured} out of the "
                                                     "calendar") from None
    return Enrollment(
        record_id=rid, kit_id=header.kit_id, schema=schema, nik=nik,
        operator_id=_text(m.get("operator_id"), "operator_id", rid), site=_text(m.get("site"), "site", rid),
        software=_text(m.get("software"), "software", rid), started=started, captured=captured,
        clock_synced=bool(m.get("clock_synced", header.clock_synced)), face=_face(m.get("face", {}), atts, rid),
        fingers=fingers, irises=irises, signature=signature, clock_offset_s=clock_offset_s,
        clock_source=_text(clock_source, "clock correction source", rid), captured_as_sealed=sealed)
