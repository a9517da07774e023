"""Issue 19.4: a record in `sent` without an ack is offered again within a bounded time, whatever happened to the
connection (deterministic repro: mosquitto with persistence killed -9 during the resend of an already-sent record)."""

from __future__ import annotations

import time

from tests.relay.conftest import assert_delivered_once, wait_for


def kill9(broker) -> None:
    """SIGKILL the broker (no clean shutdown, no persistence flush), as a power cut or OOM kill would."""
    assert broker.proc is not None
    broker.proc.kill()
    broker.proc.wait(5)
    broker.proc = None


def test_broker_killed_during_resend_of_a_sent_record(mosquitto_factory, make_kit, make_ingest, tmp_path):
    broker = mosquitto_factory(persistence=True)
    # Slow enough that a resend of one ~260 KB record takes ~2.5 s: the kill lands inside it.
    kit = make_kit([broker.url], bytes_per_s=100_000, ack_timeout_s=1.0, ack_timeout_max_s=1.0)
    ids = kit.capture(1)
    relay = kit.start_relay()
    wait_for(lambda: kit.counts()["sent"] == 1, 20, "record sent (no ingest yet: no ack)")
    wait_for(lambda: relay.status()["counters"]["records_resent"] >= 1, 10, "the resend to start")
    time.sleep(0.3)
    assert relay.status()["in_flight_messages"] > 0 or relay._active, "the kill must land inside the resend"
    kill9(broker)
    time.sleep(0.5)
    broker.start()
    make_ingest(broker.url)
    # Bounded: reconnect backoff (<= 0.5 s here) + one ack timeout + one transfer (~2.5 s). Before the fix the
    # record stayed `sent` until the relay restarted: it was neither awaiting an ack nor fresh.
    wait_for(lambda: kit.counts()["acked"] == 1, 20, "the sent record to be offered again and acked")
    assert_delivered_once(kit, tmp_path / "archive", ids)
