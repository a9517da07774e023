"""Fixtures: a simulated sensor on a real pty, and the real driver opened on it through pyserial."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hw.sensor.driver import FingerprintSensor
from hw.sensor.simulator import SensorSimulator
from hw.sensor.synth import FingerBank

FAST = {"wire_speed": 0.0, "time_scale": 0.02}


@pytest.fixture(scope="session")
def bank(corpus_dir: Path) -> FingerBank:
    """One finger bank for the session, so synthetic masters are grown once."""
    return FingerBank(corpus_dir)


@pytest.fixture
def make_sim(bank: FingerBank) -> Iterator[Callable[..., SensorSimulator]]:
    """Factory: a started simulator (fast timing unless overridden); stopped at teardown."""
    sims: list[SensorSimulator] = []

    def make(profile: str = "r307", **kw: object) -> SensorSimulator:
        opts: dict = {**FAST, "bank": bank, **kw}
        sim = SensorSimulator(profile, **opts).start()
        sims.append(sim)
        return sim

    yield make
    for s in sims:
        s.stop()


@pytest.fixture
def make_fp() -> Iterator[Callable[..., FingerprintSensor]]:
    """Factory: a driver on a port, opened; closed at teardown."""
    fps: list[FingerprintSensor] = []

    def make(port: str, open_: bool = True, **kw: object) -> FingerprintSensor:
        opts: dict = {"settle_s": 0.02, "reopen_backoff": (0.05, 0.2), **kw}
        fp = FingerprintSensor(port, **opts)
        fps.append(fp)
        if open_:
            fp.open()
        return fp

    yield make
    for fp in fps:
        fp.close()


@pytest.fixture
def sim(make_sim: Callable[..., SensorSimulator]) -> SensorSimulator:
    return make_sim("r307")


@pytest.fixture
def fp(sim: SensorSimulator, make_fp: Callable[..., FingerprintSensor]) -> FingerprintSensor:
    return make_fp(sim.port)
