"""The one MQTT adapter: a paho-mqtt 2.x client (MQTT v5) with failover, reconnects and checked publishes.

Every MQTT user in the tree (the record relay, the control plane, the claim, the data center's ingest and
the fleet service) goes through `MqttLink`; nothing else makes a paho client.

What it does:

* **Brokers in priority order, failover and return.** A connection round tries the brokers in order.
  After a round where every broker failed, the next waits a capped, jittered delay (`Backoff`). While
  connected to a fallback broker, higher-priority brokers are probed (TCP connect) every
  ``probe_interval_s`` (0: never); when one answers the link moves back to it.
* **Security.** ``mqtts`` brokers get TLS: an `ssl.SSLContext` (or a function making one, called for every
  connection), else one built from ``ca_file``/``cert_file``/``key_file`` (mTLS when a certificate is given).
  Username/password, a Last Will (a `Will`, or a function returning one at every connect: a will signed
  with a key that may rotate), Clean Start and Session Expiry, our own Receive Maximum.
* **Subscriptions** are (re)made on every connection; `ready` is set once the broker granted them all.
* **Publishes are checked.** `publish()` returns a `Delivery`: it completes with the broker's PUBACK reason
  code (>= 0x80 is a refusal) or with an error (connection lost before the PUBACK, queue full).
* **The broker's CONNACK** is exposed: `receive_maximum`, `max_packet` (Maximum Packet Size, None if absent).
* A fresh paho client per connection, and paho's callbacks only enqueue (they never raise), so paho
  never replays its RAM queue after a reconnect: callers that need delivery resend from their own store.
* **Bulk payloads without copies** (the relay): a `PacketBuffer` is a reusable bytearray with room in front
  for the MQTT header. `send()` of one writes the header into that room and queues a view of the buffer as
  the packet, where paho would build a new packet (one copy, fresh memory to fault in) and copy it again
  at every socket write. The caller fills the buffer (e.g. `readinto` from the disk) and may reuse it once
  the message's PUBACK came. A paho without the hooks this needs gets a copy instead (same bytes on the wire).

Two ways to drive it (the network is only ever read and written by one thread, the *loop thread*):

1. **Owner thread**: call `step(timeout)` in your loop, then consume `events` (connected, disconnected,
   puback, message, subscribed). `send()` hands one message to paho at once and returns its mid (matching
   ``puback`` events carry it).
1b. **Events with an I/O thread** (the relay): `start(dispatch=False)` runs the network on the link's own
   thread, which only queues `events` and sets `wakeup` once per batch (no handler runs there); your thread
   calls `send()` (paho queues the packet and wakes the I/O thread to write it), waits on `wakeup`, and
   consumes `events` as in 1. Reading and parsing PUBACKs and acks then never happens on the publishing
   thread, and a batch of PUBACKs costs the publisher one wake-up.
2. **Own thread** (control plane, claim, ingest, fleet): set handlers (`on_message`, per-filter `handle()`,
   `on_connect`, `on_disconnect`), then `start()` (a thread running `run(stop)`) or call `run(stop)` on a
   thread of yours. `publish()` may be called from ANY thread: while connected the message goes to paho
   (which wakes the loop thread to write it), otherwise it waits in a bounded queue for the next connection.
   Handlers run on the loop thread; keep them short.

Example (own thread)::

    from firmware.system.mqtt import Broker, MqttLink, MqttSettings, Will

    s = MqttSettings([Broker("dc1.example", 8883), Broker.parse("mqtts://dr.example:8883")], client_id="kit-1-ctl",
                     ca_file="/etc/ca.crt", cert_file="kit.crt", key_file="kit.key",
                     will=Will("k/kit-1/status", b"offline"), subscriptions=[("k/kit-1/cmd", 1)],
                     tcp_nodelay=True, name="control")
    link = MqttLink(s)
    link.handle("k/kit-1/cmd", lambda msg: print(msg.topic, msg.payload, msg.correlation))
    link.on_connect = lambda: link.publish("k/kit-1/status", b"online", retain=True)
    link.start()
    if link.ready.wait(10):
        d = link.publish("k/kit-1/telemetry", b"{}")
        if d.wait(5) and not d.ok:
            print("refused:", d.reason, d.error)
    link.flush(2)
    link.stop()

Example (owner thread)::

    link = MqttLink(MqttSettings([Broker.parse(url)], "kit-1-relay", max_inflight=65535, name="uplink"))
    while running:
        link.step(0.05)
        while link.events:
            ev = link.events.popleft()   # Event(kind="puback", mid=..., reason=...) ...
        if link.connected:
            mid = link.send(topic, payload, qos=1)   # None: the connection is gone

This module imports nothing of the tree but the foundation (`firmware.system.backoff`, `clock`).

Over 600 lines on purpose: the docstring and one class (`MqttLink`) whose reconnect, failover and
publish bookkeeping share one lock and one state; the value types beside it are small.
"""

from __future__ import annotations

import logging
import random
import secrets
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from firmware.system.backoff import Backoff, backoff_delay
from firmware.system.clock import iso

log = logging.getLogger(__name__)

DEFAULT_RECEIVE_MAXIMUM = 65535  # MQTT v5 §3.2.2.3.3: absent means 65,535
LOST = -1  # Delivery.reason when the connection ended before the broker answered


class BrokerAddress(Protocol):
    """What the link needs of a broker (`Broker` here, or `firmware.wire.relay_protocol.BrokerURL`)."""

    @property
    def url(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def tls(self) -> bool: ...


@dataclass(frozen=True)
class Broker:
    """One broker address; ``tls`` means mqtts."""

    host: str
    port: int = 8883
    tls: bool = True

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    @classmethod
    def parse(cls, text: str, tls: bool = True) -> Broker:
        """``mqtt://host[:1883]``, ``mqtts://host[:8883]`` or ``host:port`` (TLS as `tls` says)."""
        if "://" in text:
            scheme, _, rest = text.partition("://")
            if scheme not in ("mqtt", "mqtts"):
                raise ValueError(f"broker {text!r}: scheme must be mqtt or mqtts")
            tls = scheme == "mqtts"
            rest = rest.rstrip("/")
            if rest.startswith("[") and "]" in rest:
                host, _, port = rest[1:].partition("]")
                port = port.lstrip(":")
            else:
                host, _, port = rest.partition(":")
            return cls(host, int(port) if port else (8883 if tls else 1883), tls)
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"broker {text!r}: expected host:port or an mqtt(s):// URL")
        return cls(host.strip("[]"), int(port), tls)


def client_id(identity: str, role: str) -> str:
    """The client id of one connection: ``<identity>-<role>-<32 hex>``, `identity` being the certificate's CN
    (the kit id, ``fleet``). The prefix lets a broker that can check it tie the id to the certificate
    (docs/provisioning.md, "Other brokers"); the 128 random bits, new for every process, mean nobody can name
    another client's id, so nobody can take its session over: mosquitto 2.0 cannot tie a client id to a
    certificate that has several connections (docs/security.md), and it disconnects the owner of an id
    whenever anyone connects with that id."""
    return f"{identity}-{role}-{secrets.token_hex(16)}"


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes if the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class MqttSettings:
    """How to connect (see module doc). Only `brokers` and `client_id` are required."""

    brokers: Sequence[BrokerAddress]
    client_id: str
    keepalive_s: int = 60
    connect_timeout_s: float = 10.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 120.0
    probe_interval_s: float = 60.0  # 0: stay on a fallback broker until it fails
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None  # wins over the files
    username: str = ""
    password: str = ""
    subscriptions: list[tuple[str, int]] = field(default_factory=list)
    will: Will | Callable[[], Will | None] | None = None
    clean_start: bool = True
    session_expiry_s: int = 0  # 0: the session ends with the connection
    receive_maximum: int | None = None  # ours, sent in CONNECT (bounds unprocessed messages sent to us)
    # Ours, sent in CONNECT: the broker drops a larger packet for us instead of sending it (MQTT v5 3.1.2.11.4),
    # so a flood of big messages on a topic we read costs no memory here. None: the broker's own limit.
    max_packet_size: int | None = None
    manual_ack: bool = False  # PUBACK incoming QoS 1 messages only after their handler returned
    max_inflight: int = 20  # paho's window of unacknowledged QoS>0 messages
    max_queued: int = 1000  # publish() calls waiting for a connection
    tcp_nodelay: bool = False  # small request/response traffic: no Nagle + delayed-ACK 40 ms
    name: str = "mqtt"  # log prefix


@dataclass
class Message:
    """A message the broker delivered."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    mid: int = 0
    properties: Any = None  # paho Properties or None
    client: Any = field(default=None, repr=False)  # the paho client it came on (for manual acks)

    @property
    def correlation(self) -> bytes | None:
        return getattr(self.properties, "CorrelationData", None) if self.properties is not None else None

    @property
    def response_topic(self) -> str | None:
        return getattr(self.properties, "ResponseTopic", None) if self.properties is not None else None


@dataclass
class Event:
    """Something the network reported; owner-thread users consume `MqttLink.events` after each `step()`."""

    kind: str  # connected | disconnected | puback | message | subscribed
    mid: int = 0
    reason: int = 0
    topic: str = ""
    payload: bytes = b""
    detail: str = ""
    message: Message | None = None


class Delivery:
    """The outcome of one `publish()`: wait for it, then look at `ok`, `reason` and `error`."""

    def __init__(self, topic: str, qos: int) -> None:
        self.topic = topic
        self.qos = qos
        self.mid: int | None = None
        self.reason: int | None = None  # PUBACK reason code (0 for QoS 0 once written), LOST, or None
        self.error = ""
        self._done = threading.Event()

    def _finish(self, reason: int | None, error: str = "") -> None:
        self.reason, self.error = reason, error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def ok(self) -> bool:
        """True once the broker accepted it (PUBACK reason < 0x80, or a QoS 0 message handed over)."""
        return self._done.is_set() and not self.error and self.reason is not None and 0 <= self.reason < 0x80

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the outcome is known (True) or `timeout` passes (False)."""
        return self._done.wait(timeout)

    @property
    def reason_name(self) -> str:
        """The PUBACK reason code's MQTT name ("Success", "Not authorized"...), else `error` or "pending"."""
        if self.reason is None or self.reason == LOST:
            return self.error or ("pending" if not self.done else "")
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        try:
            return str(ReasonCode(PacketTypes.PUBACK, identifier=self.reason))
        except (KeyError, ValueError):
            return f"reason code 0x{self.reason:02x}"

    def __repr__(self) -> str:
        return f"Delivery(topic={self.topic!r}, mid={self.mid}, reason={self.reason}, error={self.error!r})"


def _code(rc: Any) -> int:
    """An int from a paho ReasonCode / MQTTErrorCode / int."""
    return int(getattr(rc, "value", rc) or 0)


class PacketBuffer(bytearray):
    """Memory for one PUBLISH of up to `capacity` payload bytes on `topic`, reusable (see module doc).

    Fill `body` (a view of the payload area), set `size` to the bytes used, hand it to `MqttLink.send()`.
    Until the PUBACK of that send, the buffer belongs to the link: do not write to it.
    """

    __slots__ = ("topic_bytes", "room", "capacity", "size")

    def __init__(self, topic: str, capacity: int) -> None:
        self.topic_bytes = topic.encode()
        # Fixed header (1) + remaining length (<= 4) + topic (2 + n) + packet id (2) + empty properties (1).
        self.room = 10 + len(self.topic_bytes)
        self.capacity = capacity
        self.size = 0
        super().__init__(self.room + capacity)

    @property
    def body(self) -> memoryview:
        """The payload area (`capacity` bytes)."""
        return memoryview(self)[self.room:]

    def payload(self) -> memoryview:
        """The payload as set (`size` bytes)."""
        return memoryview(self)[self.room:self.room + self.size]


def _zero_copy_client_class() -> Any:
    """paho's Client, publishing a `PacketBuffer` in place; None if this paho lacks the hooks (then copies)."""
    import inspect

    import paho.mqtt.client as mqtt

    need = ["self", "mid", "topic", "payload", "qos", "retain", "dup", "info", "properties"]
    try:
        if (list(inspect.signature(mqtt.Client._send_publish).parameters) != need
                or list(inspect.signature(mqtt.Client._packet_queue).parameters)[:5]
                != ["self", "command", "packet", "mid", "qos"]
                or not hasattr(mqtt.Client, "_pack_remaining_length") or not hasattr(mqtt.Client, "_pack_str16")):
            return None
    except (AttributeError, TypeError, ValueError):
        return None

    class ZeroCopyClient(mqtt.Client):  # type: ignore[misc]
        def _send_publish(self, mid: int, topic: bytes, payload: Any = b"", qos: int = 0, retain: bool = False,
                          dup: bool = False, info: Any = None, properties: Any = None) -> Any:
            if (not isinstance(payload, PacketBuffer) or properties is not None or topic != payload.topic_bytes
                    or self._protocol != mqtt.MQTTv5):
                if isinstance(payload, PacketBuffer):
                    payload = bytes(payload.payload())
                return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
            if self._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            # The header paho would build, with paho's own encoders, right before the payload; the packet is a
            # view: paho's writes slice it without copying.
            header = bytearray((mqtt.PUBLISH | ((dup & 0x1) << 3) | (qos << 1) | retain,))
            self._pack_remaining_length(header, 2 + len(topic) + (2 if qos else 0) + 1 + payload.size)
            self._pack_str16(header, topic)
            if qos:
                header += mid.to_bytes(2, "big")
            header.append(0)  # no properties
            start = payload.room - len(header)
            payload[start:payload.room] = header
            return self._packet_queue(mqtt.PUBLISH, memoryview(payload)[start:payload.room + payload.size], mid,
                                      qos, info)

    return ZeroCopyClient


_CLIENT_CLASS: list[Any] = []  # [class or None], resolved once


class MqttLink:
    """One MQTT v5 connection to the best reachable broker (see module doc)."""

    def __init__(self, settings: MqttSettings, rng: random.Random | None = None) -> None:
        if not settings.brokers:
            raise ValueError("an MQTT link needs at least one broker")
        self.s = settings
        self.rng = rng or random.Random()
        self.events: deque[Event] = deque()
        self.client: Any = None
        self.state = "disconnected"  # disconnected | connecting | connected
        self.index = -1  # broker in use
        self.since = iso()
        self.receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.max_packet: int | None = None
        self.connack_properties: Any = None
        self.last_error = ""
        self.connects = 0
        self.ready = threading.Event()  # connected and every subscription granted
        self.wakeup = threading.Event()  # start(dispatch=False): set when the I/O thread queued events
        self.should_stop: Callable[[], bool] = lambda: False  # checked while connecting
        # Handlers (own-thread use; run on the loop thread by dispatch()).
        self.on_message: Callable[[Message], None] | None = None
        self.on_connect: Callable[[], None] | None = None
        self.on_disconnect: Callable[[str], None] | None = None
        self._routes: list[tuple[str, Callable[[Message], None]]] = []
        self._backoff = Backoff(settings.backoff_min_s, settings.backoff_max_s, self.rng)
        self._next_attempt = 0.0
        self._next_probe = 0.0
        self._connack: tuple[int, Any, str] | None = None
        self._peer_closed: tuple[int, str] | None = None
        self._acks: deque[tuple[int, int]] = deque()  # PUBACKs for `_settle` (only while a Delivery may await one)
        self._handing = 0  # publish() calls between paho's publish and their Delivery's registration (under _lock)
        self._sub_mids: set[int] = set()
        self._lock = threading.RLock()  # state/client swaps vs publish() from other threads
        self._inflight: dict[int, Delivery] = {}
        self._reconnect_by = 0.0  # a requested reconnect waits for earlier publishes until then
        self._outbox: deque[tuple[Delivery, bytes, bool, Any]] = deque()
        self._threaded = False
        self._reconnect = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- read-only views ---------------------------------------------------------------------

    @property
    def broker(self) -> BrokerAddress | None:
        """The broker in use, None while not connected."""
        return self.s.brokers[self.index] if self.state == "connected" and self.index >= 0 else None

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def health(self) -> dict[str, Any]:
        """A small dict describing the link now (never blocks)."""
        b = self.broker
        return {"state": self.state, "broker": b.url if b else None, "broker_priority": self.index if b else None,
                "since": self.since, "last_error": self.last_error, "connects": self.connects,
                "receive_maximum": self.receive_maximum if b else None, "max_packet": self.max_packet if b else None,
                "queued": len(self._outbox), "in_flight": len(self._inflight)}

    # --- paho callbacks: enqueue only, never raise -------------------------------------------

    def _cb_connect(self, client: Any, _ud: Any, _flags: Any, rc: Any, props: Any) -> None:
        try:
            if client is self.client:
                self._connack = (_code(rc), props, str(rc))
        except Exception as e:  # pragma: no cover - defensive: a callback must never raise
            self._connack = (0x80, None, str(e))

    def _cb_disconnect(self, client: Any, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        try:
            if client is self.client and self.state == "connected":
                self._peer_closed = (_code(rc), str(rc))
        except Exception:  # pragma: no cover
            self._peer_closed = (0x80, "?")

    def _cb_publish(self, client: Any, _ud: Any, mid: int, rc: Any, _props: Any) -> None:
        try:
            if client is self.client:
                code = _code(rc)
                self.events.append(Event("puback", mid=mid, reason=code))
                # Only publish() makes Deliveries: the relay's send() traffic costs no lock on this thread.
                if self._inflight or self._handing:
                    self._acks.append((mid, code))
        except Exception:  # pragma: no cover
            self.events.append(Event("puback", mid=mid, reason=0x80))

    def _cb_subscribe(self, client: Any, _ud: Any, mid: int, rcs: Any, _props: Any) -> None:
        try:
            if client is not self.client:
                return
            codes = [_code(r) for r in rcs]
            self._sub_mids.discard(mid)
            if any(c >= 0x80 for c in codes):
                self.last_error = f"subscription refused reason_codes={codes}"
                log.error("%s subscription refused reason_codes=%s", self.s.name, codes)
                self.events.append(Event("subscribed", mid=mid, reason=max(codes), detail=str(codes)))
            elif not self._sub_mids:
                self.ready.set()
                log.info("%s subscribed filters=%s", self.s.name, ",".join(t for t, _ in self.s.subscriptions))
                self.events.append(Event("subscribed", mid=mid, detail=str(codes)))
        except Exception:  # pragma: no cover
            pass

    def _cb_message(self, client: Any, _ud: Any, msg: Any) -> None:
        try:
            if client is self.client:
                m = Message(msg.topic, bytes(msg.payload), int(msg.qos), bool(msg.retain), int(msg.mid),
                            getattr(msg, "properties", None), client)
                self.events.append(Event("message", topic=m.topic, payload=m.payload, message=m))
        except Exception:  # pragma: no cover
            pass

    # --- connection management ---------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        t = self.s.tls_context
        if t is not None:
            return t() if callable(t) else t
        ctx = ssl.create_default_context(cafile=self.s.ca_file or None)
        if self.s.cert_file:
            ctx.load_cert_chain(self.s.cert_file, self.s.key_file or None)
        return ctx

    def _new_client(self, b: BrokerAddress) -> Any:
        import paho.mqtt.client as mqtt

        if not _CLIENT_CLASS:
            _CLIENT_CLASS.append(_zero_copy_client_class())
        cls = _CLIENT_CLASS[0] or mqtt.Client
        c = cls(mqtt.CallbackAPIVersion.VERSION2, client_id=self.s.client_id, protocol=mqtt.MQTTv5,
                manual_ack=self.s.manual_ack)
        c.suppress_exceptions = True  # a bug in a callback must not kill the network loop
        c.on_connect, c.on_disconnect = self._cb_connect, self._cb_disconnect
        c.on_publish, c.on_message, c.on_subscribe = self._cb_publish, self._cb_message, self._cb_subscribe
        if self._threaded:
            # publish() from other threads must not write the socket itself (an SSL socket is not safe for a
            # write and a read at once): with a write hook, paho only queues and wakes the loop thread.
            c.on_socket_register_write = lambda *_a: None
        c.max_inflight_messages_set(self.s.max_inflight)
        c.max_queued_messages_set(0)
        c.connect_timeout = self.s.connect_timeout_s
        if self.s.username:
            c.username_pw_set(self.s.username, self.s.password or None)
        if b.tls:
            c.tls_set_context(self._tls())
        will = self.s.will() if callable(self.s.will) else self.s.will
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        return c

    def connect(self, index: int = 0) -> bool:
        """One blocking attempt on broker `index` (bounded by connect_timeout_s); True once connected.

        `step()` calls this for every broker of a round; call it directly for a single try (the claim)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        b = self.s.brokers[index]
        self._drop_client()
        self.state, self.index = "connecting", index
        self._connack = None
        try:
            client = self._new_client(b)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._fail(b, f"TLS setup failed: {e}")
            return False
        self.client = client
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.s.session_expiry_s
        if self.s.receive_maximum:
            props.ReceiveMaximum = self.s.receive_maximum
        if self.s.max_packet_size:
            props.MaximumPacketSize = self.s.max_packet_size
        try:
            client.connect(b.host, b.port, keepalive=self.s.keepalive_s, clean_start=self.s.clean_start,
                           properties=props)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._fail(b, f"connect failed: {e}")
            return False
        if self.s.tcp_nodelay:
            try:
                client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        deadline = time.monotonic() + self.s.connect_timeout_s
        while time.monotonic() < deadline and not self.should_stop():
            rc = client.loop(timeout=0.05)
            if self._connack is not None:
                code, cprops, text = self._connack
                if code >= 0x80:
                    self._fail(b, f"refused by broker: {text}")
                    return False
                self._connected(b, cprops)
                return True
            if rc != 0:
                self._fail(b, f"connection lost during handshake (rc={rc})")
                return False
        if self.should_stop():
            self._drop_client()  # stopping: not a broker failure, nothing to log
            return False
        self._fail(b, "no CONNACK within connect_timeout_s")
        return False

    def _connected(self, b: BrokerAddress, props: Any) -> None:
        rm = getattr(props, "ReceiveMaximum", None) if props is not None else None
        mp = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self.connack_properties = props
        self.receive_maximum = int(rm) if rm else DEFAULT_RECEIVE_MAXIMUM
        self.max_packet = int(mp) if mp else None
        self._peer_closed = None
        self._sub_mids.clear()
        with self._lock:
            for topic, qos in self.s.subscriptions:
                rc, mid = self.client.subscribe(topic, qos=qos)
                if rc == 0 and mid is not None:
                    self._sub_mids.add(mid)
            if not self.s.subscriptions:
                self.ready.set()
            self.state, self.since, self.last_error = "connected", iso(), ""
        self.connects += 1
        self._backoff.reset()
        self._next_probe = time.monotonic() + self.s.probe_interval_s
        log.info("%s connected broker=%s receive_maximum=%d max_packet=%s", self.s.name, b.url,
                 self.receive_maximum, self.max_packet or "-")
        self.events.append(Event("connected", detail=b.url))

    def _fail(self, b: BrokerAddress, why: str) -> None:
        self.last_error = f"{b.url}: {why}"
        log.warning("%s broker unavailable broker=%s error=%s", self.s.name, b.url, why)
        self._drop_client()

    def _drop_client(self, rc: int = 0) -> None:
        self._settle()  # PUBACKs that already arrived count
        with self._lock:
            c, self.client = self.client, None
            was = self.state == "connected"
            self.state = "disconnected"
            self.ready.clear()
            lost, self._inflight = self._inflight, {}
        for d in lost.values():
            d._finish(LOST, "connection lost before the broker's answer")
        if c is not None:
            try:
                c.disconnect()
                c.loop(timeout=0.01)
            except Exception:
                pass
            try:
                c.socket() and c.socket().close()
            except Exception:
                pass
        if was:
            self.since = iso()
            self.events.append(Event("disconnected", reason=rc, detail=self.last_error))

    def connect_round(self, start: int = 0) -> bool:
        """Try the brokers in priority order from `start`; schedule the next round if all fail."""
        for i in range(start, len(self.s.brokers)):
            if self.should_stop():
                return False
            if self.connect(i):
                return True
        if self.should_stop():
            return False
        delay = self._backoff.next()
        self._next_attempt = time.monotonic() + delay
        log.warning("%s no broker reachable rounds=%d retry_in_s=%.1f last_error=%s", self.s.name,
                    self._backoff.failures, delay, self.last_error)
        return False

    def _probe(self, b: BrokerAddress) -> bool:
        try:
            with socket.create_connection((b.host, b.port), timeout=min(2.0, self.s.connect_timeout_s)):
                return True
        except OSError:
            return False

    def reconnect(self, settle_s: float = 5.0) -> None:
        """Ask for a clean reconnection (e.g. a new Last Will); any thread. Done by the loop thread.

        What was published before the request goes out first: the loop keeps running until nothing is queued
        or awaiting a PUBACK, for at most `settle_s`, and only then drops the connection.
        """
        self._reconnect_by = time.monotonic() + settle_s
        self._reconnect.set()

    def step(self, timeout: float) -> None:
        """Drive the network for up to `timeout` seconds: I/O, reconnects, probes (loop thread only)."""
        now = time.monotonic()
        if (self._reconnect.is_set() and self.state == "connected"
                and (not (self._outbox or self._inflight) or now >= self._reconnect_by)):
            self._reconnect.clear()
            log.info("%s reconnecting broker=%s (asked)", self.s.name, self.s.brokers[self.index].url)
            self._drop_client()
            self._next_attempt = 0.0
        if self.state != "connected":
            if now >= self._next_attempt:
                self.connect_round()
            elif self._threaded:
                self._stop.wait(min(timeout, self._next_attempt - now))
            else:
                time.sleep(min(timeout, self._next_attempt - now))
            return
        self._drain_outbox()
        rc = self.client.loop(timeout=timeout)
        self._settle()
        if rc != 0 and self.state == "connected":
            import paho.mqtt.client as mqtt

            url = self.s.brokers[self.index].url
            self.last_error = f"{url}: connection lost ({mqtt.error_string(rc)})"
            log.warning("%s disconnected broker=%s error=%s", self.s.name, url, mqtt.error_string(rc))
            self._drop_client(_code(rc))
            self._next_attempt = time.monotonic() + backoff_delay(0, self.s.backoff_min_s, self.s.backoff_max_s,
                                                                  self.rng)
            return
        if self._peer_closed is not None and self.state == "connected":
            code, text = self._peer_closed
            url = self.s.brokers[self.index].url
            self.last_error = f"{url}: connection closed ({text})"
            log.warning("%s disconnected broker=%s reason=%s", self.s.name, url, text)
            self._drop_client(code)
            self._next_attempt = time.monotonic()
            return
        if self.index > 0 and self.s.probe_interval_s > 0 and now >= self._next_probe:
            self._next_probe = now + self.s.probe_interval_s
            for i in range(self.index):
                if self._probe(self.s.brokers[i]):
                    log.info("%s higher-priority broker is back broker=%s; switching from %s", self.s.name,
                             self.s.brokers[i].url, self.s.brokers[self.index].url)
                    self._drop_client()
                    if not self.connect_round(start=i):
                        self._next_attempt = 0.0  # fall back to the full round at once
                    break

    def _settle(self) -> None:
        """Complete the deliveries whose PUBACK arrived (under the lock: a publish() may be registering)."""
        if not self._acks:
            return
        with self._lock:
            while self._acks:
                mid, code = self._acks.popleft()
                d = self._inflight.pop(mid, None)
                if d is not None:
                    if code >= 0x80:
                        log.error("%s publish refused by broker topic=%s reason_code=0x%02x", self.s.name, d.topic,
                                  code)
                    d._finish(code, f"refused by broker (reason code 0x{code:02x})" if code >= 0x80 else "")

    # --- publishing ----------------------------------------------------------------------------

    def send(self, topic: str, payload: bytes | bytearray, qos: int = 1, retain: bool = False,
             properties: Any = None) -> int | None:
        """Owner thread (or the consumer of ``start(dispatch=False)``): hand one message to paho now; its mid
        (the PUBACK comes as an event), None if not connected. `payload` may be a `PacketBuffer` (no copy)."""
        if isinstance(payload, PacketBuffer) and not (_CLIENT_CLASS and _CLIENT_CLASS[0] is not None):
            payload = bytes(payload.payload())  # a paho without the hooks: the same bytes, copied
        if self._threaded:
            # The I/O thread swaps clients under the lock; paho only queues here (write hook) and wakes it.
            with self._lock:
                if self.state != "connected" or self.client is None:
                    return None
                info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            if info.rc != 0:
                return None  # the connection is gone: the I/O thread sees it and queues "disconnected"
            return int(info.mid)
        if self.state != "connected":
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != 0:
            import paho.mqtt.client as mqtt

            self.last_error = f"publish failed: {mqtt.error_string(info.rc)}"
            log.warning("%s publish failed error=%s; reconnecting", self.s.name, mqtt.error_string(info.rc))
            self._drop_client()
            return None
        return int(info.mid)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation: bytes | None = None, response_topic: str | None = None) -> Delivery:
        """Any thread: publish now if connected, else queue it for the next connection; see `Delivery`."""
        props = None
        if correlation is not None or response_topic:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                props.CorrelationData = correlation
            if response_topic:
                props.ResponseTopic = response_topic
        d = Delivery(topic, qos)
        with self._lock:
            if self.state == "connected" and not self._outbox:
                self._handing += 1  # its PUBACK may be read before _inflight has it
                try:
                    self._hand(d, payload, retain, props)
                finally:
                    self._handing -= 1
            elif len(self._outbox) >= self.s.max_queued:
                d._finish(None, f"queue full ({self.s.max_queued} messages waiting for a connection)")
            else:
                self._outbox.append((d, payload, retain, props))
        return d

    def _hand(self, d: Delivery, payload: bytes, retain: bool, props: Any) -> None:
        """Give one delivery to paho (lock held, connected)."""
        info = self.client.publish(d.topic, payload, qos=d.qos, retain=retain, properties=props)
        if info.rc != 0:
            import paho.mqtt.client as mqtt

            d._finish(None, f"publish failed: {mqtt.error_string(info.rc)}")
            return
        d.mid = int(info.mid)
        if d.qos:
            self._inflight[d.mid] = d
        else:
            d._finish(0)

    def _drain_outbox(self) -> None:
        if not self._outbox:
            return
        with self._lock:
            self._handing += 1
            try:
                while self._outbox and self.state == "connected":
                    d, payload, retain, props = self._outbox.popleft()
                    self._hand(d, payload, retain, props)
            finally:
                self._handing -= 1

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is queued or awaiting a PUBACK (needs the loop running); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._outbox or self._inflight:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def want_write(self) -> bool:
        return self.client is not None and self.client.want_write()

    # --- receiving -------------------------------------------------------------------------------

    def handle(self, topic_filter: str, fn: Callable[[Message], None]) -> None:
        """Route messages matching `topic_filter` to `fn` (first match wins; else `on_message`)."""
        self._routes.append((topic_filter, fn))

    def ack(self, msg: Message) -> None:
        """Loop thread, `manual_ack`: PUBACK one incoming message (dropped if its connection is gone)."""
        if msg.qos and msg.client is not None and msg.client is self.client:
            msg.client.ack(msg.mid, msg.qos)

    def dispatch(self) -> None:
        """Loop thread: consume `events`, calling the handlers. A handler that raises is logged, never fatal."""
        from paho.mqtt.client import topic_matches_sub

        # Once stopping, what is left is not handled (nor acked): a stop is never held up by a queue of
        # messages; the sender resends what it got no answer for.
        while self.events and not (self._threaded and self._stop.is_set()):
            ev = self.events.popleft()
            try:
                if ev.kind == "message" and ev.message is not None:
                    m = ev.message
                    try:
                        fn = next((f for flt, f in self._routes if topic_matches_sub(flt, m.topic)), self.on_message)
                        if fn is not None:
                            fn(m)
                    finally:
                        if self.s.manual_ack:
                            self.ack(m)
                elif ev.kind == "connected" and self.on_connect is not None:
                    self.on_connect()
                elif ev.kind == "disconnected" and self.on_disconnect is not None:
                    self.on_disconnect(ev.detail)
            except Exception:
                log.exception("%s handler failed event=%s topic=%s", self.s.name, ev.kind, ev.topic)

    # --- own-thread driving ----------------------------------------------------------------------

    def run(self, stop: threading.Event, tick: float = 0.25, on_tick: Callable[[], None] | None = None,
            dispatch: bool = True) -> None:
        """Loop until `stop`: network, handlers (or, with ``dispatch=False``, only `wakeup` for whoever consumes
        `events`), then `on_tick()`; closes the connection at the end."""
        self._threaded = True
        self._stop = stop
        outer = self.should_stop
        self.should_stop = lambda: stop.is_set() or outer()
        try:
            while not stop.is_set():
                self.step(tick)
                if not dispatch:
                    if self.events:
                        self.wakeup.set()
                    continue
                self.dispatch()
                if on_tick is not None:
                    try:
                        on_tick()
                    except Exception:
                        log.exception("%s tick failed", self.s.name)
        finally:
            self.close()
            self.should_stop = outer  # a later start() must not inherit this run's (set) stop
            self.wakeup.set()

    def start(self, name: str | None = None, dispatch: bool = True, tick: float = 0.25) -> MqttLink:
        """Run `run()` on a daemon thread of its own; returns at once (see `ready`). ``dispatch=False``: the
        thread does only the network; the caller consumes `events` (waiting on `wakeup`) and calls `send()`."""
        self._stop = threading.Event()
        self._threaded = True  # before the thread runs: send() must never write the socket itself
        self.wakeup.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop, tick), kwargs={"dispatch": dispatch},
                                        name=name or self.s.client_id, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread `start()` made (clean DISCONNECT); idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """True while the thread `start()` made is alive."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Disconnect cleanly (DISCONNECT packet: no Last Will) and forget the client; queued publishes fail."""
        if self.client is not None:
            log.info("%s closing broker=%s", self.s.name, self.s.brokers[self.index].url if self.index >= 0 else "-")
        self._drop_client()
        with self._lock:
            queued, self._outbox = self._outbox, deque()
        for d, *_ in queued:
            d._finish(None, "link closed")
