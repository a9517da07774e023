"""The relay's MQTT settings: the ``[relay]`` config section turned into `firmware.system.mqtt.MqttSettings`.

The connection itself (failover, return to the preferred broker, TLS, reconnect backoff) is the one
MQTT adapter, `firmware.system.mqtt.MqttLink`, driven by the relay thread with `step()`. A fresh
client per connection with Clean Start and no session expiry: the store, not paho, is the queue.
"""

from __future__ import annotations

from typing import Any

from firmware.config.checks import KEY_FILE_MAX
from firmware.system.fsutil import read_regular
from firmware.system.mqtt import MqttSettings
from firmware.wire.relay_protocol import MAX_JSON_BYTES, parse_broker_url

#: The relay only receives acks (at most `MAX_JSON_BYTES` of JSON each): the broker drops anything larger for us.
ACK_PACKET_MAX = 16 * MAX_JSON_BYTES


def uplink_settings(cfg: Any, client_id: str, subscriptions: list[tuple[str, int]]) -> MqttSettings:
    """MQTT settings for the record relay from ``cfg.relay`` (paths resolved against the config file)."""
    r = cfg.relay
    password = ""
    if r.password_file:
        password = read_regular(cfg.path(r.password_file), KEY_FILE_MAX).decode("utf-8", "replace").strip()

    def p(v: str) -> str:
        return str(cfg.path(v)) if v else ""

    return MqttSettings(
        [parse_broker_url(u) for u in r.brokers], client_id, keepalive_s=r.keepalive_s,
        connect_timeout_s=r.connect_timeout_s, backoff_min_s=r.backoff_min_s, backoff_max_s=r.backoff_max_s,
        probe_interval_s=r.probe_interval_s, ca_file=p(r.ca_file), cert_file=p(r.cert_file), key_file=p(r.key_file),
        username=r.username, password=password, subscriptions=subscriptions,
        clean_start=True, session_expiry_s=0,  # nothing to resume: the relay resends from the store
        max_inflight=65535,  # the relay bounds the window itself (by the broker's Receive Maximum)
        max_packet_size=ACK_PACKET_MAX,
        name="uplink")
