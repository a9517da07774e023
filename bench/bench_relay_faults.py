"""Relay fault campaign (issue #19): the scenarios of tests/faults/test_relay_faults.py, N trials each.

Broker kill -9 and restart (persistence on), broker outage, ingest kill -9 and kit kill -9, each during live
capture and drain on real processes (mosquitto, `rekam-fleet ingest`, the kit's store + relay); every trial ends
with the count against the kit journal and the archive. One summary line per scenario:
trials / confirmed / lost / corrupt / duplicated / stuck (all but confirmed must be 0), and the longest settle
(last capture to every record acked), the figure that shows no record waits long in `sent`.

    .venv/bin/python bench/bench_relay_faults.py --trials 20 [--scenario broker_kill9 ...] [--records 14]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.harness import Tally  # noqa: E402
from tests.faults.relay_harness import SCENARIOS, run, summary  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
    ap.add_argument("--records", type=int, default=14, help="records captured per trial")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the directories of unclean trials")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="rekam-relay-faults-"))
    bad = 0
    t0 = time.monotonic()
    for scenario in args.scenario or SCENARIOS:
        outs: list[Tally] = []
        for i in range(args.trials):
            root = base / f"{scenario}-{i}"
            o = run(scenario, root, args.seed * 100_003 + i, args.records)
            outs.append(o)
            if not o.clean:
                bad += 1
                print(f"  unclean trial {scenario} #{i}: lost={o.lost} corrupt={o.corrupt} duplicated={o.duplicated} "
                      f"stuck={o.stuck} {'; '.join(o.notes)} ({root})", file=sys.stderr)
            if o.clean or not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        print(summary(scenario, outs), flush=True)
    print(f"total {time.monotonic() - t0:.0f} s, unclean trials {bad}")
    if not args.dir and not (args.keep and bad):
        shutil.rmtree(base, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
