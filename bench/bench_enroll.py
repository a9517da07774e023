"""Enrollment benchmark: is the software what slows the operator down?

A complete simulated enrollment (face + ten fingers, duplicate check, commit) runs through the
real enrollment service of an in-process kit (`firmware.daemon.Kit`, simulation mode) with the
sensor simulator at real wire timing (`sensor_wire_speed = 1.0`: every byte takes its UART time
at the negotiated baud, and the module's own capture/processing times are emulated). Each step's
wall time is split into

- sensor time: the wall time the simulator spent waiting (wire time of frames in both directions
  and the emulated module processing), measured around every `_sleep` of the simulator; the
  finger is placed by the simulation at once, so there is no wait for a resident;
- kit time: the rest (driver, quality assessment, face assessment, templates, sealing, SD + USB
  writes, journal), i.e. what the Pi's software adds.

The ratio kit/sensor time is printed per step and in total; on this machine the sensor should
dominate. Note: protocol I/O is request/response, so the two barely overlap; any overlap makes
the kit time look slightly smaller than it is.

    .venv/bin/python bench/bench_enroll.py [--residents N] [--wire-speed 1.0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware import config
from firmware.enrollment.operators import hash_pin  # noqa: E402
from firmware.wire import record_format  # noqa: E402

FINGERS = ["R1", "R2", "R3", "R4", "R5", "L1", "L2", "L3", "L4", "L5"]


def corpus_dir() -> Path:
    import os

    env = os.environ.get("REKAM_CORPUS")
    repo = Path(__file__).resolve().parents[1]
    for c in ([Path(env)] if env else []) + [repo.parent / "shared" / "corpus"]:
        if (c / "MANIFEST.tsv").exists():
            return c
    raise SystemExit("corpus not found: set REKAM_CORPUS")


def make_kit(root: Path, wire_speed: float) -> Any:
    from firmware.daemon import Kit

    priv, pub = record_format.generate_datacenter_keypair()
    (root / "dc.pub").write_bytes(pub)
    (root / "usb").mkdir()
    cfg = config.validate({
        "kit": {"state_dir": str(root / "sd"), "site": "bench"},
        "datacenter": {"public_key_files": [str(root / "dc.pub")]},
        "usb": {"mount_point": str(root / "usb"), "require_mountpoint": False},
        "store": {"reserve_floor_mb": 1},
        "api": {"port": 0},
        "camera": {"backend": "sim"},
        "simulation": {"corpus_dir": str(corpus_dir()), "sensor_wire_speed": wire_speed},
        "enrollment": {"fingers": FINGERS, "dedup_fingers": ["R2", "L2"]},
        "operators": {"list": [{"id": "bench", "name": "Bench", "pin_hash": hash_pin("123456"),
                                "role": "operator"}]},
    })
    kit = Kit(cfg, sim=True)
    kit.start()
    return kit


class SleepMeter:
    """Sums the wall time the simulator spends in its own `_sleep` (wire time and emulated processing)."""

    def __init__(self, sim: Any) -> None:
        self.total = 0.0
        self._lock = threading.Lock()
        inner = sim._sleep

        def metered(seconds: float) -> None:
            t0 = time.perf_counter()
            inner(seconds)
            with self._lock:
                self.total += time.perf_counter() - t0
        sim._sleep = metered

    def read(self) -> float:
        with self._lock:
            return self.total


def run(residents: int, wire_speed: float) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        kit = make_kit(Path(d), wire_speed)
        try:
            svc = kit.enrollment
            sim = kit.hardware["simulator"]
            meter = SleepMeter(sim)
            token = svc.sign_in("bench", "123456").token
            svc.dev.sensor()  # open the sensor (baud negotiation) outside the measurement
            steps: dict[str, list[float]] = {}
            attempts: dict[str, int] = {}

            def timed(name: str, fn: Any, *a: Any) -> Any:
                w0, t0 = meter.read(), time.perf_counter()
                out = fn(*a)
                total, wire = time.perf_counter() - t0, meter.read() - w0
                acc = steps.setdefault(name, [0.0, 0.0])
                acc[0] += total
                acc[1] += wire
                attempts[name] = attempts.get(name, 0) + 1
                return out

            for i in range(residents):
                nik = f"3201011505{90 + i % 10:02d}{i + 1:04d}"
                timed("start", svc.start, token, nik)
                while True:
                    step = svc.describe()["step"]
                    if step == "face":
                        timed("face", svc.face_attempt, token)
                    elif step.startswith("finger:"):
                        timed("finger", svc.finger_attempt, token, step[7:])
                    elif step == "dupcheck":
                        timed("dupcheck", svc.dup_check, token)
                    elif step == "review":
                        timed("commit", svc.commit, token)
                        break
                    else:
                        raise SystemExit(f"unexpected step {step}")
            print(f"enrollments: {residents} x (face + {len(FINGERS)} fingers), sensor wire speed {wire_speed}, "
                  f"profile {kit.cfg.sensor.profile}, baud {getattr(svc.dev.sensor(), 'baud', '?')}")
            print(f"{'step':<10}{'calls':>6}{'total s':>10}{'sensor s':>10}{'kit s':>9}{'kit/sensor':>12}")
            tot = wire_tot = 0.0
            for name, (total, wire) in steps.items():
                kit_s = total - wire
                ratio = f"{kit_s / wire:.2f}" if wire > 0 else "-"
                print(f"{name:<10}{attempts[name]:>6}{total:>10.2f}{wire:>10.2f}{kit_s:>9.2f}{ratio:>12}")
                tot += total
                wire_tot += wire
            kit_tot = tot - wire_tot
            print(f"{'all':<10}{sum(attempts.values()):>6}{tot:>10.2f}{wire_tot:>10.2f}{kit_tot:>9.2f}"
                  f"{kit_tot / wire_tot if wire_tot else float('nan'):>12.2f}")
            print(f"per enrollment: {tot / residents:.1f} s total, kit software {kit_tot / residents:.1f} s, "
                  f"sensor wire+processing {wire_tot / residents:.1f} s (ratio kit/sensor "
                  f"{kit_tot / wire_tot if wire_tot else float('nan'):.2f})")
        finally:
            kit.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--residents", type=int, default=1, help="complete enrollments to run")
    ap.add_argument("--wire-speed", type=float, default=1.0, help="simulator wire speed (1.0 = real UART time)")
    a = ap.parse_args(argv)
    if a.residents < 1:
        ap.error("--residents must be at least 1")
    run(a.residents, a.wire_speed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
