"""``rekam-fleet serve``: the fleet service on MQTT. It answers claims (and re-publishes the claimed
kit's current config, retained) and records what kits report: telemetry, status, config state,
command results (all through the registry, `provisioning.registry.Fleet`)."""

from __future__ import annotations

import logging
import queue
import threading

from firmware.system.mqtt import Message, client_id
from firmware.wire import control_protocol as cp
from provisioning.fleet_link import FleetLink
from provisioning.registry import Fleet

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 60.0  # pending claims past their lifetime are dropped this often


class FleetService:
    """Answers claims, records telemetry/status/config state/results; `received` gets (kind, kit_id)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.link = FleetLink(fleet, client_id("fleet", "service"), self._on_message, cp.FLEET_FILTERS)
        self.received: queue.Queue[tuple[str, str]] = queue.Queue()  # (kind, kit_id) for watchers/tests

    def start(self) -> FleetService:
        """Connect and subscribe; `FleetError` if no broker answers."""
        self.link.start()
        return self

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
                    link.publish(cp.config_topic(row["kit_id"]), latest[1], retain=True)
            return
        kind = self.fleet.handle_kit_message(msg.topic, payload)
        if kind:
            parsed = cp.parse_kit_topic(msg.topic)
            self.received.put((kind, parsed[0] if parsed else ""))

    def close(self) -> None:
        """Disconnect."""
        self.link.close()


def serve(fleet: Fleet, stop: threading.Event | None = None) -> None:
    """Run the service until `stop` is set (or Ctrl-C), expiring stale claims every minute."""
    stop = stop or threading.Event()
    svc = FleetService(fleet).start()
    log.info("fleet service running brokers=%s fleet_key=%s", fleet.settings.get("brokers"),
             cp.key_fingerprint(fleet.public_key_b64))
    try:
        while not stop.wait(EXPIRE_EVERY_S):
            fleet.expire_claims()
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
