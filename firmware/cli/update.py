"""`rekam update status|apply|rollback|recover|pin-fleet-key`: signed software updates on the kit (docs/updates.md).

The work is `firmware.control.update.Updater`; here it is wired to production: the restart is
``systemctl restart rekamd.service`` (Type=notify: it returns when READY=1 arrived or the start failed), the
self-test reads the new daemon's status through its local API. `apply` and `rollback` change ``/opt/rekam``:
run them as root (the daemon itself cannot, its unit makes /opt read-only).

`apply` verifies bundles only with a root-owned key (`firmware.control.update.root_fleet_key`):
`control.fleet_public_key` of the config, else ``/etc/rekam/fleet.pub`` that `pin-fleet-key` (rekam-fleet-pin.service,
as root) copies from the daemon's ``control/fleet.pub`` after the claim, once the fleet CA of the image certified it
(``control/fleet-key.crt``). Never the daemon-writable file itself.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from firmware.cli.common import load_config
from firmware.system.i18n import N_, _

RESTART_CMD = "systemctl restart rekamd.service"

#: What the operator reads for each result status and refusal code (Bahasa Indonesia in the catalog).
STATUS_TEXT = {
    "promoted": N_("update to {version} installed and confirmed"),
    "rolled_back": N_("update to {version} failed ({code}); the previous version runs again"),
    "refused": N_("update refused ({code})"),
    "interrupted": N_("update to {version} was interrupted; the kit stayed on its version"),
}


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rekam update status|apply|rollback|recover`."""
    g = sub.add_parser("update", help=_("signed software updates: status, apply, rollback")).add_subparsers(
        dest="update_cmd", metavar="CMD")
    g.required = True

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--prefix", default=None, help=_("install prefix (default $REKAM_PREFIX or /opt/rekam)"))
        p.add_argument("--ready-timeout", type=float, default=90.0, help=_("seconds to wait for READY"))
        p.add_argument("--selftest-timeout", type=float, default=60.0,
                       help=_("seconds after READY for the self-test and the uplink"))
        p.add_argument("--restart-cmd", default=RESTART_CMD, help=_("command that restarts the daemon"))
        p.add_argument("--python", default="/usr/bin/python3", help=_("interpreter new slots are made from"))
        p.add_argument("--no-slot-pip", action="store_true",
                       help=_("make slots without pip and install with this interpreter's pip (faster)"))
        p.add_argument("--json", action="store_true")
        p.add_argument("--fleet-pin", default=None,
                       help=_("root-owned fleet key pin (default: fleet.pub beside the config, /etc/rekam/fleet.pub)"))
        return p

    common(g.add_parser("status", help=_("installed versions, trial, last result"))).set_defaults(func=cmd_status)
    p = common(g.add_parser("apply", help=_("verify and install a bundle (a file, or --stick), then try it")))
    p.add_argument("file", nargs="?", help=_("bundle file (.rkup)"))
    p.add_argument("--stick", action="store_true", help=_("take the newest bundle from the stick's rekam/updates/"))
    p.add_argument("--if-present", action="store_true",
                   help=_("with --stick: exit 0 when the stick has no bundle to install (the stick unit)"))
    p.add_argument("--remove-source", action="store_true",
                   help=_("delete FILE once copied (the pending bundle the daemon downloaded)"))
    p.set_defaults(func=cmd_apply)
    p = common(g.add_parser("rollback", help=_("go back to the previous version")))
    p.add_argument("--auto", action="store_true",
                   help=_("crash-loop unit: only when no update is running"))
    p.add_argument("--reason", default="manual", help=_("code reported to the fleet"))
    p.set_defaults(func=cmd_rollback)
    common(g.add_parser("recover", help=_("boot check: drop an interrupted install, roll back an unwatched trial"))
           ).set_defaults(func=cmd_recover)
    p = g.add_parser("pin-fleet-key", help=_("as root: pin the claimed fleet key for the updater, once the fleet CA "
                                             "certified it"))
    p.add_argument("--replace", action="store_true",
                   help=_("replace a pin holding another key (a technician who checked the new key's fingerprint)"))
    p.add_argument("--uncertified", action="store_true",
                   help=_("pin a key the fleet CA did not certify (a technician who checked its fingerprint with "
                          "the fleet operator)"))
    p.add_argument("--fleet-pin", default=None,
                   help=_("root-owned fleet key pin (default: fleet.pub beside the config, /etc/rekam/fleet.pub)"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pin_fleet_key)


def make_updater(args: argparse.Namespace, cfg: Any, verifies: bool = False) -> Any:
    """The production `Updater` for this kit (systemctl restart, local-API self-test). `verifies` (apply): load
    the root-owned fleet key; if there is none (or it is not root's alone) every bundle is refused saying why.
    Never the daemon-writable ``control/fleet.pub``: a compromised daemon could write its own key there."""
    from firmware.control.update import Updater, pin_path, prefix_from_env, root_fleet_key
    from firmware.errors import Refused

    key, no_key = None, ("not_verifying", "this command verifies no bundle")
    if verifies:
        try:
            key, _where = root_fleet_key(cfg, Path(args.fleet_pin) if args.fleet_pin else pin_path(cfg))
        except Refused as e:
            no_key = (e.reason, str(e))
    restart_argv = shlex.split(args.restart_cmd)
    return Updater(Path(args.prefix) if args.prefix else prefix_from_env(), cfg.state_dir,
                   key, restart=lambda t: command_restart(restart_argv, t),
                   probe=lambda v, up, t: api_probe(cfg.state_dir, v, up, t),
                   uplink_before=lambda: api_uplink(cfg.state_dir), ready_timeout_s=args.ready_timeout,
                   selftest_timeout_s=args.selftest_timeout, python=args.python, with_pip=not args.no_slot_pip,
                   no_key=no_key)


def command_restart(argv: list[str], timeout: float) -> tuple[bool, str]:
    """Run the restart command (``systemctl restart``: returns once the unit is READY or failed)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"no READY within {timeout:.0f} s"
    except OSError as e:
        return False, f"{argv[0]}: {e}"
    return (r.returncode == 0, (r.stderr or r.stdout).strip()[-300:] or f"exit {r.returncode}")


def _status(state_dir: Path) -> dict[str, Any] | None:
    from firmware.cli.localapi import call, daemon_url
    from firmware.errors import ApiError

    url = daemon_url(state_dir)
    if url is None:
        return None
    try:
        st = call(url, "GET", "/api/v1/status", timeout=5)
    except (ApiError, OSError, ValueError):
        return None
    return st if isinstance(st, dict) else None


def api_uplink(state_dir: Path) -> bool:
    """Whether the running daemon's uplink (relay or control plane) is up now."""
    from firmware.control.update import uplink_up

    st = _status(state_dir)
    return st is not None and uplink_up(st)


def api_probe(state_dir: Path, version: str, need_uplink: bool, timeout: float) -> tuple[bool, str, str]:
    """Poll the daemon's status until the self-test passes (`firmware.control.update.judge_status`) or `timeout`."""
    from firmware.control.update import SETTLED_AT_START, judge_status

    deadline = time.monotonic() + timeout
    last = ("no_status", "the daemon's local API does not answer")
    while True:
        st = _status(state_dir)
        if st is not None:
            ok, code, why = judge_status(st, version, need_uplink)
            if ok:
                return True, code, why
            last = (code, why)
            if code in SETTLED_AT_START:  # waiting cannot change it
                return False, code, why
        if time.monotonic() >= deadline:
            return False, last[0], last[1]
        time.sleep(0.5)


def _say(res: dict[str, Any] | None, as_json: bool) -> None:
    from firmware.control.update import dumps

    if as_json:
        print(dumps(res))
        return
    if not res:
        return
    text = STATUS_TEXT.get(str(res.get("status")))
    if text:
        print(_(text, version=res.get("version") or "?", code=res.get("code", "")))
    if res.get("reason"):
        print("  " + str(res["reason"]))


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    st = make_updater(args, cfg).status()
    if args.json:
        from firmware.control.update import dumps

        print(dumps(st))
        return 0
    print(_("running version: {version} ({slot})", version=st["current_version"], slot=st["current"] or "venv"))
    if st["previous"]:
        print(_("previous version: {version} ({slot})", version=st["previous_version"] or "?", slot=st["previous"]))
    if st["state"] != "idle":
        print(_("update in progress: {state}", state=st["state"]))
    if st["last_result"]:
        _say(st["last_result"], False)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from firmware.errors import Refused

    cfg = load_config(args)
    up = make_updater(args, cfg, verifies=True)
    try:
        if args.stick:
            res = up.apply_from_stick(cfg.usb_dir)
        elif args.file:
            try:
                copy = up.stage_file(Path(args.file))
            except Refused:
                if args.remove_source:  # else rekam-update.path starts us again for it, in a loop
                    up.reject_source(Path(args.file))
                raise
            if args.remove_source:  # else rekam-update.path would start us again for the same file
                Path(args.file).unlink(missing_ok=True)
            res = up.apply_staged(copy)
        else:
            print("rekam: " + _("name a bundle file or use --stick"), file=sys.stderr)
            return 2
    except Refused as e:
        if args.stick and args.if_present and e.reason == "no_bundle":
            return 0  # a plain mirror stick, or one whose bundles are installed or failed here already
        if args.json:
            _say({"status": "refused", "code": e.reason, "reason": str(e)}, True)
        else:
            print("rekam: " + _("update refused ({code})", code=e.reason), file=sys.stderr)
            print("  " + str(e), file=sys.stderr)
        return 3
    _say(res, args.json)
    return 0 if res.get("status") == "promoted" else 4


def cmd_rollback(args: argparse.Namespace) -> int:
    from firmware.errors import Refused

    cfg = load_config(args)
    try:
        res = make_updater(args, cfg).rollback(args.reason, f"rollback ({args.reason})", auto=args.auto)
    except Refused as e:
        print("rekam: " + _("cannot roll back ({code})", code=e.reason), file=sys.stderr)
        return 3
    _say(res, args.json)
    # 2: nothing done (a running update handles its own trial); rekam-rollback.service then does not start
    # rekamd itself (its ExecStartPost= runs only after a success), the update does.
    return 2 if res.get("status") == "skipped" else 0


def cmd_recover(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    _say(make_updater(args, cfg).recover(restart=False), args.json)
    return 0


def cmd_pin_fleet_key(args: argparse.Namespace) -> int:
    """`rekam update pin-fleet-key`: copy the claimed fleet key to the root-owned pin (rekam-fleet-pin.service).
    Exit 0 pinned or unchanged, 3 refused (not certified by the fleet CA: `--uncertified`; another key already
    pinned: `--replace`; not claimed; bad files)."""
    import logging

    from firmware.control.claim import ControlPaths
    from firmware.control.update import dumps, pin_fleet_key, pin_path
    from firmware.errors import Refused

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    cfg = load_config(args)
    pin = Path(args.fleet_pin) if args.fleet_pin else pin_path(cfg)
    if str(cfg.control.fleet_public_key or "").strip():
        # The config presets the key: it is the updater's anchor already (and the claim refused any other key).
        res = {"status": "preset", "pin": None, "reason": f"control.fleet_public_key in {cfg.source} is the anchor"}
        print(dumps(res) if args.json else "rekam: " + str(res["reason"]) + "; nothing to pin")
        return 0
    try:
        paths = ControlPaths.of(cfg)
        res = pin_fleet_key(paths.fleet_key, pin, paths.fleet_key_cert, cfg.path(cfg.control.ca_file),
                            replace=args.replace, uncertified=args.uncertified)
    except Refused as e:
        if args.json:
            print(dumps({"status": "refused", "code": e.reason, "reason": str(e)}))
        else:
            print(f"rekam: fleet key not pinned ({e.reason})", file=sys.stderr)
            print("  " + str(e), file=sys.stderr)
        return 3
    print(dumps(res) if args.json else f"rekam: fleet key {res['fingerprint']} {res['status']} in {res['pin']}")
    return 0
