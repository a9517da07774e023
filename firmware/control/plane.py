"""The kit's control plane service: signed remote config with rollback, signed replay-proof commands, telemetry.

It runs on its own MQTT v5 connection (client id ``<kit_id>-ctl-<random>``, mTLS with the certificate the claim
produced, see `firmware.control.claim`) so control traffic is never stuck behind the record relay. The
connection is the one MQTT adapter (`firmware.system.mqtt.MqttLink`) run on the ``control`` thread: its
handlers verify and dispatch what arrives; commands run on one worker thread (`firmware.control.commands`)
and publish their results thread-safely. Every refusal is logged (``control refused ... reason=...``),
written to the audit journal and counted in telemetry; nothing of a refused message is applied.

Remote config (`firmware.control.remote_config`): a document that changes only live keys is applied at
once; anything else is a *trial*: the daemon exits with `EX_RESTART` (systemd restarts it), starts with
the new config, and promotes it to last-good once this connection reaches a broker (and the relay, if one
runs). No connection within ``control.rollback_after_s``, or `MAX_TRIAL_BOOTS` starts without one,
restores last-good and exits `EX_RESTART` again. `EX_REBOOT` asks the unit to reboot the machine.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware import __version__, config
from firmware.control.claim import ControlPaths, tls_context
from firmware.control.commands import EX_REBOOT, CommandRunner, Outgoing
from firmware.control.files import read_json
from firmware.control.host import ControlHost
from firmware.control.remote_config import MAX_TRIAL_BOOTS, Candidate, RemoteConfig, effective_config
from firmware.control.replay import ANSWERED_REFUSALS, CommandGuard
from firmware.control.telemetry import telemetry as build_telemetry
from firmware.errors import Refused
from firmware.seal.identity import KitIdentity
from firmware.system.mqtt import Broker, Message, MqttLink, MqttSettings, Will, client_id
from firmware.wire import control_protocol as cp

__all__ = ["EX_REBOOT", "EX_RESTART", "MAX_TRIAL_BOOTS", "CommandGuard", "ControlPlane", "Refused", "RemoteConfig",
           "Stats", "control_brokers", "effective_config"]

log = logging.getLogger(__name__)

EX_RESTART = 75  # EX_TEMPFAIL: restart the daemon to load a new (or the last good) config
#: A restart or reboot the fleet asked for waits this long for the enrollment under way (the resident at the kit,
#: captures in memory) before that enrollment is cancelled; new ones are refused meanwhile.
EXIT_GRACE_S = 600.0
TICK_S = 0.25  # network loop tick: incoming packets and publishes from other threads wake it at once
CONNECT_TIMEOUT_S = 10.0
STOP_FLUSH_S = 1.0  # how long stop() waits for the "offline" status to reach the broker


@dataclass
class Stats:
    """Counters reported in telemetry."""

    refused: dict[str, int] = field(default_factory=dict)
    commands: int = 0
    connects: int = 0
    last_refusal: str = ""


class ControlPlane:
    """Kit side of the control plane (see module doc); a `firmware.system.service.Service`.

    `kit` is the running kit: any `firmware.control.host.ControlHost` (the daemon's `Kit`).
    `local` is the config file alone (re-read from ``kit.cfg.source`` when not given).
    """

    name = "control"

    def __init__(self, kit: ControlHost, local: config.Config | None = None) -> None:
        self.kit = kit
        self.cfg: config.Config = kit.cfg
        self.identity: KitIdentity = kit.identity
        self.paths = ControlPaths.of(self.cfg)
        self.remote = RemoteConfig(local or self._local_config())
        self.running_version = self.remote.version  # the document the running config was built from
        self.guard = self._new_guard()
        self.stats = Stats()
        self.connected = threading.Event()
        self.broker = ""
        self.stop_event = threading.Event()
        self.exit_requested: int | None = None
        self.link: MqttLink | None = None
        self.runner = CommandRunner(self, self.guard, self._send)
        self._early: list[Outgoing] = []  # messages made before the first connection existed (claim)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._started = time.monotonic()
        self._next_tel = 0.0
        self.error = ""  # why the network thread ended on its own (health: failed; the supervisor restarts it)
        self.exception: BaseException | None = None

    def _local_config(self) -> config.Config:
        # The daemon runs the merged config; floors and merges always start from the local file.
        src = Path(self.cfg.source)
        if src.is_file():
            try:
                return config.load(src)
            except config.ConfigError as e:
                log.error("cannot re-read local config file=%s error=%s; using the running config", src, e)
        return self.cfg

    # -- lifecycle (Service) ----------------------------------------------------------------

    def _new_guard(self) -> CommandGuard:
        c = self.cfg.control
        return CommandGuard(self.paths.root / "commands.db", c.max_clock_skew_s, c.max_command_ttl_s)

    def start(self) -> None:
        """Start the network and command threads (returns at once; does nothing while they run).

        Also the restart after a crash: the daemon's supervisor calls `stop()`, waits its backoff, then
        `start()` again, which reopens the replay guard and the command worker.
        """
        if self._thread is not None and self._thread.is_alive():
            return
        if self._stopped:  # started again after a stop (a supervisor restart)
            self._stopped = False
            self.stop_event.clear()
            self.guard = self._new_guard()
            self.runner = CommandRunner(self, self.guard, self._send)
        self.error, self.exception = "", None
        self.apply_lock_state()  # here, not in __init__: the enrollment service exists once its stage started
        self.runner.start()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Publish offline, disconnect, stop the threads (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        link = self.link
        if link is not None and link.connected:
            d = link.publish(cp.status_topic(self.identity.kit_id), self._status_payload("offline", "stopped"),
                             retain=True)
            d.wait(STOP_FLUSH_S)
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.runner.stop()
        self.guard.close()

    close = stop

    def health(self) -> dict[str, Any]:
        """The Service view: ``state`` (``failed`` if the thread ended without a stop) and the connection."""
        t = self._thread
        if t is not None and t.is_alive():
            return {"state": "running", "connected": self.connected.is_set(), "broker": self.broker}
        if t is not None and not (self._stopped or self.stop_event.is_set()):
            return {"state": "failed", "error": self.error or "control thread ended"}
        return {"state": "stopped"}

    def request_exit(self, status: int, why: str, grace_s: float = EXIT_GRACE_S) -> None:
        """Ask the daemon to exit with `status` (75 restart, 76 reboot), once no enrollment is under way.

        An exit drops what an enrollment holds in memory (its face, fingers, irises: the resident is still at the
        kit), so new enrollments are refused from now on (``restart_pending``) and the one under way may finish
        within `grace_s`; after that it is cancelled (never in the middle of a capture or its commit)."""
        log.warning("control requests daemon exit status=%d reason=%s", status, why)
        self.exit_requested = status
        enr = getattr(self.kit, "enrollment", None)
        if enr is not None and getattr(enr, "active", None) is not None:
            enr.exit_lock = "restart_pending"
            log.warning("daemon exit waits for the enrollment under way enrollment=%s grace_s=%.0f", enr.active.id,
                        grace_s)
            threading.Thread(target=self._exit_when_idle, args=(status, why, enr, grace_s), name="control-exit",
                             daemon=True).start()
            return
        self._exit_now(status)

    def _exit_now(self, status: int) -> None:
        fn = getattr(self.kit, "request_exit", None)
        if fn is not None:
            fn(status)

    def _exit_when_idle(self, status: int, why: str, enr: Any, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while enr.active is not None and time.monotonic() < deadline:
            if self.stop_event.wait(0.5):
                return  # the daemon stops anyway (its own shutdown handles the enrollment)
        while enr.active is not None:
            enr.active.cancel.set()  # ends a wait for a finger at once
            if enr.cancel_active(f"the kit restarts ({why})"):
                log.warning("daemon exit cancelled the enrollment under way after the grace reason=%s", why)
                break
            if self.stop_event.wait(0.5):  # a capture or the commit is still running: never cut in half
                return
        self._exit_now(status)

    def status(self) -> dict[str, Any]:
        """For the kit's status and telemetry."""
        return {"connected": self.connected.is_set(), "broker": self.broker, "provisioned": self.paths.provisioned(),
                "config_version": self.remote.version, "trial": self.remote.state.get("trial"),
                "locked": self.lock_reason(), "refused": dict(self.stats.refused), "commands": self.stats.commands}

    @property
    def _client(self) -> Any:
        """The paho client of the current connection (diagnostics and tests only)."""
        return self.link.client if self.link is not None else None

    # -- refusals -----------------------------------------------------------------------------

    def _refuse(self, what: str, topic: str, e: Exception) -> None:
        reason = getattr(e, "reason", type(e).__name__)
        log.warning("control refused what=%s topic=%s reason=%s detail=%s", what, topic, reason, str(e)[:300])
        # Counted after the log line: whoever watches the counter (status, a test) then finds the line written.
        self.stats.refused[reason] = self.stats.refused.get(reason, 0) + 1
        self.stats.last_refusal = f"{what}: {e}"
        self._audit("control_refused", "fleet", what=what, topic=topic, reason=reason, detail=str(e)[:300])

    def _audit(self, kind: str, actor: str, **detail: Any) -> None:
        try:
            self.kit.store.audit(kind, actor, **detail)
        except Exception as ae:  # the store may be closing; the log line is what matters
            log.debug("audit failed error=%s", ae)

    # -- lock ---------------------------------------------------------------------------------

    def lock_reason(self) -> str:
        """Why the fleet locked capture ('' when not locked)."""
        return str(read_json(self.paths.root / "lock.json", {}).get("reason", ""))

    def apply_lock_state(self) -> None:
        """Tell the enrollment service about the lock file."""
        enr = getattr(self.kit, "enrollment", None)
        if enr is not None:
            enr.lock_reason = self.lock_reason()

    # -- network thread -----------------------------------------------------------------------

    def _run(self) -> None:
        # No restart loop here: a crash ends the thread, health() says failed, and the daemon's
        # supervisor restarts the control plane with backoff (and reports it).
        try:
            while not self.stop_event.is_set():
                if not self.paths.provisioned():
                    self._claim()
                    continue
                self._session()
        except Exception as e:
            self.error, self.exception = f"{type(e).__name__}: {e}", e
            log.error("control plane crashed error=%s", self.error)

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
        self._audit("claimed", "fleet", fleet_key=cp.key_fingerprint(self.paths.fleet_key.read_text()))
        self._offer_config(doc, "claim")
        relay = self.cfg.raw.get("relay") or {}
        if relay.get("brokers") and not relay.get("cert_file") and self.exit_requested is None:
            self.request_exit(EX_RESTART, "claimed: restart so the record relay uses the kit certificate")

    def _settings(self, brokers: list[str]) -> MqttSettings:
        kit = self.identity.kit_id
        return MqttSettings(
            [Broker.parse(b, tls=True) for b in brokers], client_id(kit, "ctl"),
            keepalive_s=self.cfg.control.keepalive_s, connect_timeout_s=CONNECT_TIMEOUT_S,
            tls_context=lambda: tls_context(self.paths.ca, self.paths.cert, self.paths.tls_key),
            # A function: after a key rotation the next connection's will is signed by the new key.
            will=lambda: Will(cp.status_topic(kit), self._status_payload("offline", "connection lost")),
            subscriptions=[(cp.config_topic(kit), 1), (cp.cmd_topic(kit), 1)],
            tcp_nodelay=True,  # small request/response pairs: no Nagle + delayed-ACK 40 ms
            name="control")

    def _session(self) -> None:
        """Run the control connection until stopped (the adapter reconnects and fails over)."""
        brokers = control_brokers(self.cfg)
        if not brokers:
            log.error("no control brokers (control.brokers empty and no mqtts:// relay.brokers); control plane idle")
            self.stop_event.wait(60)
            return
        kit = self.identity.kit_id
        link = MqttLink(self._settings(brokers))
        link.handle(cp.config_topic(kit), self._on_config)
        link.handle(cp.cmd_topic(kit), self._on_command)
        link.on_message = lambda m: self._refuse("message", m.topic, Refused("unexpected_topic",
                                                                             "not subscribed to this topic"))
        link.on_connect = self._on_connect
        link.on_disconnect = self._on_disconnect
        self.link = link
        early, self._early = self._early, []
        for o in early:
            self._send(o)
        try:
            link.run(self.stop_event, tick=TICK_S, on_tick=self._tick)
        finally:
            self.connected.clear()

    def _on_connect(self) -> None:
        link = self.link
        if link is None or link.broker is None:  # gone again before the handler ran; the next connect counts
            return
        kit = self.identity.kit_id
        self.broker = f"{link.broker.host}:{link.broker.port}"
        self.stats.connects += 1
        self.connected.set()
        log.info("control connected broker=%s kit_id=%s", self.broker, kit)
        link.publish(cp.status_topic(kit), self._status_payload("online"), retain=True)
        self._try_promote()
        link.publish(cp.config_state_topic(kit), self._config_state(), retain=True)
        self._next_tel = 0.0

    def _on_disconnect(self, detail: str) -> None:
        self.connected.clear()
        log.warning("control disconnected broker=%s detail=%s", self.broker, detail)

    def _tick(self) -> None:
        """After every network step: trial deadline, promotion, telemetry."""
        self._check_trial_deadline()
        link = self.link
        if link is None or not link.connected:
            return
        if self._trial_running() and self._try_promote():
            link.publish(cp.config_state_topic(self.identity.kit_id), self._config_state(), retain=True)
        now = time.monotonic()
        if now >= self._next_tel:
            link.publish(cp.telemetry_topic(self.identity.kit_id), self._signed("telemetry", self.telemetry()))
            self._next_tel = now + self.cfg.control.telemetry_interval_s

    def _send(self, o: Outgoing) -> None:
        """Publish `o` (any thread); before the first connection exists, keep it for then."""
        link = self.link
        if link is None:
            self._early.append(o)
            return
        link.publish(o.topic, o.payload, qos=1, retain=o.retain, correlation=o.correlation)

    def reconnect(self) -> None:
        """Renew the connection (e.g. after a key rotation: the Last Will must be signed by the new key)."""
        if self.link is not None:
            log.info("control reconnecting broker=%s (new will)", self.broker)
            self.link.reconnect()

    # -- trial config -------------------------------------------------------------------------

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
        self._audit("config_promoted", "control", version=self.running_version)
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
            self._audit("config_rollback", "control", version=trial["version"])
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
        self._send(Outgoing(cp.config_state_topic(self.identity.kit_id), self._config_state(), retain=True))

    def _on_config(self, msg: Message) -> None:
        if msg.payload:  # an empty retained message clears the topic; nothing to apply
            self._offer_config(msg.payload, msg.topic)

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
        self._audit("config_applied", "fleet", version=cand.version, changed=cand.changed)
        self._queue_config_state()
        if not (cand.live or not cand.changed):
            self.request_exit(EX_RESTART, f"config v{cand.version} needs a restart")

    def _apply_live(self, cand: Candidate) -> None:
        if "relay.ack_public_keys" in cand.changed:
            relay = self.kit.services.get("relay") if isinstance(getattr(self.kit, "services", None), dict) else None
            if relay is not None and hasattr(relay, "set_ack_keys"):
                relay.set_ack_keys(cand.cfg.relay.ack_public_keys)
        if "operators.list" in cand.changed:
            from firmware.enrollment.operators import operators_from_config

            enr = getattr(self.kit, "enrollment", None)
            if enr is not None:
                enr.operators.replace(operators_from_config(cand.cfg.operators.list))

    def _on_command(self, msg: Message) -> None:
        """Verify and admit a command (network thread), then hand it to the worker."""
        kit_id = self.identity.kit_id
        topic = cp.cmd_topic(kit_id)
        key = self.remote.fleet_key()
        # Only ever answer on our own result topic, whatever Response Topic the message names.
        reply = (cp.result_topic(kit_id), msg.correlation)
        body: dict[str, Any] | None = None
        try:
            if key is None:
                raise Refused("not_claimed", "no pinned fleet key")
            try:
                body = cp.check_command(cp.verify(msg.payload, "cmd", key))
            except cp.ProtocolError as e:
                raise Refused(e.reason, str(e)) from None
            if body["kit_id"] != kit_id:
                raise Refused("wrong_kit", f"command is for {body['kit_id']}")
            self.guard.admit(body)
        except Refused as e:
            self._refuse("command", topic, e)
            if body is not None and e.reason in ANSWERED_REFUSALS:
                # Genuine fleet command, refused for its timing: tell the operator why (replays get no answer,
                # the original already had one).
                from firmware.control.commands import sign_result

                self._send(sign_result(kit_id, body, reply, False, e.reason, str(e), self.identity.signing_key))
            return
        self.stats.commands += 1
        self.runner.submit(body, reply)

    def switch_identity(self, new: KitIdentity) -> None:
        """Use the rotated kit key everywhere: here, in the kit and in the store."""
        self.identity = new
        self.kit.identity = new
        self.kit.store.use_identity(new)

    # -- telemetry ----------------------------------------------------------------------------

    def telemetry_soon(self, wait_s: float = 0.0) -> bool:
        """Publish telemetry at the next network step, not at the interval (a power stop, a clock correction);
        with `wait_s`, wait at most that long for it to go out (True if it did; False when not connected)."""
        self._next_tel = 0.0
        deadline = time.monotonic() + wait_s
        while wait_s > 0 and self.connected.is_set() and time.monotonic() < deadline:
            if self._next_tel != 0.0:
                return True
            time.sleep(0.05)
        return self._next_tel != 0.0

    def telemetry(self) -> dict[str, Any]:
        """The periodic health message (also the `status` command's answer)."""
        return build_telemetry(self.kit, self.identity.kit_id, self._started, self.remote.version,
                               self.lock_reason(), {"refused": dict(self.stats.refused),
                                                    "commands": self.stats.commands,
                                                    "connects": self.stats.connects})


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
