"""Issue 14.6: the archive's two backends measured in the same run (ratios, never absolute thresholds).

1. Index insert cost on PostgreSQL with 10^3 rows present vs `--rows` present (bulk-loaded with COPY; goal ratio
   <= 1.5), through the scale backend's own insert (one commit per row, as a worker does) and batched (1000 rows
   a transaction: the index cost without the commit's fsync).
2. At `--rows`: "which records of kit K are archived" (`record_ids(kit)`), "what arrived since T" (the
   received_at index), and `since(cursor)` near the end, against the same queries at 10^3 rows.
3. `store()` with 1, 2 and 4 worker processes on the scale backend (PostgreSQL + SeaweedFS S3) and on the embedded
   backend: records/s, and CPU seconds per record (the workers' own, and the servers': postgres and weed) from
   pre-sealed records. CPU per record is what projects to more cores: records/s on C free cores is about
   C / (CPU s per record, workers + servers), as long as the disks and the network are not the limit.

    python bench/bench_archive.py                    # small: --rows 20000
    python bench/bench_archive.py --rows 1000000     # the campaign

Services are real: a PostgreSQL 15 of its own with fsync ON (durable commits, as in production) and a `weed
server -s3`, both on 127.0.0.1 in a temporary folder (tests/support.py `Postgres`, `SeaweedS3`).
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from firmware.wire import record_format as rf  # noqa: E402
from firmware.wire.ids import make_record_id  # noqa: E402
from provisioning.archive import open_archive  # noqa: E402
from tests.support import Postgres, SeaweedS3  # noqa: E402

BASE_ROWS = 1000
RECORDS_PER_KIT = 1000  # synthetic index rows: kits of 1000 records each


def kit_name(i: int) -> str:
    return f"rk-b{i:09d}"


def bulk_load(dsn: str, rows: int, first_kit: int = 0) -> float:
    """COPY `rows` synthetic index rows (kits of RECORDS_PER_KIT records, arrivals spread over a year)."""
    import psycopg

    t0 = time.perf_counter()
    start = time.time() - 365 * 86400
    with psycopg.connect(dsn) as c, c.cursor() as cur:
        with cur.copy("COPY records (kit_id, record_id, seq, sha256, size, object_key, source, received_at) "
                      "FROM STDIN") as cp:
            for n in range(rows):
                kit = kit_name(first_kit + n // RECORDS_PER_KIT)
                seq = n % RECORDS_PER_KIT + 1
                rid = make_record_id(kit, seq, "20260101T000000Z")
                at = time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(start + n * 365 * 86400 / rows))
                cp.write_row((kit, rid, seq, f"{n:064x}", 400_000, f"records/{kit}/{rid}.rkm", "bulk", at))
        c.commit()
        c.execute("ANALYZE records")
        c.commit()
    return time.perf_counter() - t0


def fresh(pg: Postgres, name: str, s3: SeaweedS3) -> tuple[str, str]:
    dsn = pg.create_database(name)
    s3.create_bucket("rekam-bench")
    return dsn, s3.objects_url("rekam-bench", name)


def insert_cost(dsn: str, objects: str, n: int, first: int, first_kit: int) -> tuple[float, float]:
    """(s per row, one commit each, through ScaleArchive._insert_record; s per row batched in one transaction),
    for `n` new rows numbered from `first`."""
    a = open_archive(dsn, objects)
    try:
        t0 = time.perf_counter()
        for i in range(first, first + n):
            kit = kit_name(first_kit + i % 50)
            rid = make_record_id(kit, 10_000 + i, "20261201T000000Z")
            a._insert_record(rid, kit, 10_000 + i, f"{i:064x}", 1, None, "k", "bench")  # type: ignore[attr-defined]
        one = (time.perf_counter() - t0) / n
        rows = [(kit_name(first_kit + 50 + i % 50), make_record_id(kit_name(first_kit + 50 + i % 50), 10_000 + i,
                                                                   "20261201T000000Z"), 10_000 + i, f"{i:064x}")
                for i in range(first, first + n)]
        with a.db.conn() as c:  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            with c.transaction():
                c.cursor().executemany(
                    "INSERT INTO records (kit_id, record_id, seq, sha256, size, object_key, source) "
                    "VALUES (%s,%s,%s,%s,1,'k','bench') ON CONFLICT DO NOTHING", rows)
            batched = (time.perf_counter() - t0) / n
    finally:
        a.close()
    return one, batched


def insert_costs(small: tuple[str, str], large: tuple[str, str], n: int, first_kit: int,
                 rounds: int = 5) -> tuple[tuple[float, float], tuple[float, float]]:
    """Medians over `rounds` alternating rounds on the small and the large index (the machine is noisy: what
    disturbs one round disturbs its neighbour in the other database too)."""
    got: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    per = max(1, n // rounds)
    for r in range(rounds):
        for j, (dsn, objects) in enumerate((small, large) if r % 2 == 0 else (large, small)):
            got[j if r % 2 == 0 else 1 - j].append(insert_cost(dsn, objects, per, r * per, first_kit))
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in got.items()}
    return med[0], med[1]


def query_times(dsn: str, objects: str, rows: int, reps: int = 30) -> dict[str, float]:
    """Median seconds of the three questions at `rows` rows."""
    import psycopg

    a = open_archive(dsn, objects)
    out: dict[str, list[float]] = {"kit": [], "since_t": [], "since_cursor": []}
    rng = random.Random(1)
    kits = max(1, rows // RECORDS_PER_KIT)
    try:
        with psycopg.connect(dsn) as c:
            t_cut = c.execute("SELECT max(received_at) - interval '1 hour' * 24 FROM records").fetchone()[0]
            mid = c.execute("SELECT xid::text, arrival FROM records ORDER BY xid DESC, arrival DESC OFFSET 100 "
                            "LIMIT 1").fetchone()
        cursor = f"{mid[0]}.{mid[1]}"
        for _ in range(reps):
            k = kit_name(rng.randrange(kits))
            t0 = time.perf_counter()
            ids = a.record_ids(k)
            out["kit"].append(time.perf_counter() - t0)
            assert len(ids) == RECORDS_PER_KIT or rows < RECORDS_PER_KIT, (k, len(ids))
            with a.db.conn() as c:  # type: ignore[attr-defined]
                t0 = time.perf_counter()
                c.execute("SELECT record_id, kit_id, sha256 FROM records WHERE received_at >= %s "
                          "ORDER BY received_at", (t_cut,)).fetchall()
                out["since_t"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            a.since(cursor, limit=100)
            out["since_cursor"].append(time.perf_counter() - t0)
    finally:
        a.close()
    return {k: statistics.median(v) for k, v in out.items()}


# --- store() with N worker processes -----------------------------------------------------------------------------


def seal_records(folder: Path, kits: int, per_kit: int, size: int) -> list[tuple[str, str, str]]:
    """Pre-sealed records as files: (kit_id, public key b64, path)."""
    _, dc_pub = rf.generate_datacenter_keypair()
    rcpt = rf.load_recipient_key(dc_pub)
    out = []
    payload = os.urandom(size)
    for k in range(kits):
        key = Ed25519PrivateKey.generate()
        kit = f"rk-w{k:09d}"
        pub = base64.b64encode(rf.raw_public(key.public_key())).decode()
        for s in range(1, per_kit + 1):
            rid = make_record_id(kit, s, "20261201T000000Z")
            p = folder / f"{rid}.rkm"
            p.write_bytes(rf.seal(payload, record_id=rid, kit_id=kit, seq=s, created="2026-12-01T00:00:00Z",
                                  clock_synced=True, signing_key=key, recipients=[rcpt]))
            out.append((kit, pub, str(p)))
    return out


def _store_worker(spec: str, objects: str | None, items: list[tuple[str, str]], barrier: Any, out: Any) -> None:
    try:
        a = open_archive(spec, objects)
        datas = [(kit, Path(p).read_bytes()) for kit, p in items]
    finally:
        barrier.wait(120)
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        stored = sum(a.store(d, kit, "bench").status == "stored" for kit, d in datas)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        a.close()
        out.put((stored, wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), ""))
    except Exception as e:  # noqa: BLE001  (reported by the parent)
        out.put((0, 0.0, 0.0, repr(e)))


def _proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of the server processes `pids` and their children, including the children
    that ended and were waited for (the postmaster's backends: counted in its cutime/cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d) in pids:
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
        elif int(f[1]) in pids:  # a live child (a backend of the postmaster)
            total += int(f[11]) + int(f[12])
    return total / tick


def store_run(spec: str, objects: str | None, records: list[tuple[str, str, str]], workers: int,
              servers: list[int]) -> dict[str, float]:
    a = open_archive(spec, objects)
    for kit, pub, _p in records:
        a.register_kit(kit, pub)
    a.close()
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(workers + 1), ctx.Queue()
    shares = [[(k, p) for k, _pub, p in records[i::workers]] for i in range(workers)]
    procs = [ctx.Process(target=_store_worker, args=(spec, objects, s, barrier, out)) for s in shares]
    for p in procs:
        p.start()
    barrier.wait(120)
    s0, t0 = _proc_cpu(servers), time.perf_counter()
    res = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    server_cpu = _proc_cpu(servers) - s0
    for p in procs:
        p.join(30)
    stored = sum(r[0] for r in res)
    assert stored == len(records) and not any(r[3] for r in res), (stored, len(records), [r[3] for r in res])
    cpu = sum(r[2] for r in res)
    return {"rps": stored / wall, "cpu_worker": cpu / stored, "cpu_server": server_cpu / stored}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="index rows present for the large case")
    ap.add_argument("--inserts", type=int, default=1000, help="rows inserted to measure the insert cost")
    ap.add_argument("--records", type=int, default=96, help="records stored per store() run")
    ap.add_argument("--record-kb", type=int, default=256, help="payload of each pre-sealed record, KiB")
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rekam-bench-archive-"))
    pg = Postgres(fsync=True)
    s3 = SeaweedS3(tmp / "seaweed")
    for k, v in s3.env.items():
        os.environ[k] = v
    try:
        t0 = time.perf_counter()
        pg.start()
        s3.start()
        print(f"services up in {time.perf_counter() - t0:.1f} s (PostgreSQL 15 fsync=on, SeaweedFS S3)", flush=True)

        # 1 + 2: the index at 10^3 and at --rows rows
        small = fresh(pg, "bench_small", s3)
        large = fresh(pg, "bench_large", s3)
        for dsn, objects in (small, large):
            open_archive(dsn, objects).close()  # migrate
        bulk_load(small[0], BASE_ROWS)
        dt_load = bulk_load(large[0], args.rows)
        print(f"bulk-loaded {args.rows} rows with COPY in {dt_load:.1f} s ({args.rows / dt_load:,.0f} rows/s)")
        first_kit = args.rows // RECORDS_PER_KIT + 10
        i_small, i_large = insert_costs(small, large, args.inserts, first_kit)
        print(f"index insert, one commit a row: {i_small[0] * 1e3:.3f} ms at {BASE_ROWS} rows, "
              f"{i_large[0] * 1e3:.3f} ms at {args.rows} rows: ratio {i_large[0] / i_small[0]:.2f} (goal <= 1.5)")
        print(f"index insert, 1000 a transaction: {i_small[1] * 1e6:.1f} us at {BASE_ROWS} rows, "
              f"{i_large[1] * 1e6:.1f} us at {args.rows} rows: ratio {i_large[1] / i_small[1]:.2f} (goal <= 1.5)")
        q_small = query_times(*small, BASE_ROWS)
        q_large = query_times(*large, args.rows)
        for k, what in (("kit", "records of kit K (1000 ids)"), ("since_t", "arrived in the last 24 h"),
                        ("since_cursor", "since(cursor), 100 rows")):
            print(f"{what}: {q_small[k] * 1e3:.2f} ms at {BASE_ROWS} rows, {q_large[k] * 1e3:.2f} ms at "
                  f"{args.rows} rows: ratio {q_large[k] / q_small[k]:.2f}")
        for name in ("bench_small", "bench_large"):
            pg.drop_database(name)

        # 3: store() throughput, both backends, 1/2/4 worker processes
        recs_dir = tmp / "sealed"
        recs_dir.mkdir()
        per_kit = 8
        records = seal_records(recs_dir, max(1, args.records // per_kit), per_kit, args.record_kb * 1024)
        servers = [pg.proc.pid if pg.proc else 0, s3.proc.pid if s3.proc else 0]
        print(f"store(): {len(records)} pre-sealed records of {args.record_kb} KiB payload per run, "
              f"{os.cpu_count()} cores")
        print(f"{'backend':<10} {'workers':>7} {'records/s':>10} {'ratio':>6} {'CPU s/rec worker':>17} "
              f"{'CPU s/rec servers':>18}")
        base_rps = None
        for workers in [int(w) for w in args.workers.split(",")]:
            for kind in ("embedded", "scale"):
                if kind == "embedded":
                    spec, objects = str(tmp / f"emb-{workers}"), None
                else:
                    spec, objects = fresh(pg, f"bench_store_{workers}", s3)
                r = store_run(spec, objects, records, workers, servers if kind == "scale" else [])
                base_rps = base_rps or r["rps"]
                print(f"{kind:<10} {workers:>7} {r['rps']:>10.1f} {r['rps'] / base_rps:>6.2f} "
                      f"{r['cpu_worker']:>17.4f} {r['cpu_server']:>18.4f}", flush=True)
        print("ratio: records/s against the embedded backend with 1 worker. Projection: records/s on C cores "
              "~ C / (CPU s/rec worker + servers) while CPU-bound.")
    finally:
        s3.kill()
        pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
