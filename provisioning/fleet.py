"""Fleet side of the control plane: kit registry, claims, signed config and commands, telemetry.

Data lives in a folder (``--data DIR``): ``fleet.db`` (SQLite), ``fleet.json`` (brokers, claim
batches, claim lifetime), ``fleet-signing.key`` (Ed25519; its public half is pinned by every kit),
``allowlist.txt`` (kit ids or hardware serials approved on sight), ``default-config.json`` (the
sections every newly claimed kit gets as config version 1) and ``ca/`` (see `provisioning.ca`).

`FleetService` (``rekam-fleet serve``) holds the fleet's MQTT connection: it answers claims and
records what kits report. The CLI commands that publish (config push, cmd send) open their own
short connection with the same fleet certificate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import secrets
import socket
import sqlite3
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.errors import FleetError
from firmware.wire import control_protocol as cp
from provisioning import ca

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kits (
    kit_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, hardware_serial TEXT, software_version TEXT,
    state TEXT NOT NULL, claim_user TEXT, claimed_at INTEGER, approved_at INTEGER, revoked_at INTEGER,
    cert_serial TEXT, last_seen INTEGER, online TEXT, telemetry TEXT, config_state TEXT, note TEXT);
CREATE TABLE IF NOT EXISTS configs (
    kit_id TEXT NOT NULL, version INTEGER NOT NULL, issued_at INTEGER NOT NULL, sections TEXT NOT NULL,
    doc BLOB NOT NULL, note TEXT, files TEXT, PRIMARY KEY (kit_id, version));
CREATE TABLE IF NOT EXISTS commands (
    cmd_id TEXT PRIMARY KEY, kit_id TEXT NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL,
    issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, result TEXT, result_at INTEGER);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, at INTEGER NOT NULL, kit_id TEXT, kind TEXT NOT NULL, detail TEXT);
"""


class Fleet:
    """The fleet registry and signer (no network; see `FleetService` and `FleetLink` for MQTT)."""

    def __init__(self, data: Path) -> None:
        self.data = Path(data)
        if not (self.data / "fleet.json").exists():
            raise FleetError(f"{self.data} is not a fleet folder (run `rekam-fleet ca init --data {self.data}`)")
        self.settings = json.loads((self.data / "fleet.json").read_text())
        self.ca = ca.CaPaths(self.data / "ca")
        key = serialization.load_pem_private_key((self.data / "fleet-signing.key").read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise FleetError("fleet-signing.key is not an Ed25519 key")
        self.key = key
        self.db = sqlite3.connect(self.data / "fleet.db", check_same_thread=False, isolation_level=None, timeout=10)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self._lock = threading.RLock()

    # -- set-up -----------------------------------------------------------------------------

    @staticmethod
    def init(data: Path, brokers: list[str], claim_brokers: list[str], hosts: list[str], batch: str = "batch1",
             claim_ttl_h: float = 24.0) -> Fleet:
        """Create a fleet folder: CA, broker certificates, claim certificate, signing key, settings."""
        data = Path(data)
        data.mkdir(parents=True, exist_ok=True)
        ca.init_ca(data / "ca", hosts, batch=batch)
        key = Ed25519PrivateKey.generate()
        fd = os.open(data / "fleet-signing.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        (data / "fleet.json").write_text(json.dumps({"brokers": brokers, "claim_brokers": claim_brokers,
                                                     "claim_batches": [f"claim-{batch}"],
                                                     "claim_ttl_hours": claim_ttl_h}, indent=1))
        (data / "allowlist.txt").touch()
        return Fleet(data)

    @property
    def public_key_b64(self) -> str:
        return cp.public_b64(self.key)

    def event(self, kind: str, kit_id: str | None = None, **detail: Any) -> None:
        with self._lock:
            self.db.execute("INSERT INTO events (at, kit_id, kind, detail) VALUES (?,?,?,?)",
                            (int(time.time()), kit_id, kind, json.dumps(detail, default=str)[:4000]))

    # -- kits -------------------------------------------------------------------------------

    def kit(self, kit_id: str) -> sqlite3.Row | None:
        with self._lock:
            return self.db.execute("SELECT * FROM kits WHERE kit_id = ?", (kit_id,)).fetchone()

    def kits(self) -> list[sqlite3.Row]:
        with self._lock:
            return list(self.db.execute("SELECT * FROM kits ORDER BY kit_id"))

    def allowlisted(self, kit_id: str, serial: str) -> bool:
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
            raise FleetError(f"no claim from {kit_id} (never seen, or expired: the kit will retry)")
        if row["state"] == "revoked":
            raise FleetError(f"{kit_id} is revoked; a revoked kit cannot be approved again")
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
            raise FleetError(f"unknown kit {kit_id}")
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
            return resp_topic, cp.sign("claim_response", b, self.key)

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
        except ca.CaError as e:
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
        p = self.data / "default-config.json"
        return json.loads(p.read_text()) if p.exists() else {}

    # -- config -----------------------------------------------------------------------------

    def latest_config(self, kit_id: str) -> tuple[int, bytes] | None:
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
        with self._lock:
            marks = ",".join("?" * len(targets)) or "''"
            r = self.db.execute(f"SELECT MAX(version) FROM configs WHERE kit_id IN ({marks})", targets).fetchone()
            version = (r[0] or 0) + 1
            body: dict[str, Any] = {"kit_id": kit_id, "version": version, "issued_at": int(time.time()),
                                    "sections": sections}
            if files:
                body["files"] = files
            if note:
                body["note"] = note[:200]
            doc = cp.sign("config", body, self.key)
            for t in targets:
                self.db.execute("INSERT INTO configs VALUES (?,?,?,?,?,?,?)",
                                (t, version, body["issued_at"], json.dumps(sections), doc, note,
                                 json.dumps(files or {})))
        self.event("config", kit_id, version=version, sections=sorted(sections))
        return version, doc

    def rollback_config(self, kit_id: str, to_version: int | None = None) -> tuple[int, bytes]:
        """Re-issue an earlier version's sections as a NEW version (kits refuse old version numbers)."""
        with self._lock:
            rows = list(self.db.execute("SELECT version, sections, files FROM configs WHERE kit_id = ? "
                                        "ORDER BY version DESC", (kit_id,)))
        if len(rows) < 2 and to_version is None:
            raise FleetError(f"{kit_id} has no earlier config version to roll back to")
        target = rows[1] if to_version is None else next((r for r in rows if r["version"] == to_version), None)
        if target is None:
            raise FleetError(f"{kit_id} has no config version {to_version}")
        return self.make_config(kit_id, json.loads(target["sections"]), json.loads(target["files"] or "{}"),
                                note=f"rollback to v{target['version']}")

    def configs(self, kit_id: str) -> list[sqlite3.Row]:
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
        payload = cp.sign("cmd", body, self.key)
        with self._lock:
            self.db.execute("INSERT INTO commands (cmd_id, kit_id, name, args, issued_at, expires_at) "
                            "VALUES (?,?,?,?,?,?)", (body["cmd_id"], kit_id, name, json.dumps(args or {}), now,
                                                     body["expires_at"]))
        return body["cmd_id"], payload

    def command(self, cmd_id: str) -> sqlite3.Row | None:
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
        if kind == "result" and body.get("name") == "rotate_key" and body.get("ok"):
            self._key_rotated(kit_id, body)
        return kind

    def _key_rotated(self, kit_id: str, body: dict[str, Any]) -> None:
        import base64

        d = body.get("data", {})
        try:
            new = cp.load_public_b64(d["new_public_key"])
            old = cp.load_public_b64(d["old_public_key"])
            new.verify(base64.b64decode(d["proof"]),
                       b"rekam-key-rotation:" + cp.public_raw(old) + cp.public_raw(new))
        except (KeyError, cp.ProtocolError, InvalidSignature, ValueError) as e:
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
        self.db.close()


def _mb(v: Any) -> int | None:
    return int(v) // (1024 * 1024) if isinstance(v, int) else None


# --- MQTT ---------------------------------------------------------------------------------------


class FleetLink:
    """The fleet's MQTT connection (client certificate CN ``fleet``). One thread owns the client;
    `publish`/`subscribe` from any thread enqueue; received messages go to `on_message`."""

    def __init__(self, fleet: Fleet, client_id: str, on_message: Any = None,
                 subscriptions: tuple[str, ...] = ()) -> None:
        self.fleet = fleet
        self.client_id = client_id
        self.on_message = on_message
        self.subscriptions = subscriptions
        self.connected = threading.Event()
        self.stop = threading.Event()
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.inflight: dict[int, str] = {}  # mid -> topic, until its PUBACK
        self.refused: list[tuple[str, str]] = []  # (topic, reason) of publishes the broker refused
        self._queued = 0

    def start(self, timeout: float = 10) -> FleetLink:
        self._thread = threading.Thread(target=self._run, name=f"fleet-{self.client_id}", daemon=True)
        self._thread.start()
        if not self.connected.wait(timeout):
            self.close()
            raise FleetError(f"cannot reach any broker of {self.fleet.settings.get('brokers')}")
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False, response_topic: str | None = None,
                correlation: bytes | None = None) -> None:
        self._queued += 1
        self._out.put(("pub", (topic, payload, retain, response_topic, correlation)))

    def _client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.fleet.ca.fleet_ca_crt))
        ctx.load_cert_chain(str(self.fleet.ca.fleet_crt), str(self.fleet.ca.fleet_key))
        c.tls_set_context(ctx)
        c.on_connect = lambda _c, _u, _f, rc, _p: self._events.put(("connect", rc))
        c.on_message = lambda _c, _u, msg: self._events.put(("message", msg))
        c.on_publish = lambda _c, _u, mid, rc, _p: self._events.put(("puback", (mid, rc)))
        return c

    def _run(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        brokers = self.fleet.settings.get("brokers", [])
        n = 0
        while not self.stop.is_set():
            host, _, port = brokers[n % len(brokers)].rpartition(":")
            n += 1
            c = self._client()
            try:
                c.connect(host, int(port), keepalive=30, clean_start=True)
            except (OSError, ssl.SSLError) as e:
                log.warning("fleet connect failed broker=%s:%s error=%s", host, port, e)
                self.stop.wait(1)
                continue
            try:  # small request/response messages: no Nagle delay
                c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            while not self.stop.is_set():
                if c.loop(timeout=0.02) != 0:
                    self.connected.clear()
                    break
                while True:
                    try:
                        kind, arg = self._events.get_nowait()
                    except queue.Empty:
                        break
                    if kind == "connect" and not arg.is_failure:
                        if self.subscriptions:
                            c.subscribe([(s, 1) for s in self.subscriptions])
                        self.connected.set()
                    elif kind == "message" and self.on_message is not None:
                        try:
                            self.on_message(self, arg)
                        except Exception:
                            log.exception("fleet message handler failed topic=%s", arg.topic)
                    elif kind == "puback":
                        topic = self.inflight.pop(arg[0], "?")
                        if arg[1].is_failure:
                            log.error("fleet publish refused topic=%s reason=%s", topic, arg[1])
                            self.refused.append((topic, str(arg[1])))
                if not self.connected.is_set():
                    continue
                while True:
                    try:
                        kind, arg = self._out.get_nowait()
                    except queue.Empty:
                        break
                    topic, payload, retain, resp, corr = arg
                    props = None
                    if resp or corr:
                        props = Properties(PacketTypes.PUBLISH)
                        if resp:
                            props.ResponseTopic = resp
                        if corr:
                            props.CorrelationData = corr
                    info = c.publish(topic, payload, qos=1, retain=retain, properties=props)
                    self.inflight[info.mid] = topic
                    self._queued -= 1
            c.disconnect()
            for _ in range(5):
                c.loop(timeout=0.05)

    def flush(self, timeout: float = 5) -> list[tuple[str, str]]:
        """Wait until everything published so far is acknowledged by the broker (PUBACK); returns the
        (topic, reason) of publishes it refused, and raises `FleetError` on timeout."""
        deadline = time.monotonic() + timeout
        while (self._queued > 0 or self.inflight) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._queued > 0 or self.inflight:
            raise FleetError(f"{self._queued + len(self.inflight)} message(s) not acknowledged within {timeout:.0f} s")
        return list(self.refused)

    def close(self) -> None:
        self.stop.set()
        if self._thread:
            self._thread.join(timeout=5)


class FleetService:
    """``rekam-fleet serve``: answers claims, records telemetry/status/config state/results."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.link = FleetLink(fleet, f"fleet-service-{secrets.token_hex(3)}", self._on_message, cp.FLEET_FILTERS)
        self.received: queue.Queue[tuple[str, str]] = queue.Queue()  # (kind, kit_id) for watchers/tests

    def start(self) -> FleetService:
        self.link.start()
        return self

    def _on_message(self, link: FleetLink, msg: Any) -> None:
        payload = bytes(msg.payload)
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
        self.link.close()


# --- CLI -----------------------------------------------------------------------------------------


def _fleet(args: argparse.Namespace) -> Fleet:
    try:
        return Fleet(Path(args.data))
    except (FleetError, OSError, ValueError) as e:
        raise SystemExit(f"rekam-fleet: {e}") from None


def cmd_ca_init(args: argparse.Namespace) -> int:
    try:
        f = Fleet.init(Path(args.data), args.broker, args.claim_broker, args.host, args.batch, args.claim_ttl_hours)
    except (ca.CaError, FileExistsError) as e:
        print(f"rekam-fleet: {e}", file=sys.stderr)
        return 1
    conf = ca.render_broker_config(f.ca, Path(args.data) / "broker", port=args.port, claim_port=args.claim_port)
    print(f"fleet created in {args.data}\n  fleet key  {cp.key_fingerprint(f.public_key_b64)} ({f.public_key_b64})\n"
          f"  broker     {conf} (mosquitto -c {conf})\n"
          f"  kit image  ca/fleet-ca.crt -> control.ca_file, ca/claim-{args.batch}.crt/.key -> control.claim_*")
    return 0


def cmd_ca_crl(args: argparse.Namespace) -> int:
    f = _fleet(args)
    print(ca.write_crl(f.ca))
    return 0


def cmd_kits_list(args: argparse.Namespace) -> int:
    f = _fleet(args)
    rows = f.kits()
    if args.json:
        print(json.dumps([dict(r) for r in rows], indent=1, default=str))
        return 0
    print(f"{'kit':16} {'state':9} {'serial':18} {'version':8} {'key':17} claimed")
    for r in rows:
        print(f"{r['kit_id']:16} {r['state']:9} {(r['hardware_serial'] or '-')[:18]:18} "
              f"{(r['software_version'] or '-'):8} {cp.key_fingerprint(r['public_key']):17} "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['claimed_at'] or 0))}")
    return 0


def cmd_kits_approve(args: argparse.Namespace) -> int:
    f = _fleet(args)
    try:
        f.approve(args.kit)
    except FleetError as e:
        print(f"rekam-fleet: {e}", file=sys.stderr)
        return 1
    print(f"{args.kit} approved; it receives its certificate on its next claim attempt")
    return 0


def cmd_kits_revoke(args: argparse.Namespace) -> int:
    f = _fleet(args)
    try:
        serial = f.revoke(args.kit)
    except FleetError as e:
        print(f"rekam-fleet: {e}", file=sys.stderr)
        return 1
    if not args.offline:
        try:  # clear the retained config so nothing more reaches it
            _publish(f, [(cp.config_topic(args.kit), b"", True)])
        except FleetError as e:
            print(f"rekam-fleet: warning: retained config not cleared: {e}", file=sys.stderr)
    print(f"{args.kit} revoked (certificate {serial or 'none'} on {f.ca.crl}); reload the broker: "
          "systemctl reload mosquitto (SIGHUP) so it re-reads the CRL")
    return 0


def cmd_kits_issue(args: argparse.Namespace) -> int:
    f = _fleet(args)
    try:
        if args.csr:
            pem, serial = ca.sign_csr(f.ca, Path(args.csr).read_bytes(), args.kit)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "kit.crt").write_bytes(pem)
        else:
            _, _, serial = ca.issue_kit_files(f.ca, args.kit, Path(args.out))
    except (ca.CaError, OSError) as e:
        print(f"rekam-fleet: {e}", file=sys.stderr)
        return 1
    print(f"certificate {serial} for {args.kit} in {args.out}")
    return 0


def _parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in sets:
        key, sep, raw = s.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"rekam-fleet: --set {s!r}: use section.key=VALUE (VALUE in JSON, or a plain string)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        section, k = key.split(".", 1)
        out.setdefault(section, {})[k] = value
    return out


def _publish(f: Fleet, items: list[tuple[str, bytes, bool]]) -> None:
    link = FleetLink(f, f"fleet-cli-{secrets.token_hex(3)}").start()
    try:
        for topic, payload, retain in items:
            link.publish(topic, payload, retain=retain)
        refused = link.flush(timeout=15)
    finally:
        link.close()
    if refused:
        raise FleetError("broker refused: " + "; ".join(f"{t} ({r})" for t, r in refused))


def _push(f: Fleet, kit: str, version: int, doc: bytes, offline: bool) -> None:
    targets = [kit] if kit != "*" else [r["kit_id"] for r in f.kits() if r["state"] == "approved"]
    if not offline:
        _publish(f, [(cp.config_topic(t), doc, True) for t in targets])  # FleetError if not acknowledged
    where = "signed, not published" if offline else f"published (retained) to {len(targets)} kit(s)"
    print(f"config v{version} for {kit} {where}")


def cmd_config_push(args: argparse.Namespace) -> int:
    f = _fleet(args)
    sections: dict[str, Any] = {}
    files: dict[str, str] = {}
    if not args.replace and args.kit != "*":
        # A document is the kit's complete set of overrides: start from the previous version's.
        prev = f.configs(args.kit)
        sections = json.loads(prev[-1]["sections"]) if prev else {}
        files = json.loads(prev[-1]["files"] or "{}") if prev else {}
    if args.file:
        for s, kv in json.loads(Path(args.file).read_text()).items():
            sections.setdefault(s, {}).update(kv)
    for s, kv in _parse_sets(args.set or []).items():
        sections.setdefault(s, {}).update(kv)
    files.update({Path(p).name: Path(p).read_text() for p in (args.attach or [])})
    try:
        version, doc = f.make_config(args.kit, sections, files, note=args.note or "")
        _push(f, args.kit, version, doc, args.offline)
    except FleetError as e:
        print(f"rekam-fleet: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_config_rollback(args: argparse.Namespace) -> int:
    f = _fleet(args)
    try:
        version, doc = f.rollback_config(args.kit, args.to)
        _push(f, args.kit, version, doc, args.offline)
    except FleetError as e:
        print(f"rekam-fleet: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    f = _fleet(args)
    row = f.kit(args.kit)
    if row is None:
        print(f"rekam-fleet: unknown kit {args.kit}", file=sys.stderr)
        return 1
    state = json.loads(row["config_state"]) if row["config_state"] else {}
    print(json.dumps({"kit_id": args.kit, "kit_reports": state,
                      "versions": [{"version": r["version"], "issued_at": r["issued_at"], "note": r["note"],
                                    "sections": json.loads(r["sections"])} for r in f.configs(args.kit)]},
                     indent=1))
    return 0


def send_command(f: Fleet, kit: str, name: str, args: dict[str, Any], ttl: int, wait: float) -> dict[str, Any] | None:
    """Send one signed command and wait up to `wait` seconds for its result (None if none came)."""
    cmd_id, payload = f.make_command(kit, name, args, ttl)
    got: queue.Queue[dict[str, Any]] = queue.Queue()

    def on_message(_link: FleetLink, msg: Any) -> None:
        if f.handle_kit_message(msg.topic, bytes(msg.payload)) == "result":
            corr = getattr(msg.properties, "CorrelationData", None)
            if corr == cmd_id.encode():
                r = f.command(cmd_id)
                if r is not None and r["result"]:
                    got.put(json.loads(r["result"]))

    link = FleetLink(f, f"fleet-cli-{secrets.token_hex(3)}", on_message, (cp.result_topic(kit),)).start()
    try:
        time.sleep(0.2)  # let the SUBACK in before the command goes out
        link.publish(cp.cmd_topic(kit), payload, response_topic=cp.result_topic(kit), correlation=cmd_id.encode())
        try:
            return got.get(timeout=wait) if wait > 0 else None
        except queue.Empty:
            return None
    finally:
        link.close()


def cmd_cmd_send(args: argparse.Namespace) -> int:
    f = _fleet(args)
    cargs: dict[str, Any] = {}
    for a in args.arg or []:
        k, _, v = a.partition("=")
        try:
            cargs[k] = json.loads(v)
        except json.JSONDecodeError:
            cargs[k] = v
    try:
        res = send_command(f, args.kit, args.name, cargs, args.ttl, args.wait)
    except FleetError as e:
        print(f"rekam-fleet: {e}", file=sys.stderr)
        return 1
    if res is None:
        print(f"no result within {args.wait:.0f} s (the command stays valid for {args.ttl} s)", file=sys.stderr)
        return 3
    print(json.dumps(res, indent=1))
    return 0 if res.get("ok") else 2


def cmd_status(args: argparse.Namespace) -> int:
    f = _fleet(args)
    rows = f.status_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'kit':16} {'state':9} {'online':8} {'last seen':17} {'backlog':>8} {'sd MB':>7} {'usb MB':>7} "
          f"{'cfg':>4} halted/locked")
    for r in rows:
        seen = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["last_seen"])) if r["last_seen"] else "never"
        flag = r["halted"] or (f"locked: {r['locked']}" if r["locked"] else "")
        print(f"{r['kit_id']:16} {r['state']:9} {r['online']:8} {seen:17} {_s(r['backlog']):>8} "
              f"{_s(r['sd_free_mb']):>7} {_s(r['usb_free_mb']):>7} {_s(r['config']):>4} {flag}")
    return 0


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    f = _fleet(args)
    svc = FleetService(f).start()
    log.info("fleet service running brokers=%s fleet_key=%s", f.settings.get("brokers"),
             cp.key_fingerprint(f.public_key_b64))
    try:
        while True:
            time.sleep(60)
            f.expire_claims()
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Register `ca`, `kits`, `config`, `cmd`, `status` and `serve` on the rekam-fleet parser."""

    def data(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data", default=os.environ.get("REKAM_FLEET_DATA", "."), help="fleet folder (fleet.db, ca/)")
        return p

    g = sub.add_parser("ca", help="fleet CA and broker configuration").add_subparsers(dest="ca_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("init", help="create the fleet folder: CAs, broker/claim/fleet certificates, signing key"))
    p.add_argument("--host", action="append", required=True, help="broker host name or IP for its certificate")
    p.add_argument("--broker", action="append", default=[], help="host:port of the main listener (fleet side)")
    p.add_argument("--claim-broker", action="append", default=[], help="host:port of the claim listener")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--claim-port", type=int, default=8884)
    p.add_argument("--batch", default="batch1", help="claim certificate batch name")
    p.add_argument("--claim-ttl-hours", type=float, default=24.0, help="pending claims are dropped after this")
    p.set_defaults(func=cmd_ca_init)
    data(g.add_parser("crl", help="re-sign the CRL (run before it expires, then reload the broker)")).set_defaults(
        func=cmd_ca_crl)

    g = sub.add_parser("kits", help="kit registry").add_subparsers(dest="kits_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("list", help="every kit and its state"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kits_list)
    p = data(g.add_parser("approve", help="approve a pending claim"))
    p.add_argument("kit")
    p.set_defaults(func=cmd_kits_approve)
    p = data(g.add_parser("revoke", help="revoke a kit (CRL, no more config or commands)"))
    p.add_argument("kit")
    p.add_argument("--offline", action="store_true", help="do not clear its retained config on the broker")
    p.set_defaults(func=cmd_kits_revoke)
    p = data(g.add_parser("issue", help="issue a kit certificate without a claim (from its CSR, or a new key)"))
    p.add_argument("kit")
    p.add_argument("--csr", help="the kit's CSR (PEM); without it a key is made here")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_kits_issue)

    g = sub.add_parser("config", help="signed remote config").add_subparsers(dest="config_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("push", help="sign the next config version and publish it (retained)"))
    p.add_argument("kit", help="kit id, or '*' for every approved kit")
    p.add_argument("--set", action="append", help="section.key=VALUE (JSON value)")
    p.add_argument("--file", help="JSON file of sections {section: {key: value}}")
    p.add_argument("--attach", action="append", help="file shipped inside the document (e.g. a datacenter key)")
    p.add_argument("--note")
    p.add_argument("--replace", action="store_true", help="start from nothing instead of the previous version")
    p.add_argument("--offline", action="store_true", help="sign and store only, do not publish")
    p.set_defaults(func=cmd_config_push)
    p = data(g.add_parser("show", help="versions issued and what the kit reports"))
    p.add_argument("kit")
    p.set_defaults(func=cmd_config_show)
    p = data(g.add_parser("rollback", help="re-issue an earlier version as a new version"))
    p.add_argument("kit")
    p.add_argument("--to", type=int)
    p.add_argument("--offline", action="store_true")
    p.set_defaults(func=cmd_config_rollback)

    g = sub.add_parser("cmd", help="signed commands").add_subparsers(dest="cmd_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("send", help="send a command and wait for its result"))
    p.add_argument("kit")
    p.add_argument("name", choices=cp.COMMANDS)
    p.add_argument("--arg", action="append", help="key=VALUE (JSON value)")
    p.add_argument("--ttl", type=int, default=300, help="seconds the command stays valid")
    p.add_argument("--wait", type=float, default=30)
    p.set_defaults(func=cmd_cmd_send)

    p = data(sub.add_parser("status", help="table of kits: last seen, backlog, free space, halted"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    data(sub.add_parser("serve", help="run the fleet service (claims, telemetry, results)")).set_defaults(
        func=cmd_serve)
