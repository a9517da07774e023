"""Kit key rotation, crash-safe: `rotate_key` makes a new Ed25519 kit key, `repair_identity` finishes a cut one.

The order on disk (new key beside the old, then ``kit.json`` names it, then the rename) means a power
loss at any point leaves either the old or the new key in force, never a key ``kit.json`` disowns.
The old key is archived under ``identity/archive/`` (records it sealed stay verifiable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.seal.identity import KitIdentity
from firmware.system.fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)


def _public_b64(key: Ed25519PrivateKey) -> str:
    return KitIdentity("", key).public_key_b64


def _fingerprint(key: Ed25519PrivateKey) -> str:
    # The same short id as firmware.wire.control_protocol.key_fingerprint (SHA-256 of the raw public key).
    return hashlib.sha256(KitIdentity("", key).public_key_raw).hexdigest()[:16]


def _previous_keys(meta_path: Path) -> list[str]:
    try:
        return list(json.loads(meta_path.read_text()).get("previous_keys", []))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError) as e:
        log.error("unreadable identity file path=%s error=%s; previous keys not carried over", meta_path, e)
        return []


def repair_identity(state_dir: Path) -> None:
    """Finish a key rotation cut short by a power loss (see `rotate_key`)."""
    d = state_dir / "identity"
    new = d / "kit.key.new"
    if not new.exists():
        return
    try:
        meta = json.loads((d / "kit.json").read_text())
        key = serialization.load_pem_private_key(new.read_bytes(), password=None)
        if isinstance(key, Ed25519PrivateKey) and meta.get("public_key") == _public_b64(key):
            os.replace(new, d / "kit.key")
            log.warning("completed an interrupted kit key rotation")
        else:
            new.unlink()
            log.warning("discarded an interrupted kit key rotation (kit.json still names the old key)")
        fsync_dir(d)
    except (OSError, ValueError) as e:
        log.error("cannot check interrupted key rotation error=%s", e)



def rotate_key(state_dir: Path, old: KitIdentity) -> KitIdentity:
    """Make a new kit key; the old one goes to ``identity/archive/``. Crash-safe with `repair_identity`."""
    d = state_dir / "identity"
    arch = d / "archive"
    arch.mkdir(exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    shutil.copyfile(d / "kit.key", arch / f"kit-{stamp}.key")
    os.chmod(arch / f"kit-{stamp}.key", 0o600)
    fsync_dir(arch)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Order: new key beside the old, then kit.json names it, then rename; repair_identity finishes a cut.
    atomic_write(d / "kit.key.new", pem)
    os.chmod(d / "kit.key.new", 0o600)
    meta = {"kit_id": old.kit_id, "public_key": _public_b64(key), "algorithm": "ed25519",
            "previous_keys": _previous_keys(d / "kit.json") + [old.public_key_b64]}
    atomic_write(d / "kit.json", json.dumps(meta, indent=1).encode())
    os.chmod(d / "kit.json", 0o600)
    os.replace(d / "kit.key.new", d / "kit.key")
    fsync_dir(d)
    log.warning("kit key rotated kit_id=%s old=%s new=%s", old.kit_id, _fingerprint(old.signing_key),
                _fingerprint(key))
    return KitIdentity(old.kit_id, key)


