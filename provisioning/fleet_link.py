"""The fleet's MQTT connection (client certificate CN ``fleet``), used by the service and by the CLI
commands that publish (config push, kits revoke, cmd send). A thin layer over the one MQTT adapter,
`firmware.system.mqtt.MqttLink`: brokers from ``fleet.json``, the fleet certificate, checked publishes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from firmware.errors import FleetError
from firmware.system.mqtt import Broker, Delivery, Message, MqttLink, MqttSettings
from provisioning.registry import Fleet

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 1.0  # between rounds over every broker of fleet.json
BACKOFF_MAX_S = 30.0
MAX_INFLIGHT = 100  # a config push to '*' publishes one retained document per kit
KEEP_DELIVERIES = 1000  # a long-running link (the service) never flushes: forget what was accepted past this


class FleetLink:
    """The fleet's MQTT connection. `publish`/`flush` from any thread; received messages go to
    ``on_message(link, msg)`` on the link's thread (`msg`: `firmware.system.mqtt.Message`)."""

    def __init__(self, fleet: Fleet, client_id: str, on_message: Callable[[FleetLink, Message], None] | None = None,
                 subscriptions: tuple[str, ...] = (), brokers: list[str] | None = None) -> None:
        self.fleet = fleet
        self.client_id = client_id
        self.on_message = on_message
        self.subscriptions = subscriptions
        # `brokers`: one shard's control brokers (host:port, in order); default: the fleet.json brokers.
        self.broker_list = list(fleet.settings.get("brokers", []) if brokers is None else brokers)
        try:
            parsed = [Broker.parse(b, tls=True) for b in self.broker_list]
        except ValueError as e:
            raise FleetError(f"fleet brokers {self.broker_list}: {e}") from None
        if not parsed:
            raise FleetError("fleet.json lists no brokers")
        self.mqtt = MqttLink(MqttSettings(
            parsed, client_id=client_id, keepalive_s=30, backoff_min_s=BACKOFF_MIN_S, backoff_max_s=BACKOFF_MAX_S,
            ca_file=str(fleet.ca.fleet_ca_crt), cert_file=str(fleet.ca.fleet_crt), key_file=str(fleet.ca.fleet_key),
            subscriptions=[(s, 1) for s in subscriptions], max_inflight=MAX_INFLIGHT,
            tcp_nodelay=True,  # small request/response messages: no Nagle delay
            name="fleet"))
        self.mqtt.on_message = self._on_message
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []  # every publish since the last flush()

    @property
    def connected(self) -> threading.Event:
        """Set while connected with every subscription granted."""
        return self.mqtt.ready

    def start(self, timeout: float = 10) -> FleetLink:
        """Connect (own thread); `FleetError` if no broker answers within `timeout` seconds."""
        self.mqtt.start(name=f"fleet-{self.client_id}")
        if not self.mqtt.ready.wait(timeout):
            self.close()
            why = f" ({self.mqtt.last_error})" if self.mqtt.last_error else ""
            raise FleetError(f"cannot reach any broker of {self.broker_list}{why}")
        return self

    def _on_message(self, msg: Message) -> None:
        if self.on_message is not None:
            self.on_message(self, msg)  # a handler that raises is logged by the adapter

    def publish(self, topic: str, payload: bytes, retain: bool = False, response_topic: str | None = None,
                correlation: bytes | None = None) -> Delivery:
        """Publish at QoS 1 (queued while disconnected); `flush()` reports what the broker refused."""
        d = self.mqtt.publish(topic, payload, qos=1, retain=retain, correlation=correlation,
                              response_topic=response_topic)
        with self._lock:
            self._deliveries.append(d)
            if len(self._deliveries) > KEEP_DELIVERIES:  # keep what a flush() still has to report
                self._deliveries = [x for x in self._deliveries if not x.ok][-KEEP_DELIVERIES:]
        return d

    def flush(self, timeout: float = 5) -> list[tuple[str, str]]:
        """Wait until everything published so far is acknowledged by the broker (PUBACK); returns the
        (topic, reason) of publishes it refused, and raises `FleetError` on timeout or a lost connection."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._deliveries)
        for d in pending:
            d.wait(max(0.0, deadline - time.monotonic()))
        unanswered = [d for d in pending if not d.done or (d.reason is None or d.reason < 0)]
        if unanswered:
            why = "; ".join(sorted({d.reason_name for d in unanswered}))
            raise FleetError(f"{len(unanswered)} message(s) not acknowledged within {timeout:.0f} s ({why})")
        with self._lock:
            self._deliveries = [d for d in self._deliveries if d not in pending]
        return [(d.topic, d.reason_name) for d in pending if not d.ok]

    def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the link's thread."""
        self.mqtt.stop()
