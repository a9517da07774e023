"""The fleet's MQTT connection (client certificate CN ``fleet``), used by the service and by the CLI
commands that publish (config push, kits revoke, cmd send)."""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from typing import Any

from firmware.errors import FleetError
from provisioning.registry import Fleet

log = logging.getLogger(__name__)


class FleetLink:
    """The fleet's MQTT connection (client certificate CN ``fleet``). One thread owns the client;
    `publish`/`subscribe` from any thread enqueue; received messages go to `on_message`."""

    def __init__(self, fleet: Fleet, client_id: str, on_message: Any = None,
                 subscriptions: tuple[str, ...] = ()) -> None:
        self.fleet = fleet
        self.client_id = client_id
        self.on_message = on_message
        self.subscriptions = subscriptions
        self.connected = threading.Event()
        self.stop = threading.Event()
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.inflight: dict[int, str] = {}  # mid -> topic, until its PUBACK
        self.refused: list[tuple[str, str]] = []  # (topic, reason) of publishes the broker refused
        self._queued = 0

    def start(self, timeout: float = 10) -> FleetLink:
        self._thread = threading.Thread(target=self._run, name=f"fleet-{self.client_id}", daemon=True)
        self._thread.start()
        if not self.connected.wait(timeout):
            self.close()
            raise FleetError(f"cannot reach any broker of {self.fleet.settings.get('brokers')}")
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False, response_topic: str | None = None,
                correlation: bytes | None = None) -> None:
        self._queued += 1
        self._out.put(("pub", (topic, payload, retain, response_topic, correlation)))

    def _client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.fleet.ca.fleet_ca_crt))
        ctx.load_cert_chain(str(self.fleet.ca.fleet_crt), str(self.fleet.ca.fleet_key))
        c.tls_set_context(ctx)
        c.on_connect = lambda _c, _u, _f, rc, _p: self._events.put(("connect", rc))
        c.on_message = lambda _c, _u, msg: self._events.put(("message", msg))
        c.on_publish = lambda _c, _u, mid, rc, _p: self._events.put(("puback", (mid, rc)))
        return c

    def _run(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        brokers = self.fleet.settings.get("brokers", [])
        n = 0
        while not self.stop.is_set():
            host, _, port = brokers[n % len(brokers)].rpartition(":")
            n += 1
            c = self._client()
            try:
                c.connect(host, int(port), keepalive=30, clean_start=True)
            except (OSError, ssl.SSLError) as e:
                log.warning("fleet connect failed broker=%s:%s error=%s", host, port, e)
                self.stop.wait(1)
                continue
            try:  # small request/response messages: no Nagle delay
                c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            while not self.stop.is_set():
                if c.loop(timeout=0.02) != 0:
                    self.connected.clear()
                    break
                while True:
                    try:
                        kind, arg = self._events.get_nowait()
                    except queue.Empty:
                        break
                    if kind == "connect" and not arg.is_failure:
                        if self.subscriptions:
                            c.subscribe([(s, 1) for s in self.subscriptions])
                        self.connected.set()
                    elif kind == "message" and self.on_message is not None:
                        try:
                            self.on_message(self, arg)
                        except Exception:
                            log.exception("fleet message handler failed topic=%s", arg.topic)
                    elif kind == "puback":
                        topic = self.inflight.pop(arg[0], "?")
                        if arg[1].is_failure:
                            log.error("fleet publish refused topic=%s reason=%s", topic, arg[1])
                            self.refused.append((topic, str(arg[1])))
                if not self.connected.is_set():
                    continue
                while True:
                    try:
                        kind, arg = self._out.get_nowait()
                    except queue.Empty:
                        break
                    topic, payload, retain, resp, corr = arg
                    props = None
                    if resp or corr:
                        props = Properties(PacketTypes.PUBLISH)
                        if resp:
                            props.ResponseTopic = resp
                        if corr:
                            props.CorrelationData = corr
                    info = c.publish(topic, payload, qos=1, retain=retain, properties=props)
                    self.inflight[info.mid] = topic
                    self._queued -= 1
            c.disconnect()
            for _ in range(5):
                c.loop(timeout=0.05)

    def flush(self, timeout: float = 5) -> list[tuple[str, str]]:
        """Wait until everything published so far is acknowledged by the broker (PUBACK); returns the
        (topic, reason) of publishes it refused, and raises `FleetError` on timeout."""
        deadline = time.monotonic() + timeout
        while (self._queued > 0 or self.inflight) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._queued > 0 or self.inflight:
            raise FleetError(f"{self._queued + len(self.inflight)} message(s) not acknowledged within {timeout:.0f} s")
        return list(self.refused)

    def close(self) -> None:
        self.stop.set()
        if self._thread:
            self._thread.join(timeout=5)

