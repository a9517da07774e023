"""What the installed mosquitto enforces for certificate users (the evidence behind docs/security.md).

    .venv/bin/python tools/mosquitto_enforcement.py

Starts three throwaway brokers (TLS, client certificates from a fresh `provisioning.ca` CA, CN = user name) and
prints, for this mosquitto:

1. the ACL file: is a subscription to `$share/ingest/rekam/v1/+/records/+` (or `#`) refused? (2.0.11: no)
2. the dynamic-security plugin: a client `rk-aaaa` bound to client id `rk-aaaa-ctl`; is a connection with CN
   `rk-aaaa` and client id `rk-bbbb-ctl` refused? (2.0.11: no, the binding is only checked for user name +
   password logins) Is a `$share/#` deny applied? (yes, for the user names it lists)
3. `use_username_as_clientid`: does a second connection with the same certificate kick the first? (yes)

If a newer mosquitto answers differently, revisit the broker section of the threat model.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provisioning import ca  # noqa: E402
from tests.support import Mosquitto, broker_user  # noqa: E402

DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


class Client:
    """One MQTT v5 connection with a client certificate; records SUBACK codes and disconnects."""

    def __init__(self, client_id: str, paths: ca.CaPaths, crt: Path, key: Path, port: int) -> None:
        self.subacks: list[int] = []
        self.disconnects = 0
        self.up = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=str(paths.fleet_ca_crt), certfile=str(crt), keyfile=str(key))
        self.c.reconnect_delay_set(60, 60)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: rc.is_failure or self.up.set()
        self.c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.extend(r.value for r in rcs)
        self.c.on_disconnect = lambda *_a: setattr(self, "disconnects", self.disconnects + 1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.accepted = self.up.wait(5)

    def suback(self, topic: str) -> int:
        n = len(self.subacks)
        self.c.subscribe(topic, qos=1)
        for _ in range(100):
            if len(self.subacks) > n:
                return self.subacks[-1]
            time.sleep(0.05)
        raise TimeoutError(f"no SUBACK for {topic}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def broker(root: Path, paths: ca.CaPaths, lines: str) -> Mosquitto:
    """A broker with one TLS listener: client certificate required, CN = user name, plus `lines`."""
    m = Mosquitto(root / f"b{len(list(root.iterdir()))}")
    m.conf.write_text(f"per_listener_settings true\nuser {broker_user()}\nlog_dest stderr\nlog_type notice\n"
                      f"listener {m.port} 127.0.0.1\nallow_anonymous false\nrequire_certificate true\n"
                      f"use_identity_as_username true\ncafile {paths.fleet_ca_crt}\ncertfile {paths.server_crt}\n"
                      f"keyfile {paths.server_key}\n{lines}\n")
    return m.start()


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="mosquitto-enforcement-"))
    paths = ca.init_ca(root / "ca", ["127.0.0.1"], batch="t")
    crt, key, _ = ca.issue_kit_files(paths, "rk-aaaa", root / "kit")
    (root / "acl").write_text("pattern read rekam/v1/%u/acks\n")

    m = broker(root, paths, f"acl_file {root / 'acl'}")
    c = Client("rk-aaaa-ctl", paths, crt, key, m.port)
    share = "$share/ingest/rekam/v1/+/records/+"
    print(f"1. acl_file: SUBACK for {share} = {c.suback(share)}, for # = {c.suback('#')} (135 refused, 1 granted)")
    c.close()
    m.stop()

    dyn = {"defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                                "unsubscribe": True},
           "clients": [{"username": "rk-aaaa", "clientid": "rk-aaaa-ctl", "roles": [{"rolename": "kit"}]}],
           "roles": [{"rolename": "kit", "acls": [
               {"acltype": "subscribePattern", "topic": "rekam/v1/rk-aaaa/#", "allow": True},
               {"acltype": "subscribePattern", "topic": "$share/#", "allow": False, "priority": 5}]}],
           "groups": []}
    (root / "dynsec.json").write_text(json.dumps(dyn))
    m = broker(root, paths, f"plugin {DYNSEC}\nplugin_opt_config_file {root / 'dynsec.json'}")
    c = Client("rk-bbbb-ctl", paths, crt, key, m.port)
    share = c.suback("$share/ingest/rekam/v1/+/records/+") if c.accepted else None
    print(f"2. dynamic-security: CN rk-aaaa (bound to rk-aaaa-ctl) as client id rk-bbbb-ctl accepted: {c.accepted}; "
          f"SUBACK for $share/... = {share}")
    c.close()
    m.stop()

    m = broker(root, paths, f"acl_file {root / 'acl'}\nuse_username_as_clientid true")
    first = Client("rk-aaaa-relay", paths, crt, key, m.port)
    second = Client("rk-aaaa-ctl", paths, crt, key, m.port)
    time.sleep(1)
    print(f"3. use_username_as_clientid: the second connection of one certificate kicked the first: "
          f"{first.disconnects > 0}")
    first.close()
    second.close()
    m.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
