"""A kit as a process for the relay fault suite: the real store and the real relay (under the daemon's
supervisor), capturing `--capture` records while it relays. Each record whose commit returned (confirmed to the
operator) is printed as ``confirmed <record_id> <sha256>`` and flushed at once, so a kill -9 loses no confirmation
line that was due. After capturing it keeps relaying until SIGTERM/SIGKILL (or, with --exit-when-drained, until
nothing awaits an ack).

    python -m tests.faults.kit_driver --config rekam.toml --capture 20 --interval 0.05 [--seed 1]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from firmware import config
from firmware.capture.simulated import SimulatedCapture
from firmware.relay.relay import Relay
from firmware.seal import identity
from firmware.store.store import Store
from firmware.system import logs
from firmware.system.service import Supervisor
from firmware.system.signals import SignalLatch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--capture", type=int, default=0)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=30_000)
    ap.add_argument("--exit-when-drained", action="store_true")
    args = ap.parse_args(argv)
    logs.setup()
    cfg = config.load(args.config)
    store = Store(cfg, identity.load_or_create(cfg.state_dir))
    store.open()
    stop = threading.Event()
    latch = SignalLatch((signal.SIGTERM,))
    sup = Supervisor([Relay(store, cfg, stop)], stop)
    sup.start()
    cap = SimulatedCapture(None, seed=args.seed, pad_to=args.size)
    try:
        for _ in range(args.capture):
            if latch.wait(stop, 0):
                break
            r = store.commit(cap.capture().encode())
            print(f"confirmed {r.record_id} {r.sha256}", flush=True)
            latch.wait(stop, args.interval)
        print("captured", flush=True)
        while not latch.wait(stop, 0.1):
            if args.exit_when_drained:
                c = store.counts()
                if c["stored"]["records"] + c["sent"]["records"] == 0:
                    break
    finally:
        sup.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
