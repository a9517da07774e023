"""`rekam-fleet ca|kits|config|cmd|status|serve`: argparse and output only; the work is in
`provisioning.fleet_ops`, `provisioning.registry` and `provisioning.fleet_service`.

Errors (`FleetError`, `CaError`) reach `provisioning.cli.main`, which prints them and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from firmware.wire import control_protocol as cp
from provisioning import ca, fleet_ops, fleet_service
from provisioning.fleet_ops import open_fleet


def cmd_ca_init(args: argparse.Namespace) -> int:
    f, conf = fleet_ops.create_fleet(Path(args.data), args.broker, args.claim_broker, args.host, args.batch,
                                     args.claim_ttl_hours, args.port, args.claim_port)
    print(f"fleet created in {args.data}\n  fleet key  {cp.key_fingerprint(f.public_key_b64)} ({f.public_key_b64})\n"
          f"  broker     {conf} (mosquitto -c {conf})\n"
          f"  kit image  ca/fleet-ca.crt -> control.ca_file, ca/claim-{args.batch}.crt/.key -> control.claim_*")
    return 0


def cmd_ca_crl(args: argparse.Namespace) -> int:
    print(ca.write_crl(open_fleet(args.data).ca))
    return 0


def cmd_kits_list(args: argparse.Namespace) -> int:
    rows = open_fleet(args.data).kits()
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
    open_fleet(args.data).approve(args.kit)
    print(f"{args.kit} approved; it receives its certificate on its next claim attempt")
    return 0


def cmd_kits_revoke(args: argparse.Namespace) -> int:
    f = open_fleet(args.data)
    serial, warning = fleet_ops.revoke_kit(f, args.kit, offline=args.offline)
    if warning:
        print(f"rekam-fleet: warning: {warning}", file=sys.stderr)
    print(f"{args.kit} revoked (certificate {serial or 'none'} on {f.ca.crl}); reload the broker: "
          "systemctl reload mosquitto (SIGHUP) so it re-reads the CRL")
    return 0


def cmd_kits_issue(args: argparse.Namespace) -> int:
    serial = fleet_ops.issue_certificate(open_fleet(args.data), args.kit, Path(args.out),
                                         Path(args.csr) if args.csr else None)
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


def _pushed(kit: str, version: int, published: int | None) -> int:
    where = "signed, not published" if published is None else f"published (retained) to {published} kit(s)"
    print(f"config v{version} for {kit} {where}")
    return 0


def cmd_config_push(args: argparse.Namespace) -> int:
    f = open_fleet(args.data)
    updates = [json.loads(Path(args.file).read_text())] if args.file else []
    updates.append(_parse_sets(args.set or []))
    version, published = fleet_ops.push_config(f, args.kit, updates, [Path(p) for p in args.attach or []],
                                               note=args.note or "", replace=args.replace, offline=args.offline)
    return _pushed(args.kit, version, published)


def cmd_config_rollback(args: argparse.Namespace) -> int:
    version, published = fleet_ops.rollback_config(open_fleet(args.data), args.kit, args.to, offline=args.offline)
    return _pushed(args.kit, version, published)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(fleet_ops.config_report(open_fleet(args.data), args.kit), indent=1))
    return 0


def cmd_cmd_send(args: argparse.Namespace) -> int:
    f = open_fleet(args.data)
    cargs: dict[str, Any] = {}
    for a in args.arg or []:
        k, _, v = a.partition("=")
        try:
            cargs[k] = json.loads(v)
        except json.JSONDecodeError:
            cargs[k] = v
    res = fleet_ops.send_command(f, args.kit, args.name, cargs, args.ttl, args.wait)
    if res is None:
        print(f"no result within {args.wait:.0f} s (the command stays valid for {args.ttl} s)", file=sys.stderr)
        return 3
    print(json.dumps(res, indent=1))
    return 0 if res.get("ok") else 2


def cmd_status(args: argparse.Namespace) -> int:
    rows = open_fleet(args.data).status_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'kit':16} {'state':9} {'online':8} {'last seen':17} {'backlog':>8} {'sd MiB':>9} {'usb MiB':>9} "
          f"{'cfg':>4} halted/locked")
    for r in rows:
        seen = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["last_seen"])) if r["last_seen"] else "never"
        flag = r["halted"] or (f"locked: {r['locked']}" if r["locked"] else "")
        print(f"{r['kit_id']:16} {r['state']:9} {r['online']:8} {seen:17} {_s(r['backlog']):>8} "
              f"{_s(r['sd_free_mb']):>9} {_s(r['usb_free_mb']):>9} {_s(r['config']):>4} {flag}")
    return 0


def _s(v: Any) -> str:
    """A cell: "-" for nothing, counts and sizes with thousands separators (binary sizes, labelled MiB)."""
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    fleet_service.serve(open_fleet(args.data))
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
