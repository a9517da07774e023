"""Relay faults in CI (issue #19), one bounded trial per scenario on real processes (mosquitto with persistence,
`rekam-fleet ingest`, the kit's store + relay): broker kill -9 + restart, broker outage, ingest kill -9, kit kill -9,
each during live capture and drain. Each ends with the count against the kit journal and the archive: every
confirmed record archived once, byte-identical and verifying; nothing lost, corrupt, duplicated or stuck in
`sent` after a bounded settle. The campaign with many trials: bench/bench_relay_faults.py --trials N."""

from __future__ import annotations

import pytest

from tests.faults.relay_harness import SCENARIOS, run


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_relay_fault(scenario, tmp_path):
    out = run(scenario, tmp_path / scenario, seed=SCENARIOS.index(scenario) + 1, records=10)
    assert out.confirmed > 0
    assert (out.lost, out.corrupt, out.duplicated, out.stuck) == (0, 0, 0, 0), out
