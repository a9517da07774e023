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
import random
import sqlite3
import ssl
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.wire import relay_protocol as proto
from provisioning.archive import Archive, ArchiveError, StoreResult, UnknownKit

log = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 32  # unacknowledged messages the broker may send one worker (x 128 KiB chunks = its RAM bound)


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
    """One ingest worker: its own MQTT connection, archive handle and staging handle (see module doc)."""

    def __init__(self, s: IngestSettings) -> None:
        self.s = s
        self.url = proto.parse_broker_url(s.broker)
        self.archive = Archive(s.archive, tofu=s.tofu, fleet_db=s.fleet_db)
        self.staging = Staging(Path(s.archive) / "staging.db")
        self.counters = IngestCounters()
        self.events: deque[tuple[str, Any]] = deque()
        self.client: Any = None
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.client_id = s.client_id or f"ingest-{s.group}-{uuid.uuid4().hex[:8]}"
        self._rng = random.Random()

    # --- paho callbacks: enqueue only --------------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.events.append(("connack", int(getattr(rc, "value", rc) or 0)))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.events.append(("disconnected", str(rc)))

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            self.events.append(("message", (msg.topic, bytes(msg.payload), msg.mid, msg.qos)))
        except Exception:  # pragma: no cover - never raise in a callback
            pass

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, rcs: Any, _p: Any) -> None:
        self.events.append(("suback", [int(getattr(r, "value", r)) for r in rcs]))

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt

        # manual_ack: a PUBACK goes out only after the chunk is staged, and with the Receive Maximum below the
        # broker never has more than RECEIVE_MAXIMUM unprocessed messages on their way here (bounded memory).
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                        manual_ack=True)
        c.suppress_exceptions = True
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_message, c.on_subscribe = self._on_message, self._on_subscribe
        c.max_inflight_messages_set(100)
        if self.s.username:
            c.username_pw_set(self.s.username, self.s.password or None)
        if self.url.tls:
            ctx = ssl.create_default_context(cafile=self.s.ca_file or None)
            if self.s.cert_file:
                ctx.load_cert_chain(self.s.cert_file, self.s.key_file or None)
            c.tls_set_context(ctx)
        return c

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> IngestWorker:
        """Run in a background thread; returns at once (`connected` is set once subscribed)."""
        self.thread = threading.Thread(target=self.run, name=self.client_id, daemon=True)
        self.thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self) -> None:
        """Connect, subscribe, process messages until `stop`; reconnects with jittered backoff."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        attempt = 0
        next_expiry = time.monotonic() + 60
        try:
            while not self.stop.is_set():
                if self.client is None:
                    self.client = self._make_client()
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = 0  # a dead worker's messages go to the others at once
                    props.ReceiveMaximum = RECEIVE_MAXIMUM
                    try:
                        self.client.connect(self.url.host, self.url.port, keepalive=30, clean_start=True,
                                            properties=props)
                    except (OSError, ssl.SSLError) as e:
                        self._lost(f"connect failed: {e}", attempt)
                        attempt += 1
                        continue
                rc = self.client.loop(timeout=0.1)
                if rc != 0:
                    self._lost(f"connection lost rc={rc}", attempt)
                    attempt += 1
                    continue
                while self.events:
                    kind, val = self.events.popleft()
                    if kind == "connack":
                        if val >= 0x80:
                            self._lost(f"broker refused the connection reason=0x{val:02x}", attempt)
                            attempt += 1
                            break
                        self.client.subscribe(proto.shared_records_filter(self.s.group), qos=1)
                    elif kind == "suback":
                        if any(v >= 0x80 for v in val):
                            log.error("ingest subscription refused reason_codes=%s", val)
                        else:
                            attempt = 0
                            self.connected.set()
                            log.info("ingest subscribed broker=%s group=%s client_id=%s", self.s.broker,
                                     self.s.group, self.client_id)
                    elif kind == "disconnected":
                        self._lost(f"disconnected: {val}", attempt)
                        attempt += 1
                        break
                    elif kind == "message":
                        topic, payload, mid, qos = val
                        try:
                            self._handle(topic, payload)
                        except Exception:
                            # One bad message (or a DB hiccup) must not stop the worker; the kit resends.
                            log.exception("ingest failed on a message topic=%s", topic)
                        if qos:
                            self.client.ack(mid, qos)
                if time.monotonic() > next_expiry:
                    next_expiry = time.monotonic() + 60
                    n = self.staging.expire(self.s.transfer_ttl_s)
                    if n:
                        self.counters.expired_chunks += n
                        log.info("ingest expired abandoned chunks count=%d", n)
        finally:
            if self.client is not None:
                try:
                    self.client.disconnect()
                    self.client.loop(0.05)
                except Exception:
                    pass
            self.staging.close()
            self.archive.close()

    def _lost(self, why: str, attempt: int) -> None:
        self.connected.clear()
        if self.client is not None:
            try:
                self.client.socket() and self.client.socket().close()
            except Exception:
                pass
        self.client = None
        self.events.clear()
        cap = min(self.s.backoff_max_s, 0.5 * 2 ** min(attempt, 10))
        delay = cap / 2 + self._rng.uniform(0, cap / 2)
        log.warning("ingest broker unavailable broker=%s error=%s retry_in_s=%.1f", self.s.broker, why, delay)
        self.stop.wait(delay)

    # --- messages -------------------------------------------------------------------------------

    def _ack(self, kit_id: str, r: StoreResult) -> None:
        self.counters.by_status[r.status] = self.counters.by_status.get(r.status, 0) + 1
        setattr(self.counters, r.status, getattr(self.counters, r.status) + 1)
        self.client.publish(proto.ack_topic(kit_id), proto.Ack(r.record_id, r.sha256, r.status, r.reason).encode(),
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
    return IngestSettings(broker=broker, archive=Path(args.archive), group=args.group, tofu=args.tofu,
                          fleet_db=Path(args.fleet_db) if args.fleet_db else None,
                          transfer_ttl_s=args.transfer_ttl, max_record_bytes=args.max_record_mb * 1024 * 1024,
                          ca_file=args.ca_file or "", cert_file=args.cert_file or "", key_file=args.key_file or "",
                          username=args.username or "", password=password)


def cmd_ingest(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        proto.parse_broker_url(args.broker)
    except ValueError as e:
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
    p.add_argument("--group", default="ingest", help="shared-subscription group (workers of one group share load)")
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
