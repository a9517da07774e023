"""Signed, versioned remote config on the kit: checking, trial, promotion to last-good, rollback.

Files (``<state_dir>/remote-config/``): ``current.json`` and ``last-good.json`` hold signed documents
exactly as received (re-verified on every start), ``state.json`` the versions. A document that changes
only live keys (`LIVE_KEYS`: operators list, telemetry interval) is applied at once; anything else is
a *trial*: the daemon restarts with it and promotes it to last-good once it reaches a broker
(`firmware.control.plane`). `MAX_TRIAL_BOOTS` starts without that restore last-good.

Remote config may never touch what `DENIED` lists, nor lower a `FLOORS` setting below the local file's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware import config
from firmware.control.claim import ControlPaths
from firmware.control.files import read_json as _read_json
from firmware.control.files import write_json as _write_json
from firmware.errors import Refused
from firmware.seal.rotation import repair_identity
from firmware.system.fsutil import atomic_write, fsync_dir
from firmware.wire import control_protocol as cp

log = logging.getLogger(__name__)

MAX_TRIAL_BOOTS = 3
# Safety floors: remote config may raise these, never lower them below the local file's value.
FLOORS = ("store.reserve_floor_mb", "store.reserve_records", "store.purge_requires_stick", "store.verify_readback",
          # a plain SD folder must never pass for the second medium that purge_requires_stick asks for
          "usb.require_mountpoint")
# What remote config may never touch (identity, local paths of trust, the local API's exposure).
DENIED = {"kit": None, "api": None,
          "control": {"enabled", "ca_file", "claim_cert_file", "claim_key_file", "fleet_public_key", "claim_brokers"},
          "datacenter": set(),
          # commands the daemon runs (issue #18): set only in the kit's own file, never by the fleet
          "power": {"shutdown_command"}, "gnss": {"chrony_command"},
          # local files the daemon reads and sends or trusts (a password file pointed at /etc/shadow would go
          # to the broker), and where the stick is mounted: the kit's own file sets them
          "relay": {"password_file", "ca_file", "cert_file", "key_file"}, "usb": {"mount_point"}}
# Applied without a restart (the data-center ack keys too: a key rotation must not need a restart per kit).
LIVE_KEYS = {"operators.list", "control.telemetry_interval_s", "relay.ack_public_keys"}
MAX_FILE_BYTES = 16 * 1024


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


def effective_config(local: config.Config) -> config.Config:
    """The config `rekamd` should run: the local file merged with the current remote document."""
    repair_identity(local.state_dir)
    try:
        kit_id = json.loads((local.state_dir / "identity" / "kit.json").read_text())["kit_id"]
    except (OSError, ValueError, KeyError):
        return local
    return RemoteConfig(local).effective(kit_id)

