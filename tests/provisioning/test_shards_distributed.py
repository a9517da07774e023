"""The distributed deployment on real parts, all separate processes: two mosquitto broker shards (persistence on),
two `rekam-fleet ingest` worker processes (each in its own working directory, subscribed on every shard from the
fleet registry with ``--shards-from``, one shared group), and three kits (`tests.faults.kit_driver`: the real store
and relay) whose brokers come from the signed config the fleet makes for them (primary then failover shard).

During live capture and drain: kit A's primary shard broker is SIGKILLed (A fails over and keeps delivering, then
returns), one worker is SIGKILLed while a record is half staged (the other finishes it or the kit resends), and kit
A's stick is imported (`rekam-fleet import`) while A relays. A spy on both shards checks every ack a kit gets
against the archive index at the moment it arrives. The count: zero lost, zero stored twice, every stored/duplicate
ack after its index row. Bounded: 3 x 12 records, every wait has a timeout (about 40 s on 2 cores).

Run on both archive backends: the embedded one on one shared archive folder (chunk reassembly across the two
workers through its staging.db), and the scale one (PostgreSQL index and staging, S3 objects in SeaweedFS), where
the workers share nothing but the brokers, PostgreSQL and the object store.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from firmware.errors import ArchiveError
from firmware.seal import identity
from firmware.system.mqtt import MqttLink, MqttSettings
from firmware.wire import control_protocol as cp
from firmware.wire import record_format as rf
from firmware.wire import relay_protocol as proto
from provisioning import fleet_ops
from provisioning.archive import open_archive
from provisioning.registry import Fleet
from tests.support import REPO, Mosquitto, free_port, render_toml, subprocess_env, wait_for

RECORDS = 12  # per kit (each about 460 KB: 29 chunks)
SETTLE_S = 45.0


class Backend:
    """The archive under test: ``--archive`` (and ``--objects``) for the CLIs, and what the count reads."""

    def __init__(self, archive: str, objects: str | None) -> None:
        self.archive, self.objects = archive, objects

    @property
    def args(self) -> list[str]:
        return ["--archive", self.archive] + (["--objects", self.objects] if self.objects else [])

    def open(self) -> object:
        return open_archive(self.archive, self.objects)

    def _count(self, table: str, sqlite_file: str) -> int:
        """Rows of `table`: in PostgreSQL (scale), or in the archive folder's `sqlite_file` (embedded)."""
        if self.objects:
            import psycopg

            with psycopg.connect(self.archive, connect_timeout=5) as c:
                return int(c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        db = Path(self.archive) / sqlite_file
        if not db.exists():
            return 0
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return int(c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError:
            return 0
        finally:
            c.close()

    def staged(self) -> int:
        """Unfinished transfers in the shared staging."""
        return self._count("staging_transfers" if self.objects else "transfers", "staging.db")

    def rejects(self) -> int:
        """Refused or conflicting copies (a second copy of a record id with other bytes is one)."""
        return self._count("rejects", "index.db")


@pytest.fixture(params=["embedded", "scale"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "embedded":
        return Backend(str(tmp_path / "archive"), None)
    return Backend(request.getfixturevalue("pg_database"), request.getfixturevalue("s3_objects"))


class AckSpy:
    """Listens to every kit's acks on one shard and checks each stored/duplicate ack against the archive index
    when it arrives (the row must already be committed)."""

    def __init__(self, url: str, backend: Backend) -> None:
        self.url, self.backend = url, backend
        self.handle: object | None = None
        self.acks: list[tuple[str, str, str]] = []  # (kit, record, status)
        self.early: list[str] = []  # acks that came before their index row
        self.link = MqttLink(MqttSettings([proto.parse_broker_url(url)], client_id=f"spy-{free_port()}",
                                          subscriptions=[("rekam/v1/+/acks", 1)], backoff_min_s=0.1,
                                          backoff_max_s=0.5, name="spy"))
        self.link.on_message = self._on
        self._lock = threading.Lock()

    def _on(self, msg) -> None:
        try:
            ack = proto.Ack.decode(msg.payload)
        except proto.ProtocolError:
            return
        kit = msg.topic.split("/")[2]
        if ack.status in ("stored", "duplicate"):
            if self.handle is None:  # made on the spy's own thread
                self.handle = self.backend.open()
            try:
                found = self.handle.lookup(ack.record_id)  # type: ignore[attr-defined]
            except ArchiveError as e:
                found = None
                self.early.append(f"{ack.record_id}: index not readable ({e})")
            if found is None or found[0] != ack.sha256:
                self.early.append(f"{ack.record_id} {ack.status} on {self.url}")
        with self._lock:
            self.acks.append((kit, ack.record_id, ack.status))

    def of(self, kit: str) -> list[tuple[str, str, str]]:
        with self._lock:
            return [a for a in self.acks if a[0] == kit]


def _kit_config(root: Path, f: Fleet, kit_id: str, dc_pub: Path, stick: bool) -> Path:
    """The kit's rekam.toml with the [relay] its signed config gives it (brokers of its shards, the ack key)."""
    _version, doc = f.make_config(kit_id, {})
    relay = cp.decode(doc, "config")[0]["sections"]["relay"]
    cfg = root / "rekam.toml"
    cfg.write_text(render_toml({
        "kit": {"state_dir": str(root / "sd")},
        "datacenter": {"public_key_files": [str(dc_pub)]},
        "usb": {"mount_point": str(root / ("usb" if stick else "no-stick")), "require_mountpoint": False},
        "store": {"reserve_floor_mb": 1, "journal_reserve_mb": 1, "max_record_mb": 8, "verify_readback": False},
        "relay": {**relay, "ack_timeout_s": 1.0, "ack_timeout_max_s": 2.0, "backoff_min_s": 0.1,
                  "backoff_max_s": 0.5, "probe_interval_s": 0.5, "connect_timeout_s": 2.0, "keepalive_s": 5,
                  "telemetry_interval_s": 5.0, "publishes_per_s": 0.0, "bytes_per_s": 1_200_000, "chunk_kb": 16},
    }))
    return cfg


def _journal(root: Path) -> dict[str, tuple[str, str]]:
    db = root / "sd" / "journal.db"
    if not db.exists():
        return {}
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return {r[0]: (r[1], r[2]) for r in c.execute("SELECT id, state, sha256 FROM records")}
    except sqlite3.OperationalError:
        return {}
    finally:
        c.close()


def _confirmed(out: Path) -> dict[str, str]:
    lines = out.read_text().splitlines() if out.exists() else []
    return {p[1]: p[2] for p in (ln.split() for ln in lines) if len(p) == 3 and p[0] == "confirmed"}


def _import(stick: Path, backend: Backend) -> dict:
    """`rekam-fleet import STICK --archive ... --tofu --json` as an operator runs it; its summary."""
    r = subprocess.run([sys.executable, "-m", "provisioning.cli", "import", str(stick), *backend.args,
                        "--tofu", "--json", "--no-progress"], cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _kill9(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait(10)


def test_kits_on_two_shards_two_workers_faults_and_a_stick_import(tmp_path: Path, backend: Backend) -> None:
    t_start = time.monotonic()
    b1, b2 = (Mosquitto(tmp_path / f"broker-{n}", persistence=True) for n in (1, 2))
    f = Fleet.init(tmp_path / "fleet", [], [], ["127.0.0.1"], batch="t")
    _priv, pub = rf.generate_datacenter_keypair()
    dc_pub = tmp_path / "dc.pub"
    dc_pub.write_bytes(pub)
    workers: list[subprocess.Popen] = []
    kits: dict[str, tuple[Path, subprocess.Popen, Path]] = {}
    spies: list[AckSpy] = []
    try:
        b1.start()
        b2.start()
        fleet_ops.add_shard(f, "s1", [b1.url])
        fleet_ops.add_shard(f, "s2", [b2.url])
        # Two ingest worker processes, each in its own working directory, on every shard of the registry.
        for n in (1, 2):
            wd = tmp_path / f"worker-{n}"
            wd.mkdir()
            log = wd / "ingest.log"
            with open(log, "wb") as out:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "provisioning.cli", "ingest", "--shards-from", str(f.data),
                     *backend.args, "--tofu", "--ack-key", str(f.data / "ack-signing.key"),
                     "--transfer-ttl", "30"], cwd=wd, env=subprocess_env(), stdout=out, stderr=out))
        for n in (1, 2):
            log = tmp_path / f"worker-{n}" / "ingest.log"
            wait_for(lambda log=log: all(f"ingest connected broker={b.url} group=" in log.read_text(errors="replace")
                                         for b in (b1, b2)), 20, f"worker {n} subscribed on both shards")
        spies = [AckSpy(b.url, backend) for b in (b1, b2)]
        for s in spies:
            s.link.start()
            assert s.link.ready.wait(10)
        # Three kits: A primary s1, B primary s2 (pinned), C where rendezvous hashing puts it.
        for name, pin in (("A", ("s1", "s2")), ("B", ("s2", "s1")), ("C", None)):
            root = tmp_path / f"kit-{name}"
            root.mkdir()
            if name == "A":
                (root / "usb").mkdir()  # a present stick (a plain folder in simulation)
            kit_id = identity.load_or_create(root / "sd").kit_id
            f.db.execute("INSERT INTO kits (kit_id, public_key, state, claimed_at) VALUES (?, 'x', 'approved', 0)",
                         (kit_id,))
            if pin:
                f.pin(kit_id, *pin)
            cfg = _kit_config(root, f, kit_id, dc_pub, stick=name == "A")
            out = root / "kit.out"
            with open(out, "w") as o, open(root / "kit.log", "wb") as err:
                proc = subprocess.Popen([sys.executable, "-m", "tests.faults.kit_driver", "--config", str(cfg),
                                         "--capture", str(RECORDS), "--interval", "0.4", "--seed", str(ord(name))],
                                        cwd=REPO, env=subprocess_env(), stdout=o, stderr=err, text=True)
            kits[name] = (root, proc, out)
        kid = {n: identity.load_or_create(kits[n][0] / "sd").kit_id for n in kits}

        def acked_on(spy: AckSpy, name: str) -> int:
            return sum(1 for _k, _r, st in spy.of(kid[name]) if st in ("stored", "duplicate"))

        # Fault 1: kit A's primary shard broker dies (SIGKILL); A fails over to s2 and keeps delivering.
        wait_for(lambda: acked_on(spies[0], "A") >= 2, 30, "kit A delivering on its primary shard")
        p = b1.proc
        assert p is not None
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        b1.proc = None
        wait_for(lambda: acked_on(spies[1], "A") >= 2, 30, "kit A delivering on its failover shard")
        # A stick import of kit A while it relays (on the failover shard).
        assert _import(kits["A"][0] / "usb", backend)["rejected"] == []
        b1.start()  # the shard comes back; A returns to its primary (probe), the workers re-subscribe there
        # Fault 2: a worker SIGKILLed while a record is half staged: the other worker completes it or the kit resends.
        wait_for(lambda: backend.staged() > 0, 20, "a record half staged", step=0.01)
        _kill9(workers[0])
        for name in kits:
            wait_for(lambda out=kits[name][2]: "captured" in out.read_text(), 60, f"kit {name} captured")
        wait_for(lambda: all(sum(1 for st, _ in _journal(kits[n][0]).values() if st in ("stored", "sent")) == 0
                             for n in kits), SETTLE_S, "every record of every kit acked", step=0.2)
        assert _import(kits["A"][0] / "usb", backend)["new"] == 0  # all there already, from MQTT or the first import
    finally:
        for _root, proc, _out in kits.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    _kill9(proc)
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGINT)
                try:
                    w.wait(10)
                except subprocess.TimeoutExpired:
                    _kill9(w)
        for s in spies:
            s.link.stop()
        for b in (b1, b2):
            b.stop()
        f.close()
    # The count, against each kit's journal and the archive (index, stored bytes, hashes, kit signatures).
    a = backend.open()
    try:
        assert backend.rejects() == 0, "a refused record or a conflicting second copy"
        total = 0
        for name, (root, _proc, out) in kits.items():
            confirmed = _confirmed(out)
            total += len(confirmed)
            assert len(confirmed) == RECORDS, f"kit {name} confirmed {len(confirmed)}"
            journal = _journal(root)
            ids = a.record_ids(kid[name])  # type: ignore[attr-defined]
            assert len(ids) == len(set(ids)) == RECORDS, f"kit {name}: {len(ids)} index rows for {RECORDS} records"
            lost = [r for r in confirmed if r not in ids]
            assert not lost, f"kit {name} lost {lost}"
            for rid, sha in confirmed.items():
                data = a.read(rid)  # type: ignore[attr-defined]
                rf.parse(data)
                assert rf.sha256_hex(data) == sha == a.lookup(rid)[0], f"{rid} corrupt"  # type: ignore[attr-defined]
                assert journal[rid][0] in ("acked", "purged"), f"{rid} is {journal[rid][0]} on kit {name}"
        assert total == 3 * RECORDS
    finally:
        a.close()  # type: ignore[attr-defined]
    early = [e for s in spies for e in s.early]
    assert not early, f"acks before their index row: {early}"
    # Kits of both shards were served, and B never left its shard.
    assert acked_on(spies[1], "B") >= 1 and not spies[0].of(kid["B"])
    print(f"distributed shard test: {total} records, {time.monotonic() - t_start:.1f} s")


def test_ingest_with_a_shard_down_serves_the_other_and_exits_within_2s(mosquitto, tmp_path: Path) -> None:
    """One shard's broker is down: the worker still subscribes and serves on the other, and SIGINT still ends the
    process within 2 s (the dead shard's reconnect loop does not hold it)."""
    dead = f"mqtt://127.0.0.1:{free_port()}"
    log = tmp_path / "ingest.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "provisioning.cli", "ingest", "--broker", dead, "--broker",
                              mosquitto.url, "--archive", str(tmp_path / "archive"), "--tofu", "--workers", "2"],
                             cwd=tmp_path, env=subprocess_env(), stdout=out, stderr=out)
    try:
        wait_for(lambda: log.read_text().count(f"ingest connected broker={mosquitto.url} group=") == 2, 20,
                 "both workers subscribed on the live shard")
        time.sleep(1.0)  # the dead shard's connection is in its retry loop
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        p.wait(10)
        took = time.monotonic() - t
    finally:
        _kill9(p)
    assert p.returncode == 0
    assert took < 2.0, f"ingest took {took:.1f} s to exit"
    assert "Traceback" not in log.read_text()
