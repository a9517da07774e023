"""Fleet commands on the kit: worker threads run admitted commands and answer each with a signed result.

The control plane verifies a command and admits it through the replay guard (`firmware.control.replay`)
on its network thread, then `CommandRunner.submit()`s it; the runner executes it here, off the network
thread, and hands the signed result to the plane's ``send``. Every command is audited.

Two workers, each running its commands in order: `SLOW_COMMANDS` (a bundle download may take hours on a rural
uplink, a copy of the whole backlog to a stick minutes) on one, every other command on the other, so a ``lock``
for a stolen kit, a ``status`` or a ``sync`` never waits behind them.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware import config
from firmware.control.claim import ControlPaths
from firmware.control.files import write_json
from firmware.control.remote_config import RemoteConfig
from firmware.control.replay import CommandGuard
from firmware.errors import Refused
from firmware.seal.identity import KitIdentity
from firmware.seal.rotation import rotate_key
from firmware.system.fsutil import fsync_dir
from firmware.wire import control_protocol as cp

log = logging.getLogger(__name__)

EX_REBOOT = 76  # the unit's ExecStopPost reboots the machine on this status

#: Commands that can run for minutes to hours: their own worker (see the module doc).
SLOW_COMMANDS = frozenset({"update", "export_usb"})
_QUEUE = {"quick": 100, "slow": 8}


@dataclass
class Outgoing:
    """A message for the fleet: a result, a config state."""

    topic: str
    payload: bytes
    retain: bool = False
    correlation: bytes | None = None


class CommandTarget(Protocol):
    """What commands act on: the control plane (`firmware.control.plane.ControlPlane`)."""

    cfg: config.Config
    identity: KitIdentity
    remote: RemoteConfig
    paths: ControlPaths
    kit: Any  # firmware.control.host.ControlHost

    def telemetry(self) -> dict[str, Any]:
        """The current telemetry body."""

    def apply_lock_state(self) -> None:
        """Tell the enrollment service about lock.json."""

    def switch_identity(self, new: KitIdentity) -> None:
        """Use `new` everywhere (after a key rotation)."""

    def reconnect(self) -> None:
        """Renew the control connection (its Last Will is signed with the kit key)."""

    def request_exit(self, status: int, why: str) -> None:
        """Stop the daemon with `status`."""


def sign_result(kit_id: str, body: dict[str, Any], reply: tuple[str, Any], ok: bool, code: str, message: str,
                key: Ed25519PrivateKey, data: dict[str, Any] | None = None) -> Outgoing:
    """The signed result of command `body`, for the kit's result topic (``reply`` = topic, correlation)."""
    res = {"cmd_id": body["cmd_id"], "kit_id": kit_id, "name": body["name"], "ok": ok, "code": code,
           "message": message[:500], "data": data or {}, "at": int(time.time())}
    return Outgoing(reply[0], cp.sign("result", res, key), correlation=reply[1])


class CommandRunner:
    """The command worker threads (see module doc)."""

    def __init__(self, target: CommandTarget, guard: CommandGuard, send: Callable[[Outgoing], None]) -> None:
        self.t = target
        self.guard = guard
        self.send = send
        self._lanes: dict[str, queue.Queue[tuple[dict[str, Any], Any] | None]] = {
            lane: queue.Queue(maxsize=n) for lane, n in _QUEUE.items()}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if not self._threads:
            for lane, q in self._lanes.items():
                t = threading.Thread(target=self._run, args=(q,), name=f"control-cmd-{lane}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running commands (up to `timeout` in all), drop the others; idempotent."""
        if not self._threads:
            return
        deadline = time.monotonic() + timeout
        for q in self._lanes.values():
            try:
                q.put(None, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                pass
        for t in self._threads:  # a download past the deadline is abandoned (a daemon thread; the file is a temp)
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def submit(self, body: dict[str, Any], reply: tuple[str, Any]) -> bool:
        """Queue an admitted command on its worker; False (and a ``busy`` answer) when that queue is full."""
        try:
            self._lanes["slow" if body["name"] in SLOW_COMMANDS else "quick"].put_nowait((body, reply))
            return True
        except queue.Full:
            self.guard.done(body["cmd_id"], "dropped: busy")
            self.send(sign_result(self.t.identity.kit_id, body, reply, False, "busy", "command queue full",
                                  self.t.identity.signing_key))
            return False

    def _run(self, work: queue.Queue[tuple[dict[str, Any], Any] | None]) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            body, reply = item
            sign_key = self.t.identity.signing_key  # a rotate_key result is signed by the OLD key
            kit_id = self.t.identity.kit_id
            ok = False
            try:
                data, message = self.execute(body)
                out = sign_result(kit_id, body, reply, True, "ok", message, sign_key, data)
                ok = True
                self.guard.done(body["cmd_id"], "ok")
                log.info("command done cmd_id=%s name=%s", body["cmd_id"], body["name"])
            except Refused as e:
                out = sign_result(kit_id, body, reply, False, e.reason, str(e), sign_key)
                self.guard.done(body["cmd_id"], f"refused: {e.reason}")
                log.warning("command failed cmd_id=%s name=%s reason=%s", body["cmd_id"], body["name"], e)
            except Exception as e:  # a command must never take the control plane down
                log.exception("command crashed cmd_id=%s name=%s", body["cmd_id"], body["name"])
                out = sign_result(kit_id, body, reply, False, "error", f"{type(e).__name__}: {e}", sign_key)
                self.guard.done(body["cmd_id"], "error")
            try:
                self.t.kit.store.audit("command", "fleet", cmd_id=body["cmd_id"], name=body["name"], ok=ok)
            except Exception as ae:
                log.debug("audit failed error=%s", ae)
            self.send(out)
            if ok and body["name"] == "rotate_key":
                self.t.reconnect()  # after the result is on its way: the Last Will must be signed by the new key
            if body["name"] == "reboot":
                self.t.request_exit(EX_REBOOT, f"reboot command {body['cmd_id']}")

    def execute(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Run one command; its result data and message. Raises `Refused` for a command that cannot run."""
        t = self.t
        name, args = body["name"], body["args"]
        store = t.kit.store
        if name == "status":
            return t.telemetry(), "status"
        if name == "sync":
            relay = (getattr(t.kit, "services", None) or {}).get("relay")
            fn = getattr(relay, "sync_now", None)
            if fn is None:
                raise Refused("no_relay", "no record relay is running on this kit")
            fn()
            return {}, "relay woken"
        if name == "set_operators":
            ops = args.get("operators")
            t.cfg = t.remote.set_operators(t.cfg, ops)
            enr = getattr(t.kit, "enrollment", None)
            if enr is not None:
                from firmware.enrollment.operators import operators_from_config

                enr.operators.replace(operators_from_config(t.cfg.operators.list))
            return {"operators": [o["id"] for o in t.cfg.operators.list]}, f"{len(ops)} operator(s) set"
        if name == "lock":
            reason = str(args.get("reason") or "locked by the fleet")[:200]
            write_json(t.paths.root / "lock.json", {"reason": reason, "at": int(time.time()),
                                                    "cmd_id": body["cmd_id"]})
            t.apply_lock_state()
            return {"locked": reason}, "capture locked"
        if name == "unlock":
            (t.paths.root / "lock.json").unlink(missing_ok=True)
            fsync_dir(t.paths.root)
            t.apply_lock_state()
            return {"locked": ""}, "capture unlocked"
        if name == "purge":
            return {"purged": store.purge_acknowledged()}, "purged acknowledged records"
        if name == "export_usb":
            if store.stick is None:
                raise Refused("no_stick", "no USB stick is present")
            return {"copied": store.backfill()}, "exported to USB"
        if name == "rotate_key":
            old = t.identity
            new = rotate_key(t.cfg.state_dir, old)
            # The result is signed by the OLD key (the fleet trusts it) and carries the new key,
            # plus the new key's signature over the old one (proof the kit holds it).
            proof = new.signing_key.sign(b"rekam-key-rotation:" + old.public_key_raw + new.public_key_raw)
            data = {"new_public_key": new.public_key_b64, "old_public_key": old.public_key_b64,
                    "proof": base64.b64encode(proof).decode()}
            t.switch_identity(new)
            return data, "kit key rotated"
        if name == "reboot":
            return {}, "rebooting"
        if name == "update":
            from firmware.control.update_fetch import fetch_update

            return fetch_update(t.cfg, t.paths, args)
        raise Refused("unknown_command", name)
