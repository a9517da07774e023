"""A short run of the wire fuzz campaign (bench/bench_fuzz_wire.py): every parser of outside bytes either parses a
damaged input or refuses it with an error of the project's tree, never another exception."""

from __future__ import annotations

import pytest

from bench.bench_fuzz_wire import Mutator, cases, refused, seeds


@pytest.mark.parametrize("seed", [5, 6])
def test_damaged_inputs_are_parsed_or_refused_by_name(seed: int) -> None:
    m, s = Mutator(seed), seeds()
    n_refused = 0
    for _ in range(150):  # bounded: the campaign itself runs thousands (bench/)
        for name, call, data in cases(s, m):
            try:
                n_refused += refused(call, data)
            except Exception as e:  # pragma: no cover - a finding
                pytest.fail(f"{name}: {type(e).__name__}: {e} on input {data!r:.200}")
    assert n_refused > 1000  # the damage reaches the checks (most damaged inputs are refused)
