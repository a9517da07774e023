"""Sealing and opening records: round trip, tampering, wrong keys, truncation, the fleet CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.wire import record_format as rf


def _seal(payload: bytes, dc_pub: bytes, *extra: bytes, key: Ed25519PrivateKey | None = None) -> bytes:
    return rf.seal(payload, record_id="rk-abcdefghjk-00000001-20261129T000000Z", kit_id="rk-abcdefghjk", seq=1,
                   created="2026-11-29T00:00:00Z", clock_synced=False, signing_key=key or Ed25519PrivateKey.generate(),
                   recipients=[rf.load_recipient_key(k) for k in (dc_pub, *extra)])


def test_round_trip_and_no_plaintext_on_disk(dc_keys: dict[str, Any]) -> None:
    secret = b"NIK 3273010101900001 " * 100
    p = rf.Payload({"nik": "3273010101900001"}, [rf.Attachment("face.jpg", "image/jpeg", secret)]).encode()
    sealed = _seal(p, dc_keys["pub"])
    assert b"3273010101900001" not in sealed  # nothing personal in clear text
    hdr, plain = rf.open_record(sealed, dc_keys["sk"])
    assert hdr.record_id.endswith("00000001-20261129T000000Z") and plain == p
    back = rf.Payload.decode(plain)
    assert back.manifest["nik"] == "3273010101900001" and back.attachments[0].data == secret


def test_two_recipients_each_open(dc_keys: dict[str, Any]) -> None:
    priv2, pub2 = rf.generate_datacenter_keypair()
    sealed = _seal(b"x" * 1000, dc_keys["pub"], pub2)
    assert rf.open_record(sealed, dc_keys["sk"])[1] == b"x" * 1000
    assert rf.open_record(sealed, rf.load_datacenter_private_key(priv2))[1] == b"x" * 1000


def test_wrong_key(dc_keys: dict[str, Any]) -> None:
    sealed = _seal(b"payload", dc_keys["pub"])
    other, _ = rf.generate_datacenter_keypair()
    with pytest.raises(rf.WrongKey, match="sealed to key"):
        rf.open_record(sealed, rf.load_datacenter_private_key(other))


@pytest.mark.parametrize("offset", [0, 20, 200, -100, -1])
def test_any_flipped_byte_is_caught(dc_keys: dict[str, Any], offset: int) -> None:
    sealed = bytearray(_seal(b"p" * 500, dc_keys["pub"]))
    sealed[offset] ^= 0x40
    with pytest.raises(rf.RecordFormatError):
        rf.open_record(bytes(sealed), dc_keys["sk"])


def test_truncated(dc_keys: dict[str, Any]) -> None:
    sealed = _seal(b"p" * 500, dc_keys["pub"])
    for n in (0, 5, 30, len(sealed) - 1):
        with pytest.raises(rf.TruncatedRecord):
            rf.parse(sealed[:n])


def test_pinned_kit_key(dc_keys: dict[str, Any]) -> None:
    kit = Ed25519PrivateKey.generate()
    sealed = _seal(b"p", dc_keys["pub"], key=kit)
    rf.parse(sealed, rf.raw_public(kit.public_key()))
    with pytest.raises(rf.BadSignature, match="not the kit's registered key"):
        rf.parse(sealed, rf.raw_public(Ed25519PrivateKey.generate().public_key()))


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "provisioning.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "REKAM_LANG": "en"})  # the checks read the English messages


def test_fleet_open_cli(tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    p = rf.Payload({"nik": "3273010101900001"}, [rf.Attachment("../../evil.jpg", "image/jpeg", b"jpg")]).encode()
    f = tmp_path / "r.rkm"
    f.write_bytes(_seal(p, dc_keys["pub"]))
    r = _fleet("open", str(f), "--key", str(dc_keys["key_path"]), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert '"nik": "3273010101900001"' in r.stdout
    assert (tmp_path / "out" / "evil.jpg").read_bytes() == b"jpg"  # the name cannot escape the folder
    other = tmp_path / "other"
    assert _fleet("keygen", "--out", str(other)).returncode == 0
    r = _fleet("open", str(f), "--key", str(other / "datacenter.key"))
    assert r.returncode == 5 and "wrong key" in r.stderr
    f.write_bytes(f.read_bytes()[:-10])
    r = _fleet("open", str(f), "--key", str(dc_keys["key_path"]))
    assert r.returncode == 3 and "truncated" in r.stderr
    data = bytearray(_seal(p, dc_keys["pub"]))
    data[-70] ^= 1
    f.write_bytes(bytes(data))
    r = _fleet("open", str(f), "--key", str(dc_keys["key_path"]))
    assert r.returncode == 4 and "bad signature" in r.stderr


def test_prepared_keys_are_bound_to_the_record_late(dc_keys: dict[str, Any]) -> None:
    # Key material prepared ahead (perf, issue #17) seals the same format: the wrap's AAD is still the record id,
    # so a wrap moved to another record does not open it, and the embedded kit key is the signer's.
    sk = Ed25519PrivateKey.generate()
    rcpt = [rf.load_recipient_key(dc_keys["pub"])]
    out = []
    for seq in (1, 2):
        rid = f"rk-abcdefghjk-{seq:08d}-20261129T000000Z"
        buf, digest = rf.seal_with_digest(b"p%d" % seq * 500, record_id=rid, kit_id="rk-abcdefghjk", seq=seq,
                                          created="2026-11-29T00:00:00Z", clock_synced=True, signing_key=sk,
                                          recipients=rcpt, keys=rf.prepare_keys(rcpt))
        assert rf.sha256_hex(bytes(buf)) == digest
        hdr, plain = rf.open_record(bytes(buf), dc_keys["sk"], trusted_kit_key=rf.raw_public(sk.public_key()))
        assert hdr.record_id == rid and plain == b"p%d" % seq * 500
        out.append(rf.parse(bytes(buf)).header)
    assert out[0].recipients[0]["epk"] != out[1].recipients[0]["epk"]
    wrap = out[0].recipients[0]
    kek = rf._kek(dc_keys["sk"].exchange(rf.X25519PublicKey.from_public_bytes(rf.b64d(wrap["epk"], "epk"))),
                  rf.b64d(wrap["epk"], "epk"), rf.raw_public(dc_keys["sk"].public_key()))
    with pytest.raises(rf.InvalidTag):  # the wrap is bound to record 1's id
        rf.ChaCha20Poly1305(kek).decrypt(b"\0" * 12, rf.b64d(wrap["wrapped"], "w"), out[1].record_id.encode())


def test_seal_in_two_steps_is_one_record(dc_keys: dict[str, Any]) -> None:
    # The store's commit writes the body out while it is signed (issue #17.3): `seal_body` leaves the last 64 bytes
    # for the signature, `sign_body` fills only those and returns the whole file's SHA-256.
    sk = Ed25519PrivateKey.generate()
    kit_key = rf.raw_public(sk.public_key())
    rid = "rk-abcdefghjk-00000007-20261129T000000Z"
    p = os.urandom(70_001)
    out, end = rf.seal_body(p, record_id=rid, kit_id="rk-abcdefghjk", seq=7, created="2026-11-29T00:00:00Z",
                            clock_synced=True, recipients=[rf.load_recipient_key(dc_keys["pub"])], kit_key=kit_key)
    assert len(out) == end + rf.SIG_LEN and bytes(out[end:]) == bytes(rf.SIG_LEN)
    body = bytes(out[:end])
    digest = rf.sign_body(out, end, sk)
    assert bytes(out[:end]) == body and rf.sha256_hex(bytes(out)) == digest
    hdr, plain = rf.open_record(bytes(out), dc_keys["sk"], trusted_kit_key=kit_key)
    assert plain == p and hdr.record_id == rid and hdr.seq == 7 and hdr.payload_len == len(p)


def _with_header(header: bytes, tail: int = 200) -> bytes:
    """A file of rekam's layout around an arbitrary (unsigned) header, as a hostile stick or kit could send."""
    return rf.PREFIX.pack(rf.MAGIC, rf.VERSION, 0, len(header)) + header + b"\0" * tail


def _header(**over: Any) -> bytes:
    import json
    h = {"record_id": "rk-abcdefghjk-00000001-20261129T000000Z", "kit_id": "rk-abcdefghjk", "seq": 1,
         "created": "2026-11-29T00:00:00Z", "clock_synced": False, "kit_key": rf.b64e(b"k" * 32),
         "aead": "chacha20poly1305", "recipients": [{"kid": "x", "epk": "y", "wrapped": "z"}],
         "nonce": rf.b64e(b"n" * 12), "payload_len": 0}
    h.update(over)
    return json.dumps(h).encode().replace(b'"SEQ"', b"1e400")


@pytest.mark.parametrize("header,what", [
    (b"[" * 60_000, "too deep"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "too deep"),
    (_header(seq="SEQ"), "seq"),  # 1e400: a float (inf) where the sequence number goes
    (_header(seq="7"), "seq"),
    (_header(seq=True), "seq"),
    (_header(seq=-1), "seq"),
    (_header(payload_len=1.5), "payload_len"),
    (_header(record_id=["a"]), "record_id"),
    (_header(clock_synced=1), "clock_synced"),
    (_header(recipients=[1]), "recipients"),
    (_header(recipients=[{"kid": 5}]), "recipients"),
    (_header(kit_key="é"), "kit_key"),
    (b'{"seq": NaN}', "not valid"),
    (b"\xff\xfe", "not valid"),
])
def test_hostile_header_is_a_format_error_never_a_crash(header: bytes, what: str) -> None:
    """The header is read before the signature is checked: whatever it holds, parse() raises RecordFormatError
    (naming what was wrong), never RecursionError, OverflowError or TypeError from deep inside."""
    with pytest.raises(rf.RecordFormatError) as e:
        rf.parse(_with_header(header))
    assert what.replace(" ", "_") in str(e.value) or what in str(e.value)


def test_header_values_in_errors_are_quoted_and_cut_short(dc_keys: dict[str, Any]) -> None:
    """A hostile record id must not forge log lines: errors quote it (no raw newline) and cut it short."""
    rid = "x\nrecord archived record_id=FORGED " + "y" * 5000
    data = _with_header(_header(record_id=rid), tail=16 + 64)
    with pytest.raises(rf.BadSignature) as e:
        rf.parse(data)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize("manifest", [
    b"[" * 50_000,
    b'{"attachments": 5}',
    b'{"attachments": [{"name": "a", "type": "t", "size": 1e400, "sha256": "0"}]}',
    b'{"attachments": [{"name": "a", "type": "t", "size": -4, "sha256": "0"}]}',
    b'{"attachments": [{"name": "a"}]}',
])
def test_hostile_payload_manifest_is_a_format_error(manifest: bytes) -> None:
    import struct
    with pytest.raises(rf.RecordFormatError):
        rf.Payload.decode(rf.PAYLOAD_MAGIC + struct.pack(">I", len(manifest)) + manifest)
