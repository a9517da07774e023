"""Export benchmark (issue: ABIS export): records/s of `rekam-fleet export` against decrypting alone.

N enrollments shaped like the kit's (manifest v2, ten corpus fingerprints in the sensor's format 256x288
PNG, a 413x531 corpus portrait JPEG) are sealed and archived once; then, interleaved over `--rounds`
rounds in the same run (the machine is shared and noisy):

- decrypt: `Archive.read` + verify + decrypt + `Payload.decode` of every record (the floor any export pays);
- an2k: the whole export to AN2K with WSQ Type-14s (`Exporter.run_queue` into a fresh folder);
- an2k-raw: AN2K with uncompressed Type-14s (the cost of nistitl and the file writes without WSQ);
- cbeff: the whole export to CBEFF with lossless JPEG 2000 inside FIR/FAC, XSD-validated;
- an2k-fleet: an2k with ``--fleet-db`` (a fleet.db holding a clock correction): the per-record lookup of the
  correction segment and of the kit's registry row that the option adds (the records are sealed with a synced
  clock, so the output is an2k's).

    .venv/bin/python bench/bench_export.py [--records N] [--rounds N] [--dir PATH]

Printed: records/s per mode (median of the rounds) and each export's ratio to decrypt alone.
`--jobs N` runs the conversions in N worker processes (decrypt alone stays one process: the baseline).
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_enroll import corpus_dir  # noqa: E402
from firmware.capture.simulated import FINGERS, SimulatedCapture  # noqa: E402
from firmware.seal import identity  # noqa: E402
from firmware.wire import record_format as rf  # noqa: E402
from provisioning import registry_db  # noqa: E402
from provisioning.archive import Archive  # noqa: E402
from provisioning.interchange.export import Exporter, Options  # noqa: E402


def make_records(n: int, ident: identity.KitIdentity, dc_pub: bytes, corpus: Path) -> list[bytes]:
    """`n` sealed records: the simulated capture's corpus images (the kit's formats) in a v2 manifest."""
    rng = random.Random(4)
    sim = SimulatedCapture(corpus, seed=4)
    out = []
    for i in range(n):
        atts = sim.capture().attachments  # face.jpg + finger-R1.png .. finger-L5.png
        fingers = []
        for code in FINGERS:
            tries = rng.randint(1, 3)
            fingers.append({"finger": code, "image": f"finger-{code}.png", "width": 256, "height": 288, "ppi": 500,
                            "attempts": [{"score": round(rng.uniform(20, 90), 2), "codes": [], "rejected": False}
                                         for _ in range(tries)], "kept": tries - 1, "forced": tries == 3})
        created = f"2026-12-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z"
        m = {"schema": "rekam.enrollment/2", "nik": f"3273{rng.randrange(10**12):012d}", "operator_id": "op-1",
             "site": "bench", "started": created, "committed": created, "clock_synced": True,
             "software": "rekam bench", "nik_override": None, "duplicate_check": {"matches": [], "supervisor": None},
             "face": {"attachment": "face.jpg", "attempts": [{"score": 88.0, "codes": [], "rejected": False}],
                      "kept": 0, "forced": False}, "fingers": fingers}
        seq = i + 1
        rid = f"{ident.kit_id}-{seq:08d}-{created.replace('-', '').replace(':', '')}"
        out.append(rf.seal(rf.Payload(m, atts).encode(), record_id=rid, kit_id=ident.kit_id, seq=seq,
                           created=created, clock_synced=True, signing_key=ident.signing_key,
                           recipients=[rf.load_recipient_key(dc_pub)]))
    return out


def decrypt_all(archive: Archive, key: object) -> int:
    n = 0
    for rec in archive.since(None, 10**9):
        data = archive.read(rec.record_id)
        _hdr, plain = rf.open_record(data, key, archive.kit_keys(rec.kit_id)[0])
        rf.Payload.decode(plain)
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="work folder (default: a temporary folder under /var/tmp)")
    ap.add_argument("--jobs", type=int, default=1, help="conversion processes of the export (default 1)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.dir or "/var/tmp"))
    priv, pub = rf.generate_datacenter_keypair()
    key = rf.load_datacenter_private_key(priv)
    ident = identity.load_or_create(root / "kit")
    t0 = time.perf_counter()
    recs = make_records(args.records, ident, pub, corpus_dir())
    archive = Archive(root / "archive")
    archive.register_kit(ident.kit_id, ident.public_key_b64)
    (root / "fleet").mkdir()
    reg = registry_db.open_registry(root / "fleet", None)  # a fleet registry with one correction of this kit
    with reg.write():
        reg.execute("INSERT INTO kits (kit_id, public_key, state) VALUES (?, ?, 'approved')",
                    (ident.kit_id, ident.public_key_b64))
        reg.execute("INSERT INTO clock_corrections (id, kit_id, boot_id, source, issued, sig, doc, verified_key, "
                    "received_at) VALUES (1, ?, 'b', 'ntp', '2026-12-01T00:00:00Z', 's', '{}', 'current:x', 0)",
                    (ident.kit_id,))
        reg.execute("INSERT INTO clock_segments VALUES (?, 'b', 1, ?, ?, 3600.0, 1)",
                    (ident.kit_id, args.records, args.records))
    reg.close()
    fleet_archive = Archive(root / "archive", fleet_db=root / "fleet" / "fleet.db")
    for data in recs:
        assert archive.store(data, ident.kit_id, "bench").status == "stored"
    size = sum(len(r) for r in recs) / len(recs)
    print(f"{args.records} records of {size / 1024:.0f} KiB (10 fingers + face) sealed and archived in "
          f"{time.perf_counter() - t0:.1f} s")
    modes = {"decrypt": None, "an2k": Options("an2k", "BENCH"), "an2k-raw": Options("an2k", "BENCH", uncompressed=True),
             "cbeff": Options("cbeff"), "an2k-fleet": Options("an2k", "BENCH")}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    sizes: dict[str, float] = {}
    for r in range(args.rounds):
        for mode, opts in modes.items():
            t = time.perf_counter()
            if opts is None:
                n = decrypt_all(archive, key)
            else:
                out = root / f"out-{mode}-{r}"
                a = fleet_archive if mode == "an2k-fleet" else archive
                s = Exporter(a, key, out, opts, stream=io.StringIO(), progress=False, jobs=args.jobs).run_queue()
                assert not s.failed, s.failed[:3]
                n = len(s.written)
                files = [p for p in out.iterdir() if not p.name.startswith(".")]
                sizes[mode] = sum(p.stat().st_size for p in files) / len(files)
            rates[mode].append(n / (time.perf_counter() - t))
    base = statistics.median(rates["decrypt"])
    print(f"{'mode':10} {'records/s':>10} {'x decrypt':>10} {'file KiB':>9}")
    for mode in modes:
        med = statistics.median(rates[mode])
        kib = f"{sizes[mode] / 1024:9.0f}" if mode in sizes else f"{'-':>9}"
        print(f"{mode:10} {med:10.1f} {med / base:10.3f} {kib}")
    print(f"ratio: export AN2K+WSQ is {base / statistics.median(rates['an2k']):.1f}x slower than decrypting alone, "
          f"CBEFF+JP2 {base / statistics.median(rates['cbeff']):.1f}x; --fleet-db costs "
          f"{statistics.median(rates['an2k']) / statistics.median(rates['an2k-fleet']):.3f}x an2k's time")
    archive.close()
    fleet_archive.close()
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
