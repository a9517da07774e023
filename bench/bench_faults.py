"""The store's fault campaign: the scenarios of tests/faults/ (tests/faults/harness.py) with many more trials.

    .venv/bin/python -m bench.bench_faults --trials N [--scenarios a,b] [--power-loss M] [--chunk K] [--seed S]

Prints one summary line per scenario: trials, confirmed, lost, corrupt, duplicated, reused, stuck (all but the
first two must be 0), and exits 1 if any is not. `--trials` is the number of trials of each kill scenario
(kill_capture, kill_points, kill_recovery); the media scenarios (exhaustion, small_stick, yank_backfill,
usb_required) run `--trials // 10` (at least 1) and power_loss `--power-loss` (default `--trials // 20`, at
least 1). A kit folder holds at most `--chunk` trials (then a fresh kit, so the disk does not fill); the
figures are summed. Needs root (tmpfs and loop mounts). The load on the machine is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware.wire import record_format  # noqa: E402
from tests.faults.harness import SCENARIOS, Tally  # noqa: E402

KILL = ("kill_capture", "kill_points", "kill_recovery")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials of each kill scenario")
    ap.add_argument("--power-loss", type=int, default=None, help="power-loss trials (default trials // 20)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    ap.add_argument("--chunk", type=int, default=25, help="trials per kit folder")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--dir", default=None, help="where the kits live (default: a temp folder on the disk)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_faults needs root (tmpfs and loop mounts)", file=sys.stderr)
        return 2
    rng = random.Random(a.seed)
    base = Path(tempfile.mkdtemp(prefix="rekam-faults-", dir=a.dir or "/var/tmp"))
    _, pub = record_format.generate_datacenter_keypair()
    (base / "datacenter.pub").write_bytes(pub)
    print(f"# bench_faults trials={a.trials} seed={a.seed} dir={base} load={os.getloadavg()[0]:.2f}", flush=True)
    bad = 0
    for name in a.scenarios.split(","):
        if name in KILL:
            n = a.trials
        elif name == "power_loss":
            n = a.power_loss if a.power_loss is not None else max(1, a.trials // 20)
        else:
            n = max(1, a.trials // 10)
        total = Tally(name)
        t0 = time.monotonic()
        done = 0
        while done < n:
            k = min(a.chunk, n - done)
            kit = base / f"{name}-{done}"
            kit.mkdir()
            t = SCENARIOS[name](kit, base / "datacenter.pub", k, rng)
            total.add(t)
            done += k
            _rmtree(kit)
        bad += total.bad
        print(f"{total.line()} seconds={time.monotonic() - t0:.0f} load={os.getloadavg()[0]:.2f}", flush=True)
        for note in total.notes[:10]:
            print(f"#   {note}", flush=True)
    _rmtree(base)
    return 1 if bad else 0


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
