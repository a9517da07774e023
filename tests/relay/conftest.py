"""Fixtures for relay tests: kits with real stores, ingest workers on a real mosquitto, counting helpers."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware import config
from firmware.capture.simulated import SimulatedCapture
from firmware.relay.relay import Relay
from firmware.seal import identity
from firmware.store.store import Store
from firmware.wire import record_format
from firmware.wire import relay_protocol as proto
from provisioning.archive import Archive
from provisioning.ingest import IngestSettings, IngestWorker
from tests.support import wait_for  # noqa: F401  (the tests here import it from this conftest)

FAST_RELAY = {"ack_timeout_s": 2.0, "ack_timeout_max_s": 4.0, "backoff_min_s": 0.1, "backoff_max_s": 0.5,
              "probe_interval_s": 0.5, "connect_timeout_s": 3.0, "keepalive_s": 10, "telemetry_interval_s": 1.0,
              "publishes_per_s": 0.0}


# The data center's ack-signing key of these tests: ingest workers sign with it, kits trust its public half.
ACK_KEY = Ed25519PrivateKey.generate()
ACK_PUB = proto.ack_public_b64(ACK_KEY)


def write_ack_key(path: Path, key: Ed25519PrivateKey = ACK_KEY) -> Path:
    """Write `key` as an ingest ack-key file (PKCS#8 PEM) at `path`."""
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def ack_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ack_key(tmp_path_factory.mktemp("ack") / "ack-signing.key")


@pytest.fixture(scope="session")
def dc_pub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dc")
    _priv, pub = record_format.generate_datacenter_keypair()
    (d / "datacenter.pub").write_bytes(pub)
    return d / "datacenter.pub"


def kit_config(root: Path, dc_pub: Path, brokers: list[str], **relay: Any) -> config.Config:
    """A kit configuration in `root` relaying to `brokers` with test-speed timers (trusting `ACK_KEY`)."""
    relay.setdefault("ack_public_keys", [ACK_PUB])
    return config.validate({
        "kit": {"state_dir": str(root / "sd")},
        "datacenter": {"public_key_files": [str(dc_pub)]},
        "usb": {"mount_point": str(root / "usb"), "require_mountpoint": False},
        "store": {"reserve_floor_mb": 1, "journal_reserve_mb": 1, "max_record_mb": 8, "warn_records": 5,
                  "resume_records": 2, "verify_readback": False},
        "relay": {"brokers": brokers, **FAST_RELAY, **relay},
    })


@dataclass
class KitUnderTest:
    """A kit: its config, open store and (once started) relay."""

    cfg: config.Config
    store: Store
    relay: Relay | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    @property
    def kit_id(self) -> str:
        return self.store.identity.kit_id

    @property
    def public_key(self) -> str:
        return self.store.identity.public_key_b64

    def capture(self, n: int, size: int = 30_000) -> list[str]:
        """Commit `n` records of max(`size`, ~260 KB) bytes (random face + ten fingers, padded; no corpus)."""
        ids = []
        cap = SimulatedCapture(None, seed=self.rng.randrange(1 << 30), pad_to=size)
        for _ in range(n):
            ids.append(self.store.commit(cap.capture().encode()).record_id)
        return ids

    def start_relay(self) -> Relay:
        self.relay = Relay(self.store, self.cfg, rng=random.Random(3))
        self.relay.start()
        return self.relay

    def stop_relay(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None

    def counts(self) -> dict[str, int]:
        return {k: v["records"] for k, v in self.store.j.counts().items()}


@pytest.fixture
def make_kit(tmp_path: Path, dc_pub: Path) -> Iterator[Callable[..., KitUnderTest]]:
    made: list[KitUnderTest] = []

    def make(brokers: list[str], name: str = "kit", **relay: Any) -> KitUnderTest:
        root = tmp_path / name
        cfg = kit_config(root, dc_pub, brokers, **relay)
        store = Store(cfg, identity.load_or_create(cfg.state_dir))
        store.open()
        k = KitUnderTest(cfg, store)
        made.append(k)
        return k

    yield make
    for k in made:
        k.stop_relay()
        k.store.close()


@pytest.fixture
def make_ingest(tmp_path: Path, ack_key_file: Path) -> Iterator[Callable[..., IngestWorker]]:
    """Start ingest workers (threads with their own MQTT connection) on a shared archive, signing with `ACK_KEY`."""
    made: list[IngestWorker] = []

    def make(broker: str, archive: Path | None = None, wait: bool = True, **kw: Any) -> IngestWorker:
        kw.setdefault("tofu", True)
        kw.setdefault("ack_key", ack_key_file)
        w = IngestWorker(IngestSettings(broker=broker, archive=archive or tmp_path / "archive", **kw)).start()
        made.append(w)
        if wait:
            assert w.connected.wait(10), "ingest worker did not subscribe"
        return w

    yield make
    for w in made:
        w.close()


def assert_delivered_once(kit: KitUnderTest, archive_dir: Path, ids: list[str]) -> None:
    """The final count: every record acked on the kit and archived exactly once, byte-identical."""
    a = Archive(archive_dir)
    try:
        archived = a.record_ids(kit.kit_id)
        assert len(archived) == len(set(archived)), "a record is indexed twice"
        missing = set(ids) - set(archived)
        assert not missing, f"lost: {sorted(missing)[:5]} ({len(missing)} records)"
        for rid in ids:
            row = kit.store.j.get(rid)
            assert row is not None and row.state == "acked", f"{rid} is {row.state if row else 'gone'} on the kit"
            assert a.has(rid) == row.sha256, f"{rid}: archived bytes differ from the kit's"
            f = a.path_of(kit.kit_id, rid)
            assert record_format.sha256_hex(f.read_bytes()) == row.sha256
        files = list((archive_dir / "records" / kit.kit_id).glob("*.rkm"))
        assert len(files) == len(ids), f"{len(files)} files archived for {len(ids)} records"
    finally:
        a.close()
