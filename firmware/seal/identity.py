"""The kit's persistent identity: a kit id and an Ed25519 signing key, created on first start.

Stored in ``<state_dir>/identity/`` with mode 0600 (the key never leaves the kit). The kit id
is random, not derived from the key, so a key rotation keeps the kit's name.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.errors import IdentityError
from firmware.system.fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o/1/l/i: read aloud over a phone


@dataclass(frozen=True)
class KitIdentity:
    """Who this kit is: its id and signing key."""

    kit_id: str
    signing_key: Ed25519PrivateKey

    @property
    def public_key_raw(self) -> bytes:
        return self.signing_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key_raw).decode()


def new_kit_id() -> str:
    """A fresh kit id such as ``rk-7h3k2m9q4p`` (safe in MQTT topics and file names)."""
    return "rk-" + "".join(secrets.choice(_ALPHABET) for _ in range(10))


def load_or_create(state_dir: Path) -> KitIdentity:
    """Load the identity from `state_dir`, creating it (once, atomically) if absent."""
    d = state_dir / "identity"
    key_path, meta_path = d / "kit.key", d / "kit.json"
    if key_path.exists() and meta_path.exists():
        return load(state_dir)
    if key_path.exists() != meta_path.exists():
        raise IdentityError(f"incomplete identity in {d}: one of kit.key/kit.json is missing; "
                            "restore it from backup, or remove both to create a new kit identity")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    key = Ed25519PrivateKey.generate()
    ident = KitIdentity(new_kit_id(), key)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    old = os.umask(0o077)
    try:
        atomic_write(key_path, pem)
        os.chmod(key_path, 0o600)
        meta = {"kit_id": ident.kit_id, "public_key": ident.public_key_b64, "algorithm": "ed25519"}
        atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        os.chmod(meta_path, 0o600)
    finally:
        os.umask(old)
    fsync_dir(d)
    log.info("identity created kit_id=%s public_key=%s", ident.kit_id, ident.public_key_b64)
    return ident


def load(state_dir: Path) -> KitIdentity:
    """Load an existing identity; raise `IdentityError` naming the problem."""
    d = state_dir / "identity"
    try:
        meta = json.loads((d / "kit.json").read_text())
        key = serialization.load_pem_private_key((d / "kit.key").read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise IdentityError(f"cannot read kit identity in {d}: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{d / 'kit.key'} is not an Ed25519 key")
    ident = KitIdentity(str(meta.get("kit_id", "")), key)
    if meta.get("public_key") != ident.public_key_b64:
        raise IdentityError(f"{d}: kit.json public key does not match kit.key")
    mode = (d / "kit.key").stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("identity key has loose permissions mode=%o path=%s; fixing to 0600", mode, d / "kit.key")
        os.chmod(d / "kit.key", 0o600)
    return ident
