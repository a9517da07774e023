"""Scale benchmark (issue #17): a kit with a big backlog against a 100-record kit, in the same run.

    .venv/bin/python bench/bench_scale.py [--records N] [--small 100] [--record-kb 8] [--dir /var/tmp] [--keep DIR]

Both kits are built through the real `Store` (one sealed commit per record, the same payload sealed each
time; then the older half is acknowledged through `Store.mark_delivery` with no stick holding it: the
outage case where nothing may be purged). Then, for each kit, with a real `rekamd --sim` subprocess
(NOTIFY_SOCKET bound here, relay pointed at a broker that is down, i.e. the outage) it measures:

* start to READY after a clean stop and after SIGKILL (unclean), and the time SIGTERM takes;
* status latency (`GET /api/v1/status`, median of 20), one commit (`POST /api/v1/sim/commit`, median of 5);
* idle CPU (sum of /proc/<pid>/task/*/schedstat over `--idle-s`) and RSS (VmRSS);
* mirror to a fresh stick: start with an empty stick inserted (READY time), copy rate, status latency
  while it copies, and the time SIGTERM takes mid-copy (`--mirror-stop` seconds after READY) plus a restart
  that finishes the copy;
* drain rate at the start and the end of the backlog: relay to a real mosquitto + `rekam-fleet ingest`
  worker, `--drain K` acks timed on the full backlog; then all but the last K unsent records are acked
  through `Store.mark_delivery` (as the data center would) and the last K are timed; RSS peak and after.

It prints every figure for both kits and the growth ratio big/small (goal <= 1.5) per metric. A default
run (2,000 records) takes a few minutes; the campaign is `--records 50000`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware import config  # noqa: E402
from firmware.capture.simulated import SimulatedCapture  # noqa: E402
from firmware.seal import identity  # noqa: E402
from firmware.store.store import Store  # noqa: E402
from firmware.wire import record_format  # noqa: E402
from firmware.wire import relay_protocol as proto  # noqa: E402
from provisioning.signer import load_ack_key  # noqa: E402
from tests.support import REKAMD, REPO, Mosquitto, free_port, subprocess_env, write_daemon_config  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Kit:
    """One kit: its folder, config, and a `rekamd --sim` run at a time with a NOTIFY_SOCKET of ours."""

    def __init__(self, root: Path, dc_pub: Path, corpus: Path) -> None:
        self.root = root
        self.dc_pub = dc_pub
        self.corpus = corpus
        self.usb = root / "usb"
        self.ack_key = root / "ack-signing.key"
        root.mkdir(parents=True, exist_ok=True)
        self.down_broker = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: the outage
        self.write_config(self.down_broker)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.url = ""
        self.token = ""

    def write_config(self, broker: str) -> None:
        stick = self.usb.exists()
        self.cfg_path = write_daemon_config(
            self.root, self.dc_pub, self.corpus,
            usb={"poll_seconds": 2.0},  # the shipped default (the test helper's 0.2 s would inflate idle CPU)
            relay={"brokers": [broker], "ack_timeout_s": 120.0,
                   # acks are signed by the data center: the kit trusts this bench's ingest key
                   "ack_public_keys": [proto.ack_public_b64(load_ack_key(self.ack_key, create=True))]})
        if not stick:
            self.usb.rmdir()  # the helper makes the stick folder: keep "no stick" as it was

    @property
    def state_dir(self) -> Path:
        return self.root / "sd"

    def open_store(self) -> Store:
        cfg = config.load(self.cfg_path)
        s = Store(cfg, identity.load_or_create(cfg.state_dir))
        s.open()
        return s

    def start(self, timeout: float) -> float | None:
        """Start rekamd; seconds to READY=1 (None: not within `timeout`, the process is left running)."""
        sock_path = self.root / "notify.sock"
        sock_path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(sock_path))
        logf = open(self.root / "rekamd.log", "ab")  # noqa: SIM115 (kept by the child)
        t0 = time.monotonic()
        self.proc = subprocess.Popen([*REKAMD, "--config", str(self.cfg_path), "--sim"], stdout=logf,
                                     stderr=subprocess.STDOUT, cwd=REPO,
                                     env=subprocess_env({"NOTIFY_SOCKET": str(sock_path)}))
        logf.close()
        while (left := timeout - (time.monotonic() - t0)) > 0:
            if self.proc.poll() is not None:
                tail = (self.root / "rekamd.log").read_text(errors="replace")[-3000:]  # the folder is removed on exit
                raise SystemExit(f"rekamd exited {self.proc.returncode}; its log ends:\n{tail}")
            self.sock.settimeout(min(left, 0.5))
            try:
                msg = self.sock.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if "READY=1" in msg.split("\n"):
                ready = time.monotonic() - t0
                self.url = json.loads((self.state_dir / "api.json").read_text())["url"]
                # The local API needs the daemon's local token (the one `rekam` sends).
                self.token = (self.state_dir / "api.token").read_text().strip()
                return ready
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Signal it; seconds until it exited (SIGKILL after `timeout`)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        dt = time.monotonic() - t0
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.proc = None
        return dt

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path, headers={"X-Rekam-Token": self.token})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Rekam-Token": self.token})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def timed(self, fn: Any, n: int) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def cpu_ns(self) -> int:
        assert self.proc is not None
        total = 0
        for t in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                total += int((t / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that just ended
        return total

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def build(kit: Kit, n: int, record_kb: int) -> None:
    """n records through the real Store.commit; the older half acknowledged (no stick holds them)."""
    s = kit.open_store()
    try:
        payload = SimulatedCapture(None, seed=1, pad_to=record_kb * 1024).capture().encode()
        t = time.monotonic()
        for i in range(n):
            s.commit(payload)
            if i % 5000 == 4999:
                log(f"  built {i + 1}/{n} ({time.monotonic() - t:.0f} s)")
        rows = s.records(limit=n // 2)
        for i in range(0, len(rows), 1000):
            s.mark_delivery([], [r.id for r in rows[i:i + 1000]])
    finally:
        s.close()


def ack_all_but(kit: Kit, keep: int) -> None:
    """Acknowledge every unsent record except the newest `keep` (what the data center's acks would do)."""
    s = kit.open_store()
    try:
        stored = s.records(state="stored")
        ids = [r.id for r in stored[:max(0, len(stored) - keep)]]
        for i in range(0, len(ids), 1000):
            s.mark_delivery([], ids[i:i + 1000])
    finally:
        s.close()


def phase_idle(kit: Kit, idle_s: float, ready_timeout: float) -> dict[str, float]:
    out: dict[str, float] = {}
    ready = kit.start(ready_timeout)
    assert ready is not None, "not READY in time (no stick inserted)"
    out["ready_clean_s"] = ready
    time.sleep(3.0)  # let start-up work settle (relay connect attempts, first polls)
    out["status_ms"] = kit.timed(lambda: kit.get("/api/v1/status"), 100) * 1000  # 20 were too few under load
    out["commit_ms"] = kit.timed(lambda: kit.post("/api/v1/sim/commit", {"count": 1}), 5) * 1000
    time.sleep(2.0)
    c0, t0 = kit.cpu_ns(), time.monotonic()
    time.sleep(idle_s)
    out["idle_cpu_pct"] = (kit.cpu_ns() - c0) / 1e9 / (time.monotonic() - t0) * 100
    out["rss_idle_mb"] = kit.rss_mb()
    out["stop_s"] = kit.stop()
    # Unclean: SIGKILL, then the time to READY of the next start.
    assert kit.start(ready_timeout) is not None
    kit.stop(signal.SIGKILL)
    ready = kit.start(ready_timeout)
    assert ready is not None, "not READY in time after an unclean stop"
    out["ready_unclean_s"] = ready
    kit.stop()
    return out


def phase_mirror(kit: Kit, live: int, ready_timeout: float, mirror_stop: float, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kit.usb.mkdir()  # a fresh, empty stick
    t0 = time.monotonic()
    ready = kit.start(timeout)  # however long it takes (goal: < 3 s whatever the backlog)
    out["ready_fresh_stick_s"] = ready if ready is not None else float("nan")
    if ready is None:
        raise SystemExit(f"not READY within {timeout} s with a fresh stick")
    lag0 = kit.get("/api/v1/status")["mirror_lag"]["records"]
    out["lag_at_ready"] = lag0
    time.sleep(min(mirror_stop, 2.0))
    out["status_during_mirror_ms"] = kit.timed(lambda: kit.get("/api/v1/status"), 10) * 1000
    lag1 = kit.get("/api/v1/status")["mirror_lag"]["records"]
    out["stop_mid_mirror_s"] = kit.stop()
    out["lag_at_stop"] = lag1
    t1 = time.monotonic()
    if kit.start(ready_timeout) is None:
        log("  restart: not READY in time")
    while time.monotonic() - t1 < timeout:
        st = kit.get("/api/v1/status")
        if st["mirror_lag"]["records"] == 0:
            break
        time.sleep(0.5)
    done = time.monotonic()
    copied = live  # everything live ends on the stick
    out["mirror_total_s"] = done - t0
    out["mirror_rate_rps"] = copied / (done - t0)
    out["mirror_lag_end"] = kit.get("/api/v1/status")["mirror_lag"]["records"]
    kit.stop()
    shutil.rmtree(kit.usb)  # the drain runs without a stick (nothing purged under it)
    return out


def drain(kit: Kit, k: int, timeout: float, sample: list[float]) -> float:
    """Records acknowledged per second over the next `k` acks (fewer if fewer are unsent)."""
    def snapshot() -> tuple[int, int]:  # (done, still to go), from one status answer
        r = kit.get("/api/v1/status")["records"]
        return (int(r["acked"]["records"] + r["purged"]["records"]),
                int(r["stored"]["records"] + r["sent"]["records"]))

    n0, left = snapshot()
    k = min(k, left)
    if k < 2:
        return float("nan")
    t0 = time.monotonic()
    first: tuple[float, int] | None = None
    while time.monotonic() - t0 < timeout:
        n = snapshot()[0] - n0
        sample.append(kit.rss_mb())
        if n >= 1 and first is None:
            first = (time.monotonic(), n)
        if n >= k and first is not None:
            dt = time.monotonic() - first[0]
            return (n - first[1]) / dt if dt > 0 else float("nan")
        time.sleep(0.05)
    return float("nan")


def phase_drain(kit: Kit, k: int, ready_timeout: float, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    broker = Mosquitto(kit.root / "broker").start()
    ingest = subprocess.Popen([sys.executable, "-m", "provisioning.cli", "ingest", "--broker", broker.url,
                               "--archive", str(kit.root / "archive"), "--tofu",
                               "--ack-key", str(kit.ack_key)], cwd=REPO,
                              env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # let it subscribe
        kit.write_config(broker.url)
        rss: list[float] = []
        assert kit.start(ready_timeout) is not None
        out["drain_start_rps"] = drain(kit, k, timeout, rss)
        kit.stop()  # stopped at once: at least k stay unsent for the end-of-backlog run
        ack_all_but(kit, k)
        assert kit.start(ready_timeout) is not None
        out["drain_end_rps"] = drain(kit, k, timeout, rss)
        out["rss_drain_peak_mb"] = max(rss) if rss else float("nan")
        time.sleep(3.0)
        out["rss_after_drain_mb"] = kit.rss_mb()
        kit.stop()
    finally:
        ingest.send_signal(signal.SIGINT)
        try:
            ingest.wait(10)
        except subprocess.TimeoutExpired:
            ingest.kill()
        broker.stop()
        kit.write_config(kit.down_broker)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=2000, help="records on the big kit (50000 for the campaign)")
    ap.add_argument("--small", type=int, default=100, help="records on the baseline kit")
    ap.add_argument("--record-kb", type=int, default=8, help="payload size per record (KiB)")
    ap.add_argument("--idle-s", type=float, default=20.0, help="idle CPU window (s)")
    ap.add_argument("--drain", type=int, default=100, help="acks timed at the start and at the end of the backlog")
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--mirror-stop", type=float, default=2.0, help="SIGTERM this long after READY mid-mirror")
    ap.add_argument("--mirror-timeout", type=float, default=3600.0)
    ap.add_argument("--skip", default="", help="comma list of phases to skip: idle,mirror,drain")
    ap.add_argument("--dir", default="/var/tmp", help="where the kits live (a real disk, not tmpfs)")
    ap.add_argument("--keep", default="", help="build the kits in this folder once and reuse them in later runs "
                    "(a 50,000-record kit takes minutes to build); the idle phase adds its 5 test commits, "
                    "mirror and drain change record states: reuse with --skip mirror,drain")
    ap.add_argument("--corpus", default=os.environ.get("REKAM_CORPUS", "/work/shared/corpus"))
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    keep = Path(a.keep) if a.keep else None
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="rekam-scale-") as d:
        root = keep / f"kits-{a.small}-{a.records}-{a.record_kb}" if keep else Path(d)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "dc.pub").exists():
            (root / "dc.pub").write_bytes(record_format.generate_datacenter_keypair()[1])
        sizes = {"small": a.small, "big": a.records}
        kits = {name: Kit(root / name, root / "dc.pub", Path(a.corpus)) for name in sizes}
        for name, n in sizes.items():
            if (root / name / "built").exists():  # --keep: built by an earlier run (phases leave them reusable)
                log(f"reusing {name} kit in {root / name}")
                continue
            log(f"building {name} kit: {n} records of {a.record_kb} KiB through Store.commit")
            t = time.monotonic()
            build(kits[name], n, a.record_kb)
            (root / name / "built").write_text(str(n))
            log(f"  {name}: built in {time.monotonic() - t:.0f} s")
        res: dict[str, dict[str, Any]] = {name: {} for name in sizes}
        phases = [("idle", lambda k, n: phase_idle(k, a.idle_s, a.ready_timeout)),
                  ("mirror", lambda k, n: phase_mirror(k, n + 5, a.ready_timeout, a.mirror_stop, a.mirror_timeout)),
                  ("drain", lambda k, n: phase_drain(k, drain_k, a.ready_timeout, 180.0))]
        # The same k on both kits; the small kit must keep k unsent after the first k (about half is unsent).
        drain_k = max(2, min(a.drain, a.small // 5))
        log(f"drain rate over {drain_k} acks at the start and at the end of the backlog")
        for phase, fn in phases:
            if phase in skip:
                continue
            for name in ("small", "big", "small") if phase == "idle" else ("small", "big"):
                log(f"phase {phase}: {name} kit")
                got = fn(kits[name], sizes[name])
                for key, v in got.items():  # idle runs twice on the small kit (before and after): keep both
                    res[name].setdefault(key, []).append(v)
                print(f"# {phase} {name}: " + " ".join(f"{k}={v:.3f}" for k, v in got.items()), flush=True)
        load = os.getloadavg()
        print(f"\nscale benchmark: big kit {a.records} records vs small kit {a.small} records, "
              f"{a.record_kb} KiB payloads, on {a.dir}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"drain: {drain_k} acks timed at the start and at the end of the backlog; for rates (rps) a "
              "ratio below 1 is the slow-down")
        print(f"{'metric':28s} {'small':>12s} {'big':>12s} {'big/small':>10s}")
        for key in res["big"]:
            sm = [v for v in res["small"].get(key, []) if v == v]
            bg = [v for v in res["big"][key] if v == v]
            s_v = statistics.median(sm) if sm else float("nan")
            b_v = statistics.median(bg) if bg else float("nan")
            ratio = b_v / s_v if s_v else float("nan")
            print(f"{key:28s} {s_v:12.3f} {b_v:12.3f} {ratio:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
