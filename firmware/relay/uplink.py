"""The relay's MQTT connection: one paho-mqtt 2.x client (MQTT v5) at a time, broker failover and return.

Brokers are tried in priority order (data center, then disaster-recovery center). After every broker
failed, the next round waits a capped exponential delay with jitter. While connected to a fallback
broker, higher-priority brokers are probed (TCP connect) every ``probe_interval_s``; when one answers
the relay moves back to it.

Not thread-safe on purpose: the relay thread owns this object and the paho client inside it, and
drives the network with `step()` (paho's `loop()`, never `loop_start()`). paho callbacks only append
to `events`; they never raise. A fresh paho client is made for every connection with Clean Start and
no session expiry, so paho never replays its RAM queue: the store is the source of truth.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware.system.backoff import backoff_delay
from firmware.system.clock import iso
from firmware.wire.relay_protocol import BrokerURL, parse_broker_url

log = logging.getLogger(__name__)

DEFAULT_RECEIVE_MAXIMUM = 65535  # MQTT v5 §3.2.2.3.3: absent means 65,535


@dataclass
class Event:
    """Something the network reported; the relay thread consumes these after each `step()`."""

    kind: str  # connected | disconnected | puback | message
    mid: int = 0
    reason: int = 0
    topic: str = ""
    payload: bytes = b""
    detail: str = ""


@dataclass
class UplinkSettings:
    """What the uplink needs from the [relay] config section."""

    brokers: list[BrokerURL]
    client_id: str
    keepalive_s: int = 60
    connect_timeout_s: float = 10.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 120.0
    probe_interval_s: float = 60.0
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = ""
    subscriptions: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: Any, client_id: str, subscriptions: list[tuple[str, int]]) -> UplinkSettings:
        r = cfg.relay
        password = ""
        if r.password_file:
            password = cfg.path(r.password_file).read_text().strip()

        def p(v: str) -> str:
            return str(cfg.path(v)) if v else ""

        return cls([parse_broker_url(u) for u in r.brokers], client_id, r.keepalive_s, r.connect_timeout_s,
                   r.backoff_min_s, r.backoff_max_s, r.probe_interval_s, p(r.ca_file), p(r.cert_file),
                   p(r.key_file), r.username, password, subscriptions)


class Uplink:
    """One MQTT v5 connection to the best reachable broker (see module doc)."""

    def __init__(self, settings: UplinkSettings, rng: random.Random | None = None) -> None:
        if not settings.brokers:
            raise ValueError("the uplink needs at least one broker")
        self.s = settings
        self.rng = rng or random.Random()
        self.events: deque[Event] = deque()
        self.client: Any = None
        self.state = "disconnected"  # disconnected | connecting | connected
        self.index = -1  # broker in use
        self.since = iso()
        self.receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.max_packet: int | None = None
        self.last_error = ""
        self.connects = 0
        self._failed_rounds = 0
        self._next_attempt = 0.0
        self._next_probe = 0.0
        self.should_stop: Callable[[], bool] = lambda: False  # the owner's stop flag, checked while connecting

    @property
    def broker(self) -> BrokerURL | None:
        return self.s.brokers[self.index] if self.state == "connected" and self.index >= 0 else None

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    # --- paho callbacks: enqueue only, never raise -----------------------------------------

    def _on_connect(self, client: Any, _ud: Any, _flags: Any, rc: Any, props: Any) -> None:
        try:
            rm = getattr(props, "ReceiveMaximum", None) if props is not None else None
            mp = getattr(props, "MaximumPacketSize", None) if props is not None else None
            self.events.append(Event("connack", reason=int(getattr(rc, "value", rc)),
                                     detail=f"{rm or ''}|{mp or ''}|{rc}"))
        except Exception as e:  # pragma: no cover - defensive: a callback must never raise
            self.events.append(Event("connack", reason=0x80, detail=f"||{e}"))

    def _on_disconnect(self, client: Any, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        try:
            if client is self.client:
                self.events.append(Event("disconnected", reason=int(getattr(rc, "value", 0) or 0), detail=str(rc)))
        except Exception:  # pragma: no cover
            self.events.append(Event("disconnected", reason=0x80))

    def _on_publish(self, client: Any, _ud: Any, mid: int, rc: Any, _props: Any) -> None:
        try:
            if client is self.client:
                self.events.append(Event("puback", mid=mid, reason=int(getattr(rc, "value", rc) or 0)))
        except Exception:  # pragma: no cover
            self.events.append(Event("puback", mid=mid, reason=0x80))

    def _on_message(self, client: Any, _ud: Any, msg: Any) -> None:
        try:
            if client is self.client:
                self.events.append(Event("message", topic=msg.topic, payload=bytes(msg.payload)))
        except Exception:  # pragma: no cover
            pass

    # --- connection management ------------------------------------------------------------

    def _new_client(self, b: BrokerURL) -> Any:
        import paho.mqtt.client as mqtt

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.s.client_id, protocol=mqtt.MQTTv5)
        c.suppress_exceptions = True  # a bug in a callback must not kill the network loop
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_publish, c.on_message = self._on_publish, self._on_message
        c.max_inflight_messages_set(65535)  # the relay bounds the window itself (by Receive Maximum)
        c.max_queued_messages_set(0)
        c.connect_timeout = self.s.connect_timeout_s
        if self.s.username:
            c.username_pw_set(self.s.username, self.s.password or None)
        if b.tls:
            ctx = ssl.create_default_context(cafile=self.s.ca_file or None)
            if self.s.cert_file:
                ctx.load_cert_chain(self.s.cert_file, self.s.key_file or None)
            c.tls_set_context(ctx)
        return c

    def _try(self, index: int) -> bool:
        """Connect to broker `index` and wait for its CONNACK (blocking, bounded by connect_timeout_s)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        b = self.s.brokers[index]
        self._drop_client()
        self.state, self.index = "connecting", index
        try:
            client = self._new_client(b)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._fail(b, f"TLS setup failed: {e}")
            return False
        self.client = client
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0  # nothing to resume: the relay resends from the store
        try:
            client.connect(b.host, b.port, keepalive=self.s.keepalive_s, clean_start=True, properties=props)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._fail(b, f"connect failed: {e}")
            return False
        deadline = time.monotonic() + self.s.connect_timeout_s
        while time.monotonic() < deadline and not self.should_stop():
            rc = client.loop(timeout=0.05)
            while self.events and self.events[0].kind != "connack":
                self.events.popleft()  # stale events of a previous client cannot be here; be safe anyway
            if self.events:
                ev = self.events.popleft()
                if ev.reason >= 0x80:
                    self._fail(b, f"refused by broker: {ev.detail.split('|')[2]}")
                    return False
                rm, mp, _ = ev.detail.split("|", 2)
                self.receive_maximum = int(rm) if rm else DEFAULT_RECEIVE_MAXIMUM
                self.max_packet = int(mp) if mp else None
                for topic, qos in self.s.subscriptions:
                    client.subscribe(topic, qos=qos)
                self.state, self.since, self.last_error = "connected", iso(), ""
                self.connects += 1
                self._failed_rounds = 0
                self._next_probe = time.monotonic() + self.s.probe_interval_s
                log.info("uplink connected broker=%s receive_maximum=%d max_packet=%s", b.url,
                         self.receive_maximum, self.max_packet or "-")
                self.events.append(Event("connected", detail=b.url))
                return True
            if rc not in (0,):
                self._fail(b, f"connection lost during handshake (rc={rc})")
                return False
        self._fail(b, "no CONNACK within connect_timeout_s")
        return False

    def _fail(self, b: BrokerURL, why: str) -> None:
        self.last_error = f"{b.url}: {why}"
        log.warning("uplink broker unavailable broker=%s error=%s", b.url, why)
        self._drop_client()

    def _drop_client(self, rc: int = 0) -> None:
        c, self.client = self.client, None
        was = self.state == "connected"
        self.state = "disconnected"
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
            if self._try(i):
                return True
        self._failed_rounds += 1
        delay = backoff_delay(self._failed_rounds - 1, self.s.backoff_min_s, self.s.backoff_max_s, self.rng)
        self._next_attempt = time.monotonic() + delay
        log.warning("uplink no broker reachable rounds=%d retry_in_s=%.1f last_error=%s", self._failed_rounds,
                    delay, self.last_error)
        return False

    def _probe(self, b: BrokerURL) -> bool:
        try:
            with socket.create_connection((b.host, b.port), timeout=min(2.0, self.s.connect_timeout_s)):
                return True
        except OSError:
            return False

    def step(self, timeout: float) -> None:
        """Drive the network for up to `timeout` seconds: I/O, reconnects, probes."""
        now = time.monotonic()
        if self.state != "connected":
            if now >= self._next_attempt:
                self.connect_round()
            else:
                time.sleep(min(timeout, self._next_attempt - now))
            return
        rc = self.client.loop(timeout=timeout)
        if rc != 0 and self.state == "connected":
            import paho.mqtt.client as mqtt

            self.last_error = f"{self.s.brokers[self.index].url}: connection lost ({mqtt.error_string(rc)})"
            log.warning("uplink disconnected broker=%s error=%s", self.s.brokers[self.index].url,
                        mqtt.error_string(rc))
            self._drop_client(rc)
            self._next_attempt = time.monotonic() + backoff_delay(0, self.s.backoff_min_s, self.s.backoff_max_s,
                                                                  self.rng)
            return
        lost = [e for e in self.events if e.kind == "disconnected"]
        if lost and self.state == "connected":
            self.last_error = f"{self.s.brokers[self.index].url}: connection closed ({lost[0].detail})"
            log.warning("uplink disconnected broker=%s reason=%s", self.s.brokers[self.index].url, lost[0].detail)
            self.events = deque(e for e in self.events if e.kind != "disconnected")
            self._drop_client(lost[0].reason)
            self._next_attempt = time.monotonic()
            return
        if self.index > 0 and now >= self._next_probe:
            self._next_probe = now + self.s.probe_interval_s
            for i in range(self.index):
                if self._probe(self.s.brokers[i]):
                    log.info("uplink higher-priority broker is back broker=%s; switching from %s",
                             self.s.brokers[i].url, self.s.brokers[self.index].url)
                    self._drop_client()
                    if not self.connect_round(start=i):
                        self._next_attempt = 0.0  # fall back to the full round at once
                    break

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int | None:
        """Hand one message to paho; its mid, or None if the connection is gone."""
        if self.state != "connected":
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=False)
        if info.rc != 0:
            import paho.mqtt.client as mqtt

            self.last_error = f"publish failed: {mqtt.error_string(info.rc)}"
            log.warning("uplink publish failed error=%s; reconnecting", mqtt.error_string(info.rc))
            self._drop_client()
            return None
        return int(info.mid)

    def want_write(self) -> bool:
        return self.client is not None and self.client.want_write()

    def close(self) -> None:
        """Disconnect cleanly (DISCONNECT packet) and forget the client."""
        if self.client is not None:
            log.info("uplink closing broker=%s", self.s.brokers[self.index].url if self.index >= 0 else "-")
        self._drop_client()

