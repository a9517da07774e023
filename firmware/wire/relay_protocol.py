"""The record relay's wire protocol, shared by the kit (`firmware.relay`) and the data center
(`provisioning.ingest`): topics under ``rekam/v1/``, the announce / chunk / ack messages, limits.

Everything here is pure (no I/O, no paho) so both sides encode and validate the same way.
docs/protocol.md is the prose version of this module.

    rekam/v1/<kit>/records/announce   kit -> dc   JSON: one per transfer of a record
    rekam/v1/<kit>/records/chunk      kit -> dc   binary: b"RKC1" | u16 header length | JSON header | data
    rekam/v1/<kit>/acks               dc -> kit   JSON, v2: stored / duplicate / rejected / retry, signed by a
                                                  data-center ack key (Ed25519) over record id + hash + status
    rekam/v1/<kit>/telemetry/relay    kit -> dc   JSON: uplink state and backlog

All QoS 1, never retained, no Message Expiry (a record must never expire in a queue), no topic aliases.
Every JSON document is parsed with `firmware.wire.safejson` (size and depth bounded).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.errors import ProtocolError
from firmware.wire import safejson
from firmware.wire.ids import is_kit_id, is_record_id

PREFIX = "rekam/v1"
VERSION = 1  # announce and chunk header
ACK_VERSION = 2  # v2: signed by a data-center ack key (v1 acks were unsigned and are refused)
ACK_SIG_CONTEXT = b"rekam/v1 ack\0"  # domain separation from every other Ed25519 signature
MAX_JSON_BYTES = 4096  # an announce or an ack is ~300 bytes
CHUNK_MAGIC = b"RKC1"
_HLEN = struct.Struct(">H")

DEFAULT_CHUNK_BYTES = 128 * 1024
MIN_CHUNK_BYTES = 4 * 1024
MAX_CHUNKS = 65_535
MAX_RECORD_BYTES = 512 * 1024 * 1024  # the store's max_record_mb ceiling
MAX_CHUNK_HEADER = 1024
# Room kept in an MQTT packet for the fixed header, topic and properties around a chunk's data.
PACKET_OVERHEAD = 512 + MAX_CHUNK_HEADER

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# Ack statuses. stored/duplicate: the data center holds the record durably (the kit may mark it acked).
# rejected: the record itself is malformed (bad signature, bad layout); the kit quarantines it.
# retry: a transient problem at the data center (unknown kit, full disk, inconsistent chunks); resend later.
ACK_OK = ("stored", "duplicate")
ACK_STATUSES = ("stored", "duplicate", "rejected", "retry")


# --- topics -------------------------------------------------------------------------------


def announce_topic(kit_id: str) -> str:
    return f"{PREFIX}/{kit_id}/records/announce"


def chunk_topic(kit_id: str) -> str:
    return f"{PREFIX}/{kit_id}/records/chunk"


def ack_topic(kit_id: str) -> str:
    return f"{PREFIX}/{kit_id}/acks"


def relay_telemetry_topic(kit_id: str) -> str:
    """Relay telemetry; a sub-topic so it never mixes with the control plane's signed telemetry."""
    return f"{PREFIX}/{kit_id}/telemetry/relay"


RECORDS_FILTER = f"{PREFIX}/+/records/+"


def shared_records_filter(group: str) -> str:
    """MQTT v5 shared subscription: each message goes to one ingest worker of `group`."""
    if not group or any(c in group for c in "/+#"):
        raise ProtocolError(f"share group {group!r} must be non-empty and contain no / + #")
    return f"$share/{group}/{RECORDS_FILTER}"


def parse_records_topic(topic: str) -> tuple[str, str]:
    """``rekam/v1/<kit>/records/<kind>`` -> (kit_id, kind); ProtocolError for anything else."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[3] != "records" or parts[4] not in (
            "announce", "chunk"):
        raise ProtocolError(f"not a records topic: {topic!r}")
    if not is_kit_id(parts[2]):
        raise ProtocolError(f"bad kit id in topic: {parts[2]!r}")
    return parts[2], parts[4]


# --- messages -----------------------------------------------------------------------------


def _need(d: dict[str, Any], key: str, typ: type, what: str) -> Any:
    v = d.get(key)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
        raise ProtocolError(f"{what}: field {key!r} missing or not {typ.__name__}")
    return v


def _check_common(d: dict[str, Any], what: str) -> None:
    if not is_record_id(_need(d, "record_id", str, what)):
        raise ProtocolError(f"{what}: bad record_id {d['record_id']!r}")
    if not SHA256_RE.fullmatch(_need(d, "sha256", str, what)):
        raise ProtocolError(f"{what}: sha256 must be 64 lowercase hex digits")


@dataclass(frozen=True)
class Announce:
    """Start of one transfer of a record: what is coming and how it is cut."""

    record_id: str
    seq: int
    size: int
    sha256: str
    chunks: int
    chunk_size: int

    def encode(self) -> bytes:
        return json.dumps({"v": VERSION, "record_id": self.record_id, "seq": self.seq, "size": self.size,
                           "sha256": self.sha256, "chunks": self.chunks, "chunk_size": self.chunk_size},
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Announce:
        d = _json(data, "announce")
        _check_common(d, "announce")
        a = cls(d["record_id"], _need(d, "seq", int, "announce"), _need(d, "size", int, "announce"),
                d["sha256"], _need(d, "chunks", int, "announce"), _need(d, "chunk_size", int, "announce"))
        _check_geometry(a.size, a.chunks, a.chunk_size, "announce")
        return a


def _check_geometry(size: int, chunks: int, chunk_size: int, what: str) -> None:
    if not 0 < size <= MAX_RECORD_BYTES:
        raise ProtocolError(f"{what}: size {size} outside 1..{MAX_RECORD_BYTES}")
    if not 0 < chunk_size <= MAX_RECORD_BYTES:
        raise ProtocolError(f"{what}: chunk_size {chunk_size} invalid")
    if not 0 < chunks <= MAX_CHUNKS or chunks != -(-size // chunk_size):
        raise ProtocolError(f"{what}: {chunks} chunks does not fit size {size} / chunk_size {chunk_size}")


@dataclass(frozen=True)
class Chunk:
    """One slice of a record; self-describing so any ingest worker can stage it."""

    record_id: str
    sha256: str  # of the whole record
    size: int  # of the whole record
    index: int
    total: int
    chunk_size: int  # nominal size of every chunk but the last
    data: bytes | memoryview  # a view into the record on the sending side (no copy until encode)

    @property
    def offset(self) -> int:
        return self.index * self.chunk_size

    def encode(self) -> bytes:
        hdr = json.dumps({"r": self.record_id, "h": self.sha256, "s": self.size, "i": self.index,
                          "n": self.total, "c": self.chunk_size}, sort_keys=True).encode()
        return b"".join((CHUNK_MAGIC, _HLEN.pack(len(hdr)), hdr, self.data))  # one copy of the data

    @classmethod
    def decode(cls, data: bytes) -> Chunk:
        if len(data) < 6 or data[:4] != CHUNK_MAGIC:
            raise ProtocolError("chunk: bad magic (expected RKC1)")
        (hlen,) = _HLEN.unpack_from(data, 4)
        if hlen > MAX_CHUNK_HEADER or 6 + hlen > len(data):
            raise ProtocolError(f"chunk: header length {hlen} invalid for a {len(data)}-byte message")
        h = _json(data[6:6 + hlen], "chunk header")
        d = {"record_id": h.get("r"), "sha256": h.get("h")}
        _check_common(d, "chunk")
        size, idx, total, csize = (_need(h, k, int, "chunk") for k in ("s", "i", "n", "c"))
        _check_geometry(size, total, csize, "chunk")
        if not 0 <= idx < total:
            raise ProtocolError(f"chunk: index {idx} outside 0..{total - 1}")
        body = data[6 + hlen:]
        want = csize if idx < total - 1 else size - csize * (total - 1)
        if len(body) != want:
            raise ProtocolError(f"chunk {idx}/{total} of {d['record_id']}: {len(body)} bytes, expected {want}")
        return cls(d["record_id"], d["sha256"], size, idx, total, csize, bytes(body))


def split(record_id: str, data: bytes, sha256: str, chunk_size: int) -> list[Chunk]:
    """Cut a sealed record into chunks of `chunk_size` bytes (the last one shorter)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    total = max(1, -(-len(data) // chunk_size))
    view = memoryview(data)
    return [Chunk(record_id, sha256, len(data), i, total, chunk_size, view[i * chunk_size:(i + 1) * chunk_size])
            for i in range(total)]


def chunk_data_limit(configured: int, broker_max_packet: int | None, topic: str) -> int:
    """Largest chunk data size allowed by the config and the broker's Maximum Packet Size."""
    limit = configured
    if broker_max_packet:
        limit = min(limit, broker_max_packet - PACKET_OVERHEAD - len(topic.encode()))
    return max(MIN_CHUNK_BYTES, limit)


def ack_key_id(public_raw: bytes) -> str:
    """Short identifier of an ack key: the first 8 bytes of its SHA-256, hex (as `record_format.key_id`)."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def load_ack_public_key(text: str) -> bytes:
    """A data-center ack public key (base64 of the 32 raw Ed25519 bytes) -> raw bytes; ValueError if not one."""
    try:
        raw = base64.b64decode(str(text).strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("ack public key is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"ack public key must be 32 bytes (Ed25519), got {len(raw)}")
    Ed25519PublicKey.from_public_bytes(raw)
    return raw


def ack_public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The base64 public half of an ack key (what `relay.ack_public_keys` lists)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


@dataclass(frozen=True)
class Ack:
    """The data center's answer for one record (sent only after the record is committed, for stored).

    On the wire (v2) it is signed by a data-center ack key over ``ACK_SIG_CONTEXT`` + the canonical JSON
    of (v, record_id, sha256, status, reason); `kid` names the key, `sig` is the signature. A decoded ack
    proves nothing until `verify()` says which trusted key signed it.
    """

    record_id: str
    sha256: str
    status: str
    reason: str = ""
    kid: str = ""
    sig: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status in ACK_OK

    def _signed(self) -> bytes:
        return ACK_SIG_CONTEXT + json.dumps(
            {"v": ACK_VERSION, "record_id": self.record_id, "sha256": self.sha256, "status": self.status,
             "reason": self.reason}, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def encode(self, key: Ed25519PrivateKey) -> bytes:
        """The signed ack, signed with the data center's ack key `key`."""
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        sig = key.sign(self._signed())
        return json.dumps({"v": ACK_VERSION, "record_id": self.record_id, "sha256": self.sha256,
                           "status": self.status, "reason": self.reason, "kid": ack_key_id(raw),
                           "sig": base64.b64encode(sig).decode()}, sort_keys=True).encode()

    def encode_unsigned_v1(self) -> bytes:
        """The old unsigned v1 ack, only for kits not yet upgraded during a rollout (``--legacy-unsigned-acks``);
        this build's kits refuse it."""
        return json.dumps({"v": 1, "record_id": self.record_id, "sha256": self.sha256, "status": self.status,
                           "reason": self.reason}, sort_keys=True).encode()

    def verify(self, keys: Iterable[bytes]) -> bool:
        """True if one of `keys` (raw Ed25519 public keys) signed this ack."""
        for raw in keys:
            try:
                Ed25519PublicKey.from_public_bytes(raw).verify(self.sig, self._signed())
                return True
            except (InvalidSignature, ValueError):
                continue
        return False

    @classmethod
    def decode(cls, data: bytes) -> Ack:
        """Parse (bounded) and check the fields of an ack; the signature is checked by `verify()`."""
        d = safejson.loads_object(data, max_bytes=MAX_JSON_BYTES, max_depth=2, what="ack")
        if d.get("v") != ACK_VERSION:
            raise ProtocolError("bad_version", f"ack: protocol version {d.get('v')!r}, this build speaks "
                                f"{ACK_VERSION} (signed acks)")
        _check_common(d, "ack")
        status = _need(d, "status", str, "ack")
        if status not in ACK_STATUSES:
            raise ProtocolError(f"ack: unknown status {status!r} (known: {', '.join(ACK_STATUSES)})")
        reason = d.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 500:
            raise ProtocolError("ack: reason must be a string of at most 500 characters")
        kid, sig = d.get("kid"), d.get("sig")
        if not isinstance(kid, str) or not isinstance(sig, str):
            raise ProtocolError("unsigned", "ack: no kid/sig (unsigned ack)")
        try:
            raw_sig = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("unsigned", "ack: sig is not base64") from None
        return cls(d["record_id"], d["sha256"], status, reason, kid[:32], raw_sig)


def _json(data: bytes, what: str) -> dict[str, Any]:
    d = safejson.loads_object(data, max_bytes=MAX_JSON_BYTES, max_depth=2, what=what)
    if d.get("v", VERSION) != VERSION:
        raise ProtocolError(f"{what}: protocol version {d.get('v')!r}, this build speaks {VERSION}")
    return d


# --- broker URLs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""

    url: str
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerURL:
    """Parse and check a broker URL; ValueError names what is wrong."""
    m = re.match(r"^(mqtts?)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?/?$", url or "")
    if not m:
        raise ValueError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    tls = m.group(1) == "mqtts"
    port = int(m.group(3)) if m.group(3) else (8883 if tls else 1883)
    if not 0 < port < 65536:
        raise ValueError(f"broker URL {url!r}: port {port} out of range")
    return BrokerURL(url, m.group(2).strip("[]"), port, tls)
