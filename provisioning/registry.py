"""The fleet registry: kits, claims, approvals, revocation, signed config versions, commands, events.

Data lives in a folder (``--data DIR``): ``fleet.db`` (SQLite; or the tables in PostgreSQL with ``--registry DSN``
or ``"registry"`` in fleet.json: `provisioning.registry_db`), ``fleet.json`` (brokers, claim
batches, claim lifetime), ``fleet-signing.key`` (see `provisioning.signer`), ``allowlist.txt`` (kit ids
or hardware serials approved on sight), ``default-config.json`` (the sections every newly claimed kit
gets as config version 1) and ``ca/`` (see `provisioning.ca`).

No network here: `provisioning.fleet_service` answers claims and records kit reports over MQTT,
`provisioning.fleet_ops` publishes what the operator signs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from firmware.errors import CaError, FleetError
from firmware.system.i18n import N_
from firmware.wire import control_protocol as cp
from firmware.wire import relay_protocol as rp
from provisioning import ca, registry_db, shards
from provisioning import clock_corrections as clockfix
from provisioning.signer import ACK_KEY_FILE, KEY_FILE, Signer, load_ack_key
from provisioning.texts import Reason

log = logging.getLogger(__name__)

SCHEMA = registry_db.SQLITE_SCHEMA  # (the PostgreSQL schema: registry_db.MIGRATIONS)


REFUSED_RETRY_S = 3600.0  # a refused clock correction is looked at (and logged) again after this long


class Fleet:
    """The fleet registry (no network; see `FleetService` and `FleetLink` for MQTT)."""

    def __init__(self, data: Path, registry: str | None = None) -> None:
        self.data = Path(data)
        if not (self.data / "fleet.json").exists():
            raise FleetError(Reason(N_("{path} is not a fleet folder (run `rekam-fleet ca init --data {path}`)"),
                                    path=self.data))
        self.settings = json.loads((self.data / "fleet.json").read_text())
        self.ca = ca.CaPaths(self.data / "ca")
        self.signer = Signer.load(self.data / KEY_FILE)
        if not (self.data / ACK_KEY_FILE).exists() and not self.settings.get("ack_public_keys"):
            # A fleet folder from before signed acks: give it its ack key (kits learn it from the next config).
            try:
                Signer.create(self.data / ACK_KEY_FILE)
            except FileExistsError:  # another process of the fleet made it first
                pass
            log.warning("fleet made its data-center ack key path=%s; copy it to the ingest hosts (--ack-key)",
                        self.data / ACK_KEY_FILE)
        self.key = self.signer.key  # the Ed25519 private key, for callers that sign by hand (tests)
        self.registry = registry or self.settings.get("registry") or None
        self.db = registry_db.open_registry(self.data, self.registry)
        self._lock = threading.RLock()
        # (kit, document hash) of clock corrections this process already stored or refused -> when to look again
        # (stored: never; refused: after REFUSED_RETRY_S, since a refusal may end, e.g. the rotation result that
        # proves the signing key arrives after the telemetry). Telemetry repeats them every interval: a refused one
        # is logged once per retry period, not once per message. Bounded, then forgotten.
        self._corrections_seen: dict[tuple[str, str], float] = {}

    # -- set-up -----------------------------------------------------------------------------

    @staticmethod
    def init(data: Path, brokers: list[str], claim_brokers: list[str], hosts: list[str], batch: str = "batch1",
             claim_ttl_h: float = 24.0, registry: str | None = None) -> Fleet:
        """Create a fleet folder: CA, broker certificates, claim certificate, signing key, settings."""
        data = Path(data)
        data.mkdir(parents=True, exist_ok=True)
        ca.init_ca(data / "ca", hosts, batch=batch)
        Signer.create(data / KEY_FILE)
        Signer.create(data / ACK_KEY_FILE)  # the ingest's ack key: copy it to the ingest hosts, never to the kits
        settings: dict[str, Any] = {"brokers": brokers, "claim_brokers": claim_brokers,
                                    "claim_batches": [f"claim-{batch}"], "claim_ttl_hours": claim_ttl_h}
        if registry:
            settings["registry"] = registry  # every process of this fleet uses it (no password here: use PGPASSFILE)
        (data / "fleet.json").write_text(json.dumps(settings, indent=1))
        (data / "allowlist.txt").touch()
        return Fleet(data)

    @property
    def public_key_b64(self) -> str:
        """The fleet's public signing key, base64 (what kits pin)."""
        return self.signer.public_key_b64

    def ack_public_keys(self) -> list[str]:
        """The data-center ack keys kits must trust (base64): ``ack_public_keys`` in fleet.json (a rotation lists
        old and new), else the public half of ``ack-signing.key`` in the fleet folder, else none."""
        listed = self.settings.get("ack_public_keys")
        if isinstance(listed, list) and listed:
            return [str(k) for k in listed]
        if (self.data / ACK_KEY_FILE).exists():
            return [rp.ack_public_b64(load_ack_key(self.data / ACK_KEY_FILE))]
        return []

    def _with_ack_keys(self, sections: dict[str, Any]) -> dict[str, Any]:
        """`sections` with relay.ack_public_keys set (every document carries them: a document replaces the last)."""
        keys = self.ack_public_keys()
        relay = sections.get("relay")
        if not keys or (isinstance(relay, dict) and "ack_public_keys" in relay):
            return sections
        out = dict(sections)
        out["relay"] = {**(relay if isinstance(relay, dict) else {}), "ack_public_keys": keys}
        return out

    def event(self, kind: str, kit_id: str | None = None, **detail: Any) -> None:
        """Append one row to the event log (detail as JSON, capped at 4000 characters)."""
        with self._lock:
            self.db.execute("INSERT INTO events (at, kit_id, kind, detail) VALUES (?,?,?,?)",
                            (int(time.time()), kit_id, kind, json.dumps(detail, default=str)[:4000]))

    # -- kits -------------------------------------------------------------------------------

    def kit(self, kit_id: str) -> sqlite3.Row | None:
        """The registry row of one kit, or None."""
        with self._lock:
            return self.db.execute("SELECT * FROM kits WHERE kit_id = ?", (kit_id,)).fetchone()

    def kits(self) -> list[sqlite3.Row]:
        """Every kit, by id."""
        with self._lock:
            return list(self.db.execute("SELECT * FROM kits ORDER BY kit_id"))

    def allowlisted(self, kit_id: str, serial: str) -> bool:
        """True if `allowlist.txt` names the kit id or its hardware serial (approved on sight)."""
        try:
            lines = (self.data / "allowlist.txt").read_text().split("\n")
        except OSError:
            return False
        entries = {ln.split("#")[0].strip() for ln in lines} - {""}
        return kit_id in entries or (serial not in ("", "unknown") and serial in entries)

    def expire_claims(self, now: float | None = None) -> int:
        """Drop pending claims older than ``claim_ttl_hours``; the kit's next retry renews them."""
        cutoff = int((now or time.time()) - float(self.settings.get("claim_ttl_hours", 24)) * 3600)
        with self._lock:
            n = self.db.execute("DELETE FROM kits WHERE state = 'pending' AND claimed_at < ?", (cutoff,)).rowcount
        if n:
            log.info("expired pending claims count=%d", n)
            self.event("claims_expired", count=n)
        return n

    def approve(self, kit_id: str) -> None:
        """Approve a pending claim; the kit gets its certificate on its next claim attempt."""
        self.expire_claims()
        row = self.kit(kit_id)
        if row is None:
            raise FleetError(Reason(N_("no claim from {kit} (never seen, or expired: the kit will retry)"), kit=kit_id))
        if row["state"] == "revoked":
            raise FleetError(Reason(N_("{kit} is revoked; a revoked kit cannot be approved again"), kit=kit_id))
        with self._lock:
            self.db.execute("UPDATE kits SET state = 'approved', approved_at = ? WHERE kit_id = ?",
                            (int(time.time()), kit_id))
        self.event("approved", kit_id)

    def revoke(self, kit_id: str) -> str | None:
        """Revoke a kit: its certificate goes on the CRL, config and commands for it stop.

        Returns the revoked certificate serial (None if it never got one). The broker must re-read
        the CRL (SIGHUP or restart) for a connected kit to be cut off.
        """
        row = self.kit(kit_id)
        if row is None:
            raise FleetError(Reason(N_("unknown kit {kit}"), kit=kit_id))
        serial = row["cert_serial"]
        if serial:
            ca.revoke(self.ca, serial)
        with self._lock:
            self.db.execute("UPDATE kits SET state = 'revoked', revoked_at = ? WHERE kit_id = ?",
                            (int(time.time()), kit_id))
        self.event("revoked", kit_id, serial=serial)
        return serial

    # -- claims -----------------------------------------------------------------------------

    def handle_claim(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """Answer a claim request: (response topic, payload), or None when it must be ignored."""
        parsed = cp.parse_claim_topic(topic)
        if parsed is None:
            log.warning("claim ignored reason=bad_topic topic=%s", topic)
            return None
        user, topic_kit = parsed
        if user not in self.settings.get("claim_batches", []):
            log.warning("claim ignored reason=unknown_claim_credential user=%s kit_id=%s", user, topic_kit)
            self.event("claim_refused", topic_kit, reason="unknown claim credential", user=user)
            return None
        try:
            body, _, _ = cp.decode(payload, "claim")
            cp.check_claim(body)
            cp.verify(payload, "claim", cp.load_public_b64(body["public_key"]))
        except cp.ProtocolError as e:
            log.warning("claim ignored reason=%s kit_id=%s detail=%s", e.reason, topic_kit, e)
            self.event("claim_refused", topic_kit, reason=str(e))
            return None
        kit_id = body["kit_id"]
        if kit_id != topic_kit:
            log.warning("claim ignored reason=kit_mismatch topic_kit=%s body_kit=%s", topic_kit, kit_id)
            return None
        self.expire_claims()
        now = int(time.time())
        row = self.kit(kit_id)
        resp_topic = cp.claim_response_topic(user, kit_id)

        def answer(status: str, reason: str = "", **extra: Any) -> tuple[str, bytes]:
            b = {"kit_id": kit_id, "nonce": body["nonce"], "status": status, "reason": reason,
                 "fleet_public_key": self.public_key_b64, **extra}
            return resp_topic, self.signer.sign("claim_response", b)

        if row is not None and row["public_key"] != body["public_key"]:
            self.event("claim_refused", kit_id, reason="kit id registered with another key")
            return answer("rejected", "this kit id is registered with another key")
        if row is not None and row["state"] == "revoked":
            return answer("rejected", "this kit is revoked")
        if row is None:
            state = "approved" if self.allowlisted(kit_id, body["hardware_serial"]) else "pending"
            with self._lock:
                self.db.execute("INSERT INTO kits (kit_id, public_key, hardware_serial, software_version, state, "
                                "claim_user, claimed_at, approved_at) VALUES (?,?,?,?,?,?,?,?)",
                                (kit_id, body["public_key"], body["hardware_serial"], body["software_version"],
                                 state, user, now, now if state == "approved" else None))
            self.event("claim", kit_id, state=state, serial=body["hardware_serial"])
            log.info("claim received kit_id=%s serial=%s state=%s", kit_id, body["hardware_serial"], state)
            row = self.kit(kit_id)
        assert row is not None
        if row["state"] == "pending":
            return answer("pending", "waiting for approval (rekam-fleet kits approve)")
        try:
            cert, serial = ca.sign_csr(self.ca, body["csr"], kit_id)
        except CaError as e:
            return answer("rejected", f"bad CSR: {e}")
        if row["cert_serial"] and row["cert_serial"] != serial:
            # A kit only claims when it holds no certificate: the one issued before is unused; revoke it.
            ca.revoke(self.ca, row["cert_serial"])
            self.event("cert_replaced", kit_id, old=row["cert_serial"], new=serial)
        with self._lock:
            self.db.execute("UPDATE kits SET cert_serial = ?, software_version = ?, hardware_serial = ? "
                            "WHERE kit_id = ?", (serial, body["software_version"], body["hardware_serial"], kit_id))
        version, doc = self.latest_config(kit_id) or self.make_config(kit_id, self.default_sections(),
                                                                      note="initial config (claim)")
        self.event("claim_approved", kit_id, serial=serial, config_version=version)
        log.info("claim answered kit_id=%s cert_serial=%s config_version=%d", kit_id, serial, version)
        return answer("approved", certificate=cert.decode(), ca_certificate=self.ca.fleet_ca_crt.read_text(),
                      config=doc.decode())

    def default_sections(self) -> dict[str, Any]:
        """The sections of a newly claimed kit's config version 1 (`default-config.json`)."""
        p = self.data / "default-config.json"
        return json.loads(p.read_text()) if p.exists() else {}

    # -- config -----------------------------------------------------------------------------

    def latest_config(self, kit_id: str) -> tuple[int, bytes] | None:
        """(version, signed document) of the kit's newest config, or None."""
        with self._lock:
            r = self.db.execute("SELECT version, doc FROM configs WHERE kit_id = ? ORDER BY version DESC LIMIT 1",
                                (kit_id,)).fetchone()
        return (r["version"], bytes(r["doc"])) if r else None

    def make_config(self, kit_id: str, sections: dict[str, Any], files: dict[str, str] | None = None,
                    note: str = "") -> tuple[int, bytes]:
        """Sign the next config version for `kit_id` ('*': every approved kit, one shared document)."""
        if kit_id == "*":
            targets = [r["kit_id"] for r in self.kits() if r["state"] == "approved"]
        else:
            row = self.kit(kit_id)
            if row is None or row["state"] == "revoked":
                raise FleetError(f"{kit_id} is {'revoked' if row else 'unknown'}: no config is pushed to it")
            targets = [kit_id]
        with self._lock, self.db.write():
            marks = ",".join("?" * len(targets)) or "''"
            r = self.db.execute(f"SELECT MAX(version) FROM configs WHERE kit_id IN ({marks})", targets).fetchone()
            version = (r[0] or 0) + 1
            body: dict[str, Any] = {"kit_id": kit_id, "version": version, "issued_at": int(time.time()),
                                    "sections": self._with_ack_keys(sections)}
            if files:
                body["files"] = files
            if note:
                body["note"] = note[:200]
            doc = self.signer.sign("config", body)
            table = self.shards()
            for t in targets:
                t_doc = doc
                if table:
                    # With shards every kit's document names its own brokers: one document per kit, same version.
                    a = self.assignment(t, table)
                    t_body = {**body, "kit_id": t,
                              "sections": {**body["sections"], **_merge(body["sections"],
                                                                        shards.broker_sections(a, table))}}
                    t_doc = self.signer.sign("config", t_body)
                    self._record_assignment(a, version)
                    doc = t_doc if kit_id != "*" else doc
                self.db.execute("INSERT INTO configs VALUES (?,?,?,?,?,?,?)",
                                (t, version, body["issued_at"], json.dumps(sections), t_doc, note,
                                 json.dumps(files or {})))
        self.event("config", kit_id, version=version, sections=sorted(sections))
        return version, doc

    # -- broker shards (see provisioning.shards) -----------------------------------------------

    def shards(self) -> list[shards.Shard]:
        """Every broker shard, by name (empty: the fleet.json brokers serve every kit)."""
        with self._lock:
            rows = list(self.db.execute("SELECT * FROM shards ORDER BY name"))
        return [shards.Shard(r["name"], tuple(json.loads(r["relay"])), tuple(json.loads(r["control"])), r["state"],
                             r["note"] or "") for r in rows]

    def shard(self, name: str) -> shards.Shard:
        """One shard by name; `FleetError` if unknown."""
        for s in self.shards():
            if s.name == name:
                return s
        raise FleetError(Reason(N_("unknown broker shard {name}"), name=name))

    def add_shard(self, s: shards.Shard) -> None:
        """Add a shard (`FleetError` if the name exists). Kits move to it only with the next config push."""
        with self._lock:
            try:
                self.db.execute("INSERT INTO shards VALUES (?,?,?,?,?,?)",
                                (s.name, json.dumps(list(s.relay)), json.dumps(list(s.control)), s.state, s.note,
                                 int(time.time())))
            except self.db.IntegrityError:
                raise FleetError(Reason(N_("broker shard {name} exists already"), name=s.name)) from None
        self.event("shard_added", None, name=s.name, relay=list(s.relay), control=list(s.control))

    def set_shard_state(self, name: str, state: str) -> None:
        """Mark a shard active, draining (no new kits; rebalance moves its kits off) or retired."""
        if state not in shards.STATES:
            raise FleetError(f"shard state {state!r}: one of {', '.join(shards.STATES)}")
        self.shard(name)
        with self._lock:
            self.db.execute("UPDATE shards SET state = ? WHERE name = ?", (state, name))
        self.event("shard_state", None, name=name, state=state)

    def pin(self, kit_id: str, primary: str | None, failover: str | None = None) -> None:
        """Pin a kit to shards (None: back to the hashed assignment); takes effect with its next config push."""
        for n in (primary, failover):
            if n is not None:
                self.shard(n)
        if self.kit(kit_id) is None:
            raise FleetError(Reason(N_("unknown kit {kit}"), kit=kit_id))
        with self._lock:
            self.db.execute("INSERT INTO kit_shards (kit_id, pin_primary, pin_failover, at) VALUES (?,?,?,?) "
                            "ON CONFLICT (kit_id) DO UPDATE SET pin_primary = excluded.pin_primary, "
                            "pin_failover = excluded.pin_failover", (kit_id, primary, failover, int(time.time())))
        self.event("shard_pin", kit_id, primary=primary, failover=failover)

    def assignment(self, kit_id: str, table: list[shards.Shard] | None = None) -> shards.Assignment:
        """Where `kit_id` belongs now (its pin, else rendezvous hashing over the active shards)."""
        table = self.shards() if table is None else table
        with self._lock:
            r = self.db.execute("SELECT pin_primary, pin_failover FROM kit_shards WHERE kit_id = ?",
                                (kit_id,)).fetchone()
        pinned = (r["pin_primary"], r["pin_failover"]) if r is not None and r["pin_primary"] else None
        return shards.assign(kit_id, table, pinned)

    def assigned(self, kit_id: str) -> tuple[str, ...]:
        """The shards the kit's newest config names (primary first; empty if none was signed with shards)."""
        with self._lock:
            r = self.db.execute("SELECT primary_shard, failover_shard FROM kit_shards WHERE kit_id = ?",
                                (kit_id,)).fetchone()
        return tuple(n for n in ((r["primary_shard"], r["failover_shard"]) if r else ()) if n)

    def _record_assignment(self, a: shards.Assignment, version: int) -> None:
        self.db.execute("INSERT INTO kit_shards (kit_id, primary_shard, failover_shard, config_version, at) "
                        "VALUES (?,?,?,?,?) ON CONFLICT (kit_id) DO UPDATE SET primary_shard = excluded.primary_shard,"
                        " failover_shard = excluded.failover_shard, config_version = excluded.config_version, "
                        "at = excluded.at", (a.kit_id, a.primary, a.failover, version, int(time.time())))

    def moves(self) -> list[tuple[str, tuple[str, ...], shards.Assignment]]:
        """Approved kits whose current assignment differs from what their newest config says:
        (kit id, shards it was told, where it belongs now)."""
        table = self.shards()
        out = []
        for r in self.kits():
            if r["state"] != "approved":
                continue
            a = self.assignment(r["kit_id"], table)
            old = self.assigned(r["kit_id"])
            if old != a.shards:
                out.append((r["kit_id"], old, a))
        return out

    def kit_brokers(self, kit_id: str) -> list[list[str]]:
        """The control broker lists (one per shard) on which the fleet publishes to `kit_id`: the shards its
        newest config names and those it belongs to now (a kit being moved still listens on the old ones);
        without shards, the fleet.json brokers."""
        table = self.shards()
        if not table:
            return [list(self.settings.get("brokers", []))]
        by_name = {s.name: s for s in table}
        names = list(self.assigned(kit_id))
        try:
            names += [n for n in self.assignment(kit_id, table).shards if n not in names]
        except FleetError:
            pass
        lists = [list(by_name[n].control) for n in names if n in by_name and by_name[n].control]
        return lists or [list(self.settings.get("brokers", []))]

    def service_brokers(self) -> list[list[str]]:
        """Every control broker list the fleet service listens on: fleet.json's (the claim broker's main listener)
        and each shard's that is not retired, without repeats."""
        out: list[list[str]] = []
        for lst in [list(self.settings.get("brokers", []))] + [list(s.control) for s in self.shards()
                                                               if s.state != "retired"]:
            if lst and lst not in out:
                out.append(lst)
        return out

    def next_config(self, kit_id: str, updates: list[dict[str, dict[str, Any]]], files: dict[str, str] | None = None,
                    note: str = "", replace: bool = False) -> tuple[int, bytes]:
        """Sign the next version from the newest one's sections and files with `updates` ({section: {key: value}})
        applied in order (or from nothing with `replace`, and always for '*'). Read, merge and sign are one write
        transaction: two operators pushing at once each build on the other's version, none is lost."""
        with self._lock, self.db.write():
            sections: dict[str, Any] = {}
            base_files: dict[str, str] = {}
            if not replace and kit_id != "*":
                prev = self.configs(kit_id)
                sections = json.loads(prev[-1]["sections"]) if prev else {}
                base_files = json.loads(prev[-1]["files"] or "{}") if prev else {}
            for u in updates:
                for sec, kv in u.items():
                    sections.setdefault(sec, {}).update(kv)
            base_files.update(files or {})
            return self.make_config(kit_id, sections, base_files, note=note)

    def rollback_config(self, kit_id: str, to_version: int | None = None) -> tuple[int, bytes]:
        """Re-issue an earlier version's sections as a NEW version (kits refuse old version numbers)."""
        with self._lock, self.db.write():
            rows = list(self.db.execute("SELECT version, sections, files FROM configs WHERE kit_id = ? "
                                        "ORDER BY version DESC", (kit_id,)))
            if len(rows) < 2 and to_version is None:
                raise FleetError(Reason(N_("{kit} has no earlier config version to roll back to"), kit=kit_id))
            target = rows[1] if to_version is None else next((r for r in rows if r["version"] == to_version), None)
            if target is None:
                raise FleetError(Reason(N_("{kit} has no config version {version}"), kit=kit_id, version=to_version))
            return self.make_config(kit_id, json.loads(target["sections"]), json.loads(target["files"] or "{}"),
                                    note=f"rollback to v{target['version']}")

    def configs(self, kit_id: str) -> list[sqlite3.Row]:
        """Every config version issued to the kit, oldest first."""
        with self._lock:
            return list(self.db.execute("SELECT kit_id, version, issued_at, sections, note, files FROM configs "
                                        "WHERE kit_id = ? ORDER BY version", (kit_id,)))

    # -- commands ---------------------------------------------------------------------------

    def make_command(self, kit_id: str, name: str, args: dict[str, Any] | None = None,
                     ttl_s: int = 300) -> tuple[str, bytes]:
        """Sign a command for one kit; returns (cmd_id, payload)."""
        row = self.kit(kit_id)
        if row is None or row["state"] != "approved":
            raise FleetError(f"{kit_id} is {row['state'] if row else 'unknown'}: commands go only to approved kits")
        if name not in cp.COMMANDS:
            raise FleetError(f"unknown command {name!r} (known: {', '.join(cp.COMMANDS)})")
        now = int(time.time())
        body = {"cmd_id": secrets.token_hex(12), "kit_id": kit_id, "name": name, "args": args or {},
                "issued_at": now, "expires_at": now + ttl_s}
        payload = self.signer.sign("cmd", body)
        with self._lock:
            self.db.execute("INSERT INTO commands (cmd_id, kit_id, name, args, issued_at, expires_at) "
                            "VALUES (?,?,?,?,?,?)", (body["cmd_id"], kit_id, name, json.dumps(args or {}), now,
                                                     body["expires_at"]))
        return body["cmd_id"], payload

    def command(self, cmd_id: str) -> sqlite3.Row | None:
        """The command row (with its result once the kit answered), or None."""
        with self._lock:
            return self.db.execute("SELECT * FROM commands WHERE cmd_id = ?", (cmd_id,)).fetchone()

    # -- what kits report -------------------------------------------------------------------

    def handle_kit_message(self, topic: str, payload: bytes) -> str | None:
        """Record a kit's telemetry, status, config state or command result. Returns the kind, or
        None if the message was refused (unknown/revoked kit, bad signature, malformed)."""
        parsed = cp.parse_kit_topic(topic)
        if parsed is None:
            return None
        kit_id, rest = parsed
        kind = {"telemetry": "telemetry", "status": "status", "config/applied": "config_state",
                "result": "result"}.get(rest)
        row = self.kit(kit_id)
        if kind is None or row is None or row["state"] == "revoked" or not payload:
            return None
        try:
            body = cp.verify(payload, kind, cp.load_public_b64(row["public_key"]))
        except cp.ProtocolError as e:
            if kind == "result" and self._already_recorded(kit_id, payload):
                return kind  # a second copy of a result already verified and recorded: nothing to do
            log.warning("kit message refused kit_id=%s topic=%s reason=%s", kit_id, topic, e.reason)
            self.event("kit_message_refused", kit_id, topic=topic, reason=str(e))
            return None
        now = int(time.time())
        with self._lock:
            self.db.execute("UPDATE kits SET last_seen = ? WHERE kit_id = ?", (now, kit_id))
            if kind == "telemetry":
                self.db.execute("UPDATE kits SET telemetry = ? WHERE kit_id = ?", (json.dumps(body), kit_id))
            elif kind == "status":
                self.db.execute("UPDATE kits SET online = ? WHERE kit_id = ?", (body.get("state", "?"), kit_id))
            elif kind == "config_state":
                self.db.execute("UPDATE kits SET config_state = ? WHERE kit_id = ?", (json.dumps(body), kit_id))
            else:
                self.db.execute("UPDATE commands SET result = ?, result_at = ? WHERE cmd_id = ? AND kit_id = ?",
                                (json.dumps(body), now, body.get("cmd_id"), kit_id))
        if kind == "telemetry":
            self._take_clock_corrections(kit_id, body, row["public_key"])
        if kind == "result" and body.get("name") == "rotate_key" and body.get("ok"):
            self._key_rotated(kit_id, body)
        return kind

    # -- clock corrections (issue #18) ------------------------------------------------------------

    def _take_clock_corrections(self, kit_id: str, body: dict[str, Any], current_key: str) -> int:
        """Keep the signed clock corrections of a verified telemetry message (``clock.corrections``); returns how
        many documents were new. A bad document is refused alone (log line, ``clock_correction_refused`` event,
        once an hour: it is looked at again then), never the telemetry; a document already kept is skipped (the kit
        repeats them)."""
        clock = body.get("clock")
        docs = clock.get("corrections") if isinstance(clock, dict) else None
        if docs is None:
            return 0
        if not isinstance(docs, list) or len(docs) > clockfix.MAX_DOCS:
            self._refuse_correction(kit_id, f"#list:{len(docs) if isinstance(docs, list) else '-'}",
                                    f"clock.corrections is not a list of at most {clockfix.MAX_DOCS} documents")
            return 0
        new = 0
        for doc in docs:
            # the whole document's hash, not its sig: an altered copy of a good document must not hide it
            mark = (kit_id, hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest())
            if self._corrections_seen.get(mark, 0.0) > time.monotonic():
                continue
            try:
                new += self._take_clock_correction(kit_id, doc, current_key)
            except ValueError as e:
                self._refuse_correction(kit_id, mark[1], str(e))
                continue
            except (FleetError, sqlite3.Error, self.db.IntegrityError) as e:
                # storage trouble: not remembered, the next telemetry message tries again
                log.error("clock correction not stored kit_id=%s error=%s", kit_id, e)
                continue
            self._remember_correction(mark)
        return new

    def _remember_correction(self, mark: tuple[str, str], for_s: float = float("inf")) -> None:
        if len(self._corrections_seen) >= 10000:
            self._corrections_seen.clear()
        self._corrections_seen[mark] = time.monotonic() + for_s

    def _refuse_correction(self, kit_id: str, mark: str, reason: str) -> None:
        if self._corrections_seen.get((kit_id, mark), 0.0) > time.monotonic():
            return
        self._remember_correction((kit_id, mark), REFUSED_RETRY_S)
        log.warning("clock correction refused kit_id=%s reason=%s", kit_id, reason)
        self.event("clock_correction_refused", kit_id, reason=reason)

    def _correction_signer(self, kit_id: str, doc: dict[str, Any], current_key: str) -> str:
        """``current:<fingerprint>`` or ``rotated:<fingerprint>`` of the kit key that signed `doc`, or "".

        Tried: the kit's current key, then the keys it rotated away from (its verified `rotate_key` results, newest
        first). A correction issued before a rotation is repeated inside telemetry signed by the new key; it stays
        valid with the key it was signed with, which the registry saw this kit prove it held."""
        from firmware.wire import clock_correction

        for label, key_b64 in self._correction_keys(kit_id, current_key):
            try:
                key = cp.load_public_b64(key_b64)
            except cp.ProtocolError:
                continue
            if clock_correction.verify(doc, key):
                return f"{label}:{cp.key_fingerprint(key_b64)}"
        return ""

    def _correction_keys(self, kit_id: str, current_key: str) -> Iterator[tuple[str, str]]:
        """(label, base64 key): the current key first; then, only if asked for (lazily), the keys it rotated away
        from, following the chain back from the current key: a recorded ``rotate_key`` result (verified with the
        key registered then) whose proof verifies and whose new key is the current key or one found before."""
        yield "current", current_key
        with self._lock:
            rows = list(self.db.execute("SELECT result FROM commands WHERE kit_id = ? AND name = 'rotate_key' AND "
                                        "result IS NOT NULL ORDER BY result_at DESC LIMIT 20", (kit_id,)))
        pairs: list[tuple[str, str]] = []
        for r in rows:
            try:
                res = json.loads(r["result"])
                if res.get("ok"):
                    pairs.append(_rotation_proven(res["data"]))
            except (ValueError, KeyError, TypeError, AttributeError, cp.ProtocolError, InvalidSignature):
                continue
        chain = [current_key]
        grew = True
        while grew:  # each pass may go one rotation further back (at most 20 results: bounded)
            grew = False
            for old, new in pairs:
                if new in chain and old not in chain:
                    chain.append(old)
                    grew = True
                    yield "rotated", old

    def _take_clock_correction(self, kit_id: str, doc: Any, current_key: str) -> int:
        """Check, verify and keep one correction document (1: kept now, 0: already kept); raises ValueError."""
        segments = clockfix.check(doc, kit_id)
        with self._lock:
            if self.db.execute("SELECT 1 FROM clock_corrections WHERE kit_id = ? AND sig = ?",
                               (kit_id, doc["sig"])).fetchone():
                return 0
        verified = self._correction_signer(kit_id, doc, current_key)
        if not verified:
            raise ValueError("signature does not verify with the kit's key (current, or one it rotated away from)")
        now = int(time.time())
        with self._lock, self.db.write():
            for s in segments:
                hit = self.db.execute("SELECT boot_id, first_seq, last_seq FROM clock_segments WHERE kit_id = ? AND "
                                      "first_seq <= ? AND last_seq >= ? LIMIT 1",
                                      (kit_id, s.last_seq, s.first_seq)).fetchone()
                if hit is not None:
                    raise ValueError(f"segment {s.first_seq}..{s.last_seq} overlaps {hit['first_seq']}.."
                                     f"{hit['last_seq']} of boot {hit['boot_id']} already kept")
            r = self.db.execute(
                "INSERT INTO clock_corrections (kit_id, boot_id, source, issued, reason, sig, doc, verified_key, "
                "received_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (kit_id, sig) DO NOTHING RETURNING id",
                (kit_id, doc["boot_id"], doc["source"], doc["issued"], doc.get("reason"), doc["sig"],
                 json.dumps(doc, sort_keys=True), verified, now)).fetchone()
            if r is None:
                return 0  # another fleet process kept it first
            for s in segments:
                self.db.execute("INSERT INTO clock_segments (kit_id, boot_id, first_seq, last_seq, records, offset_s, "
                                "correction_id) VALUES (?,?,?,?,?,?,?)",
                                (kit_id, doc["boot_id"], s.first_seq, s.last_seq, s.records, s.offset_s, r[0]))
        log.info("clock correction kept kit_id=%s id=%s boot_id=%s source=%s segments=%d key=%s", kit_id, r[0],
                 doc["boot_id"], doc["source"], len(segments), verified)
        self.event("clock_correction", kit_id, id=r[0], boot_id=doc["boot_id"], source=doc["source"],
                   segments=[[s.first_seq, s.last_seq, s.offset_s] for s in segments[:20]], key=verified)
        return 1

    def clock_corrections(self, kit_id: str) -> list[dict[str, Any]]:
        """The clock corrections kept for `kit_id`, oldest first, each with its segments (`rekam-fleet kits
        clock`)."""
        with self._lock:
            docs = [dict(r) for r in self.db.execute(
                "SELECT id, boot_id, source, issued, reason, verified_key, received_at FROM clock_corrections "
                "WHERE kit_id = ? ORDER BY id", (kit_id,))]
            segs = list(self.db.execute("SELECT correction_id, first_seq, last_seq, records, offset_s FROM "
                                        "clock_segments WHERE kit_id = ? ORDER BY first_seq", (kit_id,)))
        by_id: dict[int, list[dict[str, Any]]] = {}
        for s in segs:
            by_id.setdefault(s["correction_id"], []).append(
                {"first_seq": s["first_seq"], "last_seq": s["last_seq"], "records": s["records"],
                 "offset_s": s["offset_s"]})
        return [{**d, "segments": by_id.get(d["id"], [])} for d in docs]

    def _already_recorded(self, kit_id: str, payload: bytes) -> bool:
        """True if `payload` is a command result whose body is exactly the one already recorded (verified then).

        The fleet service and a `rekam-fleet cmd send` both see every result. For a key rotation the first to
        handle it registers the new key, so the second copy no longer verifies against the current key;
        it is a duplicate, not a forgery, when its body equals what was recorded. Nothing is changed for it.
        """
        try:
            body = cp.decode(payload, "result")[0]
        except cp.ProtocolError:
            return False
        with self._lock:
            r = self.db.execute("SELECT result FROM commands WHERE cmd_id = ? AND kit_id = ?",
                                (body.get("cmd_id"), kit_id)).fetchone()
        return r is not None and r["result"] is not None and json.loads(r["result"]) == body

    def _key_rotated(self, kit_id: str, body: dict[str, Any]) -> None:
        d = body.get("data", {})
        try:
            _rotation_proven(d)
        except (KeyError, cp.ProtocolError, InvalidSignature, ValueError, TypeError) as e:
            log.error("key rotation result refused kit_id=%s error=%s", kit_id, e)
            self.event("key_rotation_refused", kit_id, error=str(e))
            return
        with self._lock:
            self.db.execute("UPDATE kits SET public_key = ? WHERE kit_id = ?", (d["new_public_key"], kit_id))
        self.event("key_rotated", kit_id, new=cp.key_fingerprint(d["new_public_key"]))
        log.info("kit key rotated kit_id=%s new_key=%s", kit_id, cp.key_fingerprint(d["new_public_key"]))

    def status_rows(self) -> list[dict[str, Any]]:
        """One row per kit for `rekam-fleet status`."""
        out = []
        for r in self.kits():
            t = json.loads(r["telemetry"]) if r["telemetry"] else {}
            cs = json.loads(r["config_state"]) if r["config_state"] else {}
            media = {m["name"]: m for m in t.get("media", [])}
            out.append({"kit_id": r["kit_id"], "state": r["state"], "online": r["online"] or "-",
                        "last_seen": r["last_seen"], "backlog": t.get("backlog", {}).get("records"),
                        "sd_free_mb": _mb(media.get("sd", {}).get("free_bytes")),
                        "usb_free_mb": _mb(media.get("usb", {}).get("free_bytes")),
                        "halted": ", ".join(t.get("halt_reasons", [])) if t.get("halted") else "",
                        "locked": t.get("locked", ""), "config": cs.get("running")})
        return out

    def close(self) -> None:
        """Close the database."""
        self.db.close()


def _rotation_proven(d: Any) -> tuple[str, str]:
    """(old, new) base64 keys of a rotate_key result's data whose proof verifies (the new key signed both);
    raises KeyError, ProtocolError, InvalidSignature, ValueError or TypeError otherwise."""
    import base64

    new = cp.load_public_b64(d["new_public_key"])
    old = cp.load_public_b64(d["old_public_key"])
    new.verify(base64.b64decode(d["proof"]), b"rekam-key-rotation:" + cp.public_raw(old) + cp.public_raw(new))
    return str(d["old_public_key"]), str(d["new_public_key"])


def _merge(base: dict[str, Any], over: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sections of `over`, each merged over the same section of `base` (a shallow key merge)."""
    return {name: {**(base.get(name) or {}), **keys} for name, keys in over.items()}


def _mb(v: Any) -> int | None:
    return int(v) // (1024 * 1024) if isinstance(v, int) else None

