"""The record relay: drains the store to the data center over MQTT and owns delivery end to end.

A broker's PUBACK proves little (brokers drop oversized or unrouted messages after acking them, paho's
queue is RAM). So the store is the queue and the data center's ingest has the last word:

    stored --(PUBACK of the last chunk)--> sent --(signed ack from ingest, hash checked)--> acked
                                             \\--(signed: ingest says malformed)--> quarantined

* An ack counts only if a data-center ack key (``relay.ack_public_keys``) signed it over the record id,
  hash and status; anything else is logged (``relay ignoring unverifiable ack ...``), counted
  (``acks_unverified``) and ignored.

* Records go out in capture order: an announce (id, size, hash), then chunks at QoS 1, as large as the
  broker's CONNACK Maximum Packet Size allows up to relay.chunk_max_kb (relay.chunk_kb if the broker
  announces none). A record that fits one chunk goes as that chunk alone (the announce would only
  repeat its header). At most min(relay.window, broker Receive Maximum) messages await a PUBACK. A
  PUBACK reason code >= 0x80 fails the transfer; a size-related refusal (0x95, 0x97, 0x83) halves the
  chunk size for that broker (brokers with ``message_size_limit`` do not announce it).
* After any reconnect or restart everything not acked is sent again from the store (transfers cut
  by a lost connection included). A sent record without an ack is resent after ``ack_timeout_s``,
  doubling (jittered) up to ``ack_timeout_max_s``, forever; a sweep every min(``ack_timeout_s``, 60 s)
  re-offers any `sent` record nothing tracks, so none stays `sent` for long whatever happened. At
  most ``max_unacked_records`` records wait for acks before new ones start.
* Token buckets on bytes/s and publishes/s leave room for control traffic on the same uplink.
* One thread owns the relay's state; the MQTT link (`firmware.system.mqtt.MqttLink`) runs its network on an
  I/O thread of its own (``start(dispatch=False)``): reading and parsing PUBACKs and acks happen there, the
  relay thread only hands paho packets (`send()`), consumes the queued events and sleeps on `wakeup` (one
  wake-up per batch of PUBACKs). Ack signatures are verified on the relay thread, which owns the state.

Run standalone (tests, field debugging): ``python -m firmware.relay --config /etc/rekam/rekam.toml``.

Over 600 lines on purpose: one state machine owned by one thread (transfers, PUBACK window, ack
timers, journal marks); split across files its invariants would have to be read in several places.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import heapq
import itertools
import json
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from firmware.relay.uplink import uplink_settings
from firmware.system.backoff import backoff_delay
from firmware.system.clock import iso
from firmware.system.mqtt import MqttLink, PacketBuffer, client_id
from firmware.system.service import Supervisor
from firmware.system.signals import SignalLatch
from firmware.wire import relay_protocol as proto

log = logging.getLogger(__name__)

MQTT_ERR_PROTOCOL = 2  # paho.mqtt.enums.MQTTErrorCode.MQTT_ERR_PROTOCOL (0x82: the same as a reason code)
SIZE_REFUSALS = {0x83, 0x95, 0x97}  # implementation specific, packet too large, quota exceeded
MARK_BATCH = 128
MARK_EVERY_S = 0.25
SWEEP_MAX_S = 60.0  # longest time between two looks for `sent` records nobody is tracking (issue 19.4)
READ_AHEAD = 4  # records prepared ahead of the network thread
IOV_BATCH = 512  # buffers per readv (the kernel's IOV_MAX is 1024)


def _read_exactly(fd: int, views: list[memoryview]) -> bool:
    """Fill `views` in order from `fd` (a regular file) with as few `readv` calls as the kernel allows; True if the
    file ended exactly there (one more byte is asked for with the last batch: a longer file gives it)."""
    extra = bytearray(1)
    i = 0
    while i < len(views):
        batch = views[i:i + IOV_BATCH]
        last = i + len(batch) == len(views)
        got = os.readv(fd, batch + [memoryview(extra)] if last else batch)
        if got == 0:
            return False  # shorter than the journal says
        while got and i < len(views):
            v = views[i]
            if got >= len(v):
                got -= len(v)
                i += 1
            else:
                views[i] = v[got:]  # a partial read (a signal): go on from there
                got = 0
        if got:
            return False  # the extra byte came: longer than the journal says
    return True


class TokenBucket:
    """Average-rate limiter that may go into debt by one item (so an item larger than the rate passes)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.t = time.monotonic()

    def wait_time(self) -> float:
        """Seconds until something may be sent (0: now)."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        return 0.0 if self.tokens > 0 else -self.tokens / self.rate + 1e-3

    def take(self, n: float) -> None:
        if self.rate > 0:
            self.tokens -= n


@dataclass
class Transfer:
    """One record on its way: its messages, how many were handed to paho, how many are unacknowledged."""

    record_id: str
    seq: int
    sha256: str
    size: int
    messages: list[tuple[str, Any, int]]  # topic, payload (bytes or a PacketBuffer), QoS
    chunk_size: int
    next_index: int = 0
    outstanding: int = 0
    failed: int = 0  # first failing PUBACK reason code
    attempts: int = 1
    retry_in: float | None = None  # the data center said "retry" while the transfer was still going

    @property
    def all_handed(self) -> bool:
        return self.next_index >= len(self.messages)


@dataclass(order=True)
class Waiting:
    """A record that is sent and awaits its ack, or failed and waits for its next attempt."""

    due: float
    seq: int
    record_id: str = field(compare=False)
    attempts: int = field(default=1, compare=False)
    retried: bool = field(default=False, compare=False)  # backed off on a "retry" ack: no second one this attempt


class Relay:
    """Relays the kit's records to the data center (see module doc).

    A `firmware.system.service.Service`: `start()`, `stop()` (idempotent), `health()`; `close()` and
    `status()` are the older names of `stop()` and `health()`.
    """

    name = "relay"

    def __init__(self, store: Any, cfg: Any, stop: threading.Event | None = None,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.r = cfg.relay
        self.kit_id = store.identity.kit_id
        self.stop_event = stop or threading.Event()
        self._own_stop = threading.Event()
        self.rng = rng or random.Random()
        self.ack_topic = proto.ack_topic(self.kit_id)
        self.uplink = MqttLink(uplink_settings(cfg, client_id(self.kit_id, "relay"), [(self.ack_topic, 1)]), self.rng)
        self.uplink.should_stop = self._stopping
        self.thread: threading.Thread | None = None
        self._wake = threading.Event()
        # Relay-thread state.
        self._active: dict[str, Transfer] = {}
        self._order: deque[str] = deque()  # active transfers in hand-out order
        self._mids: dict[int, tuple[str, Any]] = {}  # mid -> (record id, payload: its buffer goes back at the PUBACK)
        self._free: deque[PacketBuffer] = deque()  # message buffers to reuse (see `_buffer`)
        self._waiting: dict[str, Waiting] = {}
        self._heap: list[Waiting] = []
        self._fresh: deque[Any] = deque()
        self._cursor = -1
        self._refill = True
        self._chunk_cap: dict[str, int] = {}  # per broker URL, after size refusals
        self._broker_url = ""
        self._link_up = False  # the relay thread saw "connected" (and no "disconnected" since): sends may go
        self._pool, self._journal_pool = self._new_pools()
        self.error = ""  # why the relay thread ended on its own (health: failed; the supervisor restarts it)
        self.exception: BaseException | None = None
        self._ahead: dict[str, Future[tuple[int, int, list[tuple[str, Any, int]]]]] = {}
        self._to_sent: list[str] = []
        self._to_acked: list[str] = []
        self._last_mark = time.monotonic()
        self._bytes = TokenBucket(self.r.bytes_per_s, max(self.r.bytes_per_s, self.r.chunk_kb * 1024 + 2048))
        self._pubs = TokenBucket(self.r.publishes_per_s, max(1.0, self.r.publishes_per_s / 4))
        # Counters (read by status() from other threads: ints only).
        self.counters = {"records_sent": 0, "records_acked": 0, "records_rejected": 0, "records_resent": 0,
                         "puback_failures": 0, "bytes_sent": 0, "acks_ignored": 0, "acks_unverified": 0,
                         "retry_acks": 0, "read_errors": 0, "chunk_shrinks": 0, "sent_requeued": 0}
        self._ack_keys = [proto.load_ack_public_key(k) for k in self.r.ack_public_keys]
        self.last_rejects: deque[dict[str, str]] = deque(maxlen=10)
        self._status_cache: dict[str, Any] = {}
        self._status_at = 0.0

    # --- lifecycle ----------------------------------------------------------------------

    @staticmethod
    def _new_pools() -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        # Two readers: file reads and SHA-256 release the GIL, so two records are prepared at once.
        return (ThreadPoolExecutor(max_workers=2, thread_name_prefix="relay-read"),
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-journal"))

    def start(self) -> None:
        """Start the relay thread (returns at once; does nothing while it runs).

        Also the restart after a crash (the daemon's supervisor calls `stop()`, waits its backoff, then
        `start()`): transfers in flight are forgotten and resent from the store.
        """
        if self.thread is not None and self.thread.is_alive():
            return
        if self.thread is not None:  # a restart: the last run shut its pools down
            self._own_stop.clear()
            self._pool, self._journal_pool = self._new_pools()
            self._reset_transfers()
        self.error, self.exception = "", None
        if self._poke not in self.store.on_change:
            self.store.on_change.append(self._poke)
        self.thread = threading.Thread(target=self._main, name="relay", daemon=True)
        self.thread.start()
        log.info("relay started kit_id=%s brokers=%s ack_kids=%s", self.kit_id, ",".join(self.r.brokers),
                 ",".join(proto.ack_key_id(k) for k in self._ack_keys) or "none")
        if not self._ack_keys:
            log.error("relay has no relay.ack_public_keys: no data-center ack can be verified, records stay sent")

    def set_ack_keys(self, keys: list[str]) -> None:
        """Trust these data-center ack keys from now on (a live remote-config change: key rotation).

        Safe from any thread: the relay thread reads the list through one attribute, replaced whole.
        """
        raws = [proto.load_ack_public_key(k) for k in keys]
        self._ack_keys = raws
        log.info("relay ack keys updated ack_kids=%s", ",".join(proto.ack_key_id(k) for k in raws) or "none")

    def sync_now(self) -> None:
        """Look for records to send at once (the fleet's "sync now" command, a stick of new records)."""
        self._poke()

    def _poke(self) -> None:
        """New records (any thread): the relay thread looks now, not at its next 50 ms tick."""
        self._wake.set()
        self.uplink.wakeup.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, flush state marks, disconnect cleanly (idempotent)."""
        self._own_stop.set()
        self._poke()
        if self.thread is not None:
            self.thread.join(timeout)
        try:
            self.store.on_change.remove(self._poke)
        except ValueError:
            pass

    close = stop  # the name the daemon and the tests have used

    def health(self) -> dict[str, Any]:
        """The Service view: ``state`` (``failed`` if the thread ended without a stop) and the uplink's state."""
        t = self.thread
        if t is not None and t.is_alive():
            return {"state": "running", "uplink": self.uplink.state}
        if t is not None and not self._stopping():
            return {"state": "failed", "error": self.error or "relay thread ended"}
        return {"state": "stopped"}

    def _stopping(self) -> bool:
        return self.stop_event.is_set() or self._own_stop.is_set()

    def _main(self) -> None:
        # No restart loop here: a crash ends the thread, health() says failed, and the daemon's
        # supervisor restarts the relay with backoff (and reports it). What must happen at any end
        # happens here: marks flushed, connection closed, every mark in the journal before the store closes.
        try:
            self.run()
        except Exception as e:
            self.error, self.exception = f"{type(e).__name__}: {e}", e
            log.error("relay crashed error=%s", self.error)
        try:
            self._flush_marks(force=True)
        except Exception:
            log.exception("relay could not flush state marks")
        self.uplink.stop()
        if not self.uplink.running:
            self.uplink.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._journal_pool.shutdown(wait=True)
        log.info("relay stopped")

    # --- main loop ----------------------------------------------------------------------

    def run(self) -> None:
        """The relay thread's loop (see module doc)."""
        self._load_sent()
        next_tel = time.monotonic() + min(5.0, self.r.telemetry_interval_s)
        sweep_every = max(1.0, min(self.r.ack_timeout_s, SWEEP_MAX_S))
        next_sweep = time.monotonic() + sweep_every
        link = self.uplink
        self._link_up = False
        link.start(name="relay-uplink", dispatch=False, tick=0.05)
        while not self._stopping():
            link.wakeup.clear()  # before looking: a set from now on ends the wait below
            if self._link_up and link.connected:
                self._pump()
            if not link.events:
                link.wakeup.wait(0.05)  # a PUBACK batch, an ack, a (dis)connection; new records within 50 ms
            self._handle_events()
            self._flush_marks(force=not self._mids)  # at once when nothing is in flight
            if self._free and not self._active:
                self._free.clear()  # idle: the buffers' memory goes back
            now = time.monotonic()
            if self.uplink.connected and now >= next_tel:
                self._publish_telemetry()
                next_tel = now + self.r.telemetry_interval_s
            if now - self._status_at > 2.0:
                self._refresh_status()
            if now >= next_sweep:
                self._sweep_sent()
                next_sweep = now + sweep_every

    def _sweep_sent(self) -> None:
        """Offer again every `sent` record that nothing here tracks (not awaiting an ack, not in transfer).

        The events should never lose one, but a record that falls through (a transfer forgotten on a lost
        connection, a read error on a resend) would otherwise wait for the next restart: this bounds that
        at one sweep interval, whatever happened to the connection.
        """
        tracked = set(self._waiting) | set(self._active) | set(self._to_acked)
        now = time.monotonic()
        n = 0
        for row in self.store.records(state="sent"):
            if row.id not in tracked:
                self._wait(row.id, row.seq, now, attempts=1)
                n += 1
        if n:
            self.counters["sent_requeued"] += n
            log.warning("relay re-offering sent records nobody tracked count=%d", n)

    def _load_sent(self) -> None:
        """After a start: records already 'sent' are owed an ack; resend them first (capture order)."""
        now = time.monotonic()
        for row in self.store.records(state="sent"):
            self._wait(row.id, row.seq, now, attempts=1)
        if self._waiting:
            log.info("relay resuming records_awaiting_ack=%d", len(self._waiting))

    def _wait(self, record_id: str, seq: int, due: float, attempts: int, retried: bool = False) -> None:
        w = Waiting(due, seq, record_id, attempts, retried)
        self._waiting[record_id] = w
        heapq.heappush(self._heap, w)

    def _next_due(self) -> Waiting | None:
        now = time.monotonic()
        while self._heap:
            w = self._heap[0]
            if self._waiting.get(w.record_id) is not w:
                heapq.heappop(self._heap)  # stale entry (acked, or rescheduled)
                continue
            if w.due > now:
                return None
            heapq.heappop(self._heap)
            return w
        return None

    def _next_fresh(self) -> Any:
        if not self._fresh and (self._refill or self._wake.is_set()):
            self._wake.clear()
            self._refill = False
            rows = self.store.records(state="stored", after_seq=self._cursor, limit=256)
            if rows:
                self._cursor = rows[-1].seq
                self._refill = len(rows) == 256
            self._fresh.extend(r for r in rows if r.id not in self._waiting and r.id not in self._active)
        return self._fresh.popleft() if self._fresh else None

    def _window(self) -> int:
        return max(1, min(self.r.window, self.uplink.receive_maximum))

    def _pump(self) -> bool:
        """Hand paho as many messages as the window and the buckets allow; True if more could go now."""
        window = self._window()
        while len(self._mids) < window:
            t = self._current_transfer()
            if t is None:
                return False
            if self._bytes.wait_time() > 0 or self._pubs.wait_time() > 0:
                return False
            topic, payload, qos = t.messages[t.next_index]
            mid = self.uplink.send(topic, payload, qos=qos)
            if mid is None:
                return False  # connection gone; the disconnected event resets everything
            t.next_index += 1
            if qos:
                t.outstanding += 1
                self._mids[mid] = (t.record_id, payload)
            n = payload.size if isinstance(payload, PacketBuffer) else len(payload)
            self._bytes.take(n)
            self._pubs.take(1)
            self.counters["bytes_sent"] += n
        return False

    def _current_transfer(self) -> Transfer | None:
        if self._order:
            t = self._active[self._order[-1]]
            if not t.all_handed:
                return t
        while True:
            w = self._next_due()
            if w is not None:
                row = self.store.record(w.record_id)
                if row is None or row.state not in ("stored", "sent"):
                    self._waiting.pop(w.record_id, None)
                    continue
                self.counters["records_resent"] += 1
                self._waiting.pop(w.record_id, None)
                t = self._begin(row, attempts=w.attempts + 1)
            else:
                max_unacked = self.r.max_unacked_records
                if max_unacked and len(self._waiting) >= max_unacked:
                    return None
                row = self._next_fresh()
                if row is None:
                    return None
                t = self._begin(row, attempts=1)
            if t is not None:
                return t

    def _chunk_size(self) -> int:
        b = self.uplink.broker
        # A broker that announces its Maximum Packet Size gets chunks that large (bounded by chunk_max_kb: RAM is
        # window x chunk); one that announces none may still have a silent limit, so chunk_kb stays the default.
        cap = (max(self.r.chunk_kb, self.r.chunk_max_kb) if self.uplink.max_packet else self.r.chunk_kb) * 1024
        if b is not None:
            cap = min(cap, self._chunk_cap.get(b.url, cap))
        return proto.chunk_data_limit(cap, self.uplink.max_packet, proto.chunk_topic(self.kit_id))

    def _prepare(self, row: Any, size: int) -> tuple[int, int, list[tuple[str, Any, int]]]:
        """Read, hash-check and cut one record into messages (thread-safe: runs on the read-ahead threads)."""
        if row.size > 0:
            msgs = self._prepare_direct(row, size)
            if msgs is not None:
                return size, row.size, msgs
        # On any doubt (short, long, unreadable, wrong hash, missing): read_verified re-checks against the journal
        # (its lock is held through every fsync'd commit, hence not the fast path), restores a copy lost from
        # the SD from the stick, and quarantines a corrupt one.
        data = self.store.read_verified(row.id)
        chunks = proto.split(row.id, data, row.sha256, size)
        ctopic = proto.chunk_topic(self.kit_id)
        msgs: list[tuple[str, Any, int]] = [(ctopic, c.encode(), 1) for c in chunks]
        if len(chunks) > 1:
            msgs.insert(0, self._announce(row, len(data), len(chunks), size))
        return size, len(data), msgs

    def _announce(self, row: Any, length: int, chunks: int, size: int) -> tuple[str, Any, int]:
        # The announce is advisory (QoS 0, no window slot): chunks are self-describing; it lets ingest ack a
        # record it already holds before the other chunks go. A one-chunk record needs none (one packet less).
        ann = proto.Announce(row.id, row.seq, length, row.sha256, chunks, size)
        return proto.announce_topic(self.kit_id), ann.encode(), 0

    def _prepare_direct(self, row: Any, size: int) -> list[tuple[str, Any, int]] | None:
        """Read the record from the SD straight into its messages' buffers, each after its chunk header, in one
        `readv`, then hash it there: no copy in user space but this read (`PacketBuffer`), and few system calls
        (each one hands the GIL over and back). Nothing is sent before the whole record's hash matched. None on any
        doubt (the caller then takes the path through `read_verified`)."""
        total = -(-row.size // size)
        if total > proto.MAX_CHUNKS:
            return None
        ctopic = proto.chunk_topic(self.kit_id)
        msgs: list[tuple[str, Any, int]] = []
        views: list[memoryview] = []
        for i in range(total):
            n = min(size, row.size - i * size)
            hdr = proto.Chunk(row.id, row.sha256, row.size, i, total, size, b"").encode()
            buf = self._buffer(ctopic, size)
            if len(hdr) + n > buf.capacity:
                return None
            body = buf.body
            body[:len(hdr)] = hdr
            views.append(body[len(hdr):len(hdr) + n])
            buf.size = len(hdr) + n
            msgs.append((ctopic, buf, 1))
        try:
            fd = os.open(self.store.sd_path(row.id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not _read_exactly(fd, list(views)):  # a copy: it advances views on partial reads
                return None
        except OSError:
            return None
        finally:
            os.close(fd)
        h = hashlib.sha256()
        for v in views:
            h.update(v)  # releases the GIL on large buffers, as the read does
        if h.hexdigest() != row.sha256:
            return None
        if total > 1:
            msgs.insert(0, self._announce(row, row.size, total, size))
        return msgs

    def _buffer(self, topic: str, size: int) -> PacketBuffer:
        """A buffer for one chunk of `size` data bytes and its header, from the pool (any thread: deque pops are
        atomic), or a new one."""
        capacity = size + 6 + proto.MAX_CHUNK_HEADER  # magic, header length, the longest header ingest accepts
        free = self._free
        while True:
            try:
                b = free.pop()
            except IndexError:
                return PacketBuffer(topic, capacity)
            if b.capacity == capacity and b.topic_bytes == topic.encode():
                return b
            # Another chunk size (renegotiated): let it go.

    def _release(self, payload: Any) -> None:
        """A message's PUBACK came: paho is done with its buffer (written whole before the broker answered)."""
        # Kept: about what a drain has in use at once (the window and the records read ahead), at most ~24 MiB.
        if isinstance(payload, PacketBuffer) and len(self._free) < (self._window() + READ_AHEAD) * max(
                1, (1 << 20) // payload.capacity):
            self._free.append(payload)

    def _read_ahead(self, size: int) -> None:
        """Prepare the next records off the network thread (disk read + SHA-256 overlap the sending)."""
        for row in itertools.islice(self._fresh, READ_AHEAD):
            if row.id not in self._ahead and len(self._ahead) < READ_AHEAD:
                self._ahead[row.id] = self._pool.submit(self._prepare, row, size)

    def _begin(self, row: Any, attempts: int) -> Transfer | None:
        from firmware.store.store import StoreError

        size = self._chunk_size()
        fut = self._ahead.pop(row.id, None)
        try:
            got = fut.result() if fut is not None else None
            if got is None or got[0] != size:
                got = self._prepare(row, size)
        except StoreError as e:
            self.counters["read_errors"] += 1
            log.error("relay cannot read record record_id=%s error=%s; skipping it", row.id, e)
            return None
        _size, length, msgs = got
        t = Transfer(row.id, row.seq, row.sha256, length, msgs, size, attempts=attempts)
        self._active[row.id] = t
        self._order.append(row.id)
        log.debug("relay sending record_id=%s size=%d messages=%d attempt=%d", row.id, length, len(msgs), attempts)
        self._read_ahead(size)
        return t

    # --- events -------------------------------------------------------------------------

    def _handle_events(self) -> None:
        ev = self.uplink.events
        while ev:
            e = ev.popleft()
            if e.kind == "puback":
                self._on_puback(e.mid, e.reason)
            elif e.kind == "message":
                self._on_message(e.topic, e.payload)
            elif e.kind == "connected":
                self._link_up = True
                self._broker_url = e.detail
                self._reset_transfers()
                self._resend_waiting()
            elif e.kind == "disconnected":
                self._link_up = False
                self._on_connection_lost(e.reason)
                self._reset_transfers()

    def _resend_waiting(self) -> None:
        """After a (re)connection, records still owed an ack are offered again now, not at their ack timeout.

        A broker restart (or a session that expired) can lose chunks or acks queued while we were away;
        the ingest answers a record it already has with a duplicate ack at the announce, so this is cheap.
        """
        if not self._waiting:
            return
        now = time.monotonic()
        for w in list(self._waiting.values()):
            self._wait(w.record_id, w.seq, now, w.attempts)
        log.info("relay reconnected; re-offering records_awaiting_ack=%d", len(self._waiting))

    def _on_connection_lost(self, rc: int) -> None:
        """A protocol error while chunks were in flight: most likely a size refusal the client could not parse.

        mosquitto 2.0 answers a PUBLISH above ``message_size_limit`` with PUBACK 0x95, which is not a
        valid PUBACK reason in MQTT 5; paho then drops the connection with MQTT_ERR_PROTOCOL. Halving
        the chunk size for that broker is harmless when the cause was something else.
        """
        if rc not in (MQTT_ERR_PROTOCOL, 0x82) or not self._mids or not self._broker_url:
            return
        size = max((t.chunk_size for t in self._active.values()), default=0)
        if size > proto.MIN_CHUNK_BYTES:
            new = max(proto.MIN_CHUNK_BYTES, size // 2)
            self._chunk_cap[self._broker_url] = new
            self.counters["chunk_shrinks"] += 1
            log.warning("relay protocol error with chunks in flight broker=%s chunk_bytes=%d; now %d "
                        "(broker message size limit?)", self._broker_url, size, new)

    def _reset_transfers(self) -> None:
        """Forget everything handed to paho: it is resent from the store on the next connection.

        An interrupted transfer goes back to the records awaiting an ack, due now: a resend of a `sent`
        record is neither fresh (state stored) nor awaited any more once it started, so without this it
        would stay `sent` until a restart (issue 19.4: a broker killed during a resend).
        """
        if self._active:
            log.info("relay transfers interrupted count=%d; they restart from the store", len(self._active))
        now = time.monotonic()
        for t in self._active.values():
            if t.record_id not in self._to_acked:
                self._wait(t.record_id, t.seq, now, t.attempts)
        self._active.clear()
        self._order.clear()
        self._mids.clear()
        # Buffers handed to the connection that ended are never reused (its last writes may still read them).
        self._free = deque()
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()
        self._fresh.clear()
        self._cursor = -1
        self._refill = True
        try:
            self._flush_marks(force=True)
        except Exception:
            log.exception("relay could not flush state marks")

    def _on_puback(self, mid: int, reason: int) -> None:
        got = self._mids.pop(mid, None)
        if got is None:
            return
        rid, payload = got
        self._release(payload)
        t = self._active.get(rid)
        if t is None:
            return
        t.outstanding -= 1
        if reason >= 0x80:
            self.counters["puback_failures"] += 1
            if not t.failed:
                t.failed = reason
                log.warning("relay broker refused a message record_id=%s reason_code=0x%02x", rid, reason)
        if t.outstanding == 0 and t.all_handed:
            self._finish(t)

    def _finish(self, t: Transfer) -> None:
        del self._active[t.record_id]
        try:
            self._order.remove(t.record_id)
        except ValueError:
            pass
        attempts = t.attempts
        if not t.failed:
            self._to_sent.append(t.record_id)
            self.counters["records_sent"] += 1
            if t.record_id in self._to_acked:
                return  # the data center's ack overtook the last PUBACK
            # Doubling per attempt up to ack_timeout_max_s; a little jitter so a backlog's resends spread out.
            timeout = backoff_delay(attempts - 1, self.r.ack_timeout_s, self.r.ack_timeout_max_s, self.rng, spread=0.2)
            if t.retry_in is not None:  # no ack will come for this attempt: resend after the retry delay
                timeout = min(timeout, t.retry_in)
            self._wait(t.record_id, t.seq, time.monotonic() + timeout, attempts, retried=t.retry_in is not None)
            return
        b = self.uplink.broker
        if t.failed in SIZE_REFUSALS and t.chunk_size > proto.MIN_CHUNK_BYTES and b is not None:
            new = max(proto.MIN_CHUNK_BYTES, t.chunk_size // 2)
            self._chunk_cap[b.url] = new
            self.counters["chunk_shrinks"] += 1
            log.warning("relay broker refused chunk size broker=%s chunk_bytes=%d reason_code=0x%02x; now %d",
                        b.url, t.chunk_size, t.failed, new)
            self._wait(t.record_id, t.seq, 0.0, attempts)
            return
        delay = backoff_delay(attempts - 1, self.r.backoff_min_s, self.r.backoff_max_s, self.rng)
        log.error("relay transfer refused by broker record_id=%s reason_code=0x%02x retry_in_s=%.1f", t.record_id,
                  t.failed, delay)
        self._wait(t.record_id, t.seq, time.monotonic() + delay, attempts)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != self.ack_topic:
            return
        try:
            ack = proto.Ack.decode(payload)  # bounded (size, depth): a hostile payload cannot crash this thread
        except proto.ProtocolError as e:
            self.counters["acks_ignored"] += 1
            log.warning("relay ignoring malformed ack reason=%s error=%s", e.reason, e)
            return
        # Nothing is marked acked or quarantined on an ack the data center did not sign: whoever can publish on
        # our ack topic (a misconfigured broker, a stolen credential) could otherwise make us purge or quarantine.
        if not ack.verify(self._ack_keys):
            self.counters["acks_ignored"] += 1
            self.counters["acks_unverified"] += 1
            log.error("relay ignoring unverifiable ack record_id=%s status=%s kid=%s trusted_kids=%s", ack.record_id,
                      ack.status, ack.kid or "-", ",".join(proto.ack_key_id(k) for k in self._ack_keys) or "none")
            return
        row = self.store.record(ack.record_id)
        if row is None:
            self.counters["acks_ignored"] += 1
            log.warning("relay ack for unknown record record_id=%s", ack.record_id)
            return
        if row.sha256 != ack.sha256:
            self.counters["acks_ignored"] += 1
            log.error("relay ack hash mismatch record_id=%s ours=%s theirs=%s; not acknowledged", ack.record_id,
                      row.sha256[:12], ack.sha256[:12])
            return
        if ack.ok:
            if row.state in ("stored", "sent") and ack.record_id not in self._to_acked:
                self._to_acked.append(ack.record_id)
                self.counters["records_acked"] += 1
            self._waiting.pop(ack.record_id, None)
            t = self._active.get(ack.record_id)
            if t is not None and not t.all_handed:
                # The data center already holds it (a resend answered at its announce): skip the other chunks.
                t.messages = t.messages[:t.next_index]
                if t.outstanding == 0:
                    self._finish(t)
        elif ack.status == "rejected":
            if row.state in ("stored", "sent"):
                self._flush_marks(force=True)
                reason = f"rejected by data center: {ack.reason}"
                self.store.mark(ack.record_id, "quarantined", reason)
                self.counters["records_rejected"] += 1
                self.last_rejects.append({"record_id": ack.record_id, "reason": ack.reason, "at": iso()})
                self.store.audit("relay_rejected", record_id=ack.record_id, reason=ack.reason)
                log.error("relay record rejected by data center record_id=%s reason=%s; quarantined",
                          ack.record_id, ack.reason)
            self._waiting.pop(ack.record_id, None)
        else:  # retry: the data center has a transient problem; back off this record
            # Once per attempt, and only for a record that awaits an answer: a retry ack carries no attempt of
            # its own, so a copy replayed by whoever can publish on our ack topic would postpone it for ever.
            t = self._active.get(ack.record_id)
            w = self._waiting.get(ack.record_id)
            if row.state not in ("stored", "sent") or (t.retry_in is not None if t is not None
                                                       else w is None or w.retried):
                self.counters["acks_ignored"] += 1
                log.info("relay ignoring a retry ack for a record not awaiting one record_id=%s", ack.record_id)
                return
            self.counters["retry_acks"] += 1
            attempts = w.attempts if w else 1
            delay = backoff_delay(attempts, self.r.backoff_min_s, self.r.ack_timeout_max_s, self.rng)
            log.warning("relay data center asks to retry record_id=%s reason=%s retry_in_s=%.1f", ack.record_id,
                        ack.reason, delay)
            if t is None:
                self._wait(ack.record_id, row.seq, time.monotonic() + delay, attempts, retried=True)
            else:
                t.retry_in = delay

    # --- journal marks (batched: one fsync'd transaction per batch) -----------------------

    def _flush_marks(self, force: bool = False) -> None:
        if not self._to_sent and not self._to_acked:
            return
        now = time.monotonic()
        n = len(self._to_sent) + len(self._to_acked)
        if not force and n < MARK_BATCH and now - self._last_mark < MARK_EVERY_S:
            return
        self._last_mark = now
        sent, acked = self._to_sent, self._to_acked
        self._to_sent, self._to_acked = [], []
        # On its own thread: an fsync'd commit can take tens of ms on an SD card; the network must not wait.
        self._journal_pool.submit(self._write_marks, sent, acked)

    def _write_marks(self, sent: list[str], acked: list[str]) -> None:
        try:
            self.store.mark_delivery(sent, acked)
        except Exception:
            # Not fatal: unmarked records are sent again and acked again (ingest is idempotent).
            log.exception("relay could not write state marks sent=%d acked=%d", len(sent), len(acked))

    # --- observability ------------------------------------------------------------------

    def _refresh_status(self) -> None:
        self._status_at = time.monotonic()
        counts = self.store.counts()
        oldest = self.store.oldest_unacked()
        age = None
        if oldest:
            try:
                age = max(0.0, (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(
                    oldest.replace("Z", "+00:00"))).total_seconds())
            except ValueError:
                age = None
        self._status_cache = {
            "backlog": {"records": counts["stored"]["records"] + counts["sent"]["records"],
                        "bytes": counts["stored"]["bytes"] + counts["sent"]["bytes"],
                        "unsent_records": counts["stored"]["records"],
                        "awaiting_ack_records": counts["sent"]["records"]},
            "oldest_unacked": oldest, "oldest_unacked_age_s": round(age, 1) if age is not None else None,
            "quarantined": counts["quarantined"]["records"],
        }

    def status(self) -> dict[str, Any]:
        """Uplink state, backlog and counters (safe to call from any thread)."""
        u = self.uplink
        b = u.broker
        out = {
            "state": u.state if not self._stopping() else "stopped",
            "broker": b.url if b else None,
            "broker_priority": u.index if b else None,
            "since": u.since,
            "last_error": u.last_error,
            "connects": u.connects,
            "window": self._window() if b else None,
            "chunk_bytes": self._chunk_size() if b else None,
            "in_flight_messages": len(self._mids),
            "awaiting_ack_in_memory": len(self._waiting),
            "counters": dict(self.counters),
            "last_rejects": list(self.last_rejects),
        }
        out.update(self._status_cache)
        return out

    def _publish_telemetry(self) -> None:
        self._refresh_status()
        st = self.status()
        st.update({"kit_id": self.kit_id, "at": iso()})
        # QoS 0: telemetry is periodic and must not take window slots from records.
        self.uplink.send(proto.relay_telemetry_topic(self.kit_id), json.dumps(st, sort_keys=True).encode(), qos=0)


# --- standalone runner ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run only the store and the relay (no sensors, no API): tests and field debugging."""
    from firmware import config
    from firmware.seal import identity
    from firmware.store.store import Store
    from firmware.system import logs

    ap = argparse.ArgumentParser(prog="python -m firmware.relay", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--exit-when-drained", action="store_true", help="exit 0 once no record awaits an ack")
    args = ap.parse_args(argv)
    logs.setup()
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        return e.report(log=log)
    if not cfg.relay.brokers:
        log.error("relay.brokers is empty: nothing to relay to")
        return config.EX_CONFIG
    store = Store(cfg, identity.load_or_create(cfg.state_dir))
    store.open()
    stop = threading.Event()
    latch = SignalLatch()
    supervisor = Supervisor([Relay(store, cfg, stop)], stop)  # restarts the relay after a crash, as rekamd does
    supervisor.start()
    try:
        while not latch.wait(stop, 0.2):
            if args.exit_when_drained:
                c = store.counts()
                if c["stored"]["records"] + c["sent"]["records"] == 0:
                    break
    finally:
        supervisor.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
