"""``rekam-fleet serve``: the fleet service on MQTT. It answers claims (and re-publishes the claimed
kit's current config, retained) and records what kits report: telemetry, status, config state,
command results (all through the registry, `provisioning.registry.Fleet`).

With broker shards (`provisioning.shards`) it holds one connection per shard (and one to the fleet.json brokers,
where the claim listener is), answers each claim on the connection it came from, publishes the claimed kit's
config on that kit's shards, and opens connections to shards added while it runs (`refresh`).

Several services may run at once, on one host or several, on the same fleet folder and registry (PostgreSQL for
more than one host): claims, results and telemetry are shared subscriptions of one group (`ca.fleet_service_group`,
a secret of the fleet client key), so each message is handled by one of them and the others carry on when one
stops; the kits' retained state goes to each (`firmware.wire.control_protocol.fleet_service_filters`)."""

from __future__ import annotations

import logging
import queue
import threading
import time

from firmware.system.mqtt import Message, client_id
from firmware.wire import control_protocol as cp
from provisioning import ca
from provisioning.fleet_link import FleetLink
from provisioning.registry import Fleet

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 60.0  # pending claims past their lifetime are dropped this often
REFRESH_EVERY_S = 5.0  # how often the shard table is re-read for shards added while running


class FleetService:
    """Answers claims, records telemetry/status/config state/results; `received` gets (kind, kit_id)."""

    def __init__(self, fleet: Fleet, shared: bool = True) -> None:
        self.fleet = fleet
        # `shared`: in the services' group (the default); False: every message to this service alone
        self.filters = cp.fleet_service_filters(ca.fleet_service_group(fleet.ca) if shared else None)
        self.links: dict[tuple[str, ...], FleetLink] = {}
        self.link = self._make(fleet.service_brokers()[0] if fleet.service_brokers() else None)
        self.received: queue.Queue[tuple[str, str]] = queue.Queue()  # (kind, kit_id) for watchers/tests
        self._lock = threading.Lock()

    def _make(self, brokers: list[str] | None) -> FleetLink:
        link = FleetLink(self.fleet, client_id("fleet", "service"), self._on_message, self.filters, brokers=brokers)
        self.links[tuple(link.broker_list)] = link
        return link

    def start(self) -> FleetService:
        """Connect and subscribe (the first broker list must answer: `FleetError` if not; other shards connect
        in the background and reconnect on their own)."""
        self.link.start()
        self.refresh()
        return self

    def refresh(self) -> int:
        """Open a connection to every shard not connected yet; returns how many were opened."""
        n = 0
        with self._lock:
            for lst in self.fleet.service_brokers():
                if tuple(lst) not in self.links:
                    self._make(lst).mqtt.start(name="fleet-service-shard")
                    log.info("fleet service listening on shard brokers=%s", ",".join(lst))
                    n += 1
        return n

    def _kit_links(self, kit_id: str) -> list[FleetLink]:
        with self._lock:
            return [self.links[tuple(lst)] for lst in self.fleet.kit_brokers(kit_id) if tuple(lst) in self.links]

    def _on_message(self, link: FleetLink, msg: Message) -> None:
        payload = msg.payload
        if msg.topic.startswith(f"{cp.PREFIX}/claim/"):
            ans = self.fleet.handle_claim(msg.topic, payload)
            if ans is not None:
                link.publish(*ans)
                parsed = cp.parse_claim_topic(msg.topic)
                row = self.fleet.kit(parsed[1]) if parsed else None
                latest = self.fleet.latest_config(row["kit_id"]) if row and row["state"] == "approved" else None
                if latest and row["cert_serial"]:  # the config topic always holds the kit's current document
                    # where it claimed and on its shards (where it connects once it runs that config)
                    for lk in {id(x): x for x in [link, *self._kit_links(row["kit_id"])]}.values():
                        lk.publish(cp.config_topic(row["kit_id"]), latest[1], retain=True)
            return
        kind = self.fleet.handle_kit_message(msg.topic, payload)
        if kind:
            parsed = cp.parse_kit_topic(msg.topic)
            self.received.put((kind, parsed[0] if parsed else ""))

    def close(self) -> None:
        """Disconnect every connection."""
        with self._lock:
            links = list(self.links.values())
        for lk in links:
            lk.close()


def serve(fleet: Fleet, stop: threading.Event | None = None) -> None:
    """Run the service until `stop` is set (or Ctrl-C), expiring stale claims every minute."""
    stop = stop or threading.Event()
    svc = FleetService(fleet).start()
    log.info("fleet service running brokers=%s fleet_key=%s", fleet.settings.get("brokers"),
             cp.key_fingerprint(fleet.public_key_b64))
    next_expiry = time.monotonic() + EXPIRE_EVERY_S
    try:
        while not stop.wait(REFRESH_EVERY_S):
            svc.refresh()
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + EXPIRE_EVERY_S
                fleet.expire_claims()
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
