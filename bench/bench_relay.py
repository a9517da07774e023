"""Relay benchmarks (issue #6: MQTT relay with end-to-end acknowledgement).

1. Drain of a backlog of N records of 400 KB each to a local mosquitto, by the relay (announce + 128 KiB
   chunks, window, journal marks, read + hash from the SD) against a plain paho QoS 1 publisher sending
   the same record bytes (one message per record, paho's default window of 20) to the same broker in the
   same run. Both are timed until the last PUBACK. The ratio relay/plain is the figure (goal >= 0.8).
   During this phase nothing acknowledges records, so `max_unacked_records` is 0 (no limit) here.
2. End-to-end with the data center: relay + `rekam-fleet ingest` processes (staging, signature, fsync'd
   archive, ack), one and two workers sharing the subscription: records/s until every record is acked.

    .venv/bin/python bench/bench_relay.py [--records 2000] [--ingest-records 300] [--dir PATH]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
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


def start_mosquitto(d: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\n")
    binary = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else shutil.which("mosquitto")
    if not binary:
        raise SystemExit("mosquitto not installed: apt-get install -y mosquitto")
    p = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p, port
        except OSError:
            time.sleep(0.02)
    raise SystemExit("mosquitto did not start")


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


def hash_cost(store: Store) -> float:
    """Time to read and SHA-256 every record once (what `read_verified` adds before sending)."""
    t = time.monotonic()
    for r in store.j.records():
        record_format.sha256_hex(store.sd_path(r.id).read_bytes())
    return time.monotonic() - t


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
    t = time.monotonic()
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
    c.loop_stop()
    c.disconnect()
    return dt


def relay_drain(store: Store, chunk_kb: int = 128) -> float:
    """The relay, timed like the baseline: from a connected client to the last record's last PUBACK."""
    with store.j.transaction() as c:
        c.execute("UPDATE records SET state = 'acked'")  # nothing to send while it connects
    raw = store.cfg.raw
    cfg = config.validate({**raw, "relay": {**raw["relay"], "chunk_kb": chunk_kb}})
    relay = Relay(store, cfg)
    relay.start()
    while relay.status()["state"] != "connected":
        time.sleep(0.005)
    time.sleep(0.2)
    reset(store)
    t = time.monotonic()
    store._changed()  # wake the relay: the backlog is there
    total = len(store.j.records())
    while relay.counters["records_sent"] < total:  # in memory at each record's last PUBACK, like the baseline
        time.sleep(0.02)
    dt = time.monotonic() - t
    while store.j.counts()["sent"]["records"] < total:  # the batched journal marks follow within 0.25 s
        time.sleep(0.01)
    relay.close()
    return dt


def ingest_run(root: Path, port: int, store: Store, n: int, workers: int) -> float:
    """Relay + `rekam-fleet ingest` worker processes sharing one subscription, until every record is acked."""
    with store.j.transaction() as c:
        c.execute("UPDATE records SET state = 'purged' WHERE seq > ?", (n,))
        c.execute("UPDATE records SET state = 'stored' WHERE seq <= ?", (n,))
    arch = root / f"archive-{workers}"
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-m", "provisioning.cli", "ingest", "--broker",
                               f"mqtt://127.0.0.1:{port}", "--archive", str(arch), "--tofu",
                               "--ack-key", str(store.cfg.state_dir.parent / "ack-signing.key")], cwd=repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    time.sleep(1.5)  # let them subscribe
    relay = Relay(store, store.cfg)
    t = time.monotonic()
    relay.start()
    while store.j.counts()["acked"]["records"] < n:
        time.sleep(0.02)
    dt = time.monotonic() - t
    relay.close()
    for p in procs:
        p.send_signal(signal.SIGINT)
        p.wait(10)
    a = Archive(arch)
    stored = a.count()
    a.close()
    print(f"  ingest workers={workers}: archived {stored} records, resent {relay.counters['records_resent']}",
          file=sys.stderr)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--ingest-records", type=int, default=300)
    ap.add_argument("--dir", default="/var/tmp", help="where the kit store lives (a real disk, not tmpfs)")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="sys.setswitchinterval (s) for this process; default: Python's 0.005")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    root = Path(tempfile.mkdtemp(prefix="bench-relay-", dir=args.dir))
    broker, port = start_mosquitto(root)
    try:
        store = make_store(root / "kit", port, max_unacked_records=0)
        print(f"building a backlog of {args.records} records of {RECORD // 1000} KB ...", file=sys.stderr)
        fill(store, args.records)
        size = sum(r.size for r in store.j.records())
        mb = size / 1e6
        plain_paho(port, store)  # warm the page cache and the broker once
        base = plain_paho(port, store)
        rel = relay_drain(store)
        rel512 = relay_drain(store, 512)
        base2 = plain_paho(port, store)
        base = min(base, base2)
        sliced = plain_paho(port, store, 128 * 1024)
        verified = plain_paho(port, store, verify=True)
        hashing = hash_cost(store)
        print(f"\ndrain of {args.records} records ({mb:.0f} MB) to a local mosquitto, until the last PUBACK "
              f"(GIL switch interval {sys.getswitchinterval() * 1000:g} ms)")
        print(f"  plain paho QoS 1 (1 msg/record, window 20): {base:6.2f} s  {args.records / base:7.1f} rec/s  "
              f"{mb / base:6.1f} MB/s")
        print(f"  relay (announce + 128 KiB chunks, marks):   {rel:6.2f} s  {args.records / rel:7.1f} rec/s  "
              f"{mb / rel:6.1f} MB/s")
        print(f"  relay with chunk_kb = 512 (1 chunk/record): {rel512:6.2f} s  {args.records / rel512:7.1f} rec/s  "
              f"{mb / rel512:6.1f} MB/s")
        print(f"  plain paho QoS 1, same 128 KiB slices:      {sliced:6.2f} s  {args.records / sliced:7.1f} rec/s  "
              f"{mb / sliced:6.1f} MB/s")
        print(f"  plain paho QoS 1 + the same SHA-256 check:  {verified:6.2f} s  {args.records / verified:7.1f} rec/s  "
              f"{mb / verified:6.1f} MB/s")
        print(f"  ratio relay / plain: {base / rel:.2f}  (goal >= 0.8);  relay / plain sliced: {sliced / rel:.2f};  "
              f"relay / plain + SHA-256: {verified / rel:.2f};  relay 512 KiB chunks / plain: {base / rel512:.2f}")
        print(f"  of which read + SHA-256 check of every record (done by the relay, not the baseline): "
              f"{hashing:.2f} s")
        store.close()
        n = min(args.ingest_records, args.records)
        store = make_store(root / "kit", port)  # default max_unacked_records: acks pace the drain
        print(f"\nend to end with ingest (staging, signature, fsync'd archive, ack), {n} records:")
        for workers in (1, 2):
            dt = ingest_run(root, port, store, n, workers)
            print(f"  {workers} ingest worker{'s' if workers > 1 else ' '}: {dt:6.2f} s  {n / dt:7.1f} rec/s  "
                  f"{n * size / args.records / 1e6 / dt:6.1f} MB/s")
        store.close()
    finally:
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
