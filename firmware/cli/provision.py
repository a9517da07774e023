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


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rekam provision claim|status`."""
    g = sub.add_parser("provision", help="fleet claim and control-plane state").add_subparsers(
        dest="provision_cmd", metavar="CMD")
    g.required = True
    p = g.add_parser("claim", help="claim this kit now (daemon stopped): wait for the fleet's approval")
    p.add_argument("--attempts", type=int, default=0, help="give up after this many attempts (0: until approved)")
    p.set_defaults(func=cmd_claim)
    p = g.add_parser("status", help="claimed?, fleet key, certificate, config versions, lock")
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
        print("rekam: rekamd is running and claims by itself; see `rekam provision status`", file=sys.stderr)
        return 1
    paths = ControlPaths.of(cfg)
    ident = identity.load_or_create(cfg.state_dir)
    if paths.provisioned():
        print(f"kit {ident.kit_id} is already claimed (fleet key in {paths.fleet_key})")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(f"claiming kit {ident.kit_id} via {', '.join(cfg.control.claim_brokers) or '(no claim_brokers!)'}; "
          "approve it on the fleet side: rekam-fleet kits approve " + ident.kit_id)
    try:
        doc = claim(cfg, ident, max_attempts=args.attempts or None)
    except ClaimError as e:
        print(f"rekam: claim impossible: {e}", file=sys.stderr)
        return 1
    if doc is None:
        print(f"rekam: not approved after {args.attempts} attempt(s)", file=sys.stderr)
        return 3
    rc = RemoteConfig(cfg)
    try:
        cand = rc.evaluate(doc, ident.kit_id, cfg)
        rc.accept(cand)
        rc.event(cand.version, "applied" if cand.live or not cand.changed else "pending_restart")
        print(f"claimed; config v{cand.version} stored (takes effect when rekamd starts)")
    except Refused as e:
        print(f"claimed, but the initial config was refused: {e}", file=sys.stderr)
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
    print(f"kit {out['kit_id'] or '(no identity yet)'}: {'claimed' if out['claimed'] else 'NOT claimed'}"
          f"{'' if out['enabled'] else '  (control plane disabled in [control])'}")
    if out.get("fleet_key"):
        print(f"  fleet key   {out['fleet_key']} (pinned)")
    if out.get("certificate"):
        c = out["certificate"]
        print(f"  certificate {c['serial']} {c['subject']} valid until {c['not_after']}")
    c = out["config"]
    print(f"  config      running v{c['current'] or 0}, last good v{c['last_good'] or 0}"
          + (f", trial v{c['trial']['version']}" if c["trial"] else ""))
    if c["last_event"]:
        e = c["last_event"]
        print(f"  last change v{e['version']} {e['status']} {e['reason']}")
    if out["locked"]:
        print(f"  CAPTURE LOCKED by the fleet: {out['locked']}")
    return 0
