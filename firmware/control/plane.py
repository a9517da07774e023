"""The kit's control plane: signed remote config with rollback, signed replay-proof commands, telemetry.

It runs on its own MQTT v5 connection (client id ``<kit_id>-ctl``, mTLS with the certificate the
claim produced, see `firmware.provision`) so control traffic is never stuck behind the record relay.
One thread owns the paho client; callbacks only enqueue; commands run on one worker thread.
Every refusal is logged (``control refused ... reason=...``), written to the audit journal and
counted in telemetry; nothing of a refused message is applied.

Remote config (``<state_dir>/remote-config/``): ``current.json`` and ``last-good.json`` hold signed
documents exactly as received (re-verified on every start), ``state.json`` the versions. A document
that changes only live keys (operators list, telemetry interval) is applied at once; anything else
is a *trial*: the daemon exits with `EX_RESTART` (systemd restarts it), starts with the new config,
and promotes it to last-good once this connection reaches a broker. No connection within
``control.rollback_after_s``, or `MAX_TRIAL_BOOTS` starts without one, restores last-good and
exits `EX_RESTART` again. `EX_REBOOT` asks the unit to reboot the machine (reboot command).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import queue
import random
import shutil
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware import __version__, config
from firmware.control.claim import ControlPaths, split_hostport, tls_context
from firmware.errors import Refused
from firmware.seal.identity import KitIdentity
from firmware.system.fsutil import atomic_write, fsync_dir
from firmware.wire import control_protocol as cp

log = logging.getLogger(__name__)

EX_RESTART = 75  # EX_TEMPFAIL: restart the daemon to load a new (or the last good) config
EX_REBOOT = 76  # the unit's ExecStopPost reboots the machine on this status
MAX_TRIAL_BOOTS = 3
LOOP_S = 0.02  # network loop tick while a command runs: bounds the delay of its result
IDLE_LOOP_S = 0.25  # tick otherwise (incoming packets wake the loop at once; ~0.1% CPU idle)

# Safety floors: remote config may raise these, never lower them below the local file's value.
FLOORS = ("store.reserve_floor_mb", "store.reserve_records", "store.purge_requires_stick", "store.verify_readback")
# What remote config may never touch (identity, local paths of trust, the local API's exposure).
DENIED = {"kit": None, "api": None,
          "control": {"enabled", "ca_file", "claim_cert_file", "claim_key_file", "fleet_public_key", "claim_brokers"},
          "datacenter": set()}
ANSWERED_REFUSALS = ("expired", "future", "ttl_too_long", "too_old")
LIVE_KEYS = {"operators.list", "control.telemetry_interval_s"}  # applied without a restart
MAX_FILE_BYTES = 16 * 1024


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        log.error("unreadable control file path=%s error=%s; using defaults", path, e)
        return default


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


# --- remote config -------------------------------------------------------------------------


@dataclass
class Candidate:
    """A verified, validated config document ready to be applied."""

    version: int
    data: bytes
    cfg: config.Config
    changed: list[str]

    @property
    def live(self) -> bool:
        return bool(self.changed) and set(self.changed) <= LIVE_KEYS


class RemoteConfig:
    """Signed, versioned config documents on the kit (see module doc)."""

    def __init__(self, local: config.Config) -> None:
        self.local = local
        self.dir = local.state_dir / "remote-config"
        self.paths = ControlPaths.of(local)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = _read_json(self.dir / "state.json", {})
        self.state.setdefault("current", 0)
        self.state.setdefault("last_good", 0)
        self.state.setdefault("max_seen", 0)
        self.state.setdefault("trial", None)
        self.state.setdefault("last_event", None)

    @property
    def version(self) -> int:
        return int(self.state["current"])

    def _save(self) -> None:
        _write_json(self.dir / "state.json", self.state)

    def fleet_key(self) -> Ed25519PublicKey | None:
        return self.paths.pinned_fleet_key()

    # -- checking ---------------------------------------------------------------------------

    def evaluate(self, data: bytes, kit_id: str, running: config.Config, fleet_key: Ed25519PublicKey | None = None,
                 allow_version: int | None = None) -> Candidate:
        """Verify, check and validate a document; raises `Refused`. Only the files a verified document
        ships (e.g. a data-center key) are written, under a content-addressed path; nothing is applied."""
        key = fleet_key or self.fleet_key()
        if key is None:
            raise Refused("not_claimed", "no pinned fleet key yet")
        try:
            body = cp.check_config_doc(cp.verify(data, "config", key))
        except cp.ProtocolError as e:
            raise Refused(e.reason, str(e)) from None
        if body["kit_id"] not in ("*", kit_id):
            raise Refused("wrong_kit", f"document is for {body['kit_id']}")
        v = body["version"]
        if allow_version is None and v <= self.state["max_seen"]:
            raise Refused("stale_version", f"version {v} <= highest seen {self.state['max_seen']} (replay or old)")
        sections = self._sections(body, v)
        problems = self._denied(sections) + self._floors(sections)
        if problems:
            raise Refused("forbidden", "; ".join(problems))
        self._write_files(body, v)  # signed content; validation below reads the keys it ships
        merged = {s: dict(vals) for s, vals in self.local.raw.items()}
        for s, vals in sections.items():
            merged.setdefault(s, {}).update(vals)
        try:
            cfg = config.validate(merged, f"remote config v{v}", self.local.base_dir)
        except config.ConfigError as e:
            raise Refused("invalid", "; ".join(e.problems)) from None
        cfg = config.Config(cfg.raw, self.local.source, self.local.base_dir)  # keeps pointing at the local file
        cfg = self._with_claimed_identity(cfg)
        changed = sorted(f"{s}.{k}" for s in cfg.raw for k in cfg.raw[s] if cfg.raw[s][k] != running.raw[s].get(k))
        return Candidate(v, bytes(data), cfg, changed)

    def _sections(self, body: dict[str, Any], version: int) -> dict[str, dict[str, Any]]:
        sections = {s: dict(k) for s, k in body["sections"].items()}
        files = body.get("files") or {}
        dc = sections.get("datacenter", {})
        if "public_key_files" in dc and isinstance(dc["public_key_files"], list):
            # Keys shipped inside the document are referenced by absolute path; the path depends on the
            # content only, so re-sending the same key in a later version is not a change.
            dc["public_key_files"] = [str(self._file_path(n, files[n])) if isinstance(n, str) and n in files else n
                                      for n in dc["public_key_files"]]
        return sections

    def _file_path(self, name: str, text: Any) -> Path:
        digest = hashlib.sha256(str(text).encode()).hexdigest()[:16]
        return self.dir / "files" / digest / name

    def _denied(self, sections: dict[str, dict[str, Any]]) -> list[str]:
        out = []
        for s, keys in sections.items():
            if s in DENIED:
                deny = DENIED[s]
                if deny is None:
                    out.append(f"[{s}] cannot be set remotely")
                    continue
                for k in keys:
                    if k in deny:
                        out.append(f"{s}.{k} cannot be set remotely")
                if s == "datacenter" and set(keys) - {"public_key_files"}:
                    out.append("only datacenter.public_key_files can be set remotely")
        return out

    def _floors(self, sections: dict[str, dict[str, Any]]) -> list[str]:
        out = []
        for dotted in FLOORS:
            s, k = dotted.split(".")
            if k not in sections.get(s, {}):
                continue
            new, floor = sections[s][k], self.local.raw[s][k]
            if isinstance(floor, bool):
                if floor and new is not True:
                    out.append(f"{dotted} = {new!r}: safety setting cannot be turned off remotely")
            elif isinstance(new, (int, float)) and not isinstance(new, bool) and new < floor:
                out.append(f"{dotted} = {new!r}: below the safety floor {floor} (the local config's value)")
        return out

    # -- applying ---------------------------------------------------------------------------

    def _write_files(self, body: dict[str, Any], version: int) -> None:
        for name, text in (body.get("files") or {}).items():
            if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or \
                    not isinstance(text, str) or len(text) > MAX_FILE_BYTES:
                raise Refused("invalid", f"files.{name!r}: must be a plain file name and text <= {MAX_FILE_BYTES} B")
            p = self._file_path(name, text)
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(p, text.encode())

    def current_bytes(self) -> bytes:
        try:
            return (self.dir / "current.json").read_bytes()
        except OSError:
            return b""

    def note_seen(self, version: int) -> None:
        """Remember the highest version ever offered (so a refused or rolled-back one is not retried)."""
        if version > self.state["max_seen"]:
            self.state["max_seen"] = version
            self._save()

    def accept(self, cand: Candidate) -> None:
        """Make `cand` current: live documents are good at once, others start a trial."""
        atomic_write(self.dir / "current.json", cand.data)
        if cand.live or not cand.changed:
            atomic_write(self.dir / "last-good.json", cand.data)
            self.state.update(current=cand.version, last_good=cand.version, trial=None)
        else:
            self.state.update(current=cand.version, trial={"version": cand.version, "since": int(time.time()),
                                                         "boots": 0})
        self.state["max_seen"] = max(self.state["max_seen"], cand.version)
        # A new document replaces any operators set by command since the last one.
        (self.dir / "operators.json").unlink(missing_ok=True)
        self._save()

    def event(self, version: int, status: str, reason: str = "") -> dict[str, Any]:
        """Record what happened to `version` (reported on the retained config state topic)."""
        self.state["last_event"] = {"version": version, "status": status, "reason": reason[:500],
                                    "at": int(time.time())}
        self._save()
        return self.state["last_event"]

    def promote(self, running: int) -> int | None:
        """The trial config (if it is the `running` one) reached the broker: it becomes last-good."""
        trial = self.state.get("trial")
        if not trial or trial["version"] != running:
            return None
        shutil.copyfile(self.dir / "current.json", self.dir / "last-good.json.tmp")
        os.replace(self.dir / "last-good.json.tmp", self.dir / "last-good.json")
        fsync_dir(self.dir)
        self.state.update(last_good=trial["version"], trial=None)
        self.event(trial["version"], "applied")
        log.info("remote config promoted to last-good version=%d", trial["version"])
        return int(trial["version"])

    def rollback(self, reason: str) -> int:
        """Restore last-good as current; returns the version restored (0 = the local file only)."""
        bad = self.state["current"]
        good = self.state["last_good"]
        if good and (self.dir / "last-good.json").exists():
            shutil.copyfile(self.dir / "last-good.json", self.dir / "current.json.tmp")
            os.replace(self.dir / "current.json.tmp", self.dir / "current.json")
        else:
            (self.dir / "current.json").unlink(missing_ok=True)
            good = 0
        fsync_dir(self.dir)
        self.state.update(current=good, trial=None)
        self.event(bad, "rolled_back", reason)
        log.error("remote config rolled back version=%d restored=%d reason=%s", bad, good, reason)
        return good

    def effective(self, kit_id: str) -> config.Config:
        """The config to run: local file + current document (+ operators set by command).

        Counts start attempts of a trial document and rolls back after `MAX_TRIAL_BOOTS`; a current
        document that no longer verifies or validates falls back to last-good, then to the local file.
        """
        trial = self.state.get("trial")
        if trial:
            trial["boots"] = int(trial.get("boots", 0)) + 1
            self._save()
            if trial["boots"] > MAX_TRIAL_BOOTS:
                self.rollback(f"{MAX_TRIAL_BOOTS} starts without reaching the broker")
        cfg = self.local
        for name, version in (("current.json", self.state["current"]), ("last-good.json", self.state["last_good"])):
            if not version:
                break
            try:
                data = (self.dir / name).read_bytes()
                cfg = self.evaluate(data, kit_id, self.local, allow_version=version).cfg
                break
            except (OSError, Refused) as e:
                log.error("remote config unusable file=%s version=%d error=%s", name, version, e)
                if name == "current.json":
                    self.rollback(f"stored document unusable: {e}")
        else:  # neither document verifies: run the local file alone and say so
            self.state.update(current=0, last_good=0, trial=None)
            self.event(0, "rolled_back", "no stored config document verifies; running the local file")
        cfg = self._with_claimed_identity(cfg)
        ops = _read_json(self.dir / "operators.json", None)
        if ops is not None:
            raw = cfg.as_toml_dict()
            raw["operators"]["list"] = ops
            try:
                cfg = config.validate(raw, cfg.source, cfg.base_dir)
            except config.ConfigError as e:
                log.error("operators set by command are invalid, ignored: %s", e)
        return cfg

    def _with_claimed_identity(self, cfg: config.Config) -> config.Config:
        """Once claimed, the record relay uses the kit certificate too (unless [relay] names its own)."""
        relay = cfg.raw.get("relay")
        if relay is None or not relay.get("brokers") or relay.get("cert_file") or not self.paths.provisioned():
            return cfg
        raw = cfg.as_toml_dict()
        raw["relay"].update(cert_file=str(self.paths.cert), key_file=str(self.paths.tls_key),
                            ca_file=relay.get("ca_file") or str(self.paths.ca))
        try:
            return config.Config(config.validate(raw, cfg.source, cfg.base_dir).raw, cfg.source, cfg.base_dir)
        except config.ConfigError as e:
            log.error("cannot give the relay the kit certificate: %s", e)
            return cfg

    def set_operators(self, running: config.Config, operators: Any) -> config.Config:
        """Validate and persist an operators list set by command; returns the new running config."""
        raw = running.as_toml_dict()
        raw["operators"]["list"] = operators
        try:
            cfg = config.validate(raw, "operators command", running.base_dir)
        except config.ConfigError as e:
            raise Refused("invalid", "; ".join(e.problems)) from None
        _write_json(self.dir / "operators.json", operators)
        return cfg


def repair_identity(state_dir: Path) -> None:
    """Finish a key rotation cut short by a power loss (see `rotate_key`)."""
    d = state_dir / "identity"
    new = d / "kit.key.new"
    if not new.exists():
        return
    try:
        meta = json.loads((d / "kit.json").read_text())
        key = serialization.load_pem_private_key(new.read_bytes(), password=None)
        if isinstance(key, Ed25519PrivateKey) and meta.get("public_key") == cp.public_b64(key):
            os.replace(new, d / "kit.key")
            log.warning("completed an interrupted kit key rotation")
        else:
            new.unlink()
            log.warning("discarded an interrupted kit key rotation (kit.json still names the old key)")
        fsync_dir(d)
    except (OSError, ValueError) as e:
        log.error("cannot check interrupted key rotation error=%s", e)


def effective_config(local: config.Config) -> config.Config:
    """The config `rekamd` should run: the local file merged with the current remote document."""
    repair_identity(local.state_dir)
    try:
        kit_id = json.loads((local.state_dir / "identity" / "kit.json").read_text())["kit_id"]
    except (OSError, ValueError, KeyError):
        return local
    return RemoteConfig(local).effective(kit_id)


def rotate_key(state_dir: Path, old: KitIdentity) -> KitIdentity:
    """Make a new kit key; the old one goes to ``identity/archive/``. Crash-safe with `repair_identity`."""
    d = state_dir / "identity"
    arch = d / "archive"
    arch.mkdir(exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    shutil.copyfile(d / "kit.key", arch / f"kit-{stamp}.key")
    os.chmod(arch / f"kit-{stamp}.key", 0o600)
    fsync_dir(arch)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Order: new key beside the old, then kit.json names it, then rename; repair_identity finishes a cut.
    atomic_write(d / "kit.key.new", pem)
    os.chmod(d / "kit.key.new", 0o600)
    meta = {"kit_id": old.kit_id, "public_key": cp.public_b64(key), "algorithm": "ed25519",
            "previous_keys": _read_json(d / "kit.json", {}).get("previous_keys", []) + [old.public_key_b64]}
    atomic_write(d / "kit.json", json.dumps(meta, indent=1).encode())
    os.chmod(d / "kit.json", 0o600)
    os.replace(d / "kit.key.new", d / "kit.key")
    fsync_dir(d)
    log.warning("kit key rotated kit_id=%s old=%s new=%s", old.kit_id, cp.key_fingerprint(old.signing_key),
                cp.key_fingerprint(key))
    return KitIdentity(old.kit_id, key)


# --- command replay protection ----------------------------------------------------------------


class CommandGuard:
    """Persistent replay protection: seen command ids (until they expire) and a watermark.

    A command is refused if its id was seen, it has expired, it claims to be issued in the future
    (beyond the allowed clock skew), its lifetime is longer than allowed, or it was issued at or
    before the watermark: the newest issue time of any command forgotten from the table, so a
    clock that jumps back cannot resurrect one.
    """

    def __init__(self, path: Path, max_skew_s: int, max_ttl_s: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (cmd_id TEXT PRIMARY KEY, name TEXT, issued_at INTEGER, "
                        "expires_at INTEGER, received_at INTEGER, outcome TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        self.max_skew_s, self.max_ttl_s = max_skew_s, max_ttl_s
        self._lock = threading.Lock()

    def watermark(self) -> int:
        row = self.db.execute("SELECT v FROM meta WHERE k = 'watermark'").fetchone()
        return int(row[0]) if row else 0

    def admit(self, body: dict[str, Any], now: float | None = None) -> None:
        """Record the command as seen, or raise `Refused`. Recorded before it runs: at most once."""
        now = int(now if now is not None else time.time())
        issued, expires = body["issued_at"], body["expires_at"]
        with self._lock:
            self._prune(now)
            if self.db.execute("SELECT 1 FROM seen WHERE cmd_id = ?", (body["cmd_id"],)).fetchone():
                raise Refused("replayed", f"command {body['cmd_id']} was already received")
            if expires <= now:
                raise Refused("expired", f"expired {now - expires} s ago")
            if issued > now + self.max_skew_s:
                raise Refused("future", f"issued {issued - now} s in the future (clock skew > {self.max_skew_s} s)")
            if expires - issued > self.max_ttl_s:
                raise Refused("ttl_too_long", f"lifetime {expires - issued} s > {self.max_ttl_s} s")
            if issued <= self.watermark():
                raise Refused("too_old", "issued before the replay window (older than forgotten commands)")
            self.db.execute("INSERT INTO seen VALUES (?,?,?,?,?,?)",
                            (body["cmd_id"], body["name"], issued, expires, now, "received"))

    def done(self, cmd_id: str, outcome: str) -> None:
        with self._lock:
            self.db.execute("UPDATE seen SET outcome = ? WHERE cmd_id = ?", (outcome[:200], cmd_id))

    def _prune(self, now: int) -> None:
        cutoff = now - self.max_skew_s
        row = self.db.execute("SELECT MAX(issued_at) FROM seen WHERE expires_at < ?", (cutoff,)).fetchone()
        if row and row[0] is not None:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO meta VALUES ('watermark', ?) ON CONFLICT(k) DO UPDATE SET v = MAX(v, ?)",
                            (row[0], row[0]))
            self.db.execute("DELETE FROM seen WHERE expires_at < ?", (now - self.max_skew_s,))
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


# --- the control plane ----------------------------------------------------------------------


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    retain: bool = False
    correlation: bytes | None = None


@dataclass
class Stats:
    """Counters reported in telemetry."""

    refused: dict[str, int] = field(default_factory=dict)
    commands: int = 0
    connects: int = 0
    last_refusal: str = ""


class ControlPlane:
    """Kit side of the control plane (see module doc).

    `kit` is the running `firmware.daemon.Kit` (or any object with `cfg`, `identity`, `store`,
    `services`, `hardware`, `enrollment`, `started` and optionally `request_exit(status)`).
    `local` is the config file alone (re-read from ``kit.cfg.source`` when not given).
    """

    def __init__(self, kit: Any, local: config.Config | None = None) -> None:
        self.kit = kit
        self.cfg: config.Config = kit.cfg
        self.identity: KitIdentity = kit.identity
        self.paths = ControlPaths.of(self.cfg)
        self.remote = RemoteConfig(local or self._local_config())
        self.running_version = self.remote.version  # the document the running config was built from
        c = self.cfg.control
        self.guard = CommandGuard(self.paths.root / "commands.db", c.max_clock_skew_s, c.max_command_ttl_s)
        self.stats = Stats()
        self.connected = threading.Event()
        self.broker = ""
        self.stop_event = threading.Event()
        self.exit_requested: int | None = None
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._out: queue.Queue[_Outgoing] = queue.Queue(maxsize=1000)
        self._work: queue.Queue[tuple[dict[str, Any], Any] | None] = queue.Queue(maxsize=100)
        self._threads: list[threading.Thread] = []
        self._started = time.monotonic()
        self._client: Any = None
        self._reconnect = threading.Event()
        self._pending = threading.Event()  # a command is queued or running: tick fast for its result
        self._apply_lock_state()

    def _local_config(self) -> config.Config:
        # The daemon runs the merged config; floors and merges always start from the local file.
        src = Path(self.cfg.source)
        if src.is_file():
            try:
                return config.load(src)
            except config.ConfigError as e:
                log.error("cannot re-read local config file=%s error=%s; using the running config", src, e)
        return self.cfg

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the network and command threads (returns at once)."""
        for name, target in (("control", self._run), ("control-cmd", self._worker)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Publish offline, disconnect, stop the threads."""
        self.stop_event.set()
        self._work.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self.guard.close()

    def request_exit(self, status: int, why: str) -> None:
        log.warning("control requests daemon exit status=%d reason=%s", status, why)
        self.exit_requested = status
        fn = getattr(self.kit, "request_exit", None)
        if fn is not None:
            fn(status)

    def status(self) -> dict[str, Any]:
        """For the kit's status and telemetry."""
        return {"connected": self.connected.is_set(), "broker": self.broker, "provisioned": self.paths.provisioned(),
                "config_version": self.remote.version, "trial": self.remote.state.get("trial"),
                "locked": self.lock_reason(), "refused": dict(self.stats.refused), "commands": self.stats.commands}

    # -- refusals -----------------------------------------------------------------------------

    def _refuse(self, what: str, topic: str, e: Exception) -> None:
        reason = getattr(e, "reason", type(e).__name__)
        self.stats.refused[reason] = self.stats.refused.get(reason, 0) + 1
        self.stats.last_refusal = f"{what}: {e}"
        log.warning("control refused what=%s topic=%s reason=%s detail=%s", what, topic, reason, str(e)[:300])
        try:
            self.kit.store.j.audit("control_refused", "fleet", what=what, topic=topic, reason=reason,
                                   detail=str(e)[:300])
        except Exception as ae:  # the store may be closing; the log line above is what matters
            log.debug("audit failed error=%s", ae)

    # -- lock ---------------------------------------------------------------------------------

    def lock_reason(self) -> str:
        return str(_read_json(self.paths.root / "lock.json", {}).get("reason", ""))

    def _apply_lock_state(self) -> None:
        enr = getattr(self.kit, "enrollment", None)
        if enr is not None:
            enr.lock_reason = self.lock_reason()

    # -- network thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if not self.paths.provisioned():
                    self._claim()
                    continue
                self._session()
            except Exception:
                log.exception("control loop crashed; restarting in 5 s")
                self.stop_event.wait(5)

    def _claim(self) -> None:
        from firmware.control import claim as provision

        try:
            doc = provision.claim(self.cfg, self.identity, self.stop_event)
        except provision.ClaimError as e:  # misconfigured kit (no claim brokers or certificate): say so, slowly
            log.error("cannot claim kit_id=%s reason=%s detail=%s", self.identity.kit_id, e.reason, e)
            self.stop_event.wait(60)
            return
        if doc is None:
            return
        self.kit.store.j.audit("claimed", "fleet", fleet_key=cp.key_fingerprint(self.paths.fleet_key.read_text()))
        self._offer_config(doc, "claim")
        relay = self.cfg.raw.get("relay") or {}
        if relay.get("brokers") and not relay.get("cert_file") and self.exit_requested is None:
            self.request_exit(EX_RESTART, "claimed: restart so the record relay uses the kit certificate")

    def _session(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = self.cfg.control
        brokers = control_brokers(self.cfg)
        if not brokers:
            log.error("no control brokers (control.brokers empty and no mqtts:// relay.brokers); control plane idle")
            self.stop_event.wait(60)
            return
        kit = self.identity.kit_id
        delay, n = 1.0, 0
        while not self.stop_event.is_set():
            self._check_trial_deadline()
            broker = brokers[n % len(brokers)]
            n += 1
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{kit}-ctl", protocol=mqtt.MQTTv5)
            client.tls_set_context(tls_context(self.paths.ca, self.paths.cert, self.paths.tls_key))
            client.will_set(cp.status_topic(kit), self._status_payload("offline", "connection lost"), qos=1,
                            retain=True)
            client.on_connect = lambda _c, _u, _f, rc, props: self._events.put(("connect", rc))
            client.on_disconnect = lambda _c, _u, _f, rc, props: self._events.put(("disconnect", rc))
            client.on_message = lambda _c, _u, msg: self._events.put(("message", msg))
            client.on_publish = lambda _c, _u, mid, rc, props: self._events.put(("puback", (mid, rc)))
            host, port = split_hostport(broker)
            try:
                client.connect(host, port, keepalive=c.keepalive_s, clean_start=True)
            except (OSError, ssl.SSLError, ValueError) as e:
                log.warning("control connect failed broker=%s error=%s; next in %.0f s", broker, e, delay)
                self.stop_event.wait(delay * random.uniform(0.5, 1.0))  # jitter: a fleet must not reconnect in step
                delay = min(120.0, delay * 2)
                continue
            self.broker = broker
            self._client = client  # diagnostics only; only this thread calls it
            _nodelay(client)
            if self._loop(client, broker):
                delay, n = 1.0, n - 1  # it worked: come back to the same broker first
            client.disconnect()
            self.connected.clear()
            if not self.stop_event.is_set():
                self.stop_event.wait(delay * random.uniform(0.5, 1.0))
                delay = min(120.0, delay * 2)

    def _loop(self, client: Any, broker: str) -> bool:
        """Run one connection until it drops or we stop; True if CONNACK was a success."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        kit = self.identity.kit_id
        ok = False
        flushed = False
        next_tel = 0.0
        connect_deadline = time.monotonic() + 30
        while not self.stop_event.is_set():
            busy = self._pending.is_set() or not self._out.empty()
            rc = client.loop(timeout=LOOP_S if busy else IDLE_LOOP_S)
            if rc != 0:  # connection lost (before or after CONNACK)
                log.warning("control connection lost broker=%s rc=%s connected=%s", broker, rc, ok)
                return ok
            while True:
                try:
                    kind, arg = self._events.get_nowait()
                except queue.Empty:
                    break
                if kind == "connect":
                    if arg.is_failure:
                        log.error("control broker refused connection broker=%s reason=%s", broker, arg)
                        return False
                    ok = True
                    self.stats.connects += 1
                    self.connected.set()
                    log.info("control connected broker=%s kit_id=%s", broker, kit)
                    client.subscribe([(cp.config_topic(kit), 1), (cp.cmd_topic(kit), 1)])
                    client.publish(cp.status_topic(kit), self._status_payload("online"), qos=1, retain=True)
                    self._try_promote()
                    client.publish(cp.config_state_topic(kit), self._config_state(), qos=1, retain=True)
                    next_tel = 0.0
                elif kind == "disconnect":
                    if ok:
                        log.warning("control disconnected broker=%s reason=%s", broker, arg)
                        return True
                elif kind == "message":
                    self._on_message(arg)
                elif kind == "puback":
                    mid, prc = arg
                    if prc.is_failure:
                        log.error("control publish refused by broker mid=%s reason=%s", mid, prc)
            if not ok:
                if time.monotonic() > connect_deadline:
                    log.warning("control no CONNACK within 30 s broker=%s", broker)
                    return False
                continue
            while True:
                try:
                    o = self._out.get_nowait()
                except queue.Empty:
                    break
                props = None
                if o.correlation is not None:
                    props = Properties(PacketTypes.PUBLISH)
                    props.CorrelationData = o.correlation
                client.publish(o.topic, o.payload, qos=1, retain=o.retain, properties=props)
            if self._trial_running() and self._try_promote():
                client.publish(cp.config_state_topic(kit), self._config_state(), qos=1, retain=True)
            self._check_trial_deadline()
            now = time.monotonic()
            if now >= next_tel:
                client.publish(cp.telemetry_topic(kit), self._signed("telemetry", self.telemetry()), qos=1)
                next_tel = now + self.cfg.control.telemetry_interval_s
            if self.exit_requested is not None and not flushed:
                flushed = True  # let queued results and state go out before the daemon stops us
                for _ in range(20):
                    client.loop(timeout=0.05)
            if self._reconnect.is_set():
                self._reconnect.clear()  # e.g. after a key rotation: the Last Will must be signed by the new key
                log.info("control reconnecting broker=%s (new will)", broker)
                return True
        if ok:
            client.publish(cp.status_topic(kit), self._status_payload("offline", "stopped"), qos=1, retain=True)
            for _ in range(10):
                client.loop(timeout=0.05)
        return ok

    def _trial_running(self) -> bool:
        trial = self.remote.state.get("trial")
        return bool(trial) and trial["version"] == self.running_version

    def _uplinks_healthy(self) -> tuple[bool, str]:
        """The trial config may be promoted: control is connected, and so is the record relay if one runs."""
        if not self.connected.is_set():
            return False, "control not connected"
        relay = (getattr(self.kit, "services", None) or {}).get("relay")
        if relay is not None and hasattr(relay, "status"):
            try:
                state = relay.status().get("state")
            except Exception as e:  # a broken relay is not healthy
                return False, f"relay status failed: {e}"
            if state != "connected":
                return False, f"relay {state}"
        return True, ""

    def _try_promote(self) -> bool:
        ok, why = self._uplinks_healthy()
        if not ok or self.remote.promote(self.running_version) is None:
            return False
        self.kit.store.j.audit("config_promoted", "control", version=self.running_version)
        return True

    def _check_trial_deadline(self) -> None:
        if not self._trial_running() or self.exit_requested is not None:
            return
        trial = self.remote.state["trial"]
        waited = time.monotonic() - self._started
        if waited > self.cfg.control.rollback_after_s:
            _, why = self._uplinks_healthy()
            self.remote.rollback(f"no broker connection within {self.cfg.control.rollback_after_s:.0f} s "
                                 f"with config v{trial['version']} ({why})")
            self.kit.store.j.audit("config_rollback", "control", version=trial["version"])
            self.request_exit(EX_RESTART, "config rolled back: restart with the last good one")

    # -- messages -----------------------------------------------------------------------------

    def _signed(self, kind: str, body: dict[str, Any]) -> bytes:
        return cp.sign(kind, body, self.identity.signing_key)

    def _status_payload(self, state: str, why: str = "") -> bytes:
        return self._signed("status", {"kit_id": self.identity.kit_id, "state": state, "reason": why,
                                       "at": int(time.time()), "version": __version__})

    def _config_state(self) -> bytes:
        st = self.remote.state
        body = {"kit_id": self.identity.kit_id, "running": self.running_version, "current": st["current"],
                "last_good": st["last_good"], "trial": st.get("trial"), "last_event": st.get("last_event"),
                "at": int(time.time())}
        return self._signed("config_state", body)

    def _queue_config_state(self) -> None:
        self._out.put(_Outgoing(cp.config_state_topic(self.identity.kit_id), self._config_state(), retain=True))

    def _on_message(self, msg: Any) -> None:
        kit = self.identity.kit_id
        topic = msg.topic
        data = bytes(msg.payload)
        if topic == cp.config_topic(kit):
            if data:  # an empty retained message clears the topic; nothing to apply
                self._offer_config(data, topic)
        elif topic == cp.cmd_topic(kit):
            self._on_command(data, msg.properties)
        else:
            self._refuse("message", topic, Refused("unexpected_topic", "not subscribed to this topic"))

    def _offer_config(self, data: bytes, topic: str) -> None:
        """Verify, validate and apply a config document (see module doc)."""
        if self.remote.version and data == self.remote.current_bytes():
            log.debug("config document already current version=%d", self.remote.version)  # retained, re-delivered
            return
        try:
            cand = self.remote.evaluate(data, self.identity.kit_id, self.cfg)
        except Refused as e:
            self._refuse("config", topic, e)
            try:  # a well-signed but bad document is answered; junk is not
                body = cp.verify(data, "config", self.remote.fleet_key())  # type: ignore[arg-type]
                version = int(body.get("version", 0)) if isinstance(body.get("version"), int) else 0
                # Only a document for this kit that failed validation is remembered (and answered), so the
                # same retained document is not re-tried; junk never moves the version counter.
                if e.reason in ("invalid", "forbidden") and version > 0:
                    self.remote.note_seen(version)
                    self.remote.event(version, "rejected", str(e))
                    self._queue_config_state()
            except (cp.ProtocolError, TypeError, AttributeError):
                pass
            return
        try:
            if cand.live or not cand.changed:
                self._apply_live(cand)
                self.remote.accept(cand)
                self.remote.event(cand.version, "applied")
                self.cfg = cand.cfg
                self.running_version = cand.version
                log.info("remote config applied live version=%d changed=%s", cand.version, ",".join(cand.changed))
            else:
                self.remote.accept(cand)
                self.remote.event(cand.version, "pending_restart", "changed " + ", ".join(cand.changed)[:400])
                log.warning("remote config accepted version=%d changed=%s; restarting to apply", cand.version,
                            ",".join(cand.changed))
        except (Refused, OSError, ValueError) as e:
            self.remote.note_seen(cand.version)
            self.remote.event(cand.version, "rejected", f"apply failed: {e}")
            self._refuse("config", topic, e if isinstance(e, Refused) else Refused("apply_failed", str(e)))
            self._queue_config_state()
            return
        self.kit.store.j.audit("config_applied", "fleet", version=cand.version, changed=cand.changed)
        self._queue_config_state()
        if not (cand.live or not cand.changed):
            self.request_exit(EX_RESTART, f"config v{cand.version} needs a restart")

    def _apply_live(self, cand: Candidate) -> None:
        if "operators.list" in cand.changed:
            from firmware.enrollment.operators import operators_from_config

            enr = getattr(self.kit, "enrollment", None)
            if enr is not None:
                enr.operators.replace(operators_from_config(cand.cfg.operators.list))

    # -- commands -----------------------------------------------------------------------------

    def _on_command(self, data: bytes, props: Any) -> None:
        topic = cp.cmd_topic(self.identity.kit_id)
        key = self.remote.fleet_key()
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        # Only ever answer on our own result topic, whatever Response Topic the message names.
        reply = (cp.result_topic(self.identity.kit_id), corr)
        body: dict[str, Any] | None = None
        try:
            if key is None:
                raise Refused("not_claimed", "no pinned fleet key")
            try:
                body = cp.check_command(cp.verify(data, "cmd", key))
            except cp.ProtocolError as e:
                raise Refused(e.reason, str(e)) from None
            if body["kit_id"] != self.identity.kit_id:
                raise Refused("wrong_kit", f"command is for {body['kit_id']}")
            self.guard.admit(body)
        except Refused as e:
            self._refuse("command", topic, e)
            if body is not None and e.reason in ANSWERED_REFUSALS:
                # Genuine fleet command, refused for its timing: tell the operator why (replays get no answer,
                # the original already had one).
                self._out.put(self._result(body, reply, False, e.reason, str(e)))
            return
        self.stats.commands += 1
        self._pending.set()
        try:
            self._work.put_nowait((body, reply))
        except queue.Full:
            self.guard.done(body["cmd_id"], "dropped: busy")
            self._out.put(self._result(body, reply, False, "busy", "command queue full"))

    def _result(self, body: dict[str, Any], reply: tuple[str, Any], ok: bool, code: str, message: str,
                data: dict[str, Any] | None = None, key: Ed25519PrivateKey | None = None) -> _Outgoing:
        res = {"cmd_id": body["cmd_id"], "kit_id": self.identity.kit_id, "name": body["name"], "ok": ok, "code": code,
               "message": message[:500], "data": data or {}, "at": int(time.time())}
        payload = cp.sign("result", res, key or self.identity.signing_key)
        return _Outgoing(reply[0], payload, correlation=reply[1])

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            body, reply = item
            sign_key = self.identity.signing_key
            ok = False
            try:
                data, message = self._execute(body)
                out = self._result(body, reply, True, "ok", message, data, key=sign_key)
                ok = True
                self.guard.done(body["cmd_id"], "ok")
                log.info("command done cmd_id=%s name=%s", body["cmd_id"], body["name"])
            except Refused as e:
                out = self._result(body, reply, False, e.reason, str(e), key=sign_key)
                self.guard.done(body["cmd_id"], f"refused: {e.reason}")
                log.warning("command failed cmd_id=%s name=%s reason=%s", body["cmd_id"], body["name"], e)
            except Exception as e:  # a command must never take the control plane down
                log.exception("command crashed cmd_id=%s name=%s", body["cmd_id"], body["name"])
                out = self._result(body, reply, False, "error", f"{type(e).__name__}: {e}", key=sign_key)
                self.guard.done(body["cmd_id"], "error")
            try:
                self.kit.store.j.audit("command", "fleet", cmd_id=body["cmd_id"], name=body["name"],
                                       ok=ok)
            except Exception as ae:
                log.debug("audit failed error=%s", ae)
            self._out.put(out)
            if self._work.empty():
                self._pending.clear()
            if body["name"] == "reboot":
                self.request_exit(EX_REBOOT, f"reboot command {body['cmd_id']}")

    def _execute(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        name, args = body["name"], body["args"]
        store = self.kit.store
        if name == "status":
            return self.telemetry(), "status"
        if name == "sync":
            relay = (getattr(self.kit, "services", None) or {}).get("relay")
            fn = getattr(relay, "sync_now", None)
            if fn is None:
                raise Refused("no_relay", "no record relay is running on this kit")
            fn()
            return {}, "relay woken"
        if name == "set_operators":
            ops = args.get("operators")
            self.cfg = self.remote.set_operators(self.cfg, ops)
            enr = getattr(self.kit, "enrollment", None)
            if enr is not None:
                from firmware.enrollment.operators import operators_from_config

                enr.operators.replace(operators_from_config(self.cfg.operators.list))
            return {"operators": [o["id"] for o in self.cfg.operators.list]}, f"{len(ops)} operator(s) set"
        if name == "lock":
            reason = str(args.get("reason") or "locked by the fleet")[:200]
            _write_json(self.paths.root / "lock.json", {"reason": reason, "at": int(time.time()),
                                                        "cmd_id": body["cmd_id"]})
            self._apply_lock_state()
            return {"locked": reason}, "capture locked"
        if name == "unlock":
            (self.paths.root / "lock.json").unlink(missing_ok=True)
            fsync_dir(self.paths.root)
            self._apply_lock_state()
            return {"locked": ""}, "capture unlocked"
        if name == "purge":
            return {"purged": store.purge_acknowledged()}, "purged acknowledged records"
        if name == "export_usb":
            if store.stick is None:
                raise Refused("no_stick", "no USB stick is present")
            return {"copied": store.backfill()}, "exported to USB"
        if name == "rotate_key":
            old = self.identity
            new = rotate_key(self.cfg.state_dir, old)
            # The result is signed by the OLD key (the fleet trusts it) and carries the new key,
            # plus the new key's signature over the old one (proof the kit holds it).
            proof = new.signing_key.sign(b"rekam-key-rotation:" + old.public_key_raw + new.public_key_raw)
            data = {"new_public_key": new.public_key_b64, "old_public_key": old.public_key_b64,
                    "proof": base64.b64encode(proof).decode()}
            self._switch_identity(new)
            self._reconnect.set()
            return data, "kit key rotated"
        if name == "reboot":
            return {}, "rebooting"
        raise Refused("unknown_command", name)

    def _switch_identity(self, new: KitIdentity) -> None:
        self.identity = new
        self.kit.identity = new
        store = self.kit.store
        lock = getattr(store, "_lock", None)
        if lock is not None:
            with lock:  # never between the seal and the journal row of a commit
                store.identity = new
        else:
            store.identity = new

    # -- telemetry ----------------------------------------------------------------------------

    def telemetry(self) -> dict[str, Any]:
        """The periodic health message (also the `status` command's answer)."""
        k = self.kit
        st = k.store.status()
        rec = st["records"]
        guard = st["guard"]
        health: dict[str, Any] = {}
        for name, obj in {**(getattr(k, "hardware", None) or {}), **(getattr(k, "services", None) or {})}.items():
            if name in health or obj is None:
                continue
            try:
                if hasattr(obj, "status") and callable(obj.status):
                    s = obj.status()
                    health[name] = s if isinstance(s, dict) else {"status": str(s)}
                else:
                    err = str(getattr(obj, "error", "") or "")
                    health[name] = {"ok": not err, "error": err}
            except Exception as e:  # health must always answer
                health[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        oldest = st.get("oldest_unacked")
        age = None
        if oldest:
            try:
                age = int(time.time() - dt.datetime.fromisoformat(oldest.replace("Z", "+00:00")).timestamp())
            except ValueError:
                age = None
        started = getattr(k, "started", self._started)
        return {
            "kit_id": self.identity.kit_id,
            "at": int(time.time()),
            "media": [{"name": m["name"], "present": m.get("present", True), "free_bytes": m.get("free_bytes"),
                       "total_bytes": m.get("total_bytes"), "records_left": m.get("records_left"),
                       "level": m.get("level"), "reason": m.get("reason", "")} for m in st["media"]],
            "guard": {"level": guard["level"], "reasons": guard["reasons"]},
            "halted": guard["level"] == "HALT",
            "halt_reasons": guard["reasons"] if guard["level"] == "HALT" else [],
            "backlog": {"records": rec["stored"]["records"] + rec["sent"]["records"],
                        "bytes": rec["stored"]["bytes"] + rec["sent"]["bytes"]},
            "oldest_unacked": oldest,
            "oldest_unacked_age_s": age,
            "mirror_lag": st["mirror_lag"],
            "stick": st["stick"],
            "health": health,
            "cpu_temp_c": cpu_temperature(),
            "uptime_s": round(time.monotonic() - started, 1),
            "os_uptime_s": _os_uptime(),
            "versions": {"firmware": __version__, "python": platform.python_version(),
                         "config": self.remote.version},
            "locked": self.lock_reason(),
            "control": {"refused": dict(self.stats.refused), "commands": self.stats.commands,
                        "connects": self.stats.connects},
        }


def _nodelay(client: Any) -> None:
    # Control messages are small request/response pairs: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
    import socket

    try:
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def control_brokers(cfg: config.Config) -> list[str]:
    """host:port list for the control connection: ``control.brokers``, else the relay's mqtts:// brokers
    (same brokers, same fleet CA; the control plane only ever uses TLS with the kit certificate)."""
    if cfg.control.brokers:
        return list(cfg.control.brokers)
    from urllib.parse import urlsplit

    out = []
    for url in (cfg.raw.get("relay") or {}).get("brokers", []):
        u = urlsplit(url)
        if u.scheme == "mqtts" and u.hostname:
            out.append(f"{u.hostname}:{u.port or 8883}")
    return out


def cpu_temperature(path: Path = Path("/sys/class/thermal/thermal_zone0/temp")) -> float | None:
    """SoC temperature in °C, or None where there is no thermal zone."""
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def _os_uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
