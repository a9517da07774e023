"""Control-plane wire format shared by the kit (`firmware.control`: plane, claim) and the fleet
(`provisioning.registry`, `provisioning.fleet_service`): topic names under ``rekam/v1/``, the signed
envelope, and the shape of each message body (claim, config document, command, result, telemetry, state).

Every control message is one JSON object, at most `MAX_PAYLOAD` bytes::

    {"v": 1, "kind": "config", "body": {...}, "sig": "<base64 Ed25519 signature>"}

The signature covers the canonical JSON (sorted keys, no spaces, UTF-8) of
``{"v": 1, "kind": ..., "body": ...}``; the kind is inside the signed bytes, so a signed command
can never be replayed as a config document or the other way round. Fleet -> kit messages are
signed with the fleet key (pinned on the kit at claim time); kit -> fleet messages with the kit
key (registered at claim time). This module imports nothing from the rest of the firmware.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.errors import ProtocolError
from firmware.wire import safejson
from firmware.wire.ids import is_kit_id

VERSION = 1
PREFIX = "rekam/v1"
MAX_PAYLOAD = 64 * 1024  # control messages are small; anything bigger is refused unparsed
MAX_DEPTH = 16  # envelope, body, sections, operator tables: a few levels; anything deeper is refused unparsed
CLAIM_USER_RE = re.compile(r"^claim-[A-Za-z0-9._-]{1,48}$")
CMD_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

KINDS = ("claim", "claim_response", "config", "config_state", "cmd", "result", "telemetry", "status", "release")
COMMANDS = ("status", "sync", "set_operators", "lock", "unlock", "purge", "rotate_key", "export_usb", "reboot",
            "update")
CLAIM_STATUSES = ("approved", "pending", "rejected")
CONFIG_STATES = ("applied", "pending_restart", "rejected", "rolled_back")


# --- topics -----------------------------------------------------------------------------


def claim_request_topic(claim_user: str, kit_id: str) -> str:
    """Where a kit holding the claim certificate `claim_user` asks to join (client id = kit id)."""
    return f"{PREFIX}/claim/{claim_user}/{kit_id}/request"


def claim_response_topic(claim_user: str, kit_id: str) -> str:
    return f"{PREFIX}/claim/{claim_user}/{kit_id}/response"


CLAIM_REQUEST_FILTER = f"{PREFIX}/claim/+/+/request"


def config_topic(kit_id: str) -> str:
    """Retained, fleet -> kit: the kit's current signed config document."""
    return f"{PREFIX}/{kit_id}/config"


def config_state_topic(kit_id: str) -> str:
    """Retained, kit -> fleet: the config version the kit runs and what happened to the last one."""
    return f"{PREFIX}/{kit_id}/config/applied"


def cmd_topic(kit_id: str) -> str:
    """Fleet -> kit: signed commands (only the fleet identity may publish here)."""
    return f"{PREFIX}/{kit_id}/cmd"


def result_topic(kit_id: str) -> str:
    """Kit -> fleet: command results (the MQTT v5 Response Topic the fleet names)."""
    return f"{PREFIX}/{kit_id}/result"


def telemetry_topic(kit_id: str) -> str:
    return f"{PREFIX}/{kit_id}/telemetry"


def status_topic(kit_id: str) -> str:
    """Retained online/offline status; `offline` is the Last Will."""
    return f"{PREFIX}/{kit_id}/status"


# What the fleet service subscribes to. Claims, results and telemetry go to one member of the services' shared
# subscription group (several `rekam-fleet serve` split them, any one of them may stop); the kits' retained state
# (config state, online status) goes to every service: a shared subscription gets no retained messages, and a
# service that starts must learn every kit's current state.
FLEET_SHARED_FILTERS = (CLAIM_REQUEST_FILTER, f"{PREFIX}/+/result", f"{PREFIX}/+/telemetry")
FLEET_STATE_FILTERS = (f"{PREFIX}/+/config/applied", f"{PREFIX}/+/status")
FLEET_FILTERS = FLEET_SHARED_FILTERS + FLEET_STATE_FILTERS


def fleet_service_filters(group: str | None) -> tuple[str, ...]:
    """The fleet service's subscriptions: `FLEET_SHARED_FILTERS` in shared-subscription `group` (``$share/<group>/``;
    None: plain, every service gets every message) and `FLEET_STATE_FILTERS` plain."""
    shared = FLEET_SHARED_FILTERS if group is None else tuple(f"$share/{group}/{f}" for f in FLEET_SHARED_FILTERS)
    return shared + FLEET_STATE_FILTERS


def parse_kit_topic(topic: str) -> tuple[str, str] | None:
    """``rekam/v1/<kit>/<rest>`` -> (kit_id, rest), or None for any other topic."""
    parts = topic.split("/", 3)
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != PREFIX or not is_kit_id(parts[2]):
        return None
    return parts[2], parts[3]


def parse_claim_topic(topic: str) -> tuple[str, str] | None:
    """``rekam/v1/claim/<claim_user>/<kit>/request`` -> (claim_user, kit_id), or None."""
    parts = topic.split("/")
    if (len(parts) != 6 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "claim" or parts[5] != "request"
            or not CLAIM_USER_RE.fullmatch(parts[3]) or not is_kit_id(parts[4])):
        return None
    return parts[3], parts[4]


# --- keys ---------------------------------------------------------------------------------


def public_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    return base64.b64encode(public_raw(key)).decode()


def load_public_b64(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its base64 raw form; `ProtocolError` if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, AttributeError, TypeError) as e:
        raise ProtocolError("bad_key", f"not a base64 Ed25519 public key ({e})") from None


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey | str) -> str:
    """Short printable id of a public key (first 16 hex digits of SHA-256 of the raw key)."""
    import hashlib

    raw = base64.b64decode(key) if isinstance(key, str) else public_raw(key)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- envelope -----------------------------------------------------------------------------


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: the exact bytes a signature covers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign(kind: str, body: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Encode and sign one control message; returns the MQTT payload."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}")
    signed = {"v": VERSION, "kind": kind, "body": dict(body)}
    sig = base64.b64encode(key.sign(canonical(signed))).decode()
    data = canonical({**signed, "sig": sig})
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"{kind} message is {len(data)} bytes; the limit is {MAX_PAYLOAD}")
    return data


def decode(data: bytes, kind: str) -> tuple[dict[str, Any], bytes, bytes]:
    """Parse an envelope of `kind` without checking the signature: (body, signed bytes, signature).

    Raises `ProtocolError` (too_large, not_json, malformed, wrong_kind, bad_version).
    """
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError("malformed", "payload is not bytes")
    # Size, depth (a deeply nested body would otherwise recurse in json and in canonical()) and no NaN.
    obj = safejson.loads(data, max_bytes=MAX_PAYLOAD, max_depth=MAX_DEPTH, what=f"{kind} message")
    if not isinstance(obj, dict) or set(obj) != {"v", "kind", "body", "sig"}:
        raise ProtocolError("malformed", "expected an object with exactly v, kind, body, sig")
    if obj["v"] != VERSION:
        raise ProtocolError("bad_version", f"envelope version {obj['v']!r}; this kit speaks {VERSION}")
    if obj["kind"] != kind:
        raise ProtocolError("wrong_kind", f"got {obj['kind']!r}, expected {kind!r}")
    if not isinstance(obj["body"], dict) or not isinstance(obj["sig"], str):
        raise ProtocolError("malformed", "body must be an object and sig a string")
    try:
        sig = base64.b64decode(obj["sig"], validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("malformed", "sig is not base64") from None
    try:
        signed = canonical({"v": obj["v"], "kind": obj["kind"], "body": obj["body"]})
    except ValueError as e:  # e.g. 1e999: json.loads makes it inf, which has no canonical form
        raise ProtocolError("not_json", str(e)[:120]) from None
    return obj["body"], signed, sig


def verify(data: bytes, kind: str, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Parse and verify an envelope of `kind` signed by `public_key`; returns its body."""
    body, signed, sig = decode(data, kind)
    try:
        public_key.verify(sig, signed)
    except InvalidSignature:
        raise ProtocolError("bad_signature", f"{kind} not signed by key {key_fingerprint(public_key)}") from None
    return body


# --- body checks --------------------------------------------------------------------------


def _need(body: Mapping[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    v = body.get(key)
    if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, (int, float))):
        raise ProtocolError("malformed", f"{what}.{key} must be {getattr(typ, '__name__', typ)}, got {v!r}"[:200])
    return v


def check_config_doc(body: Mapping[str, Any]) -> dict[str, Any]:
    """Shape of a config document body: kit_id, version, issued_at, sections (section -> key -> value)."""
    kit = _need(body, "kit_id", str, "config")
    if kit != "*" and not is_kit_id(kit):
        raise ProtocolError("malformed", f"config.kit_id {kit!r} is neither a kit id nor '*'")
    version = _need(body, "version", int, "config")
    if version < 1:
        raise ProtocolError("malformed", f"config.version must be >= 1, got {version}")
    _need(body, "issued_at", int, "config")
    sections = _need(body, "sections", dict, "config")
    for name, keys in sections.items():
        if not isinstance(keys, dict):
            raise ProtocolError("malformed", f"config.sections.{name} must be a table")
    files = body.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ProtocolError("malformed", "config.files must be a table of file name = text")
    extra = set(body) - {"kit_id", "version", "issued_at", "sections", "note", "files"}
    if extra:
        raise ProtocolError("malformed", f"config has unknown fields {sorted(extra)}")
    return dict(body)


def check_command(body: Mapping[str, Any]) -> dict[str, Any]:
    """Shape of a command body: cmd_id, kit_id, name, args, issued_at, expires_at."""
    cmd_id = _need(body, "cmd_id", str, "cmd")
    if not CMD_ID_RE.fullmatch(cmd_id):
        raise ProtocolError("malformed", "cmd.cmd_id must be 8-64 letters, digits, _ or -")
    kit = _need(body, "kit_id", str, "cmd")
    if not is_kit_id(kit):
        raise ProtocolError("malformed", f"cmd.kit_id {kit!r} is not a kit id")
    name = _need(body, "name", str, "cmd")
    if name not in COMMANDS:
        raise ProtocolError("unknown_command", f"{name!r} (known: {', '.join(COMMANDS)})")
    _need(body, "args", dict, "cmd")
    issued, expires = _need(body, "issued_at", int, "cmd"), _need(body, "expires_at", int, "cmd")
    if expires <= issued:
        raise ProtocolError("malformed", "cmd.expires_at must be after issued_at")
    extra = set(body) - {"cmd_id", "kit_id", "name", "args", "issued_at", "expires_at"}
    if extra:
        raise ProtocolError("malformed", f"cmd has unknown fields {sorted(extra)}")
    return dict(body)


def check_claim(body: Mapping[str, Any]) -> dict[str, Any]:
    """Shape of a claim request: kit_id, public_key, hardware_serial, software_version, csr, nonce, issued_at."""
    kit = _need(body, "kit_id", str, "claim")
    if not is_kit_id(kit):
        raise ProtocolError("malformed", f"claim.kit_id {kit!r} is not a kit id")
    for k in ("public_key", "hardware_serial", "software_version", "csr", "nonce"):
        v = _need(body, k, str, "claim")
        if len(v) > 8192:
            raise ProtocolError("malformed", f"claim.{k} is too long")
    _need(body, "issued_at", int, "claim")
    return dict(body)


def check_claim_response(body: Mapping[str, Any]) -> dict[str, Any]:
    """Shape of a claim response: kit_id, nonce, status, fleet key and, when approved, certificate, CA, the fleet key's
    certificate (`firmware.wire.fleet_key_cert`) and config."""
    _need(body, "kit_id", str, "claim_response")
    _need(body, "nonce", str, "claim_response")
    status = _need(body, "status", str, "claim_response")
    if status not in CLAIM_STATUSES:
        raise ProtocolError("malformed", f"claim_response.status {status!r}")
    _need(body, "fleet_public_key", str, "claim_response")
    if status == "approved":
        for k in ("certificate", "ca_certificate", "fleet_key_certificate", "config"):
            _need(body, k, str, "claim_response")
    return dict(body)
