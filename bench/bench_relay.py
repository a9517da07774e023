"""Relay benchmarks (issue #6, issue #17: the relay against its fair limit; ingest 1 vs 2 workers).

1. Drain of a backlog of N records of 400 KB each to a local mosquitto that announces a Maximum Packet Size
   (16 MiB), until the last PUBACK, in `--runs` interleaved runs (medians and every run's ratio printed):
   * plain paho QoS 1 sending the same record bytes (one message per record, paho's default window of 20);
   * the relay (announce when needed + chunks as large as the broker allows up to relay.chunk_max_kb,
     window 20, journal marks, read + SHA-256 check from the SD);
   * its *fair limit*: plain paho doing the same SHA-256 check and the same slicing as the relay's
     negotiated chunk size (so one message per 400 KB record at 1 MiB);
   * the same pair at 128 KiB chunks (a broker that announces no limit; the relay of before issue 17).
   Ratios: relay / plain paho, relay / fair limit (goal >= 0.9), and how much the fair limit rose. Each drain
   is timed from the first record offered to the last PUBACK handled, the relay's end signalled as the
   baseline's (an event, not a poll). Beside each time: CPU per record of this process (every thread) and of
   the broker over the same interval; the CPU ratio fair limit / relay varies far less than the times on a
   shared machine. `--tuned-broker`: see TUNED_BROKER_ENV.
   During this phase nothing acknowledges records, so `max_unacked_records` is 0 (no limit) here.
2. End to end with the data center: relay + `rekam-fleet ingest` processes (signature, fsync'd archive,
   ack; staging for multi-chunk records), 1 and 2 worker processes sharing the subscription, interleaved:
   records/s until every record is acked, and each run's slowest exit after SIGINT.

    .venv/bin/python bench/bench_relay.py [--records 1000] [--runs 3] [--ingest-records 300] [--dir PATH]
                                          [--no-ingest] [--tuned-broker]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware import config
from firmware.capture.simulated import SimulatedCapture  # noqa: E402
from firmware.relay.relay import Relay  # noqa: E402
from firmware.seal import identity
from firmware.store.store import Store  # noqa: E402
from firmware.wire import record_format  # noqa: E402
from firmware.wire import relay_protocol as proto  # noqa: E402
from provisioning.archive import Archive  # noqa: E402
from provisioning.signer import load_ack_key  # noqa: E402

RECORD = 400 * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MAX_PACKET = 16 * 1024 * 1024  # announced in CONNACK: the relay's chunks are then up to relay.chunk_max_kb


# A stock glibc maps (mmap) and faults in every allocation above its dynamic threshold: mosquitto 2.0.11 then
# spends ~4x the CPU per byte on packets above ~450 KB (measured: 0.5-0.7 ms vs 0.1-0.15 ms per 463 KB record),
# CPU it takes from the kit's process on the same two cores. --tuned-broker keeps the broker's packets on its
# heap, to see the kit's side alone; the default is the stock broker (as before issue 17's fix).
TUNED_BROKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def start_mosquitto(d: Path, tuned: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_queued_messages 100000\nmax_packet_size {MAX_PACKET}\n")
    binary = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else shutil.which("mosquitto")
    if not binary:
        raise SystemExit("mosquitto not installed: apt-get install -y mosquitto")
    env = {**os.environ, **(TUNED_BROKER_ENV if tuned else {})}
    p = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p, port
        except OSError:
            time.sleep(0.02)
    raise SystemExit("mosquitto did not start")


BROKER_PID = [0]
LAST_CPU: list[tuple[float, float]] = []  # (this process, the broker) CPU seconds of the last timed drain


def cpu_now() -> tuple[float, float]:
    """CPU seconds so far of this process (every thread) and of the broker."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    t = Path(f"/proc/{BROKER_PID[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return r.ru_utime + r.ru_stime, (int(t[11]) + int(t[12])) / os.sysconf("SC_CLK_TCK")


def cpu_since(c0: tuple[float, float]) -> None:
    c1 = cpu_now()
    LAST_CPU.append((c1[0] - c0[0], c1[1] - c0[1]))


def make_store(root: Path, port: int, **relay: object) -> Store:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "dc.pub").exists():
        (root / "dc.pub").write_bytes(record_format.generate_datacenter_keypair()[1])
    cfg = config.validate({
        "kit": {"state_dir": str(root / "sd")}, "datacenter": {"public_key_files": [str(root / "dc.pub")]},
        "usb": {"mount_point": str(root / "no-stick"), "require_mountpoint": False},
        "store": {"reserve_floor_mb": 1, "verify_readback": False},
        "relay": {"brokers": [f"mqtt://127.0.0.1:{port}"], "publishes_per_s": 0.0, "window": 20,
                  "telemetry_interval_s": 3600.0, "ack_timeout_s": 120.0,
                  "ack_public_keys": [proto.ack_public_b64(load_ack_key(root / "ack-signing.key", create=True))],
                  **relay},
    })
    s = Store(cfg, identity.load_or_create(cfg.state_dir))
    s.open()
    return s


def fill(store: Store, n: int) -> None:
    cap = SimulatedCapture(None, seed=1, pad_to=RECORD)
    payload = cap.capture().encode()  # one payload sealed n times: sealing is not what is measured
    t = time.monotonic()
    for i in range(n):
        store.commit(payload)
        if i % 200 == 199:
            print(f"  backlog {i + 1}/{n} ({time.monotonic() - t:.0f} s)", file=sys.stderr)


def reset(store: Store) -> None:
    with store.j.transaction() as c:
        c.execute("UPDATE records SET state = 'stored'")


def plain_paho(port: int, store: Store, slice_bytes: int = 0, verify: bool = False) -> float:
    """QoS 1, window 20 (paho's default in-flight limit), until the last PUBACK: one message per record, or
    the record cut in `slice_bytes` pieces (the same message count as the relay's chunks)."""
    import paho.mqtt.client as mqtt

    rows = store.j.records()
    window = threading.Semaphore(20)
    done = threading.Event()
    left = [len(rows)]

    def on_publish(_c: object, _u: object, _mid: int, rc: object, _p: object) -> None:
        window.release()
        left[0] -= 1
        if left[0] == 0:
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-plain", protocol=mqtt.MQTTv5)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    t, c0 = time.monotonic(), cpu_now()
    if slice_bytes:
        left[0] = sum(-(-r.size // slice_bytes) for r in rows)
    for r in rows:
        data = store.sd_path(r.id).read_bytes()
        if verify and record_format.sha256_hex(data) != r.sha256:
            raise SystemExit(f"{r.id}: hash mismatch")
        for i in range(0, len(data), slice_bytes or len(data)):
            window.acquire()
            c.publish("bench/plain", data[i:i + (slice_bytes or len(data))], qos=1)
    done.wait(600)
    dt = time.monotonic() - t
    cpu_since(c0)
    c.loop_stop()
    c.disconnect()
    return dt


class TimedRelay(Relay):
    """The relay, telling the bench the moment its `total`-th record's last PUBACK was handled (as the baseline's
    on_publish counts down and sets an event: polling would add up to a poll period to the relay's time only)."""

    total = 0

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)
        self.done = threading.Event()

    def _finish(self, t: object) -> None:
        super()._finish(t)
        if self.counters["records_sent"] >= self.total:
            self.done.set()


def relay_drain(store: Store, chunk_kb: int = 128, chunk_max_kb: int = 1024) -> tuple[float, int]:
    """The relay, timed like the baseline: from a connected client to the last record's last PUBACK.
    Returns the time and the chunk size the relay negotiated."""
    with store.j.transaction() as c:
        c.execute("UPDATE records SET state = 'acked'")  # nothing to send while it connects
    raw = store.cfg.raw
    cfg = config.validate({**raw, "relay": {**raw["relay"], "chunk_kb": chunk_kb, "chunk_max_kb": chunk_max_kb}})
    relay = TimedRelay(store, cfg)
    relay.total = len(store.j.records())
    relay.start()
    while relay.status()["state"] != "connected":
        time.sleep(0.005)
    time.sleep(0.2)
    chunk = int(relay.status()["chunk_bytes"])
    reset(store)
    t, c0 = time.monotonic(), cpu_now()
    store._changed()  # wake the relay: the backlog is there
    total = relay.total
    if not relay.done.wait(600):  # in memory at each record's last PUBACK, like the baseline
        raise SystemExit(f"relay sent {relay.counters['records_sent']} of {total} records in 600 s")
    dt = time.monotonic() - t
    cpu_since(c0)
    while store.j.counts()["sent"]["records"] < total:  # the batched journal marks follow within 0.25 s
        time.sleep(0.01)
    relay.close()
    return dt, chunk


def ingest_run(root: Path, port: int, store: Store, n: int, workers: int, tag: str) -> tuple[float, float, str]:
    """Relay + `workers` `rekam-fleet ingest` processes sharing one subscription, until every record is acked.

    Returns (seconds, slowest exit after SIGINT, a note). The relay starts only once every worker is subscribed:
    a shared subscription with no member drops what is published to it (the kit would resend it only after its
    ack timeout: the 143 s run of issue 17)."""
    with store.j.transaction() as c:
        c.execute("UPDATE records SET state = 'purged' WHERE seq > ?", (n,))
        c.execute("UPDATE records SET state = 'stored' WHERE seq <= ?", (n,))
    arch = root / f"archive-{tag}-{workers}"
    repo = Path(__file__).resolve().parents[1]
    logs = [root / f"ingest-{tag}-{workers}-{i}.log" for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "provisioning.cli", "ingest", "--broker",
                               f"mqtt://127.0.0.1:{port}", "--archive", str(arch), "--tofu",
                               "--ack-key", str(store.cfg.state_dir.parent / "ack-signing.key")], cwd=repo,
                              stdout=subprocess.DEVNULL, stderr=log.open("w")) for log in logs]
    deadline = time.monotonic() + 60
    while not all("ingest subscribed" in log.read_text() for log in logs):
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name} (exit {p.poll()}):\n{log.read_text(errors='replace')[-2000:]}"
                              for log, p in zip(logs, procs, strict=True))
            for p in procs:
                p.kill()
            raise SystemExit(f"ingest workers did not subscribe within 60 s:\n{tails}")
        time.sleep(0.05)
    relay = Relay(store, store.cfg)
    t = time.monotonic()
    relay.start()
    while store.j.counts()["acked"]["records"] < n:
        time.sleep(0.02)
    dt = time.monotonic() - t
    relay.close()
    t = time.monotonic()
    for p in procs:
        p.send_signal(signal.SIGINT)
    exits, note = [], ""
    for p in procs:
        try:
            p.wait(max(0.1, 10 - (time.monotonic() - t)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            note = " (a worker did not exit within 10 s of SIGINT: killed)"
        exits.append(time.monotonic() - t)
    a = Archive(arch)
    stored = a.count()
    a.close()
    note = f"archived {stored}, resent {relay.counters['records_resent']}" + note
    return dt, max(exits), note


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs (median reported)")
    ap.add_argument("--ingest-records", type=int, default=300)
    ap.add_argument("--dir", default="/var/tmp", help="where the kit store lives (a real disk, not tmpfs)")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="sys.setswitchinterval (s) for this process; default: Python's 0.005")
    ap.add_argument("--no-ingest", action="store_true", help="only the drain to the broker (phase 1)")
    ap.add_argument("--tuned-broker", action="store_true",
                    help="mosquitto's glibc keeps packets on its heap (see TUNED_BROKER_ENV): the kit's side alone")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    root = Path(tempfile.mkdtemp(prefix="bench-relay-", dir=args.dir))
    broker, port = start_mosquitto(root, args.tuned_broker)
    BROKER_PID[0] = broker.pid
    try:
        store = make_store(root / "kit", port, max_unacked_records=0)
        print(f"building a backlog of {args.records} records of {RECORD // 1000} KB ...", file=sys.stderr)
        fill(store, args.records)
        size = sum(r.size for r in store.j.records())
        mb = size / 1e6
        load0 = Path("/proc/loadavg").read_text().split()[:3]
        plain_paho(port, store)  # warm the page cache and the broker once
        rows: dict[str, list[float]] = {k: [] for k in ("plain", "fair", "relay", "fair128", "relay128")}
        cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
        chunk = 0
        for run in range(args.runs):
            # Interleaved: every figure of one run is measured within a few seconds of the others.
            rows["plain"].append(plain_paho(port, store))
            rel, chunk = relay_drain(store)
            rows["relay"].append(rel)
            rows["fair"].append(plain_paho(port, store, chunk, verify=True))
            rel128, _ = relay_drain(store, 128, 128)
            rows["relay128"].append(rel128)
            rows["fair128"].append(plain_paho(port, store, 128 * 1024, verify=True))
            for k, c in zip(("plain", "relay", "fair", "relay128", "fair128"), LAST_CPU[-5:], strict=True):
                cpu[k].append(c)
            print(f"  run {run + 1}: plain {rows['plain'][-1]:.2f} s, relay {rel:.2f} s, fair {rows['fair'][-1]:.2f} s,"
                  f" relay 128 KiB {rel128:.2f} s, fair 128 KiB {rows['fair128'][-1]:.2f} s", file=sys.stderr)
        load1 = Path("/proc/loadavg").read_text().split()[:3]
        print(f"\ndrain of {args.records} records ({mb:.0f} MB) to a local mosquitto announcing Maximum Packet Size "
              f"{MAX_PACKET}{' (tuned malloc)' if args.tuned_broker else ''}, until the last PUBACK; "
              f"{args.runs} interleaved runs, medians "
              f"(load average {' '.join(load0)} -> {' '.join(load1)}; GIL switch interval "
              f"{sys.getswitchinterval() * 1000:g} ms)")
        labels = {"plain": "plain paho QoS 1 (1 msg/record, window 20)",
                  "fair": f"fair limit: plain + SHA-256 + {chunk // 1024} KiB slices",
                  "relay": f"relay (negotiated {chunk // 1024} KiB chunks)",
                  "fair128": "fair limit at 128 KiB: plain + SHA-256 + 128 KiB",
                  "relay128": "relay at 128 KiB (broker announcing nothing)"}
        for k, label in labels.items():
            t = median(rows[k])
            own = median([c[0] for c in cpu[k]]) * 1000 / args.records
            brk = median([c[1] for c in cpu[k]]) * 1000 / args.records
            print(f"  {label:<46} {t:6.2f} s  {args.records / t:7.1f} rec/s  {mb / t:6.1f} MB/s  "
                  f"CPU/record {own:.3f} ms (broker {brk:.3f} ms)")
        per = {"plain": [p / r for p, r in zip(rows["plain"], rows["relay"], strict=True)],
               "fair": [f / r for f, r in zip(rows["fair"], rows["relay"], strict=True)],
               "fair128": [f / r for f, r in zip(rows["fair128"], rows["relay128"], strict=True)],
               "raised": [f / r for f, r in zip(rows["fair128"], rows["fair"], strict=True)]}
        fmt = lambda xs: f"{median(xs):.2f} (runs: {', '.join(f'{x:.2f}' for x in xs)})"  # noqa: E731
        print(f"  ratio relay / plain paho:           {fmt(per['plain'])}")
        print(f"  ratio relay / its fair limit:       {fmt(per['fair'])}  (goal >= 0.9)")
        print(f"  ratio relay / fair limit, 128 KiB:  {fmt(per['fair128'])}")
        print(f"  fair limit raised (128 KiB -> {chunk // 1024} KiB): x{median(per['raised']):.2f}")
        cpu_ratio = [f[0] / r[0] for f, r in zip(cpu["fair"], cpu["relay"], strict=True)]
        cpu_ratio128 = [f[0] / r[0] for f, r in zip(cpu["fair128"], cpu["relay128"], strict=True)]
        print(f"  CPU of the fair limit / CPU of the relay (this process, all threads; less noisy than time): "
              f"{fmt(cpu_ratio)}; at 128 KiB {fmt(cpu_ratio128)}")
        store.close()
        if args.no_ingest:
            return 0
        n = min(args.ingest_records, args.records)
        store = make_store(root / "kit", port)  # default max_unacked_records: acks pace the drain
        print(f"\nend to end with ingest (staging, signature, fsync'd archive, ack), {n} records, 1 vs 2 worker "
              f"processes, interleaved, {args.runs} runs:")
        times: dict[int, list[float]] = {1: [], 2: []}
        for run in range(args.runs):
            for workers in (1, 2):
                dt, exit_s, note = ingest_run(root, port, store, n, workers, f"r{run}")
                times[workers].append(dt)
                print(f"  run {run + 1}, {workers} worker{'s' if workers > 1 else ' '}: {dt:6.2f} s  "
                      f"{n / dt:7.1f} rec/s  exit after SIGINT {exit_s:4.2f} s  {note}")
        one, two = median(times[1]), median(times[2])
        print(f"  median: 1 worker {one:.2f} s ({n / one:.1f} rec/s), 2 workers {two:.2f} s ({n / two:.1f} rec/s); "
              f"2 workers / 1 worker throughput {one / two:.2f}  (goal >= 1.0); load average "
              f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        store.close()
    finally:
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
