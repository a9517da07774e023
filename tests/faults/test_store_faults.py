"""The store's fault suite (bounded, in `make test`): real kill -9, real small tmpfs media (bytes and inodes,
SQLite's own writes too), a stick smaller than the backlog, a stick pulled mid-backfill, `usb.required`, and
power loss on a loop-mounted ext4 image. Each scenario ends with confirmed records all present and verifiable,
and lost, corrupt, duplicated, reused and stuck all zero (tests/faults/harness.py). The same scenarios with
many more trials: `python -m bench.bench_faults --trials N`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.faults import harness

TRIALS = {"kill_capture": 8, "kill_points": 3, "kill_recovery": 3, "exhaustion": 6, "small_stick": 1,
          "yank_backfill": 2, "usb_required": 1, "power_loss": 3}


@pytest.mark.parametrize("scenario", list(TRIALS))
def test_fault_scenario_loses_and_reuses_nothing(scenario: str, tmp_path: Path, dc_keys: dict[str, Any]) -> None:
    t = harness.SCENARIOS[scenario](tmp_path, dc_keys["pub_path"], TRIALS[scenario], random.Random(19))
    print(t.line())
    assert t.trials == TRIALS[scenario]
    assert t.confirmed > 0
    assert (t.lost, t.corrupt, t.duplicated, t.reused, t.stuck) == (0, 0, 0, 0, 0), t.notes
