"""Broker shards: which brokers a kit uses, decided by the fleet and shipped in its signed config.

A *shard* is a named set of brokers (``relay`` URLs for the record relay, ``control`` host:port for the
control plane; usually the same mqtts listener) with a state: ``active`` (takes kits), ``draining`` (keeps
its kits until the next rebalance moves them, takes no new ones) or ``retired``. The table lives in the
fleet registry (`provisioning.registry.Fleet`, tables ``shards`` and ``kit_shards``).

Every kit gets a *primary* and a *failover* shard by rendezvous (highest-random-weight) hashing of its kit id
over the active shards: the assignment is stable (it depends only on the kit id and the set of active shard
names), spread evenly, and adding a shard moves only the kits whose new top choice is that shard (about 1/N of
them). An operator may pin a kit (`rekam-fleet shards assign`). The kit learns its brokers from its signed
config: ``relay.brokers`` = primary's relay URLs then failover's, ``control.brokers`` likewise; the kit's MQTT
adapter already fails over in that order and returns to the first when it answers again.

No shard defined: the fleet works as before (``fleet.json`` brokers, no broker keys injected).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from firmware.errors import FleetError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
STATES = ("active", "draining", "retired")


@dataclass(frozen=True)
class Shard:
    """One broker shard: `relay` URLs (mqtt[s]://host:port) and `control` host:port, both in priority order."""

    name: str
    relay: tuple[str, ...]
    control: tuple[str, ...]
    state: str = "active"
    note: str = ""


@dataclass(frozen=True)
class Assignment:
    """Where one kit is: its primary and failover shard names (failover None with a single active shard)."""

    kit_id: str
    primary: str
    failover: str | None
    pinned: bool = False
    names: tuple[str, ...] = field(default=(), compare=False)

    @property
    def shards(self) -> tuple[str, ...]:
        return (self.primary,) + ((self.failover,) if self.failover else ())


def check_name(name: str) -> str:
    """`name` if it is a valid shard name (lower-case letters, digits, . _ -; 1-32), else `FleetError`."""
    if not NAME_RE.fullmatch(name):
        raise FleetError(f"shard name {name!r}: use 1-32 lower-case letters, digits, . _ -")
    return name


def control_of(relay_url: str) -> str | None:
    """The control-plane address (host:port) of an ``mqtts://`` relay URL; None for plain ``mqtt://``
    (the control plane only speaks TLS with the kit certificate)."""
    u = urlsplit(relay_url)
    if u.scheme != "mqtts" or not u.hostname:
        return None
    return f"{u.hostname}:{u.port or 8883}"


def make_shard(name: str, relay: list[str], control: list[str] | None = None, state: str = "active",
               note: str = "") -> Shard:
    """A checked `Shard`: relay URLs parse, control defaults to the mqtts relay URLs' host:port."""
    from firmware.wire.relay_protocol import parse_broker_url

    check_name(name)
    if state not in STATES:
        raise FleetError(f"shard state {state!r}: one of {', '.join(STATES)}")
    if not relay:
        raise FleetError(f"shard {name}: give at least one --broker URL")
    for url in relay:
        try:
            parse_broker_url(url)
        except ValueError as e:
            raise FleetError(f"shard {name}: {e}") from None
    ctl = list(control or [c for c in (control_of(u) for u in relay) if c])
    for c in ctl:
        host, sep, port = c.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FleetError(f"shard {name}: control broker {c!r}: use host:port")
    return Shard(name, tuple(relay), tuple(ctl), state, note)


def score(name: str, kit_id: str) -> int:
    """The rendezvous weight of shard `name` for `kit_id` (SHA-256: the same on every host and release)."""
    return int.from_bytes(hashlib.sha256(f"{name}\0{kit_id}".encode()).digest()[:8], "big")


def rank(kit_id: str, names: list[str] | tuple[str, ...]) -> list[str]:
    """`names` ordered by rendezvous weight for `kit_id`, best first (ties: by name)."""
    return sorted(names, key=lambda n: (-score(n, kit_id), n))


def assign(kit_id: str, shards: list[Shard], pinned: tuple[str, str | None] | None = None) -> Assignment:
    """Primary and failover of `kit_id` over the active `shards` (or its pin, if every pinned shard exists and is
    not retired). `FleetError` if there is no active shard."""
    by_name = {s.name: s for s in shards}
    if pinned is not None:
        p, f = pinned
        if p in by_name and by_name[p].state != "retired" and (f is None or (f in by_name and
                                                                            by_name[f].state != "retired")):
            return Assignment(kit_id, p, f, pinned=True)
    active = [s.name for s in shards if s.state == "active"]
    if not active:
        raise FleetError("no active broker shard (rekam-fleet shards add NAME --broker URL)")
    order = rank(kit_id, active)
    return Assignment(kit_id, order[0], order[1] if len(order) > 1 else None, names=tuple(order))


def broker_sections(a: Assignment, shards: list[Shard]) -> dict[str, dict[str, list[str]]]:
    """The config keys that put a kit on its shards: relay.brokers and control.brokers, primary first."""
    by_name = {s.name: s for s in shards}
    relay: list[str] = []
    control: list[str] = []
    for n in a.shards:
        s = by_name[n]
        relay += [u for u in s.relay if u not in relay]
        control += [c for c in s.control if c not in control]
    out: dict[str, dict[str, list[str]]] = {"relay": {"brokers": relay}}
    if control:
        out["control"] = {"brokers": control}
    return out


def relay_brokers_of(where: Path | str) -> list[str]:
    """Every relay broker URL of the shards not retired in a fleet registry, in shard-name order: `where` is a fleet
    folder (its ``fleet.json`` registry, else ``fleet.db`` read-only: an ingest host needs no fleet signing key) or
    a PostgreSQL DSN. `FleetError` if there is none."""
    import json
    import sqlite3

    from provisioning import registry_db

    sql = "SELECT relay FROM shards WHERE state != 'retired' ORDER BY name"
    text = str(where)
    if not registry_db.is_dsn(text):
        try:
            text = json.loads((Path(where) / "fleet.json").read_text()).get("registry") or text
        except (OSError, ValueError):
            pass
    if registry_db.is_dsn(text):
        db = registry_db.PostgresDb(text)
        try:
            rows = [(r["relay"],) for r in db.execute(sql)]
        finally:
            db.close()
    else:
        path = Path(where) / "fleet.db"
        if not path.exists():
            raise FleetError(f"{where} has no fleet registry (fleet.db)")
        c = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            rows = list(c.execute(sql))
        except sqlite3.OperationalError as e:
            raise FleetError(f"{path}: {e}") from None
        finally:
            c.close()
    out: list[str] = []
    for (relay,) in rows:
        out += [u for u in json.loads(relay) if u not in out]
    if not out:
        raise FleetError(f"{where}: no broker shard (rekam-fleet shards add NAME --broker URL)")
    return out
