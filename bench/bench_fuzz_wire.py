"""Mutation campaign over every parser of outside bytes in the wire formats and the ISO readers.

    .venv/bin/python bench/bench_fuzz_wire.py [--iterations N] [--seed S]

Each parser gets a valid input that is then damaged at random, N times: JSON documents have a field removed,
added, replaced by a value of another type (null, bool, huge or negative integers, 1e308, -0.0, an unpaired
surrogate, a 5,000-character string, nested containers) or a nested part damaged the same way; binary inputs
get bit flips, cut or inserted runs and truncation. A parser passes when every input either parses or raises
an error of the project's tree (`firmware.errors.RekamError`, which names what was wrong); anything else (a
KeyError, a TypeError, a RecursionError...) is a finding, printed with its input and traceback, and makes the
exit status 1.

Parsers: sealed record (`record_format.parse`, damaged bytes and damaged headers signed afresh by a kit key, as
anyone holding one could; `Header.from_json`, `Payload.decode`), relay protocol
(`Announce`, `Chunk`, `Ack` with `verify`), control envelopes (`control_protocol.decode`), stick metadata and
index (`stick_layout.parse_meta` / `stick_id_of`, `index_entries`), update bundles (`read_envelope`,
`check_manifest`), ISO/IEC 19794-4/-5/-6 readers (`read_fir`, `read_fac`, `read_iir`). A campaign of 3 x 5,000
found nothing on 2026-12-04 (session 12); the tests keep smaller fixed sets (tests/provisioning/test_garbage.py,
test_protocol.py, tests/store/test_hostile_stick.py).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from firmware.errors import RekamError  # noqa: E402
from firmware.wire import control_protocol as cp  # noqa: E402
from firmware.wire import record_format as rf  # noqa: E402
from firmware.wire import relay_protocol as rp  # noqa: E402
from firmware.wire import stick_layout as sl  # noqa: E402
from firmware.wire import update_bundle as ub  # noqa: E402
from provisioning.interchange import iso19794 as iso  # noqa: E402

RID = "rk-aaaaaaaaaa-00000001-20260101T000000Z"
WEIRD: list[Any] = [None, True, False, 0, -1, 2**63, 2**64 + 5, 1e308, -0.0, "", "x" * 5000, "\ud800", [], {},
                    [[[[]]]], {"a": {"b": {}}}, 1.5, RID, "0" * 64]


class Mutator:
    """Random damage to JSON documents and byte strings (one seeded generator: a run is reproducible)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def json(self, obj: Any) -> Any:
        """`obj` with one field removed, added, replaced or (in a nested container) damaged the same way."""
        rng = self.rng
        if isinstance(obj, dict) and obj:
            out = dict(obj)
            k = rng.choice(list(out))
            r = rng.random()
            if r < 0.2:
                del out[k]
            elif r < 0.4:
                out[rng.choice(["zz", k + "x"])] = rng.choice(WEIRD)
            elif r < 0.7 and isinstance(out[k], dict | list):
                out[k] = self.json(out[k])
            else:
                out[k] = rng.choice(WEIRD)
            return out
        if isinstance(obj, list) and obj:
            items = list(obj)
            i = rng.randrange(len(items))
            nested = isinstance(items[i], dict | list) and rng.random() < 0.5
            items[i] = self.json(items[i]) if nested else rng.choice(WEIRD)
            return items
        return rng.choice(WEIRD)

    def bytes(self, data: bytes) -> bytes:
        """`data` with 1-4 bit flips, cut runs, inserted runs or a truncation."""
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            if r < 0.4 and b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif r < 0.6 and b:
                at = rng.randrange(len(b))
                del b[at:at + rng.randint(1, 50)]
            elif r < 0.8:
                at = rng.randrange(len(b) + 1)
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
            else:
                b = b[:rng.randrange(len(b) + 1)]
        return bytes(b)


def seeds() -> dict[str, Any]:
    """One valid input per parser."""
    kit, ack_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    _priv, pub = rf.generate_datacenter_keypair()
    payload = rf.Payload({"nik": "3273010101900001"}, [rf.Attachment("a", "x", b"hello" * 20)]).encode()
    sealed = rf.seal(payload, record_id=RID, kit_id="rk-aaaaaaaaaa", seq=1, created="2026-01-01T00:00:00Z",
                     clock_synced=True, signing_key=kit, recipients=[rf.load_recipient_key(pub)])
    hlen = rf.PREFIX.unpack_from(sealed)[3]
    release = ub.manifest_body("1.2.3", "1.0.0", [{"name": "rekam-1.2.3-py3-none-any.whl", "sha256": "0" * 64,
                                                   "size": 3}], {"reads": [2], "writes": 2, "compatible_from": 1},
                               {"reads": [1], "writes": 1}, created=1_700_000_000)
    envelope = cp.sign(ub.KIND, release, kit)
    bundle = ub.HEADER.pack(ub.MAGIC, ub.FORMAT, len(envelope)) + envelope + b"abc"
    return {
        "sealed": sealed,
        "header": json.loads(sealed[rf.PREFIX.size:rf.PREFIX.size + hlen]),
        "manifest": json.loads(payload[8:8 + int.from_bytes(payload[4:8], "big")]),
        "announce": json.loads(rp.Announce(RID, 1, 100, "0" * 64, 1, 100).encode()),
        "ack": json.loads(rp.Ack(RID, "0" * 64, "stored").encode(ack_key)),
        "chunk": rp.Chunk(RID, "0" * 64, 10, 0, 1, 10, b"0123456789").encode(),
        "envelope": json.loads(cp.sign("cmd", {"cmd_id": "abcdefgh1", "kit_id": "k", "name": "lock", "args": {}},
                                       kit)),
        "fir": iso.write_fir([iso.FingerImage(position=2, width=4, height=4, data=b"x" * 16)]),
        "fac": iso.write_fac([iso.FaceImage(width=4, height=4, data=b"y" * 16)]),
        "iir": iso.write_iir([iso.IrisImage(eye=1, width=4, height=4, data=b"z" * 16)]),
        "stick": {"stick_id": "stick-abc", "created": "2026-01-01T00:00:00Z"},
        "index": b'{"record_id": "rk-a", "seq": 1}\n{"record_id": "rk-b"}\n',
        "kit": kit,
        "body_tail": sealed[rf.PREFIX.size + hlen:-64],  # ciphertext and tag
        "bundle": bundle,
        "release": release,
    }


def cases(s: dict[str, Any], m: Mutator) -> list[tuple[str, Callable[[Any], object], Any]]:
    """(parser, call, damaged input) for one iteration."""
    def payload(manifest: Any) -> bytes:
        mj = json.dumps(manifest).encode()
        return rf.PAYLOAD_MAGIC + len(mj).to_bytes(4, "big") + mj + b"hello" * 20

    def self_signed(header: Any) -> bytes:
        # A record signed by whoever made it (any kit key, e.g. a stolen one): the header parser runs fully
        hj = json.dumps(header).encode()
        body = rf.PREFIX.pack(rf.MAGIC, rf.VERSION, 0, len(hj)) + hj + s["body_tail"]
        return body + s["kit"].sign(rf._signed_message(body))

    dumps = lambda o: json.dumps(o).encode()  # noqa: E731
    return [
        ("record_format.parse", rf.parse, m.bytes(s["sealed"])),
        ("record_format.parse (self-signed)", rf.parse, self_signed(m.json(s["header"]))),
        ("Header.from_json", rf.Header.from_json, dumps(m.json(s["header"]))),
        ("Payload.decode", rf.Payload.decode, payload(m.json(s["manifest"]))),
        ("Announce.decode", rp.Announce.decode, dumps(m.json(s["announce"]))),
        ("Ack.decode+verify", lambda d: rp.Ack.decode(d).verify([b"\0" * 32]), dumps(m.json(s["ack"]))),
        ("Chunk.decode", rp.Chunk.decode, m.bytes(s["chunk"])),
        ("control_protocol.decode (json)", lambda d: cp.decode(d, "cmd"), dumps(m.json(s["envelope"]))),
        ("control_protocol.decode (bytes)", lambda d: cp.decode(d, "cmd"), m.bytes(dumps(s["envelope"]))),
        ("read_fir", iso.read_fir, m.bytes(s["fir"])),
        ("read_fac", iso.read_fac, m.bytes(s["fac"])),
        ("read_iir", iso.read_iir, m.bytes(s["iir"])),
        ("stick.json", lambda d: sl.stick_id_of(sl.parse_meta(d, "stick.json", 4096), "stick.json"),
         dumps(m.json(s["stick"]))),
        ("index_entries", lambda d: list(sl.index_entries(io.BytesIO(d), "index")), m.bytes(s["index"])),
        ("read_envelope", lambda d: ub.read_envelope(io.BytesIO(d), len(d)), m.bytes(s["bundle"])),
        ("check_manifest", ub.check_manifest, m.json(s["release"])),
    ]


def refused(call: Callable[[Any], object], data: Any) -> bool:
    """Feed `data` to `call`: True if it was refused by an error of ours, False if it parsed; any other exception
    (a finding) propagates."""
    try:
        call(data)
    except RekamError:
        return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=3000, help="damaged inputs per parser")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    m = Mutator(a.seed)
    s = seeds()
    calls: collections.Counter[str] = collections.Counter()
    refusals: collections.Counter[str] = collections.Counter()
    found: dict[tuple[str, str, int], tuple[int, str, str]] = {}
    t0 = time.monotonic()
    for _ in range(a.iterations):
        for name, call, data in cases(s, m):
            calls[name] += 1
            try:
                refusals[name] += refused(call, data)
            except Exception as e:  # a finding: not an error of ours naming what was wrong
                where = traceback.extract_tb(e.__traceback__)[-1]
                key = (name, type(e).__name__, where.lineno or 0)
                n, sample, tb = found.get(key, (0, repr(data)[:200], traceback.format_exc()[-800:]))
                found[key] = (n + 1, sample, tb)
    print(f"wire fuzz: {a.iterations} damaged inputs per parser, seed {a.seed}, {time.monotonic() - t0:.1f} s")
    for name in calls:
        print(f"  {name:34s} refused {refusals[name]:6d}  parsed {calls[name] - refusals[name]:6d}")
    for (name, kind, line), (n, sample, tb) in found.items():
        print(f"FINDING {name}: {kind} at line {line}, {n} times; input {sample}\n{tb}")
    print(f"findings: {len(found)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
