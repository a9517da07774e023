"""The fleet's signing keys.

* ``fleet-signing.key``: one Ed25519 key whose public half every kit pins at its claim. Everything the
  fleet tells a kit (claim answers, config documents, commands) is signed with it, in the signed
  envelope of `firmware.wire.control_protocol`.
* ``ack-signing.key``: the data center's ack key (`AckKey`), a separate Ed25519 key held by the ingest
  workers only: they sign every record ack with it (`firmware.wire.relay_protocol.Ack`), so a
  compromised ingest host can forge acks but never commands or config. Kits learn its public half from
  their signed config (``relay.ack_public_keys``, sent at claim and in every later document).

Both are PKCS#8 PEM, mode 0600.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.errors import FleetError
from firmware.wire import control_protocol as cp

KEY_FILE = "fleet-signing.key"
ACK_KEY_FILE = "ack-signing.key"


class Signer:
    """Signs control messages with the fleet key (`key` is the Ed25519 private key)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key

    @classmethod
    def create(cls, path: Path) -> Signer:
        """Make a new key at `path` (mode 0600); refuses to replace one (every kit pins it)."""
        key = Ed25519PrivateKey.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> Signer:
        """Read the key at `path`; `FleetError` if it is not an Ed25519 key."""
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise FleetError(f"{Path(path).name} is not an Ed25519 key")
        return cls(key)

    @property
    def public_key_b64(self) -> str:
        """The public half, base64 (what kits pin and `rekam-fleet ca init` prints)."""
        return cp.public_b64(self.key)

    def sign(self, kind: str, body: dict[str, Any]) -> bytes:
        """The signed envelope of `body` as message kind `kind` (claim_response, config, cmd)."""
        return cp.sign(kind, body, self.key)


def load_ack_key(path: Path, create: bool = False) -> Ed25519PrivateKey:
    """The data center's ack-signing key at `path`; with `create`, a new one (mode 0600) if none is there.

    Several ingest hosts share one key file (copy it); kits trust every key in ``relay.ack_public_keys``.
    """
    path = Path(path)
    if create and not path.exists():
        try:
            return Signer.create(path).key
        except FileExistsError:  # another worker made it first
            pass
    try:
        return Signer.load(path).key
    except (OSError, ValueError) as e:
        raise FleetError(f"cannot read the ack-signing key {path}: {e}") from None
