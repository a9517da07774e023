from __future__ import annotations

from tests.relay.conftest import assert_delivered_once, wait_for


def test_happy_path(mosquitto, make_kit, make_ingest, tmp_path):
    w = make_ingest(mosquitto.url)
    kit = make_kit([mosquitto.url])
    ids = kit.capture(10)
    kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 10, 20, "all acked")
    assert_delivered_once(kit, tmp_path / "archive", ids)
    assert w.counters.stored == 10
