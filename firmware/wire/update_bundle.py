"""The software update bundle: one file, a signed manifest and the release's wheels (see docs/updates.md).

Layout (all integers big-endian)::

    offset  size  field
    0       8     magic  b"RKUPDATE"
    8       1     bundle format version (1)
    9       3     zero
    12      4     manifest length M (<= control_protocol.MAX_PAYLOAD)
    16      M     manifest: a control-protocol envelope of kind "release", signed with the fleet key
    16+M    ...   the artifacts, in manifest order, each exactly ``size`` bytes; nothing after the last

The manifest body (`check_manifest`)::

    {"format": 1, "version": "0.2.0", "min_from_version": "0.1.0", "created": 1764633600,
     "journal_schema": {"reads": [1, 2], "writes": 2, "compatible_from": 2},
     "record_format": {"reads": [1], "writes": 1},
     "artifacts": [{"name": "rekam-0.2.0-py3-none-any.whl", "sha256": "...", "size": 489398}, ...],
     "note": "..."}

The signature is the control plane's (`firmware.wire.control_protocol.sign`/`verify`: Ed25519 over the canonical
JSON, the kind inside the signed bytes, so a release manifest can never pass as a command or config document).
The artifacts are bound to it by their SHA-256 and size. Every read is bounded: header and manifest sizes, artifact
count, each artifact's and the whole file's size; the manifest is parsed by `firmware.wire.safejson`.
Errors are `firmware.errors.BundleError` with a one-word ``reason``.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from packaging.tags import Tag
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from firmware.errors import BundleError, ProtocolError
from firmware.wire import control_protocol as cp

MAGIC = b"RKUPDATE"
FORMAT = 1
HEADER = struct.Struct(">8sB3xI")  # magic, format, reserved, manifest length
KIND = "release"
SUFFIX = ".rkup"

MAX_MANIFEST = cp.MAX_PAYLOAD
MAX_ARTIFACTS = 256  # a full wheelhouse (rekam + numpy, OpenCV, FastAPI...) is about 40 wheels
MAX_ARTIFACT_BYTES = 192 * 1024 * 1024  # the largest wheel we ship (OpenCV, aarch64) is ~50 MiB
MAX_BUNDLE_BYTES = 768 * 1024 * 1024
MAX_NOTE = 2000
CHUNK = 1 << 20

#: A release version: 1 to 4 dot-separated decimal numbers (compared as tuples; no pre-release tags).
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){0,3}$")
#: An artifact is a wheel file name: no path, no leading dot.
WHEEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}\.whl$")
#: A bundle file in a stick's update folder (``rekam/updates/``, `firmware.wire.stick_layout.UPDATES`).
STICK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,120}\.rkup$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_KEYS = {"format", "version", "min_from_version", "created", "journal_schema", "record_format", "artifacts",
                 "note"}


def parse_version(text: Any) -> tuple[int, ...]:
    """``"0.2.0"`` -> ``(0, 2, 0)``; `BundleError` (malformed) for anything else."""
    if not isinstance(text, str) or not VERSION_RE.fullmatch(text):
        raise BundleError("malformed", f"version {str(text)[:40]!r} is not N[.N[.N[.N]]]")
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (4 - len(parts))


@dataclass(frozen=True)
class Artifact:
    """One wheel of the bundle, at `offset` in the file."""

    name: str
    sha256: str
    size: int
    offset: int


@dataclass(frozen=True)
class Manifest:
    """A verified manifest: its body and where each artifact lies in the bundle."""

    body: dict[str, Any]
    artifacts: tuple[Artifact, ...]
    envelope: bytes
    total_size: int

    @property
    def version(self) -> str:
        return str(self.body["version"])

    @property
    def min_from_version(self) -> str:
        return str(self.body["min_from_version"])

    @property
    def journal_schema(self) -> dict[str, Any]:
        return dict(self.body["journal_schema"])

    @property
    def record_format(self) -> dict[str, Any]:
        return dict(self.body["record_format"])


def _int_list(v: Any, what: str) -> list[int]:
    if not isinstance(v, list) or not v or len(v) > 32 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                  and 0 < x < 1000 for x in v):
        raise BundleError("malformed", f"{what} must be a list of 1-32 versions (1..999)")
    return list(v)


def _pos_int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 1000:
        raise BundleError("malformed", f"{what} must be a version number 1..999, got {str(v)[:40]!r}")
    return v


def check_manifest(body: Mapping[str, Any]) -> dict[str, Any]:
    """The shape of a manifest body (see module doc); `BundleError` (malformed) if it is not one."""
    extra = set(body) - MANIFEST_KEYS
    missing = MANIFEST_KEYS - {"note"} - set(body)
    if extra or missing:
        raise BundleError("malformed", f"manifest: unknown fields {sorted(extra)}, missing {sorted(missing)}")
    if body["format"] != FORMAT:
        raise BundleError("malformed", f"manifest format {str(body['format'])[:20]!r}; this kit reads {FORMAT}")
    parse_version(body["version"])
    parse_version(body["min_from_version"])
    if not isinstance(body["created"], int) or isinstance(body["created"], bool):
        raise BundleError("malformed", "manifest.created must be an integer (Unix time)")
    js, rf = body["journal_schema"], body["record_format"]
    if not isinstance(js, dict) or set(js) != {"reads", "writes", "compatible_from"}:
        raise BundleError("malformed", "manifest.journal_schema must have exactly reads, writes, compatible_from")
    reads = _int_list(js["reads"], "journal_schema.reads")
    writes = _pos_int(js["writes"], "journal_schema.writes")
    if writes not in reads or _pos_int(js["compatible_from"], "journal_schema.compatible_from") > writes:
        raise BundleError("malformed", "journal_schema: writes must be in reads and compatible_from <= writes")
    if not isinstance(rf, dict) or set(rf) != {"reads", "writes"}:
        raise BundleError("malformed", "manifest.record_format must have exactly reads, writes")
    if _pos_int(rf["writes"], "record_format.writes") not in _int_list(rf["reads"], "record_format.reads"):
        raise BundleError("malformed", "record_format: writes must be in reads")
    arts = body["artifacts"]
    if not isinstance(arts, list) or not 0 < len(arts) <= MAX_ARTIFACTS:
        raise BundleError("malformed", f"manifest.artifacts must list 1-{MAX_ARTIFACTS} wheels")
    names = set()
    for i, a in enumerate(arts):
        if not isinstance(a, dict) or set(a) != {"name", "sha256", "size"}:
            raise BundleError("malformed", f"artifacts[{i}] must have exactly name, sha256, size")
        if not isinstance(a["name"], str) or not WHEEL_RE.fullmatch(a["name"]) or ".." in a["name"]:
            raise BundleError("malformed", f"artifacts[{i}].name {str(a['name'])[:60]!r} is not a wheel file name")
        if a["name"] in names:
            raise BundleError("malformed", f"artifacts[{i}].name {a['name']!r} appears twice")
        names.add(a["name"])
        if not isinstance(a["sha256"], str) or not SHA256_RE.fullmatch(a["sha256"]):
            raise BundleError("malformed", f"artifacts[{i}].sha256 is not 64 lowercase hex digits")
        if not isinstance(a["size"], int) or isinstance(a["size"], bool) or not 0 < a["size"] <= MAX_ARTIFACT_BYTES:
            raise BundleError("too_large" if isinstance(a["size"], int) and a["size"] > 0 else "malformed",
                              f"artifacts[{i}].size must be 1..{MAX_ARTIFACT_BYTES}")
    if "note" in body and (not isinstance(body["note"], str) or len(body["note"]) > MAX_NOTE):
        raise BundleError("malformed", f"manifest.note must be a string of at most {MAX_NOTE} characters")
    return dict(body)


def manifest_body(version: str, min_from_version: str, artifacts: Iterable[Mapping[str, Any]],
                  journal_schema: Mapping[str, Any], record_format: Mapping[str, Any], note: str = "",
                  created: int | None = None) -> dict[str, Any]:
    """A checked manifest body for `write_bundle` (the fleet's `rekam-fleet release build`)."""
    body = {"format": FORMAT, "version": version, "min_from_version": min_from_version,
            "created": int(time.time()) if created is None else created, "journal_schema": dict(journal_schema),
            "record_format": dict(record_format), "artifacts": [dict(a) for a in artifacts]}
    if note:
        body["note"] = note
    return check_manifest(body)


def unfit_wheels(names: Iterable[str], supported: Iterable[Tag]) -> list[str]:
    """The wheel file names of `names` that pip would refuse on an interpreter supporting `supported` (its
    `packaging.tags`, e.g. ``sys_tags()``): none of the wheel's tags is among them, or the name is no wheel name."""
    ok = set(supported)
    bad = []
    for name in names:
        try:
            tags = parse_wheel_filename(name)[3]
        except InvalidWheelFilename:
            bad.append(name)
            continue
        if ok.isdisjoint(tags):
            bad.append(name)
    return bad


def describe_wheel(path: Path) -> dict[str, Any]:
    """``{"name", "sha256", "size"}`` of a wheel file (streamed)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"name": path.name, "sha256": h.hexdigest(), "size": size}


def write_bundle(out: Path, body: Mapping[str, Any], wheels: Mapping[str, Path],
                 key: Ed25519PrivateKey | None = None, envelope: bytes | None = None) -> None:
    """Write a bundle: `body`'s manifest signed with `key` (or a ready `envelope`), then each artifact's bytes
    from `wheels` (name -> file). Without a key the manifest carries an empty signature: an unsigned bundle
    (`rekam-fleet release build` without --sign) that every kit refuses until `release sign` signs it."""
    body = check_manifest(body)
    if envelope is None:
        if key is not None:
            envelope = cp.sign(KIND, body, key)
        else:
            envelope = cp.canonical({"v": cp.VERSION, "kind": KIND, "body": body, "sig": ""})
    if len(envelope) > MAX_MANIFEST:
        raise BundleError("too_large", f"manifest is {len(envelope)} bytes; the limit is {MAX_MANIFEST}")
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, FORMAT, len(envelope)))
        f.write(envelope)
        for a in body["artifacts"]:
            h, n = hashlib.sha256(), 0
            with open(wheels[a["name"]], "rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    f.write(chunk)
            if n != a["size"] or h.hexdigest() != a["sha256"]:
                raise BundleError("hash_mismatch", f"{a['name']} changed while the bundle was written")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def read_envelope(f: BinaryIO, file_size: int) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """Header and manifest of an open bundle, without checking the signature:
    (body, envelope bytes, signed bytes, signature). Bounded: reads at most 16 + `MAX_MANIFEST` bytes."""
    if file_size > MAX_BUNDLE_BYTES:
        raise BundleError("too_large", f"bundle is {file_size} bytes; the limit is {MAX_BUNDLE_BYTES}")
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise BundleError("malformed", "shorter than its header")
    magic, fmt, mlen = HEADER.unpack(head)
    if magic != MAGIC:
        raise BundleError("bad_magic", "not a rekam update bundle")
    if fmt != FORMAT:
        raise BundleError("malformed", f"bundle format {fmt}; this kit reads {FORMAT}")
    if mlen > MAX_MANIFEST or HEADER.size + mlen > file_size:
        raise BundleError("too_large" if mlen > MAX_MANIFEST else "malformed", f"manifest length {mlen}")
    envelope = f.read(mlen)
    if len(envelope) != mlen:
        raise BundleError("malformed", "manifest is truncated")
    try:
        body, signed, sig = cp.decode(envelope, KIND)
    except ProtocolError as e:
        raise BundleError(e.reason, str(e)) from None
    return body, envelope, signed, sig


def _layout(body: dict[str, Any], envelope: bytes, file_size: int) -> Manifest:
    offset = HEADER.size + len(envelope)
    arts = []
    for a in body["artifacts"]:
        arts.append(Artifact(a["name"], a["sha256"], a["size"], offset))
        offset += a["size"]
    if offset != file_size:
        raise BundleError("size_mismatch", f"the manifest accounts for {offset} bytes, the file has {file_size}")
    return Manifest(body, tuple(arts), envelope, file_size)


def open_manifest(f: BinaryIO, file_size: int, key: Ed25519PublicKey) -> Manifest:
    """Read, verify (signature with the fleet key `key`) and check the manifest of the bundle open as `f`.

    The artifacts themselves are checked as `extract` copies them; call both on the kit's own copy of a
    bundle, never on a file on a stick (it could change between the two).
    """
    body, envelope, signed, sig = read_envelope(f, file_size)
    try:
        body = cp.verify(envelope, KIND, key)
    except ProtocolError as e:
        raise BundleError(e.reason, str(e)) from None
    return _layout(check_manifest(body), envelope, file_size)


def unsigned_manifest(f: BinaryIO, file_size: int) -> Manifest:
    """The manifest of a bundle without checking its signature (for `rekam-fleet release sign`, which signs it)."""
    body, envelope, _signed, _sig = read_envelope(f, file_size)
    return _layout(check_manifest(body), envelope, file_size)


def extract(f: BinaryIO, manifest: Manifest, dest: Path) -> list[Path]:
    """Copy every artifact into `dest` (a folder of the kit's own), each checked against its signed size and
    SHA-256; returns the wheel paths. On a mismatch the partial file is removed and `BundleError` raised."""
    out = []
    for a in manifest.artifacts:
        f.seek(a.offset)
        path = dest / a.name
        h, left = hashlib.sha256(), a.size
        try:
            with open(path, "wb") as w:
                while left:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        raise BundleError("size_mismatch", f"{a.name}: the file ends {left} bytes early")
                    h.update(chunk)
                    w.write(chunk)
                    left -= len(chunk)
                w.flush()
                os.fsync(w.fileno())
            if h.hexdigest() != a.sha256:
                raise BundleError("hash_mismatch", f"{a.name}: SHA-256 differs from the signed manifest")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        out.append(path)
    return out
