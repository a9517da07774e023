"""The export applies the kits' clock corrections (issue #18): records sealed by a real `rekamd --sim` (its clock
is not synchronised), a correction received in real signed telemetry by the fleet registry, the AN2K and CBEFF
read back (nistitl, lxml + MOSIP's XSD, our ISO reader); a correction arriving after the export re-exports."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from firmware.wire import clock_correction
from firmware.wire import control_protocol as cp
from provisioning.interchange import cbeff
from provisioning.interchange import iso19794 as iso
from provisioning.registry import Fleet
from tests.provisioning.export_support import Kit, export, shared_sim_kit

NS = {"c": cbeff.NS}
TWO_DAYS = 172800.4  # applied as whole seconds: 172800


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, dc_keys: dict[str, Any], corpus_dir: Path) -> Kit:
    return shared_sim_kit(tmp_path_factory, dc_keys, corpus_dir)


def fleet_with(tmp_path: Path, kit: Kit) -> Fleet:
    f = Fleet.init(tmp_path / "fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test")
    f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, ?, 'approved', 0)",
                 (kit.ident.kit_id, kit.ident.public_key_b64))
    return f


def send_corrections(f: Fleet, kit: Kit, *docs: tuple[str, list[tuple[int, int, float | None]]]) -> None:
    """One telemetry message from the kit carrying a signed correction per (boot, [(first, last, offset)])."""
    signed = [clock_correction.sign({"kit_id": kit.ident.kit_id, "issued": "2026-12-01T08:00:00Z", "source": "gnss",
                                     "boot_id": boot, "segments": [
                                         {"first_seq": a, "last_seq": b, "first_record": "", "last_record": "",
                                          "records": b - a + 1, "offset_s": off} for a, b, off in segs]},
                                    kit.ident.signing_key) for boot, segs in docs]
    body = {"kit_id": kit.ident.kit_id, "clock": {"synced": True, "corrections": signed}}
    topic = cp.telemetry_topic(kit.ident.kit_id)
    assert f.handle_kit_message(topic, cp.sign("telemetry", body, kit.ident.signing_key)) == "telemetry"
    assert not list(f.db.execute("SELECT 1 FROM events WHERE kind = 'clock_correction_refused'"))


def an2k(path: Path) -> Any:
    import nistitl

    msg = nistitl.Message()
    msg.parse(path.read_bytes())
    return msg


def ts(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d%H%M%SZ")


def when(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def test_an_unsynced_record_a_correction_covers_exports_at_the_corrected_time(kit: Kit, tmp_path: Path) -> None:
    full, two = kit.records["full"], kit.records["two_exceptions"]
    hdr, p = kit.open(full)
    assert not hdr.clock_synced and not kit.open(two)[0].clock_synced  # the simulated kit's clock is not synced
    synced = kit.reseal(full, 950, clock_synced=True)  # covered, but its header says the clock was right
    unplaceable = kit.reseal(full, 960)  # covered by a null offset: rebooted before the clock synced
    a = kit.archive(tmp_path / "archive", [full, two, synced, unplaceable])
    a.close()
    f = fleet_with(tmp_path, kit)
    send_corrections(f, kit, ("boot-1", [(hdr.seq, hdr.seq, TWO_DAYS), (950, 955, 3600.0)]),
                     ("boot-0", [(960, 960, None)]))
    f.close()
    fleet_db = str(tmp_path / "fleet" / "fleet.db")
    ids = {name: kit.open(d)[0].record_id for name, d in (("full", full), ("two", two), ("synced", synced),
                                                          ("unplaceable", unplaceable))}
    for fmt, suffix in (("an2k", ".an2"), ("cbeff", ".xml")):
        plain, fixed = tmp_path / f"plain-{fmt}", tmp_path / f"fixed-{fmt}"
        assert export(a.root, kit, plain, fmt).returncode == 0
        r = export(a.root, kit, fixed, fmt, "--fleet-db", fleet_db)
        assert r.returncode == 0, r.stdout + r.stderr
        for name in ("two", "synced", "unplaceable"):  # not covered, synced, or no offset: the bytes of today
            assert (fixed / f"{ids[name]}{suffix}").read_bytes() == (plain / f"{ids[name]}{suffix}").read_bytes()
        assert (fixed / f"{ids['full']}{suffix}").read_bytes() != (plain / f"{ids['full']}{suffix}").read_bytes()

    sealed = when(p.manifest["committed"])
    started = when(p.manifest["started"])
    shift = dt.timedelta(seconds=172800)
    msg = an2k(tmp_path / "fixed-an2k" / f"{ids['full']}.an2")
    t1, t2 = msg[0], msg[1]
    date, gmt = t1.DAT, t1.GMT
    assert date == (sealed + shift).strftime("%Y%m%d") and gmt == ts(sealed + shift)
    assert (t2._8, t2._10, t2._9) == (ts(sealed + shift), ts(started + shift), "N")  # 2.009: as it was at capture
    fix = t2._18
    fix = fix[0] if isinstance(fix, list) and isinstance(fix[0], list) else fix
    assert list(fix) == ["172800.400", "gnss", ts(sealed)], fix
    day = (sealed + shift).strftime("%Y%m%d")
    assert {rec.FCD for rec in msg if rec.type == 14} == {day} and [rec.PHD for rec in msg if rec.type == 10] == [day]
    before = an2k(tmp_path / "plain-an2k" / f"{ids['full']}.an2")
    assert (before[0].GMT, before[1]._8) == (ts(sealed), ts(sealed))
    assert "2.018" not in (tmp_path / "plain-an2k" / f"{ids['full']}.an2").read_bytes().decode("latin-1")

    from lxml import etree

    root = etree.fromstring((tmp_path / "fixed-cbeff" / f"{ids['full']}.xml").read_bytes())
    iso_time = (sealed + shift).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert root.findtext("c:BIRInfo/c:CreationDate", namespaces=NS) == iso_time
    assert {x.text for x in root.iterfind("c:BIR/c:BDBInfo/c:CreationDate", NS)} == {iso_time}
    others = {o.findtext("c:Key", namespaces=NS): o.findtext("c:Value", namespaces=NS)
              for o in root.iterfind("c:Others", NS)}
    assert others == {"CLOCK_CORRECTION_S": "172800.400", "CLOCK_CORRECTION_SOURCE": "gnss",
                      "CAPTURE_TIME_AS_SEALED": p.manifest["committed"]}
    finger = next(b for b in root.iterfind("c:BIR", NS) if b.findtext("c:BDBInfo/c:Type", namespaces=NS) == "Finger")
    fir = iso.read_fir(base64.b64decode(finger.findtext("c:BDB", namespaces=NS)))
    assert fir[0].capture == sealed + shift
    plain_root = etree.fromstring((tmp_path / "plain-cbeff" / f"{ids['full']}.xml").read_bytes())
    assert plain_root.findtext("c:BIRInfo/c:CreationDate", namespaces=NS) == p.manifest["committed"]
    assert not list(plain_root.iterfind("c:Others", NS))


def test_a_correction_that_arrives_after_the_export_re_exports_on_the_next_queue_run(kit: Kit, tmp_path: Path) -> None:
    full, two = kit.records["full"], kit.records["two_exceptions"]
    hdr = kit.open(full)[0]
    synced = kit.reseal(full, 950, clock_synced=True)
    a = kit.archive(tmp_path / "archive", [full, two, synced])
    a.close()
    f = fleet_with(tmp_path, kit)
    fleet_db = str(tmp_path / "fleet" / "fleet.db")
    out = tmp_path / "out"
    r = export(a.root, kit, out, "an2k", "--fleet-db", str(tmp_path / "nothing.db"))
    assert r.returncode == 2 and "is not a fleet.db" in r.stderr and not out.exists(), r.stderr
    r = export(a.root, kit, out, "an2k", "--fleet-db", fleet_db)
    first = json.loads(r.stdout)
    assert r.returncode == 0 and len(first["written"]) == 3 and first["corrected"] == [], r.stdout + r.stderr
    files = {p.name: p.read_bytes() for p in out.glob("*.an2")}
    synced_id = kit.open(synced)[0].record_id
    (out / f"{synced_id}.an2").unlink()  # the ABIS took it away: not to be delivered again
    send_corrections(f, kit, ("boot-1", [(hdr.seq, hdr.seq, 60.0), (950, 950, 60.0)]))
    r = export(a.root, kit, out, "an2k", "--fleet-db", fleet_db)
    second = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert second["corrected"] == second["written"] == [hdr.record_id], second
    assert f"export corrected record_id={hdr.record_id}" in r.stderr
    assert an2k(out / f"{hdr.record_id}.an2")[1]._8 != an2k_time(files[f"{hdr.record_id}.an2"])
    assert not (out / f"{synced_id}.an2").exists()  # its header says synced: the correction changes nothing
    two_id = kit.open(two)[0].record_id
    assert (out / f"{two_id}.an2").read_bytes() == files[f"{two_id}.an2"]
    state = json.loads((out / ".rekam-export.json").read_text())
    assert state["an2k"]["corrections_cursor"] >= 1
    r = export(a.root, kit, out, "an2k", "--fleet-db", fleet_db)  # nothing new: nothing rewritten
    assert json.loads(r.stdout)["written"] == [] and json.loads(r.stdout)["corrected"] == []
    # A record that arrives after the correction is exported corrected by the queue itself (not "corrected").
    later = kit.reseal(full, hdr.seq + 1000)
    send_corrections(f, kit, ("boot-2", [(hdr.seq + 1000, hdr.seq + 1000, 30.0)]))
    b = kit.archive(a.root, [])
    assert b.store(later, kit.ident.kit_id, "test").status == "stored"
    b.close()
    r = export(a.root, kit, out, "an2k", "--fleet-db", fleet_db)
    third = json.loads(r.stdout)
    later_id = kit.open(later)[0].record_id
    assert third["written"] == [later_id] and third["corrected"] == [], third
    assert list(an2k(out / f"{later_id}.an2")[1]._18[0])[0] == "30.000"
    f.close()
    # Another fleet registry (moved, rebuilt): its correction ids start at 1 again, below this folder's cursor;
    # the cursor is bound to the registry (its first correction), so its correction is not skipped.
    g = fleet_with(tmp_path / "other", kit)
    send_corrections(g, kit, ("boot-9", [(kit.open(two)[0].seq, kit.open(two)[0].seq, 90.0)]))
    r = export(a.root, kit, out, "an2k", "--fleet-db", str(tmp_path / "other" / "fleet" / "fleet.db"))
    fourth = json.loads(r.stdout)
    assert fourth["corrected"] == [two_id] and "another fleet registry" in r.stderr, r.stdout + r.stderr
    assert list(an2k(out / f"{two_id}.an2")[1]._18[0])[0] == "90.000"
    g.close()


def test_limit_bounds_the_late_corrections_which_resume_where_they_stopped(kit: Kit, tmp_path: Path) -> None:
    """`--limit N` bounds the whole run: one correction covering many exported records takes at most half of N
    (rounded up) and goes on next run from the record it stopped after (`corrections_resume`), the new records get
    the rest; no record is re-exported twice for one correction."""
    full = kit.records["full"]
    recs = [kit.reseal(full, seq) for seq in range(3000, 3006)]
    ids = [kit.open(r)[0].record_id for r in recs]
    a = kit.archive(tmp_path / "archive", recs)
    a.close()
    f = fleet_with(tmp_path, kit)
    fleet_db = str(tmp_path / "fleet" / "fleet.db")
    out = tmp_path / "out"

    def run(*extra: str) -> tuple[dict[str, Any], str]:
        r = export(a.root, kit, out, "an2k", "--fleet-db", fleet_db, *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout), r.stderr

    assert sorted(run()[0]["written"]) == sorted(ids)
    send_corrections(f, kit, ("boot-7", [(3000, 3005, 60.0)]))
    first, err = run("--limit", "3")  # half of 3 rounded up: 2 corrections; no new records to export
    assert first["corrected"] == ids[:2] and "paused at the run's limit" in err, first
    state = json.loads((out / ".rekam-export.json").read_text())["an2k"]
    assert state["corrections_resume"]["page_after"] == [3001, ids[1]] and "corrections_cursor" not in state
    later = kit.reseal(full, 3100)
    b = kit.archive(a.root, [])
    assert b.store(later, kit.ident.kit_id, "test").status == "stored"
    b.close()
    second, _ = run("--limit", "4")  # 2 corrections, where the first run stopped; the new record in the rest
    later_id = kit.open(later)[0].record_id
    assert second["corrected"] == ids[2:4] and later_id in second["written"], second
    third, _ = run("--limit", "4")  # the last two: the correction is done, its cursor saved
    assert third["corrected"] == ids[4:] and third["written"] == ids[4:], third
    state = json.loads((out / ".rekam-export.json").read_text())["an2k"]
    assert "corrections_resume" not in state and state["corrections_cursor"] >= 1
    assert run("--limit", "4")[0]["written"] == []
    for rid in ids:
        assert list(an2k(out / f"{rid}.an2")[1]._18[0])[0] == "60.000"
    f.close()


def an2k_time(data: bytes) -> str:
    import nistitl

    msg = nistitl.Message()
    msg.parse(data)
    return msg[1]._8


def test_late_correction_on_the_scale_archive_with_a_postgresql_registry(kit: Kit, tmp_path: Path, postgres: Any,
                                                                         pg_database: str, s3_objects: str) -> None:
    """The same queue on the other backends: records in PostgreSQL + S3, corrections in a PostgreSQL registry (its
    own database: both have a `kits` table)."""
    import io
    import os

    from provisioning.archive import open_archive
    from provisioning.interchange.export import Exporter, Options

    registry = postgres.create_database(f"t_clock_registry_{os.getpid()}")
    try:
        f = Fleet.init(tmp_path / "fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test",
                       registry=registry)
        f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, ?, 'approved', 0)",
                     (kit.ident.kit_id, kit.ident.public_key_b64))
        a = open_archive(pg_database, s3_objects, fleet_db=registry)
        a.register_kit(kit.ident.kit_id, kit.ident.public_key_b64)
        for data in (kit.records["full"], kit.records["two_exceptions"]):
            assert a.store(data, kit.ident.kit_id, "test").status == "stored"
        hdr = kit.open(kit.records["full"])[0]
        log = io.StringIO()
        ex = Exporter(a, kit.dc_sk, tmp_path / "out", Options("an2k", "IDDUKCAPIL"), stream=log, progress=False)
        first = ex.run_queue()
        assert len(first.written) == 2 and first.corrected == [], first
        send_corrections(f, kit, ("boot-1", [(hdr.seq, hdr.seq, -7200.0)]))
        second = ex.run_queue()
        assert second.corrected == second.written == [hdr.record_id] and not second.failed, second
        assert list(an2k(tmp_path / "out" / f"{hdr.record_id}.an2")[1]._18[0])[0] == "-7200.000"
        assert ex.run_queue().written == []
        a.close()
        f.close()
    finally:
        postgres.drop_database(f"t_clock_registry_{os.getpid()}")
