"""Control-plane benchmarks (issue #8: remote provisioning and fleet control over MQTT).

Against a real mosquitto with the deployed TLS + ACL configuration (provisioning/mosquitto/):

0. Idle CPU of the process with the control connection up (20 ms network tick) against the same process
   with the control plane stopped.

1. Command round trip (fleet signs -> broker -> kit verifies, replay check in SQLite, runs `status`,
   signs the result -> broker -> fleet verifies): latency p50/p95 with the kit idle (baseline), then
   the same while the real record relay (firmware/relay/relay.py) drains a backlog of 400 KB records from
   the same kit over its own TLS connection to the same broker. The ratio (busy / idle) is the figure:
   the control connection is separate, so commands must not queue behind the records (goal p95 < 5x).
2. Envelope cost: sign + verify of a command envelope (canonical JSON + Ed25519) against a bare
   Ed25519 sign + verify of the same bytes measured in the same run.

    .venv/bin/python bench/bench_control.py [--records 400] [--commands 40]
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from firmware.wire import control_protocol as cp  # noqa: E402
from provisioning.fleet_link import FleetLink  # noqa: E402
from provisioning.fleet_ops import send_command  # noqa: E402
from provisioning.fleet_service import FleetService  # noqa: E402
from provisioning.registry import Fleet  # noqa: E402
from tests.provisioning.conftest import make_kit, write_kit_config  # noqa: E402
from tests.support import Mosquitto, free_port, wait_for  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Commander:
    """A persistent fleet connection that sends `status` commands and times each result."""

    def __init__(self, fleet: Fleet, kid: str) -> None:
        self.fleet, self.kid = fleet, kid
        self.results: queue.Queue[bytes] = queue.Queue()
        self.link = FleetLink(fleet, "bench-commander", self._on, (cp.result_topic(kid),)).start()
        time.sleep(0.3)

    def _on(self, _link: FleetLink, msg: object) -> None:
        if self.fleet.handle_kit_message(msg.topic, bytes(msg.payload)) == "result":  # type: ignore[attr-defined]
            self.results.put(getattr(msg.properties, "CorrelationData", b""))  # type: ignore[attr-defined]

    def round_trips(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            cmd_id, payload = self.fleet.make_command(self.kid, "status", {}, 60)
            t = time.perf_counter()
            self.link.publish(cp.cmd_topic(self.kid), payload, response_topic=cp.result_topic(self.kid),
                              correlation=cmd_id.encode())
            while self.results.get(timeout=10) != cmd_id.encode():
                pass
            out.append(time.perf_counter() - t)
        return out


def cli_round_trips(fleet: Fleet, kid: str, n: int) -> list[float]:
    """`rekam-fleet cmd send` as an operator runs it: new TLS connection per command."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        res = send_command(fleet, kid, "status", {}, 60, 10)
        if not res or not res["ok"]:
            raise SystemExit(f"status command failed: {res}")
        out.append(time.perf_counter() - t)
    return out


def envelope_cost(n: int = 2000) -> tuple[float, float]:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    body = {"cmd_id": "a" * 24, "kit_id": "rk-benchkit01", "name": "status", "args": {}, "issued_at": 1,
            "expires_at": 2}
    t = time.perf_counter()
    for _ in range(n):
        cp.check_command(cp.verify(cp.sign("cmd", body, key), "cmd", pub))
    env = (time.perf_counter() - t) / n
    raw = cp.canonical(body)
    t = time.perf_counter()
    for _ in range(n):
        pub.verify(key.sign(raw), raw)
    bare = (time.perf_counter() - t) / n
    return env, bare


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--commands", type=int, default=40)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-control-"))
    port, claim_port = free_port(), free_port()
    fleet = Fleet.init(tmp / "fleet", [f"127.0.0.1:{port}"], [f"127.0.0.1:{claim_port}"], ["127.0.0.1"], batch="test")
    broker = Mosquitto(tmp / "broker", port=port, claim_port=claim_port)
    broker.use_shipped(fleet.ca, extra="max_queued_messages 100000\n")
    broker.start()
    svc = FleetService(fleet).start()
    relay = None
    kit = None
    try:
        root = tmp / "kit"
        extra = f'[relay]\nbrokers = ["mqtts://127.0.0.1:{port}"]\nmax_unacked_records = 0\n'
        kit = make_kit(root, write_kit_config(root, fleet, broker, extra=extra))
        (fleet.data / "allowlist.txt").write_text(kit.identity.kit_id + "\n")
        t0 = time.perf_counter()
        kit.start_control()
        kit.exited.wait(30)  # claimed: the daemon would restart so the relay gets the kit certificate
        claim_s = time.perf_counter() - t0
        kit = kit.restart()
        ctl = kit.start_control()
        wait_for(ctl.connected.is_set, 10, "control connected")
        kid = kit.identity.kit_id
        print(f"claim (new kit -> approved -> own certificate): {claim_s:.2f} s")
        payload = os.urandom(400_000)
        t = time.perf_counter()
        for _ in range(a.records):
            kit.store.commit(payload)
        print(f"backlog: {a.records} records x 400 KB committed in {time.perf_counter() - t:.1f} s")
        # Idle cost of the control connection (20 ms network tick): process CPU over 5 s, connected vs stopped.
        def cpu_pct(seconds: float = 5.0) -> float:
            c0, t0 = time.process_time(), time.perf_counter()
            time.sleep(seconds)
            return 100 * (time.process_time() - c0) / (time.perf_counter() - t0)

        svc.close()  # the fleet service runs in this process too: measure it out
        on = cpu_pct()
        ctl.stop()
        off = cpu_pct()
        print(f"idle CPU of this process: control connected {on:.2f}% vs stopped {off:.2f}% of one core")
        kit.control = None
        ctl = kit.start_control()
        svc = FleetService(fleet).start()
        wait_for(ctl.connected.is_set, 10, "control reconnected")
        cmdr = Commander(fleet, kid)
        cmdr.round_trips(3)  # warm-up
        idle = cmdr.round_trips(a.commands)
        cli = cli_round_trips(fleet, kid, 5)
        from firmware.relay.relay import Relay

        relay = Relay(kit.store, kit.cfg)
        relay.start()
        def unsent() -> int:
            return kit.store.j.counts()["stored"]["records"]

        wait_for(lambda: unsent() < a.records, 30, "relay draining")
        before = unsent()
        busy = cmdr.round_trips(a.commands)
        after = unsent()
        drained = before - after
        print(f"relay drained {drained} records ({drained * 0.4:.0f} MB) while the busy commands ran; "
              f"{after} still unsent at the end")
        i50, i95, b50, b95 = pct(idle, .5), pct(idle, .95), pct(busy, .5), pct(busy, .95)
        print(f"command round trip idle: p50 {i50 * 1000:.1f} ms p95 {i95 * 1000:.1f} ms (n={len(idle)})")
        print(f"command round trip while draining: p50 {b50 * 1000:.1f} ms p95 {b95 * 1000:.1f} ms "
              f"(n={len(busy)}, mean {statistics.mean(busy) * 1000:.1f} ms)")
        print(f"ratio busy/idle: p50 {b50 / i50:.2f}x  p95 {b95 / i95:.2f}x  (goal p95 < 5x)")
        print(f"rekam-fleet cmd send (new TLS connection each, idle kit): p50 {pct(cli, .5) * 1000:.0f} ms (n=5)")
        env, bare = envelope_cost()
        print(f"envelope sign+verify+check {env * 1e6:.0f} us vs bare Ed25519 sign+verify {bare * 1e6:.0f} us: "
              f"ratio {env / bare:.2f}x")
        if drained <= 0:
            print("WARNING: the relay did not drain during the busy phase; the busy figure is not meaningful")
    finally:
        if relay is not None:
            relay.close()
        if kit is not None:
            kit.stop()
        if "cmdr" in locals():
            cmdr.link.close()
        svc.close()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
