"""Issue 14.5: the real ingest (two `IngestWorker`s, a real kit relaying over a real mosquitto) on the scale backend
(real PostgreSQL, real SeaweedFS S3): PostgreSQL killed and restarted mid-drain, the object store killed mid-write
and started again; a stick imported next to MQTT. Zero lost, zero stored twice, and every stored/duplicate ack the
kit receives names a record the index already holds at the moment the ack arrives (no ack before commit)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from firmware.errors import ArchiveError
from firmware.wire import record_format as rf
from firmware.wire import relay_protocol as proto
from firmware.wire import safejson
from provisioning.archive import open_archive
from tests.relay.conftest import KitUnderTest, wait_for
from tests.support import subprocess_env


@dataclass
class AckWatch:
    """Every ack sent to a kit, checked against the index the moment it arrives (its own archive handle)."""

    dsn: str
    objects: str
    acks: list[dict[str, Any]] = field(default_factory=list)
    before_commit: list[str] = field(default_factory=list)  # stored/duplicate acks for a record not yet indexed
    unchecked: int = 0  # acks that came while the database was down (no check possible)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, _c: Any, _u: Any, m: Any) -> None:
        ack = safejson.loads_object(m.payload, max_bytes=1 << 16, what="ack")
        with self.lock:
            self.acks.append(ack)
            if ack.get("status") not in ("stored", "duplicate"):
                return
            try:
                found = self.archive.lookup(str(ack["record_id"]))
            except ArchiveError:
                self.unchecked += 1
                return
            if found is None or found[0] != ack.get("sha256"):
                self.before_commit.append(str(ack["record_id"]))

    def __post_init__(self) -> None:
        self.archive = open_archive(self.dsn, self.objects, connect_timeout_s=1.0)


@pytest.fixture
def scale(pg_database: str, s3_objects: str) -> dict[str, str]:
    return {"archive": pg_database, "objects": s3_objects}


@pytest.fixture
def watch_acks(mosquitto, scale) -> Iterator[Callable[[str], AckWatch]]:
    clients: list[tuple[mqtt.Client, AckWatch]] = []

    def watch(kit_id: str) -> AckWatch:
        w = AckWatch(scale["archive"], scale["objects"])
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_message = w.on_message
        c.connect("127.0.0.1", mosquitto.port)
        c.subscribe(proto.ack_topic(kit_id), qos=1)
        c.loop_start()
        clients.append((c, w))
        return w

    yield watch
    for c, w in clients:
        c.loop_stop()
        c.disconnect()
        w.archive.close()


def assert_archived_once(kit: KitUnderTest, scale: dict[str, str], ids: list[str], workers: list[Any]) -> None:
    """Every record acked on the kit, indexed once, its object byte-identical; no conflicts; stored once."""
    a = open_archive(scale["archive"], scale["objects"])
    try:
        archived = a.record_ids(kit.kit_id)
        assert sorted(archived) == sorted(ids), f"lost or extra: {sorted(set(ids) ^ set(archived))[:5]}"
        for rid in ids:
            row = kit.store.j.get(rid)
            assert row is not None and row.state == "acked", f"{rid} is {row.state if row else 'gone'} on the kit"
            assert a.has(rid) == row.sha256 and rf.sha256_hex(a.read(rid)) == row.sha256
        o = a.objects  # type: ignore[attr-defined]
        keys = [x["Key"] for x in o.s3.list_objects_v2(Bucket=o.url.bucket, Prefix=o.url.key("")).get("Contents", [])]
        assert len([k for k in keys if "/records/" in k]) == len(ids) and not [k for k in keys if "/conflicts/" in k]
        # Never stored twice (a commit whose answer was lost in the crash is found as a duplicate on the resend).
        assert sum(w.counters.stored for w in workers) <= len(ids)
    finally:
        a.close()


def _drain_with_fault(make_kit, make_ingest, mosquitto, scale, watch_acks, fault: Callable[[], None],
                      n: int = 10) -> None:
    workers = [make_ingest(mosquitto.url, archive=scale["archive"], objects=scale["objects"]) for _ in range(2)]
    kit = make_kit([mosquitto.url], chunk_kb=64)  # several chunks per record: staged in PostgreSQL
    watch = watch_acks(kit.kit_id)
    ids = kit.capture(n)
    kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] >= 3, 60, "the first records acked")
    fault()
    wait_for(lambda: kit.counts()["acked"] == n, 120, "every record acked after the fault")
    assert kit.counts()["quarantined"] == 0
    c = kit.relay.status()["counters"] if kit.relay else {}
    kit.stop_relay()
    assert watch.before_commit == [], f"acked before its index row was committed: {watch.before_commit}"
    checked = len([x for x in watch.acks if x.get("status") in ("stored", "duplicate")]) - watch.unchecked
    assert checked >= n - 2, (checked, watch.unchecked)
    # The fault hit records in flight: the kit had to send some again (told to retry, or no ack came in time).
    assert c["retry_acks"] + c["records_resent"] > 0, c
    assert_archived_once(kit, scale, ids, workers)


def test_postgres_killed_and_restarted_mid_drain(make_kit, make_ingest, mosquitto, postgres, scale, watch_acks):
    def crash_and_recover() -> None:
        postgres.kill()  # every connection drops, unlogged staging is emptied by crash recovery
        threading.Timer(2.0, postgres.start).start()

    _drain_with_fault(make_kit, make_ingest, mosquitto, scale, watch_acks, crash_and_recover)
    assert postgres.running


def test_object_store_killed_mid_write(make_kit, make_ingest, mosquitto, seaweed, scale, watch_acks):
    def crash_and_recover() -> None:
        seaweed.kill()
        threading.Timer(2.0, seaweed.start).start()

    _drain_with_fault(make_kit, make_ingest, mosquitto, scale, watch_acks, crash_and_recover)
    wait_for(lambda: seaweed.running, 30, "the object store back")


def test_usb_import_and_mqtt_idempotent_on_the_scale_backend(make_kit, make_ingest, mosquitto, scale, tmp_path):
    """The same kit's records over MQTT (ingest) and from its stick (`rekam-fleet import --archive DSN --objects`,
    a real process): each archived once, whichever came first; the import's printed command names the DSN."""
    (tmp_path / "stick-kit" / "usb").mkdir(parents=True)
    kit = make_kit([mosquitto.url], name="stick-kit")
    stick = tmp_path / "stick-kit" / "usb"
    argv = [sys.executable, "-m", "provisioning.cli", "import", str(stick), "--archive", scale["archive"],
            "--objects", scale["objects"], "--no-progress", "--json"]
    ids = kit.capture(4)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert r.returncode == 1 and "register-kit" in r.stdout and "--objects" in r.stdout, r.stdout + r.stderr
    reg = subprocess.run([sys.executable, "-m", "provisioning.cli", "archive", "register-kit", kit.kit_id,
                          kit.public_key, "--archive", scale["archive"], "--objects", scale["objects"]],
                         capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert reg.returncode == 0, reg.stdout + reg.stderr
    w = make_ingest(mosquitto.url, archive=scale["archive"], objects=scale["objects"], tofu=False)
    kit.start_relay()
    wait_for(lambda: kit.counts()["acked"] == 4, 60, "all acked over MQTT")
    kit.stop_relay()
    more = kit.capture(3)  # only on the stick and the SD
    kit.store.eject()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout)
    assert (s["new"], s["already_had"], s["rejected"]) == (3, 4, [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert json.loads(r.stdout)["already_had"] == 7
    a = open_archive(scale["archive"], scale["objects"])
    try:
        assert sorted(a.record_ids(kit.kit_id)) == sorted(ids + more)
        assert all(a.has(x) == kit.store.j.get(x).sha256 for x in ids + more)
    finally:
        a.close()
    assert w.counters.stored == 4


def test_two_ingest_processes_share_nothing_but_the_services(make_kit, mosquitto, scale, tmp_path, ack_key_file):
    """`rekam-fleet ingest --archive DSN --objects ...` as two real processes in separate working folders: the
    chunks of one record land on both (shared subscription) and are reassembled from PostgreSQL staging."""
    base = [sys.executable, "-m", "provisioning.cli", "ingest", "--broker", mosquitto.url, "--archive",
            scale["archive"], "--objects", scale["objects"], "--tofu"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert r.returncode != 0 and "--ack-key" in r.stderr  # no archive folder to keep a made-up key in
    procs = []
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
        procs.append(subprocess.Popen([*base, "--ack-key", str(ack_key_file), "--group", "scale"],
                                      cwd=tmp_path / f"w{i}", env=subprocess_env(), stderr=subprocess.PIPE,
                                      text=True))
    try:
        kit = make_kit([mosquitto.url], chunk_kb=16)  # ~17 chunks a record, spread over both processes
        ids = kit.capture(6)
        kit.start_relay()
        wait_for(lambda: kit.counts()["acked"] == 6, 60, "every record acked")
        kit.stop_relay()
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        errs = [p.communicate(timeout=15)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    # Both were subscribed in the group, so the broker handed each its share of every record's chunks (mosquitto
    # deals shared-subscription messages round-robin); whichever got a last chunk assembled the record from both.
    assert all("ingest connected" in e for e in errs), [e[-1500:] for e in errs]
    assert sum(e.count("record archived") for e in errs) == 6
    a = open_archive(scale["archive"], scale["objects"])
    try:
        assert sorted(a.record_ids(kit.kit_id)) == sorted(ids)
    finally:
        a.close()
