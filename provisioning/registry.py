"""The fleet registry: kits, claims, approvals, revocation, signed config versions, commands, events.

Data lives in a folder (``--data DIR``): ``fleet.db`` (SQLite; or the tables in PostgreSQL with ``--registry DSN``
or ``"registry"`` in fleet.json: `provisioning.registry_db`), ``fleet.json`` (brokers, claim
batches, claim lifetime), ``fleet-signing.key`` (see `provisioning.signer`), ``allowlist.txt`` (kits approved
on sight: ``KIT_ID FINGERPRINT`` lines, see `Fleet.allowlisted`), ``default-config.json`` (the sections every newly
claimed kit gets as config version 1) and ``ca/`` (see `provisioning.ca`).

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
from collections.abc import Callable, Iterator
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
from provisioning.texts import Reason, for_terminal

log = logging.getLogger(__name__)

SCHEMA = registry_db.SQLITE_SCHEMA  # (the PostgreSQL schema: registry_db.MIGRATIONS)


REFUSED_RETRY_S = 3600.0  # a refused clock correction is looked at (and logged) again after this long
# Clock segments one kit may keep: a real kit makes a few corrections per boot, a hostile one sends new ranges in
# every message. Beyond it a correction is refused (said once an hour), not stored.
MAX_KIT_SEGMENTS = 10_000


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
        if not self.ca.fleet_key_crt.exists() and self.ca.fleet_ca_key.exists():
            # A fleet folder from before the fleet key certificate: kits refuse a claim answer without one.
            ca.certify_fleet_key(self.ca, self.signer.key.public_key())
            log.warning("fleet certified its signing key with the fleet CA path=%s", self.ca.fleet_key_crt)
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
        if registry and registry_db.dsn_has_password(registry):
            # fleet.json is read by every fleet process and ingest host and is not a secret file: refused before
            # anything is made, so the operator just runs the command again without it.
            raise FleetError(Reason(N_("the registry connection string holds a password, and fleet.json must not: "
                                       "put the password in a .pgpass file (or name one with PGPASSFILE) and give "
                                       "--registry without it")))
        data.mkdir(parents=True, exist_ok=True)
        ca.init_ca(data / "ca", hosts, batch=batch)
        ca.certify_fleet_key(ca.CaPaths(data / "ca"), Signer.create(data / KEY_FILE).key.public_key())
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

    EVENTS_KEEP = 100_000  # rows kept in the event log (fleet.json ``events_keep``)
    EVENTS_KEEP_DAYS = 90.0  # ... and days (fleet.json ``events_keep_days``)
    EVENTS_PRUNE_EVERY = 500  # events this process writes between two prunes (its first one prunes too)
    # One delete statement drops at most this many rows (its own short transaction: the fleet service and other
    # `rekam-fleet` commands write in between), one prune at most EVENTS_PRUNE_MAX; a prune that stopped there is
    # continued at the next event. A fleet.db from before pruning (millions of rows) is so worked off in steps
    # instead of one write transaction that held every other writer past its busy timeout.
    EVENTS_PRUNE_BATCH = 5_000
    EVENTS_PRUNE_MAX = 100_000

    def event(self, kind: str, kit_id: str | None = None, **detail: Any) -> None:
        """Append one row to the event log (detail as JSON, capped at 4000 characters).

        The log is pruned here, where it grows: the first event a process writes and every `EVENTS_PRUNE_EVERY`-th
        after it drop the rows beyond the newest ``events_keep`` and older than ``events_keep_days`` (indexed
        deletes in batches, `_prune_events`), so no stream of events (claims, refusals) fills the disk."""
        mem = self._process_memory()
        with self._lock:
            self.db.execute("INSERT INTO events (at, kit_id, kind, detail) VALUES (?,?,?,?)",
                            (int(time.time()), kit_id, kind, json.dumps(detail, default=str)[:4000]))
            mem["events"] += 1
            due = (mem["events"] - 1) % max(1, self.EVENTS_PRUNE_EVERY) == 0 or mem["prune_more"]
        if due:
            self._prune_events()

    def _prune_events(self) -> int:
        """Drop the events older than ``events_keep_days``, then those beyond the newest ``events_keep`` rows, in
        statements of at most `EVENTS_PRUNE_BATCH` rows and `EVENTS_PRUNE_MAX` in all (the rest: at the next event);
        returns how many went."""
        keep = int(self.settings.get("events_keep", self.EVENTS_KEEP))
        days = float(self.settings.get("events_keep_days", self.EVENTS_KEEP_DAYS))
        batch, most = max(1, self.EVENTS_PRUNE_BATCH), max(1, self.EVENTS_PRUNE_MAX)
        with self._lock:
            top = self.db.execute("SELECT MAX(id) FROM events").fetchone()[0]
        rules = [("at < ?", int(time.time() - days * 86400))]
        if top is not None:  # ids grow by one per row (a few gaps on PostgreSQL): about `keep` rows stay
            rules.append(("id <= ?", int(top) - keep))
        n, more = 0, False
        for rule, bound in rules:
            while not more:
                limit = min(batch, most - n)
                with self._lock:  # released between statements: other threads' registry calls go in between
                    got = max(0, self.db.execute(f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE {rule} "
                                                 "LIMIT ?)", (bound, limit)).rowcount)
                n += got
                if got < limit:
                    break  # this rule is done
                more = n >= most
        self._process_memory()["prune_more"] = more
        if n > 0:
            log.info("events pruned count=%d keep=%d keep_days=%g%s", n, keep, days,
                     " more=yes (continued at the next event)" if more else "")
        return n

    def _process_memory(self) -> dict[str, Any]:
        """What this process remembers for the claim path and the event log (rate-limited notes, when pending
        claims were last expired, events written), made on first use."""
        return self.__dict__.setdefault("_claim_memory", {"notes": {}, "expire_next": 0.0, "events": 0,
                                                          "prune_more": False})

    # -- kits -------------------------------------------------------------------------------

    def kit(self, kit_id: str) -> sqlite3.Row | None:
        """The registry row of one kit, or None."""
        with self._lock:
            return self.db.execute("SELECT * FROM kits WHERE kit_id = ?", (kit_id,)).fetchone()

    def kits(self) -> list[sqlite3.Row]:
        """Every kit, by id."""
        with self._lock:
            return list(self.db.execute("SELECT * FROM kits ORDER BY kit_id"))

    # -- claims: limits (the ones named with a fleet.json key may be set there) -----------------------------

    CLAIM_MAX_PENDING = 1000  # fleet.json claim_max_pending: beyond it a new claim is refused, not stored
    CLAIM_REISSUE_EVERY_S = 600  # at most one certificate for a NEW key per kit this often
    CLAIM_RENEW_BEFORE_S = 30 * 86400  # the same key gets a new certificate only when the old one ends within this
    CLAIM_EXPIRE_EVERY_S = 60.0  # claims expire pending claims at most this often (`serve` does it every minute too)
    CLAIM_NOTE_EVERY_S = 60.0  # one log line (and event) per kind of claim refusal per this long
    CLAIM_FIELD_MAX = {"hardware_serial": 64, "software_version": 32}  # printable, at most this many characters

    def _allowlist(self) -> list[tuple[str, str]]:
        """(name, fingerprint or "") of each usable line of ``allowlist.txt``.

        A line is ``NAME [FINGERPRINT]`` with an optional ``# comment``: NAME a kit id or a hardware serial,
        FINGERPRINT the kit key's as `rekam identity show` prints it on the kit (``1a2b-3c4d-5e6f-7a8b``; the
        dashes and the case do not matter). Any other line approves nothing (logged)."""
        try:
            text = (self.data / "allowlist.txt").read_text()
        except OSError:
            return []
        out: list[tuple[str, str]] = []
        for n, line in enumerate(text.split("\n"), 1):
            words = line.split("#")[0].split()
            fp = words[1].replace("-", "").lower() if len(words) == 2 else ""
            if len(words) > 2 or (len(words) == 2 and (len(fp) != 16 or fp.strip("0123456789abcdef"))):
                self._claim_note("allowlist_line", None, f"allowlist.txt line {n} is not NAME [FINGERPRINT]: ignored",
                                 event=False)
            elif words:
                out.append((words[0], fp))
        return out

    def allowlisted(self, kit_id: str, serial: str, public_key: str = "") -> tuple[str, str] | None:
        """Whether a NEW kit is approved on sight: ("key", NAME) by a line naming its kit id or serial with the
        fingerprint of `public_key`; ("once", NAME) by a plain line (NAME alone) that approved no kit yet
        (the caller marks it used in ``allowlist_uses``); ("other_key", NAME) when a line names this kit id with
        another fingerprint (the claim is refused, not stored); None: pending, for a human.

        Why: the kit id and serial are what the claimant says, and anyone holding the batch claim certificate (it is
        in every kit image) can say any; serials are not secret. Only the key fingerprint ties a line to one kit.
        A plain line (the older format) approves the first kit naming it and none after, and never by a serial
        already registered to another kit. A line naming this kit with another fingerprint approves nothing, and
        then no plain line does either."""
        fp = cp.key_fingerprint(public_key) if public_key else ""
        lines = [(name, want) for name, want in self._allowlist()
                 if name == kit_id or (serial not in ("", "unknown") and name == serial)]
        for name, want in lines:
            if want and want == fp:
                return "key", name
        other = [(name, want) for name, want in lines if want]
        if other:
            self._claim_note("allowlist_other_key", kit_id, f"allowlist line {other[0][0]!r} is for another kit key "
                             f"({other[0][1]}; the claim's is {fp})")
            by_id = [name for name, _ in other if name == kit_id]
            return ("other_key", by_id[0]) if by_id else None
        for name in [name for name, want in lines if not want]:
            with self._lock:
                used = self.db.execute("SELECT kit_id FROM allowlist_uses WHERE entry = ?", (name,)).fetchone()
                taken = name != kit_id and self.db.execute(
                    "SELECT 1 FROM kits WHERE hardware_serial = ? AND kit_id != ? LIMIT 1", (serial, kit_id)).fetchone()
            if used is not None:
                self._claim_note("allowlist_used", kit_id, f"allowlist line {name!r} approved {used[0]} already: "
                                 "left pending (a line with the kit's key fingerprint approves it)")
            elif taken:
                self._claim_note("allowlist_serial_taken", kit_id, f"allowlist serial {name!r} is registered to "
                                 "another kit: left pending")
            else:
                return "once", name
        return None

    def expire_claims(self, now: float | None = None) -> int:
        """Drop pending claims older than ``claim_ttl_hours``; the kit's next retry renews them (index
        ``kits_pending``: no scan of the kits)."""
        cutoff = int((now or time.time()) - float(self.settings.get("claim_ttl_hours", 24)) * 3600)
        with self._lock:
            n = self.db.execute("DELETE FROM kits WHERE state = 'pending' AND claimed_at < ?", (cutoff,)).rowcount
        if n:
            log.info("expired pending claims count=%d", n)
            self.event("claims_expired", count=n)
        return n

    def _expire_claims_now_and_then(self) -> None:
        """`expire_claims` from the claim path, at most every `CLAIM_EXPIRE_EVERY_S` (not once per claim)."""
        mem = self._process_memory()
        if time.monotonic() >= mem["expire_next"]:
            mem["expire_next"] = time.monotonic() + self.CLAIM_EXPIRE_EVERY_S
            self.expire_claims()

    def _claim_note(self, reason: str, kit_id: str | None, detail: str, event: bool = True) -> None:
        """Log a claim refusal (and record a ``claim_refused`` event) at most once per `CLAIM_NOTE_EVERY_S` per
        `reason`, with how many were left out since: a flood of claims must not become a flood of log lines and
        event rows. Claimant text goes out with %r (a newline in it cannot forge a log line)."""
        notes = self._process_memory()["notes"]
        now = time.monotonic()
        next_at, skipped = notes.get(reason, (0.0, 0))
        if now < next_at:
            notes[reason] = (next_at, skipped + 1)
            return
        notes[reason] = (now + self.CLAIM_NOTE_EVERY_S, 0)
        log.warning("claim refused reason=%s kit_id=%r detail=%r suppressed=%d", reason, kit_id, detail[:300], skipped)
        if event:
            self.event("claim_refused", kit_id, reason=reason, detail=detail[:300], suppressed=skipped)

    def _pending_claims(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM kits WHERE state = 'pending'").fetchone()[0])

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
        """Answer a claim request: (response topic, payload), or None when it must be ignored.

        Refused before anything is stored: claimant strings that are not short printable text, a new kit while
        ``claim_max_pending`` claims
        wait, a kit id the allowlist names with another key (`allowlisted`). A claim whose key the allowlist names
        replaces a pending (never approved) claim for that kit id made with another key. An approved kit's
        re-claim (`_claim_certificate`): with the key of the certificate it was given, that
        certificate again (nothing issued, nothing revoked); with a new key, a new one at most every
        `CLAIM_REISSUE_EVERY_S`; the last answered claim again (its nonce) is not answered, an older one refused."""
        parsed = cp.parse_claim_topic(topic)
        if parsed is None:
            self._claim_note("bad_topic", None, f"topic {topic[:200]!r}", event=False)
            return None
        user, topic_kit = parsed
        if user not in self.settings.get("claim_batches", []):
            self._claim_note("unknown_claim_credential", topic_kit, f"claim user {user!r}")
            return None
        try:
            body, _, _ = cp.decode(payload, "claim")
            cp.check_claim(body)
            cp.verify(payload, "claim", cp.load_public_b64(body["public_key"]))
        except cp.ProtocolError as e:
            self._claim_note(e.reason, topic_kit, str(e))
            return None
        kit_id = body["kit_id"]
        if kit_id != topic_kit:
            self._claim_note("kit_mismatch", topic_kit, f"the body names {kit_id!r}", event=False)
            return None
        now = int(time.time())
        resp_topic = cp.claim_response_topic(user, kit_id)

        def answer(status: str, reason: str = "", **extra: Any) -> tuple[str, bytes]:
            b = {"kit_id": kit_id, "nonce": body["nonce"], "status": status, "reason": reason,
                 "fleet_public_key": self.public_key_b64, **extra}
            return resp_topic, self.signer.sign("claim_response", b)

        for field, most in self.CLAIM_FIELD_MAX.items():
            if len(body[field]) > most or not body[field].isprintable():
                self._claim_note("bad_field", kit_id, f"{field} {body[field][:100]!r}")
                return answer("rejected", f"claim.{field} must be printable text of at most {most} characters")
        serial = body["hardware_serial"]
        # No bound on issued_at against the fleet's clock: a Pi without a clock claims before chrony (whose
        # servers a site's firewall may not even allow) has set it. Replays are met by the nonce and the order
        # below, and a replay of a claim with the kit's current key only gets its certificate again.
        self._expire_claims_now_and_then()
        row = self.kit(kit_id)
        # A pending claim for this kit id with another key was never approved: the key the allowlist names wins.
        squatted = row is not None and row["state"] == "pending" and row["public_key"] != body["public_key"]
        allowed = self.allowlisted(kit_id, serial, body["public_key"]) if row is None or squatted else None
        if allowed is not None and allowed[0] == "other_key":
            return answer("rejected", "the fleet's allowlist names this kit id with another key")
        if row is None or (squatted and allowed is not None and allowed[0] == "key"):
            cap = int(self.settings.get("claim_max_pending", self.CLAIM_MAX_PENDING))
            if allowed is None and self._pending_claims() >= cap:
                self._claim_note("pending_full", kit_id, f"{cap} claims wait already (claim_max_pending): approve "
                                 "or let them expire", event=False)
                return answer("rejected", "too many claims are waiting for approval at the fleet: retry later")
            with self._lock, self.db.write():
                if squatted:
                    self.db.execute("DELETE FROM kits WHERE kit_id = ? AND state = 'pending'", (kit_id,))
                    self.event("claim_replaced", kit_id, old_key=cp.key_fingerprint(row["public_key"]))
                if allowed is not None and allowed[0] == "once" and self.db.execute(
                        "INSERT INTO allowlist_uses (entry, kit_id, at) VALUES (?,?,?) ON CONFLICT (entry) DO NOTHING",
                        (allowed[1], kit_id, now)).rowcount != 1:
                    allowed = None  # another fleet process approved a kit by this line just now
                state = "approved" if allowed is not None else "pending"
                self.db.execute("INSERT INTO kits (kit_id, public_key, hardware_serial, software_version, state, "
                                "claim_user, claimed_at, approved_at) VALUES (?,?,?,?,?,?,?,?) "
                                "ON CONFLICT (kit_id) DO NOTHING",
                                (kit_id, body["public_key"], serial, body["software_version"],
                                 state, user, now, now if state == "approved" else None))
            how = allowed[0] if allowed is not None else ""
            self.event("claim", kit_id, state=state, serial=serial, allowlist=how)
            log.info("claim received kit_id=%s serial=%r state=%s allowlist=%s", kit_id, serial, state, how or "-")
            row = self.kit(kit_id)
            if row is None:  # expired or removed in between: the kit retries
                return None
        if row["public_key"] != body["public_key"]:
            self._claim_note("another_key", kit_id, "kit id registered with another key")
            return answer("rejected", "this kit id is registered with another key")
        if row["state"] == "revoked":
            return answer("rejected", "this kit is revoked")
        if row["state"] == "pending":
            return answer("pending", "waiting for approval (rekam-fleet kits approve)")
        return self._claim_certificate(row, body, answer, now)

    def _claim_certificate(self, row: sqlite3.Row, body: dict[str, Any], answer: Callable[..., tuple[str, bytes]],
                           now: int) -> tuple[str, bytes] | None:
        """The approved answer to an approved kit's claim (see `handle_claim`), or a refusal.

        ``claim_certs`` remembers the certificate this kit was given and the claim it answered. Why: re-signing on
        every claim let anyone replaying a kit's claim revoke its working certificate, and made each claim rewrite
        the CA's ``issued.json`` and ``crl.pem``."""
        kit_id = row["kit_id"]
        with self._lock:
            prev = self.db.execute("SELECT * FROM claim_certs WHERE kit_id = ?", (kit_id,)).fetchone()
        if prev is not None and body["nonce"] == prev["claim_nonce"]:
            self._claim_note("replay", kit_id, "the nonce of the last answered claim: not answered again",
                             event=False)
            return None
        try:
            key = ca.csr_key_id(body["csr"], kit_id)
        except CaError as e:
            return answer("rejected", f"bad CSR: {e}")
        issued = False
        same_key = (prev is not None and prev["cert_serial"] == row["cert_serial"] and prev["cert_key"] == key
                    and prev["not_after"] - now > self.CLAIM_RENEW_BEFORE_S)
        if not same_key and prev is not None and body["issued_at"] < prev["claim_issued_at"]:
            # Only a claim that would revoke the kit's certificate must be newer than the last one answered.
            self._claim_note("older_claim", kit_id, f"issued_at {body['issued_at']} < {prev['claim_issued_at']}")
            return answer("rejected", "this claim is older than the kit's last answered claim (a replay, or the "
                                      "kit's clock went back): retry once the clock is right")
        if same_key:
            cert, serial = str(prev["cert_pem"]).encode(), str(prev["cert_serial"])
            with self._lock:
                self.db.execute("UPDATE claim_certs SET claim_nonce = ?, claim_issued_at = ? WHERE kit_id = ?",
                                (body["nonce"], body["issued_at"], kit_id))
            log.info("claim answered with the certificate issued before kit_id=%s cert_serial=%s", kit_id, serial)
        else:
            age = now - int(prev["issued_at"]) if prev is not None else self.CLAIM_REISSUE_EVERY_S
            if row["cert_serial"] and age < self.CLAIM_REISSUE_EVERY_S:
                self._claim_note("reissue_too_soon", kit_id, f"a certificate for another key was issued {age} s ago")
                return answer("rejected", f"a certificate was issued to this kit {age} s ago; a new key gets one at "
                                          f"most every {self.CLAIM_REISSUE_EVERY_S} s: retry later")
            try:
                cert, serial = ca.sign_csr(self.ca, body["csr"], kit_id)
            except CaError as e:
                return answer("rejected", f"bad CSR: {e}")
            if row["cert_serial"] and row["cert_serial"] != serial:
                # A new key (the kit lost its TLS key): the certificate for the old key is of no use; revoke it.
                ca.revoke(self.ca, row["cert_serial"])
                self.event("cert_replaced", kit_id, old=row["cert_serial"], new=serial)
            with self._lock, self.db.write():
                self.db.execute(
                    "INSERT INTO claim_certs (kit_id, cert_serial, cert_key, cert_pem, not_after, issued_at, "
                    "claim_nonce, claim_issued_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (kit_id) DO UPDATE SET "
                    "cert_serial = excluded.cert_serial, cert_key = excluded.cert_key, cert_pem = excluded.cert_pem, "
                    "not_after = excluded.not_after, issued_at = excluded.issued_at, "
                    "claim_nonce = excluded.claim_nonce, claim_issued_at = excluded.claim_issued_at",
                    (kit_id, serial, key, cert.decode(), ca.cert_not_after(cert), now, body["nonce"],
                     body["issued_at"]))
                self.db.execute("UPDATE kits SET cert_serial = ?, software_version = ?, hardware_serial = ? "
                                "WHERE kit_id = ?", (serial, body["software_version"], body["hardware_serial"],
                                                     kit_id))
            issued = True
        version, doc = self.latest_config(kit_id) or self.make_config(kit_id, self.default_sections(),
                                                                      note="initial config (claim)")
        if issued:
            self.event("claim_approved", kit_id, serial=serial, config_version=version)
        log.info("claim answered kit_id=%s cert_serial=%s config_version=%d", kit_id, serial, version)
        return answer("approved", certificate=cert.decode(), ca_certificate=self.ca.fleet_ca_crt.read_text(),
                      fleet_key_certificate=self.ca.fleet_key_crt.read_text(), config=doc.decode())

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
        None if the message was refused (unknown/revoked kit, bad signature, malformed, or a result that answers no
        open command of the kit: `unmatched_results`)."""
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
        # Signed by the kit is not shaped by us: the fields the fleet reads are checked here, a wrong one dropped
        # (the rest of the report is kept: a buggy kit stays visible), with an event.
        dropped: dict[str, str] = {}
        if kind == "telemetry":
            dropped = _telemetry_problems(body)
        state = _status_state(body) if kind == "status" else None
        if kind == "status" and state is None:
            dropped = {"state": f"not a printable word of 1-{MAX_STATE} characters"}
        answered = False
        with self._lock:
            self.db.execute("UPDATE kits SET last_seen = ? WHERE kit_id = ?", (now, kit_id))
            if kind == "telemetry":
                kept = {k: v for k, v in body.items() if k not in dropped}
                self.db.execute("UPDATE kits SET telemetry = ? WHERE kit_id = ?", (json.dumps(kept), kit_id))
            elif kind == "status":
                self.db.execute("UPDATE kits SET online = ? WHERE kit_id = ?", (state or "?", kit_id))
            elif kind == "config_state":
                self.db.execute("UPDATE kits SET config_state = ? WHERE kit_id = ?", (json.dumps(body), kit_id))
            elif isinstance(body.get("cmd_id"), str) and isinstance(body.get("name"), str):
                # Only the first answer to a command issued to this kit under that name: the kit signs whatever
                # it sends (a cmd_id never issued, another command's name, a second answer after the first).
                answered = self.db.execute(
                    "UPDATE commands SET result = ?, result_at = ? WHERE cmd_id = ? AND kit_id = ? AND name = ? "
                    "AND result IS NULL", (json.dumps(body), now, body["cmd_id"], kit_id, body["name"])).rowcount == 1
        if dropped:
            self._report_fields_dropped(kit_id, kind, dropped)
        if kind == "telemetry":
            self._take_clock_corrections(kit_id, body, row["public_key"])
        if kind == "result":
            if not answered:
                if self._already_recorded(kit_id, payload):
                    return kind  # the copy of the recorded answer (the fleet service and `cmd send` both see it)
                self._result_not_recorded(kit_id, body)
                return None
            if body["name"] == "rotate_key" and body.get("ok"):  # the answer to a rotate_key command sent
                self._key_rotated(kit_id, body)
        return kind

    @property
    def unmatched_results(self) -> dict[str, int]:
        """Kit id -> verified results this process saw that answer no open command of that kit (not recorded)."""
        return self._report_memory()["unmatched"]

    def _report_memory(self) -> dict[str, Any]:
        """What this process remembers of the kits' wrong reports (counts, when each was last said), made on first
        use."""
        return self.__dict__.setdefault("_kit_report_memory", {"said": {}, "unmatched": {}})

    def _say_now(self, what: str, kit_id: str) -> int | None:
        """Count one more `what` (a kind of wrong report) of `kit_id`: how many since it was last said if it is to
        be said now (the first, then once every `REPORT_QUIET_S` per kit: a kit repeats them every message), else
        None."""
        said = self._report_memory()["said"]
        n, until = said.get((what, kit_id), (0, 0.0))
        if time.monotonic() < until:
            said[(what, kit_id)] = (n + 1, until)
            return None
        if len(said) >= 10000:  # bounded, then forgotten
            said.clear()
        said[(what, kit_id)] = (0, time.monotonic() + REPORT_QUIET_S)
        return n + 1

    def _report_fields_dropped(self, kit_id: str, kind: str, dropped: dict[str, str]) -> None:
        n = self._say_now(f"dropped:{kind}", kit_id)
        if n is None:
            return
        log.warning("kit report fields dropped kit_id=%s report=%s fields=%s count=%d", kit_id, kind,
                    ",".join(sorted(dropped)), n)
        self.event("kit_report_fields_dropped", kit_id, report=kind, fields=dropped, count=n)

    def _result_not_recorded(self, kit_id: str, body: dict[str, Any]) -> None:
        """Count a verified result that answers no open command of `kit_id` (never issued to it, answered already,
        or issued under another name); said once a minute per kit, never stored."""
        unmatched = self._report_memory()["unmatched"]
        unmatched[kit_id] = unmatched.get(kit_id, 0) + 1
        n = self._say_now("result", kit_id)
        if n is None:
            return
        cmd_id, name = body.get("cmd_id"), body.get("name")
        r = None
        if isinstance(cmd_id, str):
            with self._lock:
                r = self.db.execute("SELECT name, result FROM commands WHERE cmd_id = ? AND kit_id = ?",
                                    (cmd_id, kit_id)).fetchone()
        reason = "unknown_command" if r is None else "answered_already" if r["result"] is not None else "other_name"
        cmd_shown, name_shown = for_terminal(cmd_id, 80), for_terminal(name, 40)  # as the kit sent them: escaped
        log.warning("command result not recorded kit_id=%s cmd_id=%s name=%s reason=%s count=%d", kit_id,
                    cmd_shown, name_shown, reason, n)
        self.event("result_not_recorded", kit_id, cmd_id=cmd_shown, name=name_shown, reason=reason, count=n)

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
            except _SegmentCap as e:
                # this document is looked at again after the retry period; the refusal is said once per kit, not
                # once per document (a kit at its cap sends new ones in every message)
                self._remember_correction(mark, REFUSED_RETRY_S)
                self._refuse_correction(kit_id, "#segment-cap", str(e))
                continue
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
            kept = self.db.execute("SELECT COUNT(*) FROM clock_segments WHERE kit_id = ?", (kit_id,)).fetchone()[0]
            if int(kept) + len(segments) > MAX_KIT_SEGMENTS:
                raise _SegmentCap(f"kit keeps {kept} clock segments, this correction has {len(segments)}: at most "
                                  f"{MAX_KIT_SEGMENTS} are kept per kit (a real kit makes a few per boot)")
            for s in segments:
                hit = self._overlapping_segment(kit_id, s)
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

    def _overlapping_segment(self, kit_id: str, s: clockfix.Segment) -> Any:
        """The kept segment of `kit_id` that overlaps `s` (a row: boot_id, first_seq, last_seq), or None.

        The kept segments of a kit never overlap each other (each was checked on the way in, in a write
        transaction), so only the two nearest `s` can overlap it: the last one starting at or before its first seq,
        and the first one starting after it. Two probes of the (kit_id, first_seq) index, not a scan of every kept
        segment below `s` (quadratic in what a kit sent)."""
        cols = "SELECT boot_id, first_seq, last_seq FROM clock_segments WHERE kit_id = ? AND "
        before = self.db.execute(cols + "first_seq <= ? ORDER BY first_seq DESC LIMIT 1",
                                 (kit_id, s.first_seq)).fetchone()
        if before is not None and before["last_seq"] >= s.first_seq:
            return before
        after = self.db.execute(cols + "first_seq > ? ORDER BY first_seq LIMIT 1", (kit_id, s.first_seq)).fetchone()
        return after if after is not None and after["first_seq"] <= s.last_seq else None

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
        if not isinstance(body.get("cmd_id"), str):  # (a list would not even bind as a query parameter)
            return False
        with self._lock:
            r = self.db.execute("SELECT result FROM commands WHERE cmd_id = ? AND kit_id = ?",
                                (body["cmd_id"], kit_id)).fetchone()
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
        """One row per kit for `rekam-fleet status`.

        A kit whose stored telemetry cannot be read (not a JSON object, or a field the fleet reads in the wrong
        shape: stored before fields were checked on arrival, or by an older fleet) gets ``telemetry_unreadable``
        and None for what could not be read; it never hides the other kits."""
        out = []
        for r in self.kits():
            try:
                out.append(_status_row(r))
            except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as e:  # belt and braces
                log.error("status row unreadable kit_id=%s error=%s", r["kit_id"], for_terminal(e, 200))
                out.append({"kit_id": r["kit_id"], "state": r["state"], "online": "-", "last_seen": r["last_seen"],
                            "backlog": None, "sd_free_mb": None, "usb_free_mb": None, "halted": "", "locked": "",
                            "config": None, "telemetry_unreadable": True})
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


class _SegmentCap(Exception):
    """A correction that would take its kit past `MAX_KIT_SEGMENTS` kept segments (refused, said once)."""


# -- what kits report: the fields the fleet reads ------------------------------------------------------------------
# Telemetry and status are signed by the kit, not shaped by us: a broken or hostile kit may send any JSON. The fields
# `status_rows` reads are checked on arrival (a wrong one is dropped) and again when read (rows stored before). The
# limits are far above what `firmware.control.telemetry` sends.

MAX_MEDIA = 16  # media in one report (a kit has sd and usb)
MAX_REASONS = 32  # halt reasons
MAX_REPORT_TEXT = 500  # a halt reason, the lock reason (the kit cuts that at 200), a medium's name
MAX_STATE = 32  # a status message's state word (online, offline)
REPORT_QUIET_S = 60.0  # a kit's wrong reports (fields dropped, results for no open command) are said once a minute


def _count_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63)


def _text_upto(v: Any, limit: int) -> bool:
    return isinstance(v, str) and len(v) <= limit


def _telemetry_problems(t: dict[str, Any]) -> dict[str, str]:
    """Field -> what is wrong with it, for each field of telemetry `t` that `status_rows` reads and whose shape is
    wrong (an absent field is fine: older kits send fewer)."""
    bad: dict[str, str] = {}
    media = t.get("media")
    if "media" in t and not (isinstance(media, list) and len(media) <= MAX_MEDIA and all(
            isinstance(m, dict) and _text_upto(m.get("name"), MAX_REPORT_TEXT) and _count_or_none(m.get("free_bytes"))
            for m in media)):
        bad["media"] = f"not a list of at most {MAX_MEDIA} objects with a name and free_bytes (a count or null)"
    backlog = t.get("backlog")
    if "backlog" in t and not (isinstance(backlog, dict) and _count_or_none(backlog.get("records"))):
        bad["backlog"] = "not an object with records (a count or null)"
    if "halted" in t and not isinstance(t["halted"], bool):
        bad["halted"] = "not true or false"
    reasons = t.get("halt_reasons")
    if "halt_reasons" in t and not (isinstance(reasons, list) and len(reasons) <= MAX_REASONS and all(
            _text_upto(x, MAX_REPORT_TEXT) for x in reasons)):
        bad["halt_reasons"] = f"not a list of at most {MAX_REASONS} texts of up to {MAX_REPORT_TEXT} characters"
    if "locked" in t and not _text_upto(t["locked"], MAX_REPORT_TEXT):
        bad["locked"] = f"not a text of up to {MAX_REPORT_TEXT} characters"
    return bad


def _status_state(body: dict[str, Any]) -> str | None:
    """The state word of a status message (``online``, ``offline``), or None if it is not a short printable one."""
    v = body.get("state")
    return v if isinstance(v, str) and 0 < len(v) <= MAX_STATE and v.isprintable() else None


def _stored_object(text: Any) -> tuple[dict[str, Any], bool]:
    """(the JSON object a kits column holds, False), or ({}, True) if it holds something else; ({}, False) if
    empty."""
    if not text:
        return {}, False
    try:
        v = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return {}, True
    return (v, False) if isinstance(v, dict) else ({}, True)


def _status_row(r: Any) -> dict[str, Any]:
    """The `status_rows` row of kits row `r`: what could not be read is None (and ``telemetry_unreadable``)."""
    t, unreadable = _stored_object(r["telemetry"])
    bad = _telemetry_problems(t)
    t = {k: v for k, v in t.items() if k not in bad}
    cs, _ = _stored_object(r["config_state"])
    media = {m["name"]: m for m in t.get("media", [])}
    running = cs.get("running")
    halted = (", ".join(t.get("halt_reasons", [])) or "HALT") if t.get("halted") else ""  # halted without reasons
    return {"kit_id": r["kit_id"], "state": r["state"], "online": str(r["online"] or "-"),
            "last_seen": r["last_seen"], "backlog": t.get("backlog", {}).get("records"),
            "sd_free_mb": _mb(media.get("sd", {}).get("free_bytes")),
            "usb_free_mb": _mb(media.get("usb", {}).get("free_bytes")),
            "halted": halted, "locked": t.get("locked", ""),
            "config": running if isinstance(running, int) and not isinstance(running, bool) else None,
            "telemetry_unreadable": unreadable or bool(bad)}
