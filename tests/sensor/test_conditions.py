"""The simulator's finger conditions (dry, wet, partial, moved): seeded, at the configured rates, and the kit's
real quality check sees them fail; auto mode holds one finger for several placements (a two-impression enrol)."""

from __future__ import annotations

import time

import pytest

from firmware import config
from firmware.quality.finger import quality
from hw.sensor.driver import WaitResult
from hw.sensor.simulator import conditions


def _capture(sim, fp) -> object:
    assert fp.wait_for_finger(timeout=5, poll_s=0.02) is WaitResult.CAPTURED
    return quality.assess(fp.upload_image())


def test_defaults_match_the_config_and_are_seeded() -> None:
    assert config.defaults().simulation.finger_conditions == conditions.DEFAULT_RATES
    draws = [conditions.draw(conditions.DEFAULT_RATES, 0, f"demo-{i}/{f}", n)
             for i in range(40) for f in range(10) for n in range(3)]
    assert draws == [conditions.draw(conditions.DEFAULT_RATES, 0, f"demo-{i}/{f}", n)
                     for i in range(40) for f in range(10) for n in range(3)]  # repeatable
    share = {c: draws.count(c) / len(draws) for c in (*conditions.CONDITIONS, "good")}
    for c, rate in conditions.DEFAULT_RATES.items():
        assert abs(share[c] - rate) < 0.03, (c, share[c], rate)  # 1,200 draws: within 3 points
    with pytest.raises(ValueError):
        conditions.check_rates({"sweaty": 0.1})
    with pytest.raises(ValueError):
        conditions.check_rates({"dry": 0.7, "wet": 0.5})


@pytest.mark.parametrize("condition", ["dry", "partial", "moved"])
def test_each_condition_fails_the_kits_check_more_than_good(make_sim, make_fp, condition: str) -> None:
    sim = make_sim()
    fp = make_fp(sim.port)
    bad = good = 0
    for i in range(4):
        sim.present_finger(f"cond-{i}", i, condition)
        q = _capture(sim, fp)
        bad += q.rejected or q.score < 40
        sim.present_finger(f"cond-{i}", i, "good")
        q = _capture(sim, fp)
        good += q.rejected or q.score < 40
    assert bad >= 3 and good <= 1, (condition, bad, good)


def test_drawn_conditions_follow_the_rates(make_sim, make_fp) -> None:
    sim = make_sim(finger_conditions={"moved": 1.0})
    sim.present_finger("erin", 0, quality=None)
    assert sim.stats.conditions == {"moved": 1} and sim._finger.quality == "moved"
    sim = make_sim(finger_conditions={})
    for _ in range(5):
        sim.present_finger("erin", 0, quality=None)
    assert sim.stats.conditions == {"good": 5}


def test_auto_mode_holds_one_finger_for_an_enrol(make_sim, make_fp) -> None:
    sim = make_sim(auto_present=True, auto_repeat=2, finger_conditions={})
    sim.auto_hold_s = sim.auto_gap_s = 0.1 / sim.time_scale
    fp = make_fp(sim.port)
    assert fp.enroll(3, timeout=10, poll_s=0.02) is WaitResult.CAPTURED  # two impressions of one demo finger
    keys: list[tuple[str, object]] = []
    deadline = time.monotonic() + 20
    while len(keys) < 5 and time.monotonic() < deadline:
        f = sim._finger
        if f is not None and (not keys or keys[-1][1] is not f):
            keys.append((f.key, f))
        time.sleep(0.005)
    names = [k for k, _ in keys]
    assert len(names) == 5 and len(set(names)) in (2, 3), names
    pairs = zip(names, names[1:], strict=False)
    assert all(names.count(n) <= 2 for n in names) and any(a == b for a, b in pairs), names
