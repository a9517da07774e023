"""Stateful property test: random command sequences, driver over a pty against the simulator,
checked against a plain model of the library (Store / Delete / Empty / Search / export-import)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hw.sensor.driver import FingerprintSensor
from hw.sensor.simulator import SensorSimulator
from hw.sensor.synth import FingerBank

pytestmark = pytest.mark.timeout(120)

FINGERS = [("ana", 0), ("ana", 1), ("budi", 0), ("citra", 4)]
PAGES = st.integers(0, 15)


def make_machine(bank: FingerBank) -> type[RuleBasedStateMachine]:
    class Library(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.sim = SensorSimulator("r307", bank=bank, wire_speed=0, time_scale=0.01, capacity=16).start()
            self.fp = FingerprintSensor(self.sim.port, settle_s=0.01)
            self.fp.open()
            self.model: dict[int, tuple[str, int]] = {}

        def teardown(self) -> None:
            self.fp.close()
            self.sim.stop()

        def _features(self, finger: tuple[str, int], buffer: int = 1) -> None:
            self.sim.present_finger(*finger)
            assert self.fp.capture_image()
            self.fp.image_to_template(buffer)

        @rule(finger=st.sampled_from(FINGERS), page=PAGES)
        def store(self, finger: tuple[str, int], page: int) -> None:
            self._features(finger)
            self.fp.store(page)
            self.model[page] = finger

        @rule(page=PAGES, count=st.integers(1, 3))
        def delete(self, page: int, count: int) -> None:
            if page + count > 16:
                return
            self.fp.delete(page, count)
            for p in range(page, page + count):
                self.model.pop(p, None)

        @rule()
        def empty(self) -> None:
            self.fp.empty()
            self.model.clear()

        @rule(finger=st.sampled_from(FINGERS))
        def search(self, finger: tuple[str, int]) -> None:
            self._features(finger)
            hit = self.fp.search()
            if finger in self.model.values():
                assert hit is not None and self.model.get(hit.page) == finger
            else:
                assert hit is None

        @rule(src=PAGES, dst=PAGES)
        def export_import(self, src: int, dst: int) -> None:
            if src not in self.model:
                return
            self.fp.load(src, 1)
            data = self.fp.upload_template(1)
            self.fp.download_template(data, 2)
            self.fp.store(dst, 2)
            self.model[dst] = self.model[src]

        @invariant()
        def library_matches_model(self) -> None:
            assert self.fp.template_count() == len(self.model)
            assert self.fp.used_slots() == sorted(self.model)

    return Library


def test_library_behaves_like_its_model(bank: FingerBank) -> None:
    machine = make_machine(bank)
    machine.TestCase.settings = settings(max_examples=15, stateful_step_count=15, deadline=None)
    machine.TestCase().runTest()
