"""`rekam-fleet ingest`: the data center's MQTT ingest worker (any number share one subscription).

Each worker subscribes to ``$share/<group>/rekam/v1/+/records/+`` (MQTT v5 shared subscription), so the
broker hands every announce and chunk to exactly one worker of the group. Chunks of one record may
therefore land on different workers: they are staged in a SQLite file next to the archive
(``staging.db``, shared by the workers of one host), keyed by (record_id, sha256, index), never held in
RAM. The worker whose insert completes a record assembles it (one record in memory at a time, bounded
by --max-record-mb), checks the announced hash, stores it through `Archive.store()` (signature against
the registered kit key, fsync, unique index row) and only then publishes the ack on
``rekam/v1/<kit>/acks``. Partial transfers older than --transfer-ttl are deleted (the kit resends).

Acks: stored / duplicate (safe at the data center), rejected (malformed: the kit quarantines it),
retry (unknown kit, disk or database trouble, inconsistent chunks: the kit resends later).
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.system.mqtt import Message, MqttLink, MqttSettings, client_id
from firmware.wire import relay_protocol as proto
from provisioning import ca
from provisioning.archive import Archive, ArchiveError, StoreResult, UnknownKit

log = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 32  # unacknowledged messages the broker may send one worker (x 128 KiB chunks = its RAM bound)
BACKOFF_MIN_S = 0.5  # first reconnect delay; doubles up to IngestSettings.backoff_max_s
EXPIRE_EVERY_S = 60.0  # how often abandoned partial transfers are looked for


@dataclass
class IngestSettings:
    """How one ingest worker connects and stages."""

    broker: str
    archive: Path
    group: str = "ingest"
    tofu: bool = False
    fleet_db: Path | None = None
    transfer_ttl_s: float = 3600.0
    max_record_bytes: int = 64 * 1024 * 1024
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = ""
    client_id: str = ""
    backoff_max_s: float = 30.0


@dataclass
class IngestCounters:
    """What a worker did (tests, logs, the bench)."""

    chunks: int = 0
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    retry: int = 0
    malformed: int = 0
    expired_chunks: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


class Staging:
    """Chunks of records in transit, in SQLite (shared by the workers of one host)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # Losing staged chunks in a power cut is harmless (the kit resends until acked): no fsync per chunk.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=60000")
        self.conn.execute("""CREATE TABLE IF NOT EXISTS chunks (
            record_id TEXT NOT NULL, sha256 TEXT NOT NULL, idx INTEGER NOT NULL, total INTEGER NOT NULL,
            size INTEGER NOT NULL, kit_id TEXT NOT NULL, data BLOB NOT NULL, at REAL NOT NULL,
            PRIMARY KEY (record_id, sha256, idx))""")
        self.conn.execute("CREATE INDEX IF NOT EXISTS chunks_at ON chunks (at)")

    def add(self, kit_id: str, c: proto.Chunk) -> bool:
        """Stage one chunk; True if this insert completed the record (exactly one inserter sees that)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?,?,?,?)",
                              (c.record_id, c.sha256, c.index, c.total, c.size, kit_id, c.data, time.time()))
            (n,) = self.conn.execute("SELECT COUNT(*) FROM chunks WHERE record_id = ? AND sha256 = ? AND total = ?",
                                     (c.record_id, c.sha256, c.total)).fetchone()
            # A chunk resent after completion may assemble the record again: the archive answers duplicate.
            complete = n == c.total
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return complete

    def assemble(self, record_id: str, sha256: str, total: int) -> bytes:
        rows = self.conn.execute("SELECT idx, data FROM chunks WHERE record_id = ? AND sha256 = ? AND total = ? "
                                 "ORDER BY idx", (record_id, sha256, total)).fetchall()
        if [r[0] for r in rows] != list(range(total)):
            raise ArchiveError(f"record {record_id}: staged chunks incomplete")
        return b"".join(r[1] for r in rows)

    def drop(self, record_id: str, sha256: str) -> None:
        self.conn.execute("DELETE FROM chunks WHERE record_id = ? AND sha256 = ?", (record_id, sha256))

    def expire(self, ttl_s: float) -> int:
        """Delete chunks of transfers older than `ttl_s` (abandoned; the kit resends from its store)."""
        return self.conn.execute("DELETE FROM chunks WHERE at < ?", (time.time() - ttl_s,)).rowcount

    def pending(self) -> int:
        return int(self.conn.execute("SELECT COUNT(DISTINCT record_id) FROM chunks").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class IngestWorker:
    """One ingest worker: its own MQTT connection, archive handle and staging handle (see module doc).

    The connection is the one MQTT adapter (`firmware.system.mqtt.MqttLink`): it reconnects with the one
    backoff helper (0.5 s doubling up to ``backoff_max_s``, jittered) and, with ``manual_ack``, sends a
    message's PUBACK only once its handler (staging, archiving, the record ack) returned.
    """

    def __init__(self, s: IngestSettings) -> None:
        self.s = s
        self.url = proto.parse_broker_url(s.broker)
        self.archive = Archive(s.archive, tofu=s.tofu, fleet_db=s.fleet_db)
        self.staging = Staging(Path(s.archive) / "staging.db")
        self.counters = IngestCounters()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.client_id = s.client_id or client_id("fleet", "ingest")
        # With the Receive Maximum below the broker never has more than RECEIVE_MAXIMUM unprocessed messages on
        # their way here (bounded memory); session expiry 0: a dead worker's messages go to the others at once.
        self.mqtt = MqttLink(MqttSettings(
            [self.url], client_id=self.client_id, keepalive_s=30, backoff_min_s=BACKOFF_MIN_S,
            backoff_max_s=max(BACKOFF_MIN_S, s.backoff_max_s), ca_file=s.ca_file, cert_file=s.cert_file,
            key_file=s.key_file, username=s.username, password=s.password,
            subscriptions=[(proto.shared_records_filter(s.group), 1)], clean_start=True, session_expiry_s=0,
            receive_maximum=RECEIVE_MAXIMUM, manual_ack=True, max_inflight=100, name="ingest"))
        self.mqtt.on_message = self._on_message
        self.mqtt.on_connect = lambda: log.info("ingest connected broker=%s group=%s client_id=%s", s.broker,
                                                s.group, self.client_id)
        self._next_expiry = 0.0

    @property
    def connected(self) -> threading.Event:
        """Set while connected and subscribed."""
        return self.mqtt.ready

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> IngestWorker:
        """Run in a background thread; returns at once (`connected` is set once subscribed)."""
        self.thread = threading.Thread(target=self.run, name=self.client_id, daemon=True)
        self.thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (clean DISCONNECT) and wait for its thread."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self) -> None:
        """Connect, subscribe, process messages until `stop` (the adapter reconnects); then close."""
        self._next_expiry = time.monotonic() + EXPIRE_EVERY_S
        try:
            self.mqtt.run(self.stop, tick=0.1, on_tick=self._tick)
        finally:
            self.staging.close()
            self.archive.close()

    def _tick(self) -> None:
        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + EXPIRE_EVERY_S
        n = self.staging.expire(self.s.transfer_ttl_s)
        if n:
            self.counters.expired_chunks += n
            log.info("ingest expired abandoned chunks count=%d", n)

    def _on_message(self, msg: Message) -> None:
        try:
            self._handle(msg.topic, msg.payload)
        except Exception:
            # One bad message (or a DB hiccup) must not stop the worker; the kit resends.
            log.exception("ingest failed on a message topic=%s", msg.topic)

    # --- messages -------------------------------------------------------------------------------

    def _ack(self, kit_id: str, r: StoreResult) -> None:
        self.counters.by_status[r.status] = self.counters.by_status.get(r.status, 0) + 1
        setattr(self.counters, r.status, getattr(self.counters, r.status) + 1)
        self.mqtt.publish(proto.ack_topic(kit_id), proto.Ack(r.record_id, r.sha256, r.status, r.reason).encode(),
                          qos=1)

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            kit_id, kind = proto.parse_records_topic(topic)
            if kind == "announce":
                a = proto.Announce.decode(payload)
                if self.archive.has(a.record_id) == a.sha256:
                    self._ack(kit_id, StoreResult("duplicate", a.record_id, a.sha256))
                return
            c = proto.Chunk.decode(payload)
        except proto.ProtocolError as e:
            self.counters.malformed += 1
            log.warning("ingest malformed message topic=%s error=%s", topic, e)
            return
        self.counters.chunks += 1
        if c.size > self.s.max_record_bytes:
            if c.index == c.total - 1:
                self._ack(kit_id, StoreResult("rejected", c.record_id, c.sha256,
                                              f"record of {c.size} bytes exceeds the ingest limit "
                                              f"{self.s.max_record_bytes}"))
            return
        if self.archive.has(c.record_id) == c.sha256:
            if c.index == c.total - 1:
                self._ack(kit_id, StoreResult("duplicate", c.record_id, c.sha256))
            return
        try:
            if not self.staging.add(kit_id, c):
                return
            data = self.staging.assemble(c.record_id, c.sha256, c.total)
        except (sqlite3.Error, ArchiveError) as e:
            log.error("ingest staging failed record_id=%s error=%s", c.record_id, e)
            return
        try:
            r = self.archive.store(data, kit_id, "mqtt", expect_record_id=c.record_id, expect_sha256=c.sha256)
        except UnknownKit as e:
            r = StoreResult("retry", c.record_id, c.sha256, str(e))
            log.error("ingest unknown kit kit_id=%s record_id=%s: %s", kit_id, c.record_id, e)
        except ArchiveError as e:
            r = StoreResult("retry", c.record_id, c.sha256, str(e))
            log.error("ingest cannot archive record_id=%s error=%s", c.record_id, e)
        finally:
            self.staging.drop(c.record_id, c.sha256)
        self._ack(kit_id, r)


# --- CLI --------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, broker: str) -> IngestSettings:
    password = Path(args.password_file).read_text().strip() if args.password_file else ""
    return IngestSettings(broker=broker, archive=Path(args.archive), group=ca.ingest_group(args.group, args.key_file),
                          tofu=args.tofu,
                          fleet_db=Path(args.fleet_db) if args.fleet_db else None,
                          transfer_ttl_s=args.transfer_ttl, max_record_bytes=args.max_record_mb * 1024 * 1024,
                          ca_file=args.ca_file or "", cert_file=args.cert_file or "", key_file=args.key_file or "",
                          username=args.username or "", password=password)


def cmd_ingest(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        proto.parse_broker_url(args.broker)
        proto.shared_records_filter(ca.ingest_group(args.group, args.key_file))
    except ValueError as e:  # ProtocolError is a ValueError too
        raise SystemExit(f"rekam-fleet ingest: {e}") from None
    if args.tofu:
        log.warning("ingest trust-on-first-use is ON: the first record of an unknown kit registers its key")
    workers = [IngestWorker(_settings(args, args.broker)).start() for _ in range(args.workers)]
    try:
        while all(w.thread is not None and w.thread.is_alive() for w in workers):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for w in workers:
            w.close()
    return 0


def cmd_kits(args: argparse.Namespace) -> int:
    a = Archive(Path(args.archive))
    try:
        if args.kits_cmd == "register-kit":
            try:
                a.register_kit(args.kit_id, args.public_key)
            except ValueError as e:
                print(f"rekam-fleet archive register-kit: {e}")
                return 2
            print(f"kit {args.kit_id} registered")
        else:
            for k in a.kits():
                print(f"{k['kit_id']}  {k['public_key']}  {k['registered_at']}  ({k['how']})  "
                      f"{a.count(k['kit_id'])} records")
    finally:
        a.close()
    return 0


def register(sub: Any) -> None:
    """Add `ingest` and `archive` to rekam-fleet."""
    p = sub.add_parser("ingest", help="receive records over MQTT into an archive (shared subscription)")
    p.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--archive", required=True, help="archive directory (index.db, records/, staging.db)")
    p.add_argument("--group", help="shared-subscription group (workers of one group share load); default: a secret "
                   "derived from --key-file, so no kit can join it (docs/security/broker.md)")
    p.add_argument("--workers", type=int, default=1, help="worker connections in this process")
    p.add_argument("--tofu", action="store_true",
                   help="trust on first use: register an unknown kit's key from its first record (tests, pilots)")
    p.add_argument("--transfer-ttl", type=float, default=3600.0, help="drop partial transfers older than this, s")
    p.add_argument("--max-record-mb", type=int, default=64)
    p.add_argument("--ca-file")
    p.add_argument("--cert-file")
    p.add_argument("--key-file")
    p.add_argument("--username")
    p.add_argument("--password-file")
    p.set_defaults(func=cmd_ingest)
    p.add_argument("--fleet-db", help="fleet.db of `rekam-fleet serve`: its approved kits' keys are trusted too")
    p = sub.add_parser("archive", help="the record archive's kit key registry")
    ks = p.add_subparsers(dest="kits_cmd", required=True)
    r = ks.add_parser("register-kit", help="register a kit's Ed25519 public key (base64, from `rekam identity show`)")
    r.add_argument("kit_id")
    r.add_argument("public_key")
    r.add_argument("--archive", required=True)
    r.set_defaults(func=cmd_kits)
    r = ks.add_parser("kits", help="kits known to the archive and their record counts")
    r.add_argument("--archive", required=True)
    r.set_defaults(func=cmd_kits)
