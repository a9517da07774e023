"""After a kit key rotation the archive accepts records signed with the old and the new key, and no other."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.wire import record_format as rf
from provisioning.archive import Archive

KIT = "rk-abcdefghjk"


def sealed(key: Ed25519PrivateKey, seq: int, dc_pub: bytes) -> tuple[str, bytes]:
    rid = f"{KIT}-{seq:08d}-20261129T000000Z"
    return rid, rf.seal(b"payload", record_id=rid, kit_id=KIT, seq=seq, created="2026-11-29T00:00:00Z",
                        clock_synced=True, signing_key=key, recipients=[rf.load_recipient_key(dc_pub)])


def b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(rf.raw_public(key.public_key())).decode()


def test_old_and_new_key_accepted_after_rotation(tmp_path: Path) -> None:
    _, dc_pub = rf.generate_datacenter_keypair()
    old, new, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    fleet = tmp_path / "fleet.db"
    db = sqlite3.connect(fleet)
    db.execute("CREATE TABLE kits (kit_id TEXT PRIMARY KEY, public_key TEXT, state TEXT)")
    db.execute("INSERT INTO kits VALUES (?,?, 'approved')", (KIT, b64(old)))
    db.commit()
    archive = Archive(tmp_path / "archive", fleet_db=fleet)
    rid, data = sealed(old, 1, dc_pub)
    assert archive.store(data, KIT, "mqtt", rid, rf.sha256_hex(data)).status == "stored"
    # The fleet registers the rotated key (what provisioning.registry does on a rotate_key result).
    db.execute("UPDATE kits SET public_key = ? WHERE kit_id = ?", (b64(new), KIT))
    db.commit()
    for seq, key in ((2, old), (3, new)):  # sealed before the rotation but sent after it, and after it
        rid, data = sealed(key, seq, dc_pub)
        assert archive.store(data, KIT, "mqtt", rid, rf.sha256_hex(data)).status == "stored", seq
    rid, data = sealed(stranger, 4, dc_pub)
    res = archive.store(data, KIT, "mqtt", rid, rf.sha256_hex(data))
    assert res.status == "rejected" and "not by a registered key" in res.reason
    assert archive.count(KIT) == 3
