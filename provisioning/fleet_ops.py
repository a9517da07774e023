"""What the operator does to the fleet, as library calls (`rekam-fleet ca|kits|config|cmd`): create the
fleet folder, revoke, issue, sign and publish config, send a command and wait for its result.

Each call signs or changes the registry (`provisioning.registry.Fleet`) and, unless told to stay
offline, publishes through a short-lived `FleetLink` with the fleet certificate. Errors are
`firmware.errors` classes (`FleetError`, `CaError`); the CLI prints them.
"""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Any

from firmware.errors import CaError, FleetError
from firmware.system.i18n import N_
from firmware.system.mqtt import Message, client_id
from firmware.wire import control_protocol as cp
from provisioning import ca
from provisioning.fleet_link import FleetLink
from provisioning.registry import Fleet
from provisioning.texts import Reason

PUBLISH_TIMEOUT_S = 15.0  # how long a CLI publish waits for the broker's PUBACKs
CONNECT_TIMEOUT_S = 5.0  # how long a CLI publish waits for one shard's broker to answer


def open_fleet(data: Path, registry: str | None = None) -> Fleet:
    """The fleet folder at `data` (its registry: `registry` if given, else fleet.json's, else fleet.db); `FleetError`
    if it is not one or cannot be read."""
    try:
        return Fleet(Path(data), registry)
    except FleetError:
        raise
    except (OSError, ValueError) as e:
        raise FleetError(str(e)) from e


def create_fleet(data: Path, brokers: list[str], claim_brokers: list[str], hosts: list[str], batch: str,
                 claim_ttl_h: float, port: int, claim_port: int, registry: str | None = None) -> tuple[Fleet, Path]:
    """`rekam-fleet ca init`: the fleet folder and its broker config; returns (fleet, mosquitto.conf). `registry`:
    a PostgreSQL DSN for the registry (recorded in fleet.json), else fleet.db."""
    try:
        f = Fleet.init(Path(data), brokers, claim_brokers, hosts, batch, claim_ttl_h, registry=registry)
    except FileExistsError as e:  # the signing key: every kit pins it, never replaced
        raise CaError(str(e)) from e
    return f, ca.render_broker_config(f.ca, Path(data) / "broker", port=port, claim_port=claim_port)


def issue_certificate(f: Fleet, kit_id: str, out: Path, csr: Path | None = None) -> str:
    """A kit certificate without a claim, from its CSR or with a new key made here; returns its serial."""
    try:
        if csr is not None:
            pem, serial = ca.sign_csr(f.ca, Path(csr).read_bytes(), kit_id)
            out.mkdir(parents=True, exist_ok=True)
            (out / "kit.crt").write_bytes(pem)
            return serial
        return ca.issue_kit_files(f.ca, kit_id, out)[2]
    except OSError as e:
        raise CaError(str(e)) from e


def publish(f: Fleet, items: list[tuple[str, bytes, bool]], brokers: list[str] | None = None) -> None:
    """Publish (topic, payload, retain) items on `brokers` (one shard's control brokers; default fleet.json's) and
    wait for the broker; `FleetError` if it refused any or none answered."""
    link = FleetLink(f, client_id("fleet", "cli"), brokers=brokers).start(CONNECT_TIMEOUT_S)
    try:
        for topic, payload, retain in items:
            link.publish(topic, payload, retain=retain)
        refused = link.flush(timeout=PUBLISH_TIMEOUT_S)
    finally:
        link.close()
    if refused:
        raise FleetError("broker refused: " + "; ".join(f"{t} ({r})" for t, r in refused))


def publish_to_kits(f: Fleet, items: list[tuple[str, str, bytes, bool]],
                    before: dict[str, list[list[str]]] | None = None) -> list[str]:
    """Publish (kit id, topic, payload, retain) items on the broker shards of each kit (`Fleet.kit_brokers`: its
    primary and failover, and the old ones of a kit being moved), one connection per shard.

    Returns warnings for shards that could not be reached while another shard of the same kit took the message;
    `FleetError` if some kit's message reached none of its shards. `before`: broker lists per kit taken before
    the document was signed (a config that moves a kit must also reach the shards it is leaving)."""
    groups: dict[tuple[str, ...], list[tuple[str, bytes, bool]]] = {}
    wants: dict[str, list[tuple[str, ...]]] = {}
    for kit, topic, payload, retain in items:
        lists = [*(before or {}).get(kit, []), *f.kit_brokers(kit)]
        for lst in [x for i, x in enumerate(lists) if x not in lists[:i]]:
            groups.setdefault(tuple(lst), []).append((topic, payload, retain))
            wants.setdefault(kit, []).append(tuple(lst))
    failed: dict[tuple[str, ...], str] = {}
    for lst, its in groups.items():
        try:
            publish(f, its, list(lst))
        except FleetError as e:
            failed[lst] = str(e)
    unreached = sorted(k for k, lists in wants.items() if all(lst in failed for lst in lists))
    if unreached:
        raise FleetError(f"no broker shard reached for {', '.join(unreached[:10])}: "
                         + "; ".join(f"{','.join(lst)}: {why}" for lst, why in failed.items()))
    return [f"shard {','.join(lst)} not reached ({why}); its kits got it on another shard"
            for lst, why in failed.items()]


def revoke_kit(f: Fleet, kit_id: str, offline: bool = False) -> tuple[str | None, str]:
    """Revoke a kit and clear its retained config; returns (certificate serial, warning or "").

    Clearing the retained config is best effort: the kit is revoked in the registry and on the CRL
    whatever the broker says.
    """
    serial = f.revoke(kit_id)
    if offline:
        return serial, ""
    try:  # clear the retained config so nothing more reaches it
        publish_to_kits(f, [(kit_id, cp.config_topic(kit_id), b"", True)])
    except FleetError as e:
        return serial, f"retained config not cleared: {e}"
    return serial, ""


def _targets(f: Fleet, kit_id: str) -> list[str]:
    return [kit_id] if kit_id != "*" else [r["kit_id"] for r in f.kits() if r["state"] == "approved"]


def _brokers_before(f: Fleet, kit_id: str) -> dict[str, list[list[str]]]:
    """Where each target listens now (before a new document may move it)."""
    return {t: f.kit_brokers(t) for t in _targets(f, kit_id)} if f.shards() else {}


def _publish_config(f: Fleet, kit_id: str, doc: bytes, offline: bool,
                    before: dict[str, list[list[str]]] | None = None) -> int | None:
    if offline:
        return None
    targets = _targets(f, kit_id)
    items = []
    for t in targets:  # with shards each kit has its own document (its brokers); without, `doc` is everyone's
        latest = f.latest_config(t) if f.shards() else None
        items.append((t, cp.config_topic(t), latest[1] if latest else doc, True))
    publish_to_kits(f, items, before)  # FleetError if not acknowledged
    return len(targets)


def push_config(f: Fleet, kit_id: str, updates: list[dict[str, dict[str, Any]]], attach: list[Path] | None = None,
                note: str = "", replace: bool = False, offline: bool = False) -> tuple[int, int | None]:
    """Sign the next config version and publish it retained; returns (version, kits published to or None).

    A document is the kit's complete set of overrides: unless `replace`, it starts from the previous
    version's sections and files, then applies `updates` ({section: {key: value}}) in order.
    """
    files = {Path(p).name: Path(p).read_text() for p in (attach or [])}
    before = _brokers_before(f, kit_id)
    version, doc = f.next_config(kit_id, updates, files, note=note, replace=replace)
    return version, _publish_config(f, kit_id, doc, offline, before)


def rollback_config(f: Fleet, kit_id: str, to_version: int | None = None,
                    offline: bool = False) -> tuple[int, int | None]:
    """Re-issue an earlier version as a new one and publish it; returns (version, kits published to or None)."""
    before = _brokers_before(f, kit_id)
    version, doc = f.rollback_config(kit_id, to_version)
    return version, _publish_config(f, kit_id, doc, offline, before)


def config_report(f: Fleet, kit_id: str) -> dict[str, Any]:
    """The versions issued to a kit and the config state it reports (`rekam-fleet config show`)."""
    row = f.kit(kit_id)
    if row is None:
        raise FleetError(Reason(N_("unknown kit {kit}"), kit=kit_id))
    state = json.loads(row["config_state"]) if row["config_state"] else {}
    return {"kit_id": kit_id, "kit_reports": state,
            "versions": [{"version": r["version"], "issued_at": r["issued_at"], "note": r["note"],
                          "sections": json.loads(r["sections"])} for r in f.configs(kit_id)]}


def send_command(f: Fleet, kit: str, name: str, args: dict[str, Any], ttl: int, wait: float) -> dict[str, Any] | None:
    """Send one signed command and wait up to `wait` seconds for its result (None if none came)."""
    cmd_id, payload = f.make_command(kit, name, args, ttl)
    got: queue.Queue[dict[str, Any]] = queue.Queue()

    def on_message(_link: FleetLink, msg: Message) -> None:
        # Record every result (handle_kit_message first), then pick out this command's.
        if f.handle_kit_message(msg.topic, msg.payload) == "result" and msg.correlation == cmd_id.encode():
            r = f.command(cmd_id)
            if r is not None and r["result"]:
                got.put(json.loads(r["result"]))

    # On every shard of the kit (it is connected to one of them; a copy on another is refused as a replay).
    links: list[FleetLink] = []
    errors: list[str] = []
    try:
        for lst in f.kit_brokers(kit):
            try:
                links.append(FleetLink(f, client_id("fleet", "cli"), on_message, (cp.result_topic(kit),),
                                       brokers=lst).start(CONNECT_TIMEOUT_S))
            except FleetError as e:
                errors.append(str(e))
        if not links:
            raise FleetError("; ".join(errors))
        time.sleep(0.2)  # let the SUBACK in before the command goes out
        for link in links:
            link.publish(cp.cmd_topic(kit), payload, response_topic=cp.result_topic(kit),
                         correlation=cmd_id.encode())
        try:
            return got.get(timeout=wait) if wait > 0 else None
        except queue.Empty:
            return None
    finally:
        for link in links:
            link.close()


# -- broker shards -----------------------------------------------------------------------------


def add_shard(f: Fleet, name: str, relay: list[str], control: list[str] | None = None, note: str = "",
              hosts: list[str] | None = None, port: int = 8883, claim_port: int = 8884) -> Path | None:
    """`rekam-fleet shards add`: a new shard in the registry; with `hosts`, also its broker's server certificate
    and mosquitto configuration (``<data>/shards/<name>/``), returned. Kits move to it with `rebalance`."""
    from provisioning import shards

    s = shards.make_shard(name, relay, control, note=note)
    conf = None
    if hosts:
        conf = ca.render_shard_broker(f.ca, f.data / "shards" / name, name, hosts, port=port, claim_port=claim_port)
    f.add_shard(s)
    return conf


def rebalance(f: Fleet, offline: bool = False, limit: int = 0) -> list[tuple[str, tuple[str, ...], tuple[str, ...],
                                                                                int]]:
    """`rekam-fleet shards rebalance`: push a new config version (same sections, new brokers) to every approved kit
    whose shard assignment changed (a shard added, drained, retired, or a pin); returns (kit, old shards, new
    shards, version) per kit moved. `limit` > 0 moves at most that many (a gradual move)."""
    moved = []
    for kit, old, a in f.moves()[: limit or None]:
        version, _published = push_config(f, kit, [], note=f"shard move {'+'.join(old) or '-'} -> "
                                                         f"{'+'.join(a.shards)}", offline=offline)
        moved.append((kit, old, a.shards, version))
    return moved
