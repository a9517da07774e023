"""`rekam provision claim` and `rekam provision status`: joining the fleet, and what the kit holds.

`rekamd` claims by itself when ``[control] enabled``; `claim` is for a technician at the bench
(daemon stopped) who wants to see the claim go through. See docs/provisioning.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from typing import Any

from firmware.cli.common import load_config
from firmware.system.i18n import _, ngettext


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rekam provision claim|status`."""
    g = sub.add_parser("provision", help=_("fleet claim and control-plane state")).add_subparsers(
        dest="provision_cmd", metavar="CMD")
    g.required = True
    p = g.add_parser("claim", help=_("claim this kit now (daemon stopped): wait for the fleet's approval"))
    p.add_argument("--attempts", type=int, default=0, help=_("give up after this many attempts (0: until approved)"))
    p.set_defaults(func=cmd_claim)
    p = g.add_parser("status", help=_("claimed?, fleet key, certificate, config versions, lock"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def _daemon_running(state_dir: Any) -> bool:
    try:
        fd = os.open(state_dir / "store.lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def cmd_claim(args: argparse.Namespace) -> int:
    import logging

    from firmware.control.claim import ClaimError, ControlPaths, claim
    from firmware.control.plane import Refused, RemoteConfig
    from firmware.seal import identity

    cfg = load_config(args)
    if _daemon_running(cfg.state_dir):
        print("rekam: " + _("rekamd is running and claims by itself; see `rekam provision status`"), file=sys.stderr)
        return 1
    paths = ControlPaths.of(cfg)
    ident = identity.load_or_create(cfg.state_dir)
    if paths.provisioned():
        print(_("kit {kit} is already claimed (fleet key in {path})", kit=ident.kit_id, path=paths.fleet_key))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(_("claiming kit {kit} via {brokers}; approve it on the fleet side: rekam-fleet kits approve {kit}",
            kit=ident.kit_id, brokers=", ".join(cfg.control.claim_brokers) or _("(no claim_brokers!)")))
    try:
        doc = claim(cfg, ident, max_attempts=args.attempts or None)
    except ClaimError as e:
        print("rekam: " + _("claim impossible: {error}", error=e), file=sys.stderr)
        return 1
    if doc is None:
        print("rekam: " + ngettext("not approved after {n} attempt", "not approved after {n} attempts", args.attempts),
              file=sys.stderr)
        return 3
    rc = RemoteConfig(cfg)
    try:
        cand = rc.evaluate(doc, ident.kit_id, cfg)
        rc.accept(cand)
        rc.event(cand.version, "applied" if cand.live or not cand.changed else "pending_restart")
        print(_("claimed; config v{version} stored (takes effect when rekamd starts)", version=cand.version))
    except Refused as e:
        print(_("claimed, but the initial config was refused: {error}", error=e), file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cryptography import x509

    from firmware.control.claim import ControlPaths
    from firmware.wire import control_protocol as cp

    cfg = load_config(args)
    paths = ControlPaths.of(cfg)
    out: dict[str, Any] = {"enabled": cfg.control.enabled, "claimed": paths.provisioned(),
                           "brokers": list(cfg.control.brokers), "claim_brokers": list(cfg.control.claim_brokers)}
    try:
        out["kit_id"] = json.loads((cfg.state_dir / "identity" / "kit.json").read_text())["kit_id"]
    except (OSError, ValueError, KeyError):
        out["kit_id"] = None
    if paths.fleet_key.exists():
        out["fleet_key"] = cp.key_fingerprint(paths.fleet_key.read_text().strip())
    if paths.cert.exists():
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        out["certificate"] = {"serial": format(cert.serial_number, "x"), "subject": cert.subject.rfc4514_string(),
                              "not_after": cert.not_valid_after_utc.isoformat()}
    try:
        st = json.loads((cfg.state_dir / "remote-config" / "state.json").read_text())
    except (OSError, ValueError):
        st = {}
    out["config"] = {k: st.get(k) for k in ("current", "last_good", "max_seen", "trial", "last_event")}
    try:
        out["locked"] = json.loads((paths.root / "lock.json").read_text()).get("reason", "")
    except (OSError, ValueError):
        out["locked"] = ""
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(_("kit {kit}: {state}", kit=out["kit_id"] or _("(no identity yet)"),
            state=_("claimed") if out["claimed"] else _("NOT claimed"))
          + ("" if out["enabled"] else "  " + _("(control plane disabled in [control])")))
    if out.get("fleet_key"):
        print("  " + _("fleet key   {key} (pinned)", key=out["fleet_key"]))
    if out.get("certificate"):
        c = out["certificate"]
        print("  " + _("certificate {serial} {subject} valid until {until}", serial=c["serial"], subject=c["subject"],
                       until=c["not_after"]))
    c = out["config"]
    print("  " + _("config      running v{current}, last good v{good}", current=c["current"] or 0,
                   good=c["last_good"] or 0)
          + (", " + _("trial v{version}", version=c["trial"]["version"]) if c["trial"] else ""))
    if c["last_event"]:
        e = c["last_event"]
        print("  " + _("last change v{version} {status} {reason}", version=e["version"], status=e["status"],
                       reason=e["reason"]))
    if out["locked"]:
        print("  " + _("CAPTURE LOCKED by the fleet: {reason}", reason=out["locked"]))
    return 0
