"""ISO/IEC 19794-4:2011 finger image records (FIR, version 020), 19794-5:2011 face image records (FAC, 030) and
19794-6:2011 iris image records (IIR, 020; layout at `write_iir`).

Our own writer and strict reader (the PyPI `iso19794` package breaks on current Pillow and writes only the
2005 face version). All integers big-endian. Layouts, byte by byte:

FIR general header (16 bytes)::

    0  4  format identifier  b"FIR\\0"
    4  4  version            b"020\\0"
    8  4  record length      (whole record, this header included)
    12 2  number of finger representations
    14 1  certification flag (0: no certification blocks follow in the representations)
    15 1  number of distinct finger positions

FIR representation (repeated)::

    +0  4  representation length (this header + image data)
    +4  9  capture date and time: year u16, month, day, hour, minute, second u8, millisecond u16 (0xFF.. unknown)
    +13 1  capture device technology (0 unknown)
    +14 2  capture device vendor      (0 unknown)
    +16 2  capture device type        (0 unknown)
    +18 1  number of quality blocks Q, then Q x (score u8 0-100/255, algorithm vendor u16, algorithm id u16)
    ..  1  finger position (0 unknown, 1 right thumb .. 5 right little, 6 left thumb .. 10 left little)
    ..  1  representation number
    ..  1  scale units (1 pixels per inch, 2 per centimetre)
    ..  2  capture sampling rate, horizontal;  2 vertical
    ..  2  image sampling rate, horizontal;    2 vertical
    ..  1  bit depth
    ..  1  compression (0 none, 1 bit-packed, 2 WSQ, 3 JPEG, 4 JPEG 2000 lossy, 5 JPEG 2000 lossless, 6 PNG)
    ..  1  impression type (0 live-scan plain)
    ..  2  horizontal line length (width);  2 vertical line length (height)
    ..  4  image data length, then the image data

FAC general header (17 bytes)::

    0 4 b"FAC\\0"  4 4 b"030\\0"  8 4 record length  12 2 number of representations  14 1 certification flag
    15 2 temporal semantics (0: one representation / no sequence)

FAC representation::

    +0 4 representation length, +4 9 capture date and time, +13 1 device technology (2 digital still camera),
    +14 2 vendor, +16 2 type, +18 1 quality blocks Q then Q x 5 bytes,
    facial information (17): landmark count u16, gender, eye colour, hair colour, subject height u8,
        property mask u24, expression u16, pose angle yaw/pitch/roll u8 x3, pose uncertainty u8 x3,
    landmark points (8 bytes each: point type u8 (1 MPEG-4 feature point, 2 anthropometric landmark), point
    code u8, X u16, Y u16, Z u16; read into `FaceImage.landmarks`), image information (11): face image type,
    image data type
        (0 JPEG, 1 JPEG 2000 lossy, 2 JPEG 2000 lossless, 3 PNG), width u16, height u16,
        spatial sampling rate level, post-acquisition processing u16, cross reference, colour space (Table 21:
        0 unspecified, 1 24-bit RGB, 2 YUV422, 3 8-bit greyscale),
    then the image data length u32 and the image data (no 3-D data: the length is what the representation
    length leaves, and the reader requires both to agree). The 2011 edition's length field is what MOSIP's
    reader (bio-utils ``face/ImageData``) reads; without it the first 4 bytes of the image were taken as the
    length.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass, field

from firmware.errors import IsoRecordError

FIR_ID, FIR_VERSION = b"FIR\0", b"020\0"
FAC_ID, FAC_VERSION = b"FAC\0", b"030\0"
FIR_HEADER = struct.Struct(">4s4sIHBB")  # 16 bytes
FAC_HEADER = struct.Struct(">4s4sIHBH")  # 17 bytes
DATETIME = struct.Struct(">HBBBBBH")  # 9 bytes
DEVICE = struct.Struct(">BHH")  # technology, vendor, type: 5 bytes
QUALITY = struct.Struct(">BHH")  # score, algorithm vendor, algorithm id: 5 bytes
FIR_IMAGE = struct.Struct(">BBBHHHHBBBHHI")  # position .. image data length: 22 bytes
FAC_FACIAL = struct.Struct(">HBBBB3sH3s3s")  # 17 bytes
FAC_IMAGE = struct.Struct(">BBHHBHBB")  # 11 bytes
LANDMARK = struct.Struct(">BBHHH")  # point type, point code, X, Y, Z: 8 bytes

# Compression codes (19794-4:2011 Table 4) and face image data types (19794-5:2011).
FIR_NONE, FIR_WSQ, FIR_JPEG, FIR_JP2_LOSSY, FIR_JP2_LOSSLESS, FIR_PNG = 0, 2, 3, 4, 5, 6
FAC_JPEG, FAC_JP2_LOSSY, FAC_JP2_LOSSLESS, FAC_PNG = 0, 1, 2, 3
FAC_RGB24, FAC_GREY8 = 1, 3  # image colour space (19794-5:2011 Table 21)
SCALE_PPI = 1
UNKNOWN_TIME = (0xFFFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFFFF)
#: Largest record the reader takes (a ten-print at 1000 ppi is far below this).
MAX_RECORD = 64 * 1024 * 1024
#: Most landmark points the FAC reader takes in one record (one representation's u16 count; MPEG-4 defines
#: under 100 feature points): a hostile record of 8-byte points would otherwise become millions of objects.
MAX_LANDMARKS = 0xFFFF


@dataclass(frozen=True)
class Quality:
    """One quality block: a 0-100 score (255: failed) and the algorithm that computed it (0/0: unregistered)."""

    score: int
    vendor: int = 0
    algorithm: int = 0


@dataclass(frozen=True)
class FingerImage:
    """One finger representation of a FIR record."""

    position: int
    width: int
    height: int
    data: bytes
    compression: int = FIR_JP2_LOSSLESS
    ppi: int = 500
    bit_depth: int = 8
    impression: int = 0
    number: int = 0
    capture: dt.datetime | None = None
    quality: tuple[Quality, ...] = ()
    technology: int = 0
    vendor: int = 0
    device_type: int = 0


@dataclass(frozen=True)
class Landmark:
    """One landmark point of a FAC representation (coordinates in pixels of the image)."""

    kind: int  # landmark point type: 1 MPEG-4 feature point, 2 anthropometric landmark
    code: int  # the point within its type (MPEG-4: major and minor id as nibbles, point 12.1 is 0xC1)
    x: int
    y: int
    z: int = 0


@dataclass(frozen=True)
class FaceImage:
    """One face representation of a FAC record."""

    width: int
    height: int
    data: bytes
    data_type: int = FAC_JP2_LOSSLESS
    face_type: int = 1  # full frontal (the kit stores an ICAO-proportioned portrait)
    colour_space: int = 1  # 24-bit RGB
    capture: dt.datetime | None = None
    quality: tuple[Quality, ...] = ()
    technology: int = 2  # static photograph from a digital still-image camera
    vendor: int = 0
    device_type: int = 0
    sampling_level: int = 0
    facial: bytes = field(default=b"\0" * FAC_FACIAL.size)  # landmarks none, everything unspecified
    landmarks: tuple[Landmark, ...] = ()  # as many as `facial`'s first two bytes count


def _datetime(t: dt.datetime | None) -> bytes:
    if t is None:
        return DATETIME.pack(*UNKNOWN_TIME)
    t = t.astimezone(dt.UTC)
    return DATETIME.pack(t.year, t.month, t.day, t.hour, t.minute, t.second, t.microsecond // 1000)


def _quality(blocks: tuple[Quality, ...]) -> bytes:
    if len(blocks) > 255:
        raise IsoRecordError(f"{len(blocks)} quality blocks, at most 255")
    for q in blocks:
        if not (0 <= q.score <= 100 or q.score == 255):
            raise IsoRecordError(f"quality score {q.score} is not 0-100 or 255")
    return bytes([len(blocks)]) + b"".join(QUALITY.pack(q.score, q.vendor, q.algorithm) for q in blocks)


def write_fir(fingers: list[FingerImage]) -> bytes:
    """An ISO/IEC 19794-4:2011 record holding `fingers` (no certification blocks, no extended data)."""
    if not 1 <= len(fingers) <= 0xFFFF:
        raise IsoRecordError("a FIR record holds 1 to 65535 representations")
    reps = []
    for f in fingers:
        if not 0 <= f.position <= 15 and f.position not in range(19, 51):
            raise IsoRecordError(f"finger position {f.position} is not an ISO 19794-4 position code")
        if not (1 <= f.width <= 0xFFFF and 1 <= f.height <= 0xFFFF):
            raise IsoRecordError(f"image size {f.width}x{f.height} does not fit the record")
        body = (_datetime(f.capture) + DEVICE.pack(f.technology, f.vendor, f.device_type) + _quality(f.quality)
                + FIR_IMAGE.pack(f.position, f.number, SCALE_PPI, f.ppi, f.ppi, f.ppi, f.ppi, f.bit_depth,
                                 f.compression, f.impression, f.width, f.height, len(f.data)))
        reps.append(struct.pack(">I", 4 + len(body) + len(f.data)) + body + f.data)
    total = FIR_HEADER.size + sum(len(r) for r in reps)
    head = FIR_HEADER.pack(FIR_ID, FIR_VERSION, total, len(fingers), 0, len({f.position for f in fingers}))
    return head + b"".join(reps)


def write_fac(faces: list[FaceImage]) -> bytes:
    """An ISO/IEC 19794-5:2011 record holding `faces` (2-D, no 3-D data); each face's `landmarks` after its
    facial information, whose landmark count must be their number."""
    if not 1 <= len(faces) <= 0xFFFF:
        raise IsoRecordError("a FAC record holds 1 to 65535 representations")
    reps = []
    for f in faces:
        if not (1 <= f.width <= 0xFFFF and 1 <= f.height <= 0xFFFF):
            raise IsoRecordError(f"image size {f.width}x{f.height} does not fit the record")
        if len(f.facial) != FAC_FACIAL.size:
            raise IsoRecordError(f"facial information is {len(f.facial)} bytes, not {FAC_FACIAL.size}")
        if struct.unpack(">H", f.facial[:2])[0] != len(f.landmarks):
            raise IsoRecordError(f"facial information counts {struct.unpack('>H', f.facial[:2])[0]} landmark "
                                 f"points, {len(f.landmarks)} given")
        try:
            points = b"".join(LANDMARK.pack(p.kind, p.code, p.x, p.y, p.z) for p in f.landmarks)
        except struct.error as e:
            raise IsoRecordError(f"a landmark point does not fit the record ({e})") from None
        body = (_datetime(f.capture) + DEVICE.pack(f.technology, f.vendor, f.device_type) + _quality(f.quality)
                + f.facial + points
                + FAC_IMAGE.pack(f.face_type, f.data_type, f.width, f.height, f.sampling_level, 0, 0, f.colour_space)
                + struct.pack(">I", len(f.data)))
        reps.append(struct.pack(">I", 4 + len(body) + len(f.data)) + body + f.data)
    total = FAC_HEADER.size + sum(len(r) for r in reps)
    return FAC_HEADER.pack(FAC_ID, FAC_VERSION, total, len(faces), 0, 0) + b"".join(reps)


class _Reader:
    """Bounds-checked big-endian reads; every failure names the field and its offset."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int, field_name: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise IsoRecordError(f"{self.what}: {field_name} at offset {self.pos} needs {n} bytes, "
                                 f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, field_name: str) -> tuple:
        return st.unpack(self.take(st.size, field_name))


def _read_datetime(r: _Reader) -> dt.datetime | None:
    parts = r.unpack(DATETIME, "capture date and time")
    if parts == UNKNOWN_TIME:
        return None
    y, mo, d, h, mi, s, ms = parts
    try:
        return dt.datetime(y, mo, d, h, mi, s, ms * 1000, tzinfo=dt.UTC)
    except ValueError as e:
        raise IsoRecordError(f"{r.what}: capture date and time {parts} is not a date ({e})") from None


def _read_quality(r: _Reader) -> tuple[Quality, ...]:
    (n,) = r.take(1, "number of quality blocks")
    out = []
    for _ in range(n):
        score, vendor, alg = r.unpack(QUALITY, "quality block")
        if not (score <= 100 or score == 255):
            raise IsoRecordError(f"{r.what}: quality score {score} is not 0-100 or 255")
        out.append(Quality(score, vendor, alg))
    return tuple(out)


def _read_general(data: bytes, st: struct.Struct, ident: bytes, version: bytes, what: str) -> tuple:
    if len(data) > MAX_RECORD:
        raise IsoRecordError(f"{what}: {len(data)} bytes, larger than {MAX_RECORD}")
    r = _Reader(data, what)
    head = r.unpack(st, "general header")
    if head[0] != ident:
        raise IsoRecordError(f"{what}: format identifier {head[0]!r}, expected {ident!r}")
    if head[1] != version:
        raise IsoRecordError(f"{what}: version {head[1]!r}, this reader reads {version!r}")
    if head[2] != len(data):
        raise IsoRecordError(f"{what}: record length field says {head[2]}, the record is {len(data)} bytes")
    if head[3] == 0:
        raise IsoRecordError(f"{what}: no representations")
    if head[4] != 0:
        raise IsoRecordError(f"{what}: certification flag {head[4]} (certification blocks are not supported)")
    return r, head


def read_fir(data: bytes) -> list[FingerImage]:
    """Parse an ISO/IEC 19794-4:2011 record strictly (every length checked); raises `IsoRecordError`."""
    r, head = _read_general(data, FIR_HEADER, FIR_ID, FIR_VERSION, "FIR")
    out = []
    for i in range(head[3]):
        start = r.pos
        (length,) = r.unpack(struct.Struct(">I"), f"representation {i} length")
        capture = _read_datetime(r)
        tech, vendor, dtype = r.unpack(DEVICE, "capture device")
        quality = _read_quality(r)
        (pos, number, scale, hs, vs, his, vis, depth, comp, imp, w, h, n) = r.unpack(FIR_IMAGE, "image header")
        if scale != SCALE_PPI or hs != his or vs != vis or hs != vs:
            raise IsoRecordError(f"FIR representation {i}: sampling rates {hs}/{vs}/{his}/{vis} (unit {scale}) "
                                 "are not one square ppi resolution")
        img = r.take(n, f"representation {i} image data")
        if r.pos - start != length:
            raise IsoRecordError(f"FIR representation {i}: length field says {length}, its fields take "
                                 f"{r.pos - start}")
        out.append(FingerImage(pos, w, h, img, comp, hs, depth, imp, number, capture, quality, tech, vendor, dtype))
    if r.pos != len(data):
        raise IsoRecordError(f"FIR: {len(data) - r.pos} bytes after the last representation")
    if head[5] != len({f.position for f in out}):
        raise IsoRecordError(f"FIR: header counts {head[5]} finger positions, the representations hold "
                             f"{len({f.position for f in out})}")
    return out


def read_fac(data: bytes) -> list[FaceImage]:
    """Parse an ISO/IEC 19794-5:2011 record strictly (identifier, version, every length; landmark points kept
    in `FaceImage.landmarks`); raises `IsoRecordError` naming what is wrong."""
    r, head = _read_general(data, FAC_HEADER, FAC_ID, FAC_VERSION, "FAC")
    out: list[FaceImage] = []
    points = 0
    for i in range(head[3]):
        start = r.pos
        (length,) = r.unpack(struct.Struct(">I"), f"representation {i} length")
        if length < 4 + DATETIME.size + DEVICE.size + 1 + FAC_FACIAL.size + FAC_IMAGE.size + 4:
            raise IsoRecordError(f"FAC representation {i}: length {length} is shorter than its fixed fields")
        capture = _read_datetime(r)
        tech, vendor, dtype = r.unpack(DEVICE, "capture device")
        quality = _read_quality(r)
        facial = r.take(FAC_FACIAL.size, "facial information")
        (count,) = struct.unpack(">H", facial[:2])
        points += count
        if points > MAX_LANDMARKS:
            raise IsoRecordError(f"FAC representation {i}: {points} landmark points in the record, more than "
                                 f"{MAX_LANDMARKS}")
        landmarks = tuple(Landmark(*r.unpack(LANDMARK, f"representation {i} landmark point {k}"))
                          for k in range(count))  # each read is bounded by the record: a lying count fails
        ftype, data_type, w, h, level, _post, _xref, colour = r.unpack(FAC_IMAGE, "image information")
        (size,) = r.unpack(struct.Struct(">I"), f"representation {i} image data length")
        left = length - (r.pos - start)
        if size != left:  # 3-D data after the image is not written by rekam, nor accepted here
            raise IsoRecordError(f"FAC representation {i}: image data length {size}, the representation "
                                 f"leaves {left}")
        img = r.take(size, f"representation {i} image data")
        out.append(FaceImage(w, h, img, data_type, ftype, colour, capture, quality, tech, vendor, dtype, level,
                             facial, landmarks))
    if r.pos != len(data):
        raise IsoRecordError(f"FAC: {len(data) - r.pos} bytes after the last representation")
    return out


# --- ISO/IEC 19794-6:2011 iris image records (IIR, version 020; issue #20) -----------------------------------
#
# IIR general header (16 bytes)::
#
#     0 4 b"IIR\0"  4 4 b"020\0"  8 4 record length  12 2 number of representations  14 1 certification flag
#     15 1 number of eyes represented
#
# IIR representation::
#
#     +0 4 representation length, +4 9 capture date and time, +13 1 device technology (1 CMOS/CCD),
#     +14 2 vendor, +16 2 type, +18 1 quality blocks Q then Q x 5 bytes,
#     representation number u16, eye label u8 (0 undefined, 1 right, 2 left), image type u8 (1 uncropped,
#     2 VGA, 3 cropped, 7 cropped and masked), image format u8 (0x02 mono raw, 0x0A JPEG 2000, 0x0E PNG),
#     image properties u8 (bits 0-1 horizontal orientation, 2-3 vertical, 6-7 compression history:
#     1 lossless or none, 2 lossy), width u16, height u16, bit depth u8, range u16 (0 unassigned),
#     roll angle u16 and its uncertainty u16 (0xFFFF undefined), iris centre smallest X, largest X, smallest Y,
#     largest Y u16, iris diameter smallest, largest u16 (0: undefined), image data length u32, image data.

IIR_ID, IIR_VERSION = b"IIR\0", b"020\0"
IIR_HEADER = struct.Struct(">4s4sIHBB")  # 16 bytes
IIR_IMAGE = struct.Struct(">HBBBBHHBHHHHHHHHHI")  # representation number .. image data length: 33 bytes
IIR_MONO_RAW, IIR_JP2, IIR_PNG = 0x02, 0x0A, 0x0E
EYE_UNDEFINED, EYE_RIGHT, EYE_LEFT = 0, 1, 2
IIR_UNCROPPED, IIR_VGA, IIR_CROPPED, IIR_CROPPED_MASKED = 1, 2, 3, 7
ROLL_UNDEFINED = 0xFFFF


@dataclass(frozen=True)
class IrisImage:
    """One iris representation of an IIR record (defaults: the kit's 640x480 K_VGA frame, lossless)."""

    eye: int
    width: int
    height: int
    data: bytes
    image_format: int = IIR_JP2
    image_type: int = IIR_VGA
    properties: int = 0x45  # base orientation both ways, compression history lossless
    bit_depth: int = 8
    number: int = 1
    capture: dt.datetime | None = None
    quality: tuple[Quality, ...] = ()
    technology: int = 1  # CMOS/CCD
    vendor: int = 0
    device_type: int = 0
    range_cm: int = 0
    roll: int = ROLL_UNDEFINED
    roll_uncertainty: int = ROLL_UNDEFINED
    centre: tuple[int, int, int, int] = (0, 0, 0, 0)  # smallest X, largest X, smallest Y, largest Y
    diameter: tuple[int, int] = (0, 0)  # smallest, largest


def write_iir(irises: list[IrisImage]) -> bytes:
    """An ISO/IEC 19794-6:2011 record holding `irises` (no certification blocks)."""
    if not 1 <= len(irises) <= 0xFFFF:
        raise IsoRecordError("an IIR record holds 1 to 65535 representations")
    reps = []
    for i in irises:
        if i.eye not in (EYE_UNDEFINED, EYE_RIGHT, EYE_LEFT):
            raise IsoRecordError(f"eye label {i.eye} is not 0, 1 (right) or 2 (left)")
        if not (1 <= i.width <= 0xFFFF and 1 <= i.height <= 0xFFFF):
            raise IsoRecordError(f"image size {i.width}x{i.height} does not fit the record")
        body = (_datetime(i.capture) + DEVICE.pack(i.technology, i.vendor, i.device_type) + _quality(i.quality)
                + IIR_IMAGE.pack(i.number, i.eye, i.image_type, i.image_format, i.properties, i.width, i.height,
                                 i.bit_depth, i.range_cm, i.roll, i.roll_uncertainty, *i.centre, *i.diameter,
                                 len(i.data)))
        reps.append(struct.pack(">I", 4 + len(body) + len(i.data)) + body + i.data)
    total = IIR_HEADER.size + sum(len(r) for r in reps)
    head = IIR_HEADER.pack(IIR_ID, IIR_VERSION, total, len(irises), 0, len({i.eye for i in irises}))
    return head + b"".join(reps)


def read_iir(data: bytes) -> list[IrisImage]:
    """Parse an ISO/IEC 19794-6:2011 record strictly (every length checked); raises `IsoRecordError`."""
    r, head = _read_general(data, IIR_HEADER, IIR_ID, IIR_VERSION, "IIR")
    out = []
    for k in range(head[3]):
        start = r.pos
        (length,) = r.unpack(struct.Struct(">I"), f"representation {k} length")
        capture = _read_datetime(r)
        tech, vendor, dtype = r.unpack(DEVICE, "capture device")
        quality = _read_quality(r)
        (number, eye, itype, fmt, props, w, h, depth, rng, roll, rollu, cx0, cx1, cy0, cy1, d0, d1,
         n) = r.unpack(IIR_IMAGE, "image header")
        if eye not in (EYE_UNDEFINED, EYE_RIGHT, EYE_LEFT):
            raise IsoRecordError(f"IIR representation {k}: eye label {eye}")
        img = r.take(n, f"representation {k} image data")
        if r.pos - start != length:
            raise IsoRecordError(f"IIR representation {k}: length field says {length}, its fields take "
                                 f"{r.pos - start}")
        out.append(IrisImage(eye, w, h, img, fmt, itype, props, depth, number, capture, quality, tech, vendor,
                             dtype, rng, roll, rollu, (cx0, cx1, cy0, cy1), (d0, d1)))
    if r.pos != len(data):
        raise IsoRecordError(f"IIR: {len(data) - r.pos} bytes after the last representation")
    if head[5] != len({i.eye for i in out}):
        raise IsoRecordError(f"IIR: header counts {head[5]} eyes, the representations hold {len({i.eye for i in out})}")
    return out
