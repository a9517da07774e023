"""The kits' signed clock corrections at the data center (issue #18): kept from verified telemetry (fleet registry,
SQLite and PostgreSQL), hostile documents refused without failing the telemetry, read back by the archive, shown
by `rekam-fleet kits clock`."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.wire import clock_correction
from firmware.wire import control_protocol as cp
from provisioning import clock_corrections as clockfix
from provisioning.archive import Archive
from provisioning.registry import Fleet
from tests.support import subprocess_env

KIT = "rk-0000c10c"


@pytest.fixture(params=["sqlite", "postgres"])
def registry(request: pytest.FixtureRequest) -> str | None:
    """The fleet registry's backend: None (fleet.db) or the DSN of a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_database")


def make_fleet(tmp_path: Path, registry: str | None = None) -> Fleet:
    return Fleet.init(tmp_path / "fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test",
                      registry=registry)


def approve(f: Fleet, kit_id: str, key: Ed25519PrivateKey) -> None:
    """A kit row as an approved claim leaves it (the claim itself: test_claim.py)."""
    f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, ?, 'approved', 0)",
                 (kit_id, cp.public_b64(key)))


def correction(key: Ed25519PrivateKey, segments: list[dict[str, Any]], kit_id: str = KIT, boot: str = "boot-1",
               source: str = "gnss") -> dict[str, Any]:
    """A correction as the kit's ClockCorrections signs it (firmware.wire.clock_correction.sign)."""
    return clock_correction.sign({"kit_id": kit_id, "issued": "2026-12-01T08:00:00Z", "source": source,
                                  "boot_id": boot, "segments": segments}, key)


def seg(first: int, last: int, offset: float | None, sealed: str = "20261101T000000Z",
        sealed_last: str | None = None) -> dict[str, Any]:
    """A segment whose records' ids carry `sealed` (the kit's wrong clock; the last one `sealed_last`)."""
    return {"first_seq": first, "last_seq": last, "first_record": f"{KIT}-{first:08d}-{sealed}",
            "last_record": f"{KIT}-{last:08d}-{sealed_last or sealed}", "records": last - first + 1,
            "offset_s": offset}


def telemetry(f: Fleet, key: Ed25519PrivateKey, docs: Any, kit_id: str = KIT, **extra: Any) -> str | None:
    body = {"kit_id": kit_id, "halted": False, "clock": {"synced": True, "corrections": docs}, **extra}
    return f.handle_kit_message(cp.telemetry_topic(kit_id), cp.sign("telemetry", body, key))


def events(f: Fleet, kind: str) -> list[dict[str, Any]]:
    return [json.loads(r["detail"]) for r in f.db.execute("SELECT detail FROM events WHERE kind = ? ORDER BY id",
                                                          (kind,))]


def test_a_valid_correction_is_kept_once_though_every_telemetry_repeats_it(tmp_path, registry) -> None:
    f = make_fleet(tmp_path, registry)
    key = Ed25519PrivateKey.generate()
    approve(f, KIT, key)
    first = correction(key, [seg(1, 40, 31536012.4, sealed="20251101T000000Z"), seg(41, 45, -2.5)])
    for _ in range(3):  # the kit repeats its newest corrections in every telemetry message
        assert telemetry(f, key, [first]) == "telemetry"
    later = correction(key, [seg(46, 50, None)], boot="boot-0", source="none")
    assert telemetry(f, key, [first, later]) == "telemetry"
    # A second fleet process (its own memory of what it saw) finds them in the registry: still once.
    other = Fleet(tmp_path / "fleet", registry)
    assert telemetry(other, key, [first, later]) == "telemetry"
    kept = f.clock_corrections(KIT)
    assert [(d["boot_id"], d["source"], [(s["first_seq"], s["last_seq"], s["offset_s"]) for s in d["segments"]])
            for d in kept] == [("boot-1", "gnss", [(1, 40, 31536012.4), (41, 45, -2.5)]),
                               ("boot-0", "none", [(46, 50, None)])]
    assert all(d["verified_key"] == f"current:{cp.key_fingerprint(key)}" for d in kept)
    assert len(events(f, "clock_correction")) == 2 and not events(f, "clock_correction_refused")
    assert json.loads(f.kit(KIT)["telemetry"])["clock"]["corrections"][1]["boot_id"] == "boot-0"
    other.close()
    f.close()


def test_the_archive_reads_the_corrections_of_a_sqlite_or_postgresql_registry(tmp_path, registry) -> None:
    f = make_fleet(tmp_path, registry)
    key = Ed25519PrivateKey.generate()
    approve(f, KIT, key)
    telemetry(f, key, [correction(key, [seg(1, 40, 3600.0), seg(41, 45, None)])])
    a = Archive(tmp_path / "archive", fleet_db=registry or tmp_path / "fleet" / "fleet.db")
    hit = a.clock_segment(KIT, 40)
    assert hit is not None and (hit.first_seq, hit.last_seq, hit.offset_s, hit.source) == (1, 40, 3600.0, "gnss")
    assert a.clock_segment(KIT, 41) is None  # null offset: nothing to apply
    assert a.clock_segment(KIT, 46) is None and a.clock_segment("rk-00000bad", 1) is None
    segs, newest = a.clock_segments_since(0)
    assert [(s.first_seq, s.offset_s) for s in segs] == [(1, 3600.0)] and newest == hit.correction_id
    assert a.clock_segments_since(newest) == ([], newest)
    assert Archive(tmp_path / "plain").clock_segment(KIT, 1) is None  # no registry: as before
    a.close()
    f.close()


def test_an_old_fleet_db_without_the_tables_has_no_corrections(tmp_path) -> None:
    import sqlite3

    db = tmp_path / "fleet.db"
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE kits (kit_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, state TEXT NOT NULL)")
    c.close()
    a = Archive(tmp_path / "archive", fleet_db=db)
    assert a.clock_segment(KIT, 1) is None and a.clock_segments_since(0) == ([], 0)
    a.close()


def test_hostile_corrections_are_refused_one_by_one_and_never_fail_the_telemetry(tmp_path) -> None:
    f = make_fleet(tmp_path)
    key = Ed25519PrivateKey.generate()
    approve(f, KIT, key)
    good = correction(key, [seg(1, 10, 60.0)])
    forged = correction(Ed25519PrivateKey.generate(), [seg(11, 20, 60.0)])
    altered = dict(good, segments=[seg(1, 10, 86400.0)])  # a good signature over other numbers
    other_kit = correction(key, [seg(21, 30, 60.0)], kit_id="rk-00000bad")
    absurd = [correction(key, [seg(31, 40, 1e12)]), correction(key, [seg(0, 3, 1.0)]),
              correction(key, [seg(50, 41, 1.0)]), correction(key, [dict(seg(60, 61, 1.0), first_seq=True)]),
              correction(key, [dict(seg(60, 61, 1.0), offset_s="3600")]),
              correction(key, [seg(70, 75, 1.0), seg(75, 80, 1.0)]),  # overlapping segments
              correction(key, [{"first_seq": i, "last_seq": i} for i in range(100, 1101)]),  # 1001 segments
              correction(key, []), "not an object", dict(good, type="rekam.other/1"),
              correction(key, [seg(90, 95, 3600.0, sealed="19700101T000000Z")])]  # lands in 1970
    docs = [forged, altered, other_kit, *absurd, good]
    for _ in range(2):
        assert telemetry(f, key, docs, halted=True) == "telemetry"
    assert json.loads(f.kit(KIT)["telemetry"])["halted"] is True  # the telemetry itself was recorded
    kept = f.clock_corrections(KIT)
    assert [[(s["first_seq"], s["offset_s"]) for s in d["segments"]] for d in kept] == [[(1, 60.0)]]
    refused = [e["reason"] for e in events(f, "clock_correction_refused")]
    assert len(refused) == len(docs) - 1, refused  # each bad one once, though sent twice
    for want in ("does not verify", "sent by kit", "offset_s", "sequence numbers", "overlap", "1-1000",
                 "not an object", "rekam.other/1", "is before 2026-01-01"):
        assert any(want in r for r in refused), (want, refused)
    # Too many documents: none is taken (the kit sends its newest five), the telemetry still is.
    assert telemetry(f, key, [correction(key, [seg(2000 + i, 2000 + i, 1.0)]) for i in range(51)]) == "telemetry"
    assert telemetry(f, key, {"a": 1}) == "telemetry"
    assert len(f.clock_corrections(KIT)) == 1
    assert sum("at most 50" in e["reason"] for e in events(f, "clock_correction_refused")) == 2
    # A later document whose range overlaps one already kept is refused (one place in time per record).
    assert telemetry(f, key, [correction(key, [seg(5, 12, 1.0)], boot="boot-2")]) == "telemetry"
    assert len(f.clock_corrections(KIT)) == 1 and "overlaps 1..10" in events(f, "clock_correction_refused")[-1][
        "reason"]
    f.close()


def test_a_correction_signed_before_a_key_rotation_still_verifies(tmp_path) -> None:
    """The kit repeats a correction signed with its old key inside telemetry signed by the new one: accepted when
    the old key is one the registry saw the kit rotate away from (its verified rotate_key result)."""
    f = make_fleet(tmp_path)
    old, new, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    approve(f, KIT, new)
    before = correction(old, [seg(1, 5, 10.0)])
    assert telemetry(f, new, [before]) == "telemetry"
    assert f.clock_corrections(KIT) == [] and "does not verify" in events(f, "clock_correction_refused")[0]["reason"]
    # The rotation as `handle_kit_message` records a rotate_key result (verified with the key registered then:
    # tests/provisioning/test_commands.py); here only the rows it leaves. The proof is checked again here, and the
    # chain must lead to the current key: a result naming another new key, or with a bad proof, adds nothing.
    def rotated(cmd: str, old_key: Ed25519PrivateKey, new_key: Ed25519PrivateKey, proof_by: Ed25519PrivateKey,
                at: int) -> None:
        raw = b"rekam-key-rotation:" + cp.public_raw(old_key.public_key()) + cp.public_raw(new_key.public_key())
        result = {"cmd_id": cmd, "kit_id": KIT, "name": "rotate_key", "ok": True,
                  "data": {"old_public_key": cp.public_b64(old_key), "new_public_key": cp.public_b64(new_key),
                           "proof": base64.b64encode(proof_by.sign(raw)).decode()}}
        f.db.execute("INSERT INTO commands (cmd_id, kit_id, name, args, issued_at, expires_at, result, result_at) "
                     "VALUES (?, ?, 'rotate_key', '{}', 0, 0, ?, ?)", (cmd, KIT, json.dumps(result), at))

    rotated("c1", old, new, new, 1)
    rotated("c2", stranger, old, old, 2)  # one step further back: stranger -> old -> new (current)
    forged_proof, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    rotated("c3", forged_proof, new, stranger, 3)  # proof not made by the new key
    rotated("c4", other, Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), 4)  # not in the chain
    # The same process retries a refused correction once its retry period has passed (here: at once), and the
    # proven rotation now lets it in; within the period it is not even looked at again.
    assert telemetry(f, new, [before]) == "telemetry" and f.clock_corrections(KIT) == []
    f._corrections_seen = {k: 0.0 for k in f._corrections_seen}  # the period is over
    assert telemetry(f, new, [before]) == "telemetry"
    assert [d["verified_key"] for d in f.clock_corrections(KIT)] == [f"rotated:{cp.key_fingerprint(old)}"]
    fresh = Fleet(tmp_path / "fleet")  # another process (its own memory of what it saw)
    assert telemetry(fresh, new, [before, correction(stranger, [seg(6, 9, 1.0)]), correction(
        forged_proof, [seg(10, 11, 1.0)]), correction(other, [seg(12, 13, 1.0)])]) == "telemetry"
    kept = fresh.clock_corrections(KIT)
    assert [d["verified_key"] for d in kept] == [f"rotated:{cp.key_fingerprint(old)}",
                                                 f"rotated:{cp.key_fingerprint(stranger)}"]
    fresh.close()
    f.close()


def test_rekam_fleet_kits_clock_lists_them(tmp_path) -> None:
    f = make_fleet(tmp_path)
    key = Ed25519PrivateKey.generate()
    approve(f, KIT, key)
    telemetry(f, key, [correction(key, [seg(1, 40, 3600.25)]), correction(key, [seg(41, 42, None)], boot="b0")])
    f.close()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "provisioning.cli", "kits", "clock", *args, "--data",
                               str(tmp_path / "fleet")], capture_output=True, text=True, timeout=60,
                              env=subprocess_env({"REKAM_LANG": "en"}))

    r = run(KIT)
    assert r.returncode == 0, r.stderr
    assert "seq 1..40  offset +3600.250 s" in r.stdout and "seq 41..42  not correctable" in r.stdout, r.stdout
    r = run(KIT, "--json")
    assert [d["segments"][0]["offset_s"] for d in json.loads(r.stdout)] == [3600.25, None]
    r = run("rk-00000bad")
    assert r.returncode == 1 and "unknown kit" in r.stderr


def test_where_a_correction_moves_the_records_must_be_plausible() -> None:
    """Defence in depth against a kit that signed a spoofed time: both ends of a segment (the time in its record
    ids + offset_s) must land in 2026-01-01..2056-01-01 and not after the data center's clock (+1 day); the offset
    alone is not what is bounded, so a Pi corrected from 1970 is kept."""
    now = 1_796_220_000.0  # 2026-12-02T14:00:00Z

    def reason(*segments: dict[str, Any]) -> str:
        try:
            clockfix.check(correction(Ed25519PrivateKey.generate(), list(segments)), KIT, now=now)
        except ValueError as e:
            return str(e)
        return ""

    # booted at 1970 (no saved time), corrected by 56 years: the right offset, kept
    assert reason(seg(1, 40, 1_796_160_000.0, sealed="19700101T000012Z", sealed_last="19700101T020000Z")) == ""
    assert clockfix.check(correction(Ed25519PrivateKey.generate(), [seg(1, 2, 1_796_160_000.0, sealed=(
        "19700101T000012Z"))]), KIT, now=now)[0].offset_s == 1_796_160_000.0
    assert reason(seg(1, 2, -1_900_000_000.0, sealed="20870201T000000Z")) == ""  # clock stepped to a spoof, undone
    assert reason({**seg(1, 2, 3600.0), "first_record": "", "last_record": ""}) == ""  # no ids: offset bound only
    # the review's spoof (System time 1.9e9 s on a clock that was nearly right): 2087
    assert "is after 2056-01-01" in reason(seg(1, 2, 1_900_000_000.123))
    # within the range but in the data center's future: a record is never captured after its correction arrived
    assert "after the data center's clock" in reason(seg(1, 2, 500_000_000.0))
    assert "is before 2026-01-01" in reason(seg(1, 2, 3600.0, sealed="19700101T000000Z"))
    # the last end too: a run of 3 days whose first record lands right but whose last lands 2 days ahead
    why = reason(seg(1, 2, 86400.0, sealed="20261130T000000Z", sealed_last="20261203T000000Z"))
    assert "last_record" in why and "after the data center's clock" in why, why
    assert "offset_s" in reason(seg(1, 2, 3e9, sealed="19700101T000000Z"))  # beyond 1970 -> 2056: the offset bound


def _sqlite_steps(f: Fleet, fn: Any) -> int:
    """Thousands of SQLite virtual-machine steps `fn` costs on the registry's connection: how many rows the registry
    looks at, independent of the machine's speed (a wall-clock bound would be flaky on a shared host)."""
    ticks = [0]

    def tick() -> int:
        ticks[0] += 1
        return 0  # go on

    f.db.conn.set_progress_handler(tick, 1000)
    try:
        fn()
    finally:
        f.db.conn.set_progress_handler(None, 1000)
    return ticks[0]


def test_the_overlap_check_costs_the_same_however_many_segments_are_kept(tmp_path) -> None:
    """A kit sends new one-record segments in every telemetry message: checking each against every segment kept
    before made a 64 KB message cost O(kept) per segment (1.7 s of CPU at 18,000 kept). Only the nearest kept
    segments are looked at; a kit keeps at most `MAX_KIT_SEGMENTS` (refused beyond, said once)."""
    from provisioning import registry

    f = make_fleet(tmp_path)
    key = Ed25519PrivateKey.generate()
    approve(f, KIT, key)

    def kept_already(first: int, n: int) -> None:  # n one-record segments from `first`, as earlier corrections left
        with f.db.write():
            f.db.conn.executemany("INSERT INTO clock_segments (kit_id, boot_id, first_seq, last_seq, records, "
                                  "offset_s, correction_id) VALUES (?, 'old', ?, ?, 1, 1.0, 0)",
                                  [(KIT, s, s) for s in range(first, first + n)])

    def cost(first: int) -> int:  # steps of one telemetry message with a new document of 900 one-record segments
        doc = correction(key, [{"first_seq": s, "last_seq": s} for s in range(first, first + 900)], boot=f"b{first}")
        return _sqlite_steps(f, lambda: telemetry(f, key, [doc]))

    kept_already(1, 1000)
    few = cost(1_000_001)
    kept_already(100_001, 7000)
    many = cost(2_000_001)
    assert len(f.clock_corrections(KIT)) == 2 and not events(f, "clock_correction_refused")
    assert many < 2 * few, (few, many)  # 8x the segments kept: about the same work (it was 8x more)

    # The nearest kept segments still catch every overlap: a new range that ends in, starts in, lies in or
    # swallows a kept one (here 500_100..500_200); one that fits between the kept ones is kept.
    telemetry(f, key, [correction(key, [seg(500_100, 500_200, 1.0)], boot="k")])
    for i, (a, b) in enumerate(((500_050, 500_100), (500_200, 500_250), (500_120, 500_130), (500_050, 500_250))):
        telemetry(f, key, [correction(key, [seg(a, b, 1.0)], boot=f"o{i}")])
        assert "overlaps 500100..500200" in events(f, "clock_correction_refused")[-1]["reason"], (a, b)
    telemetry(f, key, [correction(key, [seg(500_000, 500_099, 1.0), seg(500_201, 500_300, 1.0)], boot="fits")])
    assert [d["boot_id"] for d in f.clock_corrections(KIT)][-2:] == ["k", "fits"]
    assert len(events(f, "clock_correction_refused")) == 4

    # The cap: 9,803 kept. A document that would pass 10,000 is refused whole; filled up to the cap, every further
    # one is refused too, with one event for them all (each is looked at again only after the retry period).
    assert registry.MAX_KIT_SEGMENTS == 10_000
    assert telemetry(f, key, [correction(key, [{"first_seq": s, "last_seq": s} for s in range(3_000_001, 3_000_900)],
                                         boot="over")]) == "telemetry"
    kept_already(5_000_001, 10_000 - 9803)
    for i in range(3):
        assert telemetry(f, key, [correction(key, [seg(6_000_000 + 10 * i, 6_000_005 + 10 * i, 1.0)],
                                             boot=f"more{i}")]) == "telemetry"
    refused = [e["reason"] for e in events(f, "clock_correction_refused")[4:]]
    assert len(refused) == 1 and "at most 10000" in refused[0], refused
    assert f.db.execute("SELECT COUNT(*) FROM clock_segments WHERE kit_id = ?", (KIT,)).fetchone()[0] == 10_000
    assert [d["boot_id"] for d in f.clock_corrections(KIT)][-1] == "fits"
    f.close()
