"""The sealed record: byte layout, sealing on the kit, opening at the data center.

A record is encrypted before it touches any disk: a fresh ChaCha20-Poly1305 key per record,
wrapped to each data-center X25519 public key (ephemeral-static ECDH + HKDF-SHA256), and the
whole file is signed with the kit's Ed25519 key. The kit cannot decrypt its own records.
The layout is documented in docs/record-format.md; this module is the reference for it and is
the only kit module the fleet side (`provisioning`) imports besides the protocol.

    offset  size  field
    0       8     magic  b"REKAMREC"
    8       1     format version (1)
    9       1     flags (0)
    10      4     header length H, big-endian
    14      H     header: canonical JSON (UTF-8, sorted keys), no personal data
    14+H    C     ciphertext of the payload + 16-byte tag (AAD: bytes 0 .. 14+H)
    end-64  64    Ed25519 signature of SIG_CONTEXT + SHA-256(every byte before it)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firmware.errors import BadSignature, ProtocolError, RecordFormatError, TruncatedRecord, WrongKey
from firmware.wire import safejson

MAGIC = b"REKAMREC"
VERSION = 1
PREFIX = struct.Struct(">8sBBI")  # magic, version, flags, header length
SIG_LEN = 64
TAG_LEN = 16
MAX_HEADER = 64 * 1024
HEADER_DEPTH = 3  # the header object, its recipients list, one wrap object
PAYLOAD_MAGIC = b"RKPL"
WRAP_INFO = b"rekam/v1 key-wrap"
FILE_SUFFIX = ".rkm"
SIG_CONTEXT = b"rekam/v1 record\0"  # domain separation: this key signs other things too (telemetry, claims)


def b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def b64d(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, AttributeError) as e:
        raise RecordFormatError(f"header field {what} is not valid base64") from e


def key_id(public_raw: bytes) -> str:
    """Short identifier of a public key: first 8 bytes of its SHA-256, hex."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- keys ----------------------------------------------------------------------------------


def load_recipient_key(data: bytes) -> X25519PublicKey:
    """Parse a data-center X25519 public key from PEM, or 32 raw bytes (or their base64)."""
    data = data.strip()
    if data.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, X25519PublicKey):
            raise ValueError(f"PEM key is {type(key).__name__}, expected X25519")
        return key
    if len(data) != 32:
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError:
            raise ValueError("expected PEM, 32 raw bytes or base64 of them") from None
    if len(data) != 32:
        raise ValueError(f"expected 32 bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(data)


def load_datacenter_private_key(data: bytes) -> X25519PrivateKey:
    """Parse a data-center X25519 private key (PEM PKCS#8, or 32 raw bytes)."""
    data_s = data.strip()
    if data_s.startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(data_s, password=None)
        if not isinstance(key, X25519PrivateKey):
            raise ValueError(f"PEM key is {type(key).__name__}, expected X25519")
        return key
    if len(data) == 32:
        return X25519PrivateKey.from_private_bytes(data)
    raise ValueError("expected a PEM X25519 private key or 32 raw bytes")


def raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _kek(shared: bytes, epk: bytes, rpk: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + rpk, info=WRAP_INFO).derive(shared)


# --- payload container ----------------------------------------------------------------------


@dataclass
class Attachment:
    """One binary part of a record: an image, a template, a JSON document."""

    name: str
    content_type: str
    data: bytes


@dataclass
class Payload:
    """The plaintext of a record: a manifest (the enrollment's data) and its attachments."""

    manifest: dict[str, Any]
    attachments: list[Attachment] = field(default_factory=list)

    def encode(self) -> bytes:
        """Serialise: b"RKPL", u32 manifest length, manifest JSON, then the attachments' bytes."""
        manifest = dict(self.manifest)
        manifest["attachments"] = [
            {"name": a.name, "type": a.content_type, "size": len(a.data), "sha256": sha256_hex(a.data)}
            for a in self.attachments
        ]
        m = canonical_json(manifest)
        return b"".join([PAYLOAD_MAGIC, struct.pack(">I", len(m)), m, *(a.data for a in self.attachments)])

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        """Parse and check a payload (attachment sizes and hashes)."""
        if len(data) < 8 or data[:4] != PAYLOAD_MAGIC:
            raise RecordFormatError("payload: bad magic")
        (mlen,) = struct.unpack(">I", data[4:8])
        if 8 + mlen > len(data):
            raise TruncatedRecord("payload: manifest runs past the end")
        try:  # bounded: a payload is authenticated, but by a kit key that may have been stolen
            manifest = safejson.loads_object(data[8 : 8 + mlen], max_bytes=mlen, what="payload manifest")
        except ProtocolError as e:
            raise RecordFormatError(f"payload: {e}") from None
        pos = 8 + mlen
        atts = []
        listed = manifest.pop("attachments", [])
        if not isinstance(listed, list) or not all(_attachment_entry(a) for a in listed):
            raise RecordFormatError("payload: the manifest's attachments are not a list of "
                                    "{name, type, size, sha256} entries")
        for a in listed:
            part = data[pos : pos + a["size"]]
            if len(part) != a["size"]:
                raise TruncatedRecord(f"payload: attachment {a['name']!r} truncated")
            if sha256_hex(part) != a["sha256"]:
                raise RecordFormatError(f"payload: attachment {a['name']!r} hash mismatch")
            atts.append(Attachment(a["name"], a["type"], part))
            pos += a["size"]
        if pos != len(data):
            raise RecordFormatError("payload: trailing bytes after the attachments")
        return cls(manifest, atts)


def _attachment_entry(a: Any) -> bool:
    return (isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("type"), str)
            and _count(a.get("size")) and isinstance(a.get("sha256"), str))


def _count(v: Any) -> bool:
    """A JSON integer >= 0 (not a bool, not a float such as 1e400)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _quoted(v: str, limit: int = 80) -> str:
    """A header value in an error message: repr'd (no newline reaches a log line) and cut short."""
    return repr(v[:limit]) + ("..." if len(v) > limit else "")


# --- sealing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """The clear-text header of a sealed record (no personal data)."""

    record_id: str
    kit_id: str
    seq: int
    created: str
    clock_synced: bool
    kit_key: bytes
    recipients: list[dict[str, str]]
    nonce: bytes
    payload_len: int
    aead: str = "chacha20poly1305"

    def to_json(self) -> bytes:
        return canonical_json({
            "record_id": self.record_id, "kit_id": self.kit_id, "seq": self.seq, "created": self.created,
            "clock_synced": self.clock_synced, "kit_key": b64e(self.kit_key), "aead": self.aead,
            "recipients": self.recipients, "nonce": b64e(self.nonce), "payload_len": self.payload_len,
        })

    @classmethod
    def from_json(cls, raw: bytes) -> Header:
        # Read before the signature is checked: bounded in size and depth (a ``[[[[`` header must not end in
        # RecursionError) and every field of its exact JSON type (``1e400`` is no sequence number).
        try:
            h = safejson.loads_object(raw, max_bytes=MAX_HEADER, max_depth=HEADER_DEPTH, what="header")
        except ProtocolError as e:
            raise RecordFormatError(f"header is not valid: {e}") from None
        for name, ok in (("record_id", str), ("kit_id", str), ("created", str), ("aead", str),
                         ("kit_key", str), ("nonce", str), ("clock_synced", bool), ("recipients", list)):
            if not isinstance(h.get(name), ok):
                raise RecordFormatError(f"header is not valid: {name} is missing or not a {ok.__name__}")
        for name in ("seq", "payload_len"):
            if not _count(h.get(name)):
                raise RecordFormatError(f"header is not valid: {name} is missing or not an integer >= 0")
        if not all(isinstance(w, dict) and all(isinstance(v, str) for v in w.values()) for w in h["recipients"]):
            raise RecordFormatError("header is not valid: recipients must be objects of strings")
        try:
            hdr = cls(
                record_id=h["record_id"], kit_id=h["kit_id"], seq=h["seq"], created=h["created"],
                clock_synced=h["clock_synced"], kit_key=b64d(h["kit_key"], "kit_key"), recipients=h["recipients"],
                nonce=b64d(h["nonce"], "nonce"), payload_len=h["payload_len"], aead=h["aead"],
            )
        except ValueError as e:
            raise RecordFormatError(f"header is not valid: {e}") from None
        if hdr.aead != "chacha20poly1305":
            raise RecordFormatError(f"header: unsupported AEAD {hdr.aead!r}")
        if len(hdr.kit_key) != 32 or len(hdr.nonce) != 12:
            raise RecordFormatError("header: kit_key must be 32 bytes and nonce 12 bytes")
        return hdr


@dataclass(frozen=True)
class SealKeys:
    """The per-record key material that depends on nothing of the record: a fresh DEK and, per recipient,
    an ephemeral X25519 key's public half and the KEK it agrees with that recipient.

    Prepared ahead (`prepare_keys`, e.g. in a background thread while the previous record is written) so a
    commit pays only the AEAD of its payload, one SHA-256 and the signature. The record is bound late: the
    wrap of the DEK under each KEK (AAD = the record id) is made in `seal_with_digest`. Use each at most once
    (the KEK's fixed wrap nonce is safe only because a KEK wraps one DEK); nothing here is written anywhere.
    """

    dek: bytes
    wraps: tuple[tuple[str, str, bytes], ...]  # per recipient: (kid, base64 of the ephemeral public key, KEK)


def prepare_keys(recipients: list[X25519PublicKey]) -> SealKeys:
    """Fresh key material for one record to `recipients` (see `SealKeys`)."""
    if not recipients:
        raise ValueError("at least one data-center public key is needed to seal a record")
    wraps = []
    for rpk in recipients:
        eph = X25519PrivateKey.generate()
        epk, rpk_raw = raw_public(eph.public_key()), raw_public(rpk)
        wraps.append((key_id(rpk_raw), b64e(epk), _kek(eph.exchange(rpk), epk, rpk_raw)))
    return SealKeys(ChaCha20Poly1305.generate_key(), tuple(wraps))


def seal(payload: bytes, *, record_id: str, kit_id: str, seq: int, created: str, clock_synced: bool,
         signing_key: Ed25519PrivateKey, recipients: list[X25519PublicKey]) -> bytes:
    """Encrypt `payload` to every recipient and sign the result with the kit key."""
    return bytes(seal_with_digest(payload, record_id=record_id, kit_id=kit_id, seq=seq, created=created,
                                  clock_synced=clock_synced, signing_key=signing_key, recipients=recipients)[0])


def seal_with_digest(payload: bytes, *, record_id: str, kit_id: str, seq: int, created: str, clock_synced: bool,
                     signing_key: Ed25519PrivateKey, recipients: list[X25519PublicKey],
                     keys: SealKeys | None = None, kit_key: bytes | None = None) -> tuple[bytearray, str]:
    """`seal` into one buffer, also returning the record hash (SHA-256 of the whole file, hex) without a
    second pass. `keys` (from `prepare_keys(recipients)`, used once) saves the key agreement; `kit_key`
    (the raw public key of `signing_key`) saves deriving it. `seal_body` then `sign_body`."""
    out, end = seal_body(payload, record_id=record_id, kit_id=kit_id, seq=seq, created=created,
                         clock_synced=clock_synced, recipients=recipients, keys=keys,
                         kit_key=kit_key or raw_public(signing_key.public_key()))
    return out, sign_body(out, end, signing_key)


def seal_body(payload: bytes, *, record_id: str, kit_id: str, seq: int, created: str, clock_synced: bool,
              recipients: list[X25519PublicKey], kit_key: bytes, keys: SealKeys | None = None) -> tuple[bytearray, int]:
    """The first step of `seal_with_digest`: a buffer of the file's final size holding everything but the
    signature (prefix, header, ciphertext and tag), and the length of that body (the signature's offset).

    The second step, `sign_body`, needs only the body: a caller may already write the body out (not yet
    durably, not yet under its final name) while the signature is computed (the store's commit does).
    """
    if keys is None:
        keys = prepare_keys(recipients)
    aad = record_id.encode()
    # The late binding: the wrap's AAD is the record id, so it is made here (a 32-byte AEAD per recipient).
    wraps = [{"kid": kid, "epk": epk, "wrapped": b64e(ChaCha20Poly1305(kek).encrypt(b"\0" * 12, keys.dek, aad))}
             for kid, epk, kek in keys.wraps]
    nonce = os.urandom(12)
    hdr = Header(record_id, kit_id, seq, created, clock_synced, kit_key, wraps, nonce, len(payload))
    hj = hdr.to_json()
    start = PREFIX.size + len(hj)
    end = start + len(payload) + TAG_LEN
    # One buffer of the file's final size: the AEAD writes its output in place and the signature goes at
    # the end (no join, no second 400 KB copy).
    out = bytearray(end + SIG_LEN)
    PREFIX.pack_into(out, 0, MAGIC, VERSION, 0, len(hj))
    out[PREFIX.size:start] = hj
    with memoryview(out) as view:
        ChaCha20Poly1305(keys.dek).encrypt_into(nonce, payload, view[:start], view[start:end])
    return out, end


def sign_body(out: bytearray, end: int, signing_key: Ed25519PrivateKey) -> str:
    """The second step of `seal_with_digest`: sign `out[:end]` (SIG_CONTEXT + its SHA-256), write the signature
    into `out[end:]` (the last SIG_LEN bytes) and return the SHA-256 of the whole file, hex, without a second
    pass over the body. Safe to run while other threads read `out[:end]` (it only writes the tail)."""
    with memoryview(out) as view:
        h = hashlib.sha256(view[:end])  # through a view: no copy of the body
    sig = signing_key.sign(SIG_CONTEXT + h.digest())
    out[end:] = sig
    h.update(sig)
    return h.hexdigest()


def _signed_message(body: bytes) -> bytes:
    # Signing the SHA-256 of the body (not the body) halves the hashing cost of a 400 KB record.
    return SIG_CONTEXT + hashlib.sha256(body).digest()


@dataclass(frozen=True)
class Parsed:
    """A sealed record split into its parts (signature already verified)."""

    header: Header
    prefix: bytes
    ciphertext: bytes


def parse(data: bytes, trusted_kit_key: bytes | None = None) -> Parsed:
    """Check the layout and the kit signature; return the header. No key is needed.

    `trusted_kit_key` (raw Ed25519 public key) pins the signer; without it the key embedded in
    the header is used, which proves integrity but not origin.
    """
    if len(data) < PREFIX.size:
        raise TruncatedRecord(f"file is {len(data)} bytes, shorter than the {PREFIX.size}-byte prefix")
    magic, version, _flags, hlen = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise RecordFormatError("not a rekam record (bad magic)")
    if version != VERSION:
        raise RecordFormatError(f"unsupported record format version {version} (this build reads {VERSION})")
    if hlen > MAX_HEADER:
        raise RecordFormatError(f"header length {hlen} exceeds {MAX_HEADER}")
    end_hdr = PREFIX.size + hlen
    if len(data) < end_hdr + TAG_LEN + SIG_LEN:
        raise TruncatedRecord(f"file is {len(data)} bytes, too short for its {hlen}-byte header")
    hdr = Header.from_json(data[PREFIX.size:end_hdr])
    expected = end_hdr + hdr.payload_len + TAG_LEN + SIG_LEN
    if len(data) < expected:
        raise TruncatedRecord(f"file is {len(data)} bytes, its header says {expected}")
    if len(data) > expected:
        raise RecordFormatError(f"file is {len(data)} bytes, its header says {expected} (trailing data)")
    signer = trusted_kit_key if trusted_kit_key is not None else hdr.kit_key
    if trusted_kit_key is not None and trusted_kit_key != hdr.kit_key:
        raise BadSignature(f"record {_quoted(hdr.record_id)} is signed by key {key_id(hdr.kit_key)}, "
                           f"not the kit's registered key {key_id(trusted_kit_key)}")
    try:
        Ed25519PublicKey.from_public_bytes(signer).verify(data[-SIG_LEN:], _signed_message(data[:-SIG_LEN]))
    except InvalidSignature:
        raise BadSignature(f"record {_quoted(hdr.record_id)}: signature does not verify (file altered)") from None
    return Parsed(hdr, data[:end_hdr], data[end_hdr:-SIG_LEN])


def open_record(data: bytes, dc_key: X25519PrivateKey, trusted_kit_key: bytes | None = None) -> tuple[Header, bytes]:
    """Verify and decrypt a sealed record with a data-center private key (fleet side)."""
    p = parse(data, trusted_kit_key)
    my_raw = raw_public(dc_key.public_key())
    kid = key_id(my_raw)
    wrap = next((w for w in p.header.recipients if w.get("kid") == kid), None)
    if wrap is None:
        kids = ", ".join(w.get("kid", "?") for w in p.header.recipients)
        raise WrongKey(f"record {p.header.record_id} is sealed to key(s) {kids}, not to {kid}")
    epk = b64d(wrap["epk"], "epk")
    try:
        kek = _kek(dc_key.exchange(X25519PublicKey.from_public_bytes(epk)), epk, my_raw)
        dek = ChaCha20Poly1305(kek).decrypt(b"\0" * 12, b64d(wrap["wrapped"], "wrapped"),
                                            p.header.record_id.encode())
        plain = ChaCha20Poly1305(dek).decrypt(p.header.nonce, p.ciphertext, p.prefix)
    except (InvalidTag, ValueError) as e:
        raise WrongKey(f"record {p.header.record_id}: the key does not open it ({type(e).__name__})") from None
    return p.header, plain


def generate_datacenter_keypair() -> tuple[bytes, bytes]:
    """A new data-center X25519 key pair as (private PEM, public PEM)."""
    sk = X25519PrivateKey.generate()
    priv = sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = sk.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub
