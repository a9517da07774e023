"""`rekam-fleet ingest`: the data center's MQTT ingest worker (any number share one subscription).

Each worker subscribes to ``$share/<group>/rekam/v1/+/records/+`` (MQTT v5 shared subscription), so the
broker hands every announce and chunk to exactly one worker of the group. Chunks of one record may
therefore land on different workers: they are staged in a SQLite file next to the archive
(``staging.db``, shared by the workers of one host), keyed by (record_id, sha256, index), never held in
RAM. The worker whose insert completes a record assembles it (one record in memory at a time, bounded
by --max-record-mb), checks the announced hash, stores it through `Archive.store()` (signature against
the registered kit key, fsync, unique index row) and only then publishes the ack on
``rekam/v1/<kit>/acks``, signed with the data center's ack key (``--ack-key``, default
``<archive>/ack-signing.key``, made on first start; see `provisioning.signer`).

With a PostgreSQL archive (``--archive postgresql://... --objects s3://...``, the scale backend) the chunks are
staged in that database instead (`provisioning.staging_pg`), so stateless workers on any hosts finish any record.

Staging is bounded: unfinished transfers are capped per kit and in total (count and announced bytes,
`StagingLimits`) and expire after --transfer-ttl without a chunk (default 5 minutes; the kit resends).
A transfer that does not fit is answered ``retry`` at its last chunk, so a genuine kit backs off and
resends later while a flooding kit cannot fill the disk.

A record id must carry the kit of the topic it came on (and the archive checks the header and the
signer too): kit B cannot stage or archive records named after kit A's.

Acks: stored / duplicate (safe at the data center), rejected (malformed: the kit quarantines it),
retry (unknown kit, disk or database trouble, inconsistent chunks, staging full: the kit resends later).
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

from firmware.errors import FleetError
from firmware.system.i18n import _, ngettext
from firmware.system.mqtt import Message, MqttLink, MqttSettings, client_id
from firmware.system.signals import SignalLatch, exit_now
from firmware.wire import relay_protocol as proto
from provisioning import ca, shards
from provisioning.archive import (
    ArchiveError,
    KitRevoked,
    StoreResult,
    UnknownKit,
    add_archive_arguments,
    check,
    is_scale_spec,
    open_archive,
    record_id_mismatch,
)
from provisioning.signer import ACK_KEY_FILE, load_ack_key
from provisioning.staging import InconsistentChunk, Staging, StagingFull, StagingLimits, StagingStore

__all__ = ["IngestSettings", "IngestWorker", "Staging", "StagingFull", "StagingLimits"]  # staging: re-exported

log = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 32  # unacknowledged messages the broker may send one worker (x 128 KiB chunks = its RAM bound)
BACKOFF_MIN_S = 0.5  # first reconnect delay; doubles up to IngestSettings.backoff_max_s
EXPIRE_EVERY_S = 60.0  # how often abandoned partial transfers are looked for (at most; less with a short TTL)
DEFAULT_TRANSFER_TTL_S = 300.0
STOP_WITHIN_S = 1.5  # SIGINT/SIGTERM to exit (issue 17: within 2 s)


@dataclass
class IngestSettings:
    """How one ingest worker connects and stages."""

    broker: str
    archive: Path | str  # a directory (embedded) or a postgresql:// DSN (scale backend, with `objects`)
    group: str = "ingest"
    tofu: bool = False
    fleet_db: Path | str | None = None  # fleet.db, or a PostgreSQL registry DSN
    transfer_ttl_s: float = DEFAULT_TRANSFER_TTL_S
    max_record_bytes: int = 64 * 1024 * 1024
    staging: StagingLimits = field(default_factory=lambda: StagingLimits())
    ack_key: Path | None = None  # None: <archive>/ack-signing.key, created if missing
    legacy_unsigned_acks: bool = False  # also publish v1 (unsigned) acks, for kits not yet upgraded (rollout only)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = ""
    client_id: str = ""
    backoff_max_s: float = 30.0
    objects: str | None = None  # s3://BUCKET[/PREFIX]?endpoint=URL: the object store of a PostgreSQL archive
    shard_brokers: tuple[str, ...] = ()  # the other broker shards (one URL each); `broker` is the first

    @property
    def brokers(self) -> list[str]:
        """Every broker this worker subscribes on, one connection each, without repeats."""
        out: list[str] = []
        for b in (self.broker, *self.shard_brokers):
            if b not in out:
                out.append(b)
        return out


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
    staging_refused: int = 0  # chunks refused because their transfer did not fit the staging limits
    wrong_kit: int = 0  # messages whose record id does not carry the topic's kit
    revoked: int = 0  # records of a kit the fleet registry revoked: neither archived nor acknowledged
    by_status: dict[str, int] = field(default_factory=dict)


class _AllReady:
    """`connected` of a worker: set while every one of its broker connections is subscribed."""

    def __init__(self, links: list[MqttLink]) -> None:
        self.links = links

    def is_set(self) -> bool:
        return all(lk.ready.is_set() for lk in self.links)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for lk in self.links:
            if not lk.ready.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return False
        return True


class IngestWorker:
    """One ingest worker: one MQTT connection per broker shard, one archive handle and one staging handle (see
    module doc).

    Each connection is the one MQTT adapter (`firmware.system.mqtt.MqttLink`) on a thread of its own: it reconnects
    with the one backoff helper (0.5 s doubling up to ``backoff_max_s``, jittered) and, with ``manual_ack``, sends a
    message's PUBACK only once its handler (staging, archiving, the record ack) returned. The handlers of all
    shards take turns (one lock: one archive and staging handle per worker), and a record's ack goes out on the
    shard its last message came from (the kit is connected there).
    """

    def __init__(self, s: IngestSettings) -> None:
        self.s = s
        self.url = proto.parse_broker_url(s.broker)
        if s.ack_key is None and is_scale_spec(s.archive):
            raise ArchiveError("a PostgreSQL archive has no folder for the ack-signing key: give --ack-key")
        self.archive = open_archive(s.archive, s.objects, tofu=s.tofu, fleet_db=s.fleet_db)
        if is_scale_spec(s.archive):  # staged in the archive's database: any worker on any host finishes a record
            from provisioning.staging_pg import PgStaging  # only here: psycopg is the scale extra

            self.staging: StagingStore = PgStaging(str(s.archive), s.staging)
        else:
            self.staging = Staging(Path(s.archive) / "staging.db", s.staging)
        key_path = s.ack_key or Path(s.archive) / ACK_KEY_FILE
        made = s.ack_key is None and not key_path.exists()
        self.ack_key = load_ack_key(key_path, create=s.ack_key is None)
        if made:
            # A new key no kit trusts yet: its acks are ignored (and counted) on every kit until the fleet lists it.
            log.warning("ingest made a new ack-signing key path=%s public_key=%s; kits trust it only once it is in "
                        "their relay.ack_public_keys (fleet.json ack_public_keys, or use the fleet's "
                        "ack-signing.key with --ack-key)", key_path, proto.ack_public_b64(self.ack_key))
        self.expire_every_s = min(EXPIRE_EVERY_S, max(0.5, s.transfer_ttl_s / 4))
        self.counters = IngestCounters()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.client_id = s.client_id or client_id("fleet", "ingest")
        self.links = [self._link(url) for url in s.brokers]
        self.mqtt = self.links[0]  # the first shard's connection (one-broker callers)
        self._handling = threading.Lock()  # the shards' handlers take turns on the archive and staging handles
        self._closed = False
        self._next_expiry = 0.0

    def _link(self, broker: str) -> MqttLink:
        """The connection to one broker shard, subscribed with the worker's shared group."""
        s = self.s
        # With the Receive Maximum below the broker never has more than RECEIVE_MAXIMUM unprocessed messages on
        # their way here (bounded memory); session expiry 0: a dead worker's messages go to the others at once.
        link = MqttLink(MqttSettings(
            [proto.parse_broker_url(broker)], client_id=self.client_id, keepalive_s=30, backoff_min_s=BACKOFF_MIN_S,
            backoff_max_s=max(BACKOFF_MIN_S, s.backoff_max_s), ca_file=s.ca_file, cert_file=s.cert_file,
            key_file=s.key_file, username=s.username, password=s.password,
            subscriptions=[(proto.shared_records_filter(s.group), 1)], clean_start=True, session_expiry_s=0,
            receive_maximum=RECEIVE_MAXIMUM, manual_ack=True, max_inflight=100, name="ingest"))
        link.on_message = lambda msg: self._on_message(msg, link)
        link.on_connect = lambda: log.info("ingest connected broker=%s group=%s client_id=%s ack_key=%s",
                                           broker, s.group, self.client_id, proto.ack_public_b64(self.ack_key))
        return link

    @property
    def connected(self) -> _AllReady:
        """Set while connected and subscribed on every broker shard."""
        return _AllReady(self.links)

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
        """Connect to every shard, subscribe, process messages until `stop` (each adapter reconnects on its own);
        then close every connection (clean DISCONNECT) and the handles."""
        self._next_expiry = time.monotonic() + self.expire_every_s
        try:
            for i, lk in enumerate(self.links):
                lk.start(name=f"{self.client_id}-{i}", tick=0.1)
            while not self.stop.wait(0.1):
                try:
                    self._tick()
                except Exception:
                    log.exception("ingest tick failed")
        finally:
            for lk in self.links:  # every link told at once, then all waited for against one deadline
                lk.stop(0)
            deadline = time.monotonic() + STOP_WITHIN_S
            for lk in self.links:
                lk.stop(max(0.0, deadline - time.monotonic()))
            # A handler still inside a commit keeps the handles (bounded: the process exits after STOP_WITHIN_S
            # whatever happens here; the kit resends what it got no ack for).
            if self._handling.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    self._closed = True
                    self.staging.close()
                    self.archive.close()
                finally:
                    self._handling.release()
            else:
                log.warning("ingest handler still busy at stop client_id=%s; handles left open", self.client_id)

    def _tick(self) -> None:
        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + self.expire_every_s
        with self._handling:
            n = self.staging.expire(self.s.transfer_ttl_s)
        if n:
            self.counters.expired_chunks += n
            log.info("ingest expired abandoned chunks count=%d", n)

    def _on_message(self, msg: Message, link: MqttLink | None = None) -> None:
        try:
            with self._handling:
                if self._closed:
                    return  # the handles are closed: not handled (the kit resends what it got no ack for)
                self._handle(msg.topic, msg.payload, link or self.mqtt)
        except Exception:
            # One bad message (or a DB hiccup) must not stop the worker; the kit resends.
            log.exception("ingest failed on a message topic=%s", msg.topic)

    # --- messages -------------------------------------------------------------------------------

    def _ack(self, kit_id: str, r: StoreResult, link: MqttLink) -> None:
        """Publish the signed record ack on `link`: the shard the kit sent on (it listens there)."""
        self.counters.by_status[r.status] = self.counters.by_status.get(r.status, 0) + 1
        setattr(self.counters, r.status, getattr(self.counters, r.status) + 1)
        ack = proto.Ack(r.record_id, r.sha256, r.status, r.reason[:500])
        link.publish(proto.ack_topic(kit_id), ack.encode(self.ack_key), qos=1)
        if self.s.legacy_unsigned_acks:  # old kits read only v1; upgraded kits ignore it (counted, logged)
            link.publish(proto.ack_topic(kit_id), ack.encode_unsigned_v1(), qos=1)

    def _handle(self, topic: str, payload: bytes, link: MqttLink) -> None:
        try:
            kit_id, kind = proto.parse_records_topic(topic)
            if kind == "announce":
                a = proto.Announce.decode(payload)
                if self._wrong_kit(kit_id, a.record_id, a.sha256, False, link):
                    return
                if self.archive.lookup(a.record_id) == (a.sha256, kit_id):
                    self._ack(kit_id, StoreResult("duplicate", a.record_id, a.sha256), link)
                return
            c = proto.Chunk.decode(payload)
        except proto.ProtocolError as e:
            self.counters.malformed += 1
            log.warning("ingest malformed message topic=%s error=%s", topic, e)
            return
        self.counters.chunks += 1
        if self._wrong_kit(kit_id, c.record_id, c.sha256, c.index == c.total - 1, link):
            return
        if c.size > self.s.max_record_bytes:
            if c.index == c.total - 1:
                self._ack(kit_id, StoreResult("rejected", c.record_id, c.sha256,
                                              f"record of {c.size} bytes exceeds the ingest limit "
                                              f"{self.s.max_record_bytes}"), link)
            return
        if self.archive.lookup(c.record_id) == (c.sha256, kit_id):
            if c.index == c.total - 1:
                self._ack(kit_id, StoreResult("duplicate", c.record_id, c.sha256), link)
            return
        if c.total == 1:
            # A whole record in one message: nothing to stage, whichever worker of the group the broker chose.
            self._store(kit_id, c, bytes(c.data), False, link)
            return
        try:
            if not self.staging.add(kit_id, c):
                return
            data = self.staging.assemble(c.record_id, c.sha256, c.total)
        except StagingFull as e:
            self.counters.staging_refused += 1
            if c.index == c.total - 1:  # once per transfer: the kit backs off this record and resends later
                log.warning("ingest staging refused kit_id=%s record_id=%s scope=%s detail=%s", kit_id, c.record_id,
                            e.scope, e)
                self._ack(kit_id, StoreResult("retry", c.record_id, c.sha256, str(e)), link)
            return
        except InconsistentChunk as e:  # the kit's chunk contradicts its transfer: dropped, no answer (see staging)
            self.counters.malformed += 1
            log.warning("ingest chunk refused kit_id=%s record_id=%s field=%s error=%s", kit_id, c.record_id,
                        e.field, e)
            return
        except (sqlite3.Error, ArchiveError) as e:
            log.error("ingest staging failed record_id=%s error=%s", c.record_id, e)
            return
        self._store(kit_id, c, data, True, link)

    def _store(self, kit_id: str, c: proto.Chunk, data: bytes, staged: bool, link: MqttLink) -> None:
        """Archive one complete record, drop its staged chunks, then ack it (after the archive's commit)."""
        try:
            r = self.archive.store(data, kit_id, "mqtt", expect_record_id=c.record_id, expect_sha256=c.sha256)
        except KitRevoked as e:
            self.counters.revoked += 1
            r = StoreResult("retry", c.record_id, c.sha256, str(e))
            log.warning("ingest record of a revoked kit not archived kit_id=%s record_id=%s", kit_id, c.record_id)
        except UnknownKit as e:
            r = StoreResult("retry", c.record_id, c.sha256, str(e))
            log.error("ingest unknown kit kit_id=%s record_id=%s: %s", kit_id, c.record_id, e)
        except ArchiveError as e:
            r = StoreResult("retry", c.record_id, c.sha256, str(e))
            log.error("ingest cannot archive record_id=%s error=%s", c.record_id, e)
        except Exception as e:
            # A case no check foresaw (a bug here, not the kit's): answered "retry", never left unanswered (the
            # kit would resend it blindly) and never "rejected" (the kit would quarantine a record that may be good).
            r = StoreResult("retry", c.record_id, c.sha256, f"internal error: {type(e).__name__}")
            log.exception("ingest failed archiving record_id=%s kit_id=%s", c.record_id, kit_id)
        finally:
            if staged:
                self.staging.drop(c.record_id, c.sha256)
        self._ack(kit_id, r, link)

    def _wrong_kit(self, kit_id: str, record_id: str, sha256: str, last: bool, link: MqttLink) -> bool:
        """True (and refused, answered at the last chunk) if `record_id` does not carry the topic's kit."""
        why = record_id_mismatch(record_id, kit_id)
        if not why:
            return False
        self.counters.wrong_kit += 1
        if last:
            self.archive.refuse(record_id, kit_id, sha256, why, "mqtt")
            self._ack(kit_id, StoreResult("rejected", record_id, sha256, why), link)
        return True


# --- CLI --------------------------------------------------------------------------------------


def ingest_brokers(args: argparse.Namespace) -> list[str]:
    """The broker shards of `rekam-fleet ingest`: every --broker, then the relay brokers of every shard of
    --shards-from (the fleet registry), without repeats."""
    out: list[str] = []
    given = args.broker if isinstance(args.broker, list) else [args.broker] if args.broker else []
    for b in given + (shards.relay_brokers_of(args.shards_from) if getattr(args, "shards_from", None) else []):
        if b not in out:
            out.append(b)
    return out


def _settings(args: argparse.Namespace, broker: str | list[str] | None = None) -> IngestSettings:
    brokers = ingest_brokers(args) if broker is None else broker if isinstance(broker, list) else [broker]
    broker = brokers[0]
    password = Path(args.password_file).read_text().strip() if args.password_file else ""
    archive = args.archive if is_scale_spec(args.archive) else Path(args.archive)
    return IngestSettings(broker=broker, archive=archive, objects=args.objects,
                          group=ca.ingest_group(args.group, args.key_file),
                          tofu=args.tofu,
                          fleet_db=args.fleet_db or None,
                          transfer_ttl_s=args.transfer_ttl, max_record_bytes=args.max_record_mb * 1024 * 1024,
                          staging=StagingLimits(kit_bytes=args.staging_kit_mb * 1024 * 1024,
                                                kit_transfers=args.staging_kit_transfers,
                                                total_bytes=args.staging_total_mb * 1024 * 1024,
                                                total_transfers=args.staging_total_transfers),
                          ack_key=Path(args.ack_key) if args.ack_key else None,
                          legacy_unsigned_acks=args.legacy_unsigned_acks,
                          ca_file=args.ca_file or "", cert_file=args.cert_file or "", key_file=args.key_file or "",
                          username=args.username or "", password=password,
                          shard_brokers=tuple(brokers[1:]))


def cmd_ingest(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        brokers = ingest_brokers(args)
        if not brokers:
            raise ValueError("give --broker URL (repeat it for every broker shard) or --shards-from FLEETDIR")
        for b in brokers:
            proto.parse_broker_url(b)
        proto.shared_records_filter(ca.ingest_group(args.group, args.key_file))
    except (ValueError, FleetError) as e:  # ProtocolError is a ValueError too
        raise SystemExit(f"rekam-fleet ingest: {e}") from None
    if args.staging_kit_mb < args.max_record_mb:
        raise SystemExit(f"rekam-fleet ingest: --staging-kit-mb {args.staging_kit_mb} is below --max-record-mb "
                         f"{args.max_record_mb}: the largest record could never be staged")
    if is_scale_spec(args.archive) and not (args.objects and args.ack_key):
        raise SystemExit("rekam-fleet ingest: a PostgreSQL --archive needs --objects s3://BUCKET?endpoint=URL and "
                         "--ack-key")
    if args.tofu:
        log.warning("ingest trust-on-first-use is ON: the first record of an unknown kit registers its key")
    # SIGINT/SIGTERM only set an event (no KeyboardInterrupt in the middle of a commit; no lock taken in the
    # handler: firmware/system/signals.py); every worker is then told at once and all are waited for against one
    # deadline, and the process leaves without interpreter teardown (a late worker may be inside SQLite), so it
    # ends within STOP_WITHIN_S.
    stop = threading.Event()
    latch = SignalLatch()
    workers: list[IngestWorker] = []
    try:
        for _i in range(args.workers):
            if latch.wait(stop, 0):
                break
            workers.append(IngestWorker(_settings(args, brokers)).start())
        while not latch.wait(stop, 0.5):
            if not all(w.thread is not None and w.thread.is_alive() for w in workers):
                break
    finally:
        stop_workers(workers, STOP_WITHIN_S)
    exit_now(0)
    return 0  # not reached


def stop_workers(workers: list[IngestWorker], within_s: float) -> None:
    """Stop every worker at once (clean DISCONNECT each) and wait for them against one deadline."""
    for w in workers:
        w.stop.set()
    deadline = time.monotonic() + within_s
    for w in workers:
        if w.thread is not None:
            w.thread.join(max(0.0, deadline - time.monotonic()))
    late = [w.client_id for w in workers if w.thread is not None and w.thread.is_alive()]
    if late:  # a handler still in a commit: the kit resends whatever it did not get an ack for
        log.warning("ingest workers still busy at exit count=%d client_ids=%s", len(late), ",".join(late))


def cmd_ack_key(args: argparse.Namespace) -> int:
    """`rekam-fleet archive ack-key`: the base64 public ack key kits must trust."""
    if args.ack_key is None and is_scale_spec(args.archive):
        raise SystemExit("rekam-fleet archive ack-key: a PostgreSQL archive needs --ack-key")
    path = Path(args.ack_key) if args.ack_key else Path(args.archive) / ACK_KEY_FILE
    if not is_scale_spec(args.archive):
        Path(args.archive).mkdir(parents=True, exist_ok=True)
    print(proto.ack_public_b64(load_ack_key(path, create=args.ack_key is None)))
    return 0


def cmd_kits(args: argparse.Namespace) -> int:
    a = open_archive(args.archive, args.objects)
    try:
        if args.kits_cmd == "register-kit":
            try:
                a.register_kit(args.kit_id, args.public_key)
            except ValueError as e:
                print("rekam-fleet archive register-kit: " + _("refused: {error}", error=e))
                return 2
            print(_("kit {kit} registered", kit=args.kit_id))
        else:
            for k in a.kits():
                print(f"{k['kit_id']}  {k['public_key']}  {k['registered_at']}  ({k['how']})  "
                      + ngettext("{n} record", "{n} records", a.count(k["kit_id"])))
    finally:
        a.close()
    return 0


def register(sub: Any) -> None:
    """Add `ingest` and `archive` to rekam-fleet."""
    p = sub.add_parser("ingest", help=_("receive records over MQTT into an archive (shared subscription)"))
    p.add_argument("--broker", action="append", help=_("mqtt://host:port or mqtts://host:port; repeat it for every "
                                                       "broker shard (one connection each, same group)"))
    p.add_argument("--shards-from", metavar="FLEETDIR",
                   help=_("also subscribe on the relay brokers of every shard in this fleet folder's registry (or a "
                          "PostgreSQL registry DSN)"))
    add_archive_arguments(p, _("archive directory (index.db, records/, staging.db), or a postgresql:// DSN (the "
                               "scale backend, with --objects)"))
    p.add_argument("--group", help=_("shared-subscription group (workers of one group share load); default: a secret "
                                     "derived from --key-file, so no kit can join it (docs/security.md)"))
    p.add_argument("--workers", type=int, default=1, help=_("worker connections in this process"))
    p.add_argument("--tofu", action="store_true",
                   help=_("trust on first use: register an unknown kit's key from its first record (tests, pilots)"))
    p.add_argument("--transfer-ttl", type=float, default=DEFAULT_TRANSFER_TTL_S,
                   help=_("drop a partial transfer after this long without a chunk, s"))
    lim = StagingLimits()
    p.add_argument("--staging-kit-mb", type=int, default=lim.kit_bytes // 2**20,
                   help=_("most MiB of unfinished transfers one kit may hold in staging"))
    p.add_argument("--staging-kit-transfers", type=int, default=lim.kit_transfers,
                   help=_("most unfinished transfers one kit may hold in staging"))
    p.add_argument("--staging-total-mb", type=int, default=lim.total_bytes // 2**20,
                   help=_("most MiB of unfinished transfers in staging, all kits together"))
    p.add_argument("--staging-total-transfers", type=int, default=lim.total_transfers,
                   help=_("most unfinished transfers in staging, all kits together"))
    p.add_argument("--legacy-unsigned-acks", action="store_true",
                   help=_("also publish the old unsigned (v1) acks, for kits not yet upgraded; only during a rollout: "
                          "a kit on old firmware stays open to forged acks"))
    p.add_argument("--ack-key", help=_("Ed25519 key that signs record acks (default <archive>/ack-signing.key, made "
                                       "if missing; kits list its public half in relay.ack_public_keys)"))
    p.add_argument("--max-record-mb", type=int, default=64)
    p.add_argument("--ca-file")
    p.add_argument("--cert-file")
    p.add_argument("--key-file")
    p.add_argument("--username")
    p.add_argument("--password-file")
    p.set_defaults(func=cmd_ingest)
    p.add_argument("--fleet-db", help=_("the fleet registry of `rekam-fleet serve` (its fleet.db, or the PostgreSQL "
                                        "DSN of a shared registry): its approved kits' keys are trusted too, its "
                                        "revoked kits' records refused"))
    p = sub.add_parser("archive", help=_("the record archive: its kit key registry, its integrity check"))
    ks = p.add_subparsers(dest="kits_cmd", required=True)
    r = ks.add_parser("register-kit",
                      help=_("register a kit's Ed25519 public key (base64, from `rekam identity show`)"))
    r.add_argument("kit_id")
    r.add_argument("public_key")
    add_archive_arguments(r)
    r.set_defaults(func=cmd_kits)
    r = ks.add_parser("kits", help=_("kits known to the archive and their record counts"))
    add_archive_arguments(r)
    r.set_defaults(func=cmd_kits)
    check.register(ks)
    r = ks.add_parser("ack-key", help=_("print the public half of the ack-signing key (for relay.ack_public_keys)"))
    r.add_argument("--archive", required=True)
    r.add_argument("--ack-key", help=_("key file (default <archive>/ack-signing.key, made if missing)"))
    r.set_defaults(func=cmd_ack_key)
