"""Fixtures: a fleet folder (CAs, signing key), a REAL mosquitto with the deployed TLS + ACL
configuration (`provisioning/mosquitto/`) on free 127.0.0.1 ports, the fleet service, and kits
made of the real parts (identity, store, operators, enrollment service) that the control plane
drives. Missing mosquitto fails the test (apt-get install -y mosquitto); nothing is skipped."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from firmware import config
from firmware.control.plane import ControlPlane, effective_config
from firmware.enrollment.dedup import DuplicateChecker, nik_key
from firmware.enrollment.operators import Operators, hash_pin, operators_from_config
from firmware.enrollment.session import Devices, EnrollmentService
from firmware.seal import identity
from firmware.store.store import Store
from firmware.wire import record_format
from provisioning.fleet_service import FleetService
from provisioning.registry import Fleet
from tests.support import Mosquitto, broker_user, free_port, render_toml, wait_for  # noqa: F401 (free_port: for the tests)

REPO_ROOT = Path(__file__).resolve().parents[2]
PIN_HASH = hash_pin("2468")

@pytest.fixture(scope="session")
def fleet_and_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Mosquitto]]:
    data = tmp_path_factory.mktemp("fleet")
    # The shared broker with a claim listener, on the deployed config; ports first: the fleet and its config name them.
    b = Mosquitto(data / "broker", claim_listener=True)
    fleet = Fleet.init(data, [f"127.0.0.1:{b.port}"], [f"127.0.0.1:{b.claim_port}"], ["127.0.0.1", "localhost"],
                       batch="test")
    b.use_shipped(fleet.ca)
    b.start()
    yield fleet, b
    b.stop()
    fleet.close()


@pytest.fixture(scope="session")
def fleet(fleet_and_broker: tuple[Fleet, Mosquitto]) -> Fleet:
    return fleet_and_broker[0]


@pytest.fixture(scope="session")
def broker(fleet_and_broker: tuple[Fleet, Mosquitto]) -> Mosquitto:
    return fleet_and_broker[1]


@pytest.fixture(scope="session")
def service(fleet: Fleet, broker: Mosquitto) -> Iterator[FleetService]:
    svc = FleetService(fleet).start()
    yield svc
    svc.close()


@dataclass
class KitHarness:
    """The parts of a running kit the control plane drives, all real (no daemon, no capture hardware)."""

    root: Path
    cfg_path: Path
    local: config.Config
    cfg: config.Config
    identity: identity.KitIdentity
    store: Store
    enrollment: EnrollmentService
    services: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    exits: list[int] = field(default_factory=list)
    exited: threading.Event = field(default_factory=threading.Event)
    control: ControlPlane | None = None

    def request_exit(self, status: int) -> None:
        self.exits.append(status)
        self.exited.set()

    def start_control(self) -> ControlPlane:
        self.control = ControlPlane(self)
        self.control.start()
        return self.control

    def start_relay(self) -> Any:
        """The real record relay (firmware/relay/relay.py) as the daemon runs it."""
        from firmware.relay.relay import Relay

        relay = Relay(self.store, self.cfg)
        relay.start()
        self.services["relay"] = relay
        return relay

    def stop(self) -> None:
        if self.control is not None:
            self.control.stop()
            self.control = None
        relay = self.services.pop("relay", None)
        if relay is not None:
            relay.close()
        self.store.close()

    def restart(self) -> KitHarness:
        """What systemd does after EX_RESTART: a new process with the effective config."""
        self.stop()
        return make_kit(self.root, self.cfg_path)


#: Every harness made (restarts too), so that `new_kit` stops them all when its test ends: a control plane left
#: running would go on reconnecting to the test's stopped broker for the rest of the session.
MADE: list[KitHarness] = []


def make_kit(root: Path, cfg_path: Path) -> KitHarness:
    """A kit harness on the config file `cfg_path` (its store open); listed in `MADE`."""
    local = config.load(cfg_path)
    cfg = effective_config(local)
    ident = identity.load_or_create(cfg.state_dir)
    store = Store(cfg, ident)
    store.open()
    ops = Operators(operators_from_config(cfg.operators.list))
    # A kit without capture devices (none is needed here); the NIK check is the real one, so enrollments start.
    enr = EnrollmentService(store, cfg, ops, DuplicateChecker(store.j, nik_key(cfg.state_dir)), Devices())
    k = KitHarness(root, cfg_path, local, cfg, ident, store, enr)
    MADE.append(k)
    return k


def write_kit_config(root: Path, fleet: Fleet, broker: Mosquitto, extra: str = "", **control: Any) -> Path:
    """A kit config file as a technician would write it (TOML), pointing at the test broker."""
    root.mkdir(parents=True, exist_ok=True)
    _, pub = record_format.generate_datacenter_keypair()
    (root / "dc.pub").write_bytes(pub)
    (root / "serial").write_text("10000000deadbeef\n")
    (root / "usb").mkdir(exist_ok=True)
    c = {"enabled": True, "brokers": [f"127.0.0.1:{broker.port}"], "claim_brokers": [f"127.0.0.1:{broker.claim_port}"],
         "ca_file": str(fleet.ca.fleet_ca_crt), "claim_cert_file": str(fleet.ca.claim_crt("test")),
         "claim_key_file": str(fleet.ca.claim_key("test")), "telemetry_interval_s": 1.0, "rollback_after_s": 4.0,
         "claim_wait_s": 3.0, "claim_retry_min_s": 0.3, "claim_retry_max_s": 1.0, **control}

    sections = {
        "kit": {"state_dir": str(root / "state"), "hardware_serial_file": str(root / "serial")},
        "datacenter": {"public_key_files": ["dc.pub"]},
        "usb": {"mount_point": str(root / "usb"), "require_mountpoint": False},
        "store": {"reserve_floor_mb": 1, "journal_reserve_mb": 1, "max_record_mb": 1},
        "operators": {"list": [{"id": "op1", "name": "Op One", "pin_hash": PIN_HASH}]},
        "control": c,
    }
    p = root / "rekam.toml"
    p.write_text(render_toml(sections) + extra)
    return p


@pytest.fixture
def new_kit(tmp_path: Path, fleet: Fleet, broker: Mosquitto) -> Iterator[Callable[..., KitHarness]]:
    """Factory: a fresh, unclaimed kit (`allow=True` puts it on the fleet's allow-list first). At teardown every
    harness made meanwhile is stopped, the ones a test's `restart()` made included."""
    first = len(MADE)

    def make(name: str = "kit", allow: bool = True, extra: str = "", **control: Any) -> KitHarness:
        k = make_kit(tmp_path / name, write_kit_config(tmp_path / name, fleet, broker, extra, **control))
        if allow:
            with open(fleet.data / "allowlist.txt", "a") as f:
                f.write(k.identity.kit_id + "\n")
        return k

    yield make
    made, MADE[first:] = MADE[first:], []
    for k in made:
        try:
            k.stop()
        except Exception:
            pass


@pytest.fixture
def online_kit(new_kit: Callable[..., KitHarness], service: FleetService) -> KitHarness:
    """A kit that has claimed, runs its control plane, and is connected."""
    k = new_kit()
    cp_ = k.start_control()
    wait_for(cp_.connected.is_set, 20, "kit claimed and connected")
    wait_for(lambda: service.fleet.kit(k.identity.kit_id)["online"] == "online", 10, "fleet sees the kit online")
    return k


@pytest.fixture(scope="session")
def fleet_link(fleet: Fleet, broker: Mosquitto) -> Iterator[Any]:
    """The fleet's own MQTT connection, for tests that publish as the fleet."""
    from provisioning.fleet_link import FleetLink

    link = FleetLink(fleet, "fleet-test-link").start()
    yield link
    link.close()


def config_state(fleet: Fleet, kit_id: str) -> dict[str, Any]:
    import json

    row = fleet.kit(kit_id)
    return json.loads(row["config_state"]) if row and row["config_state"] else {}


def push_config(fleet: Fleet, link: Any, kit_id: str, sections: dict[str, Any], **kw: Any) -> int:
    from firmware.wire import control_protocol as cp

    version, doc = fleet.make_config(kit_id, sections, **kw)
    link.publish(cp.config_topic(kit_id), doc, retain=True)
    return version


def wait_event(fleet: Fleet, kit_id: str, version: int, status: str, timeout: float = 10) -> dict[str, Any]:
    """Wait until the kit reports `status` for config `version` on its retained state topic."""
    def ok() -> dict[str, Any] | None:
        ev = config_state(fleet, kit_id).get("last_event") or {}
        return ev if ev.get("version") == version and ev.get("status") == status else None

    return wait_for(ok, timeout, f"config v{version} {status}")
