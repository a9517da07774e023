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

from firmware.errors import FleetError
from firmware.system.i18n import N_, _, format_count, ngettext
from firmware.wire import control_protocol as cp
from provisioning import ca, fleet_ops, fleet_service
from provisioning.fleet_ops import open_fleet
from provisioning.texts import Reason, for_terminal

#: Column headers of `kits list` and `status` (translated where printed).
KITS_HEADER = (N_("kit"), N_("state"), N_("serial"), N_("version"), N_("key"), N_("claimed"))
SHARDS_HEADER = (N_("shard"), N_("state"), N_("primary"), N_("failover"), N_("relay brokers"))
STATUS_HEADER = (N_("kit"), N_("state"), N_("online"), N_("last seen"), N_("backlog"), N_("sd MiB"), N_("usb MiB"),
                 N_("cfg"), N_("halted/locked"))
FLAG_WIDTH = 80  # the halt or lock reason a kit reports, in `status` (the last column)


def cmd_ca_init(args: argparse.Namespace) -> int:
    f, conf = fleet_ops.create_fleet(Path(args.data), args.broker, args.claim_broker, args.host, args.batch,
                                     args.claim_ttl_hours, args.port, args.claim_port, registry=args.registry)
    print(_("fleet created in {path}", path=args.data))
    print("  " + _("fleet key  {fingerprint} ({key})", fingerprint=cp.key_fingerprint(f.public_key_b64),
                   key=f.public_key_b64))
    print("  " + _("broker     {conf} (mosquitto -c {conf})", conf=conf))
    print("  " + _("kit image  ca/fleet-ca.crt -> control.ca_file, ca/claim-{batch}.crt/.key -> control.claim_*",
                   batch=args.batch))
    return 0


def cmd_ca_crl(args: argparse.Namespace) -> int:
    print(ca.write_crl(open_fleet(args.data, args.registry).ca))
    return 0


def cmd_kits_list(args: argparse.Namespace) -> int:
    rows = open_fleet(args.data, args.registry).kits()
    if args.json:
        print(json.dumps([dict(r) for r in rows], indent=1, default=str))
        return 0
    head = [_(h) for h in KITS_HEADER]
    print(f"{head[0]:16} {head[1]:9} {head[2]:18} {head[3]:12} {head[4]:17} {head[5]}")
    for r in rows:
        # What the kit sent (serial, version) is shown escaped and cut to its column: the operator approves kits
        # from this table. The kit id is a checked pattern (rk-[a-z0-9]): never cut, it is what `approve` takes.
        print(f"{for_terminal(r['kit_id']):16} {r['state']:9} {for_terminal(r['hardware_serial'] or '-', 18):18} "
              f"{for_terminal(r['software_version'] or '-', 12):12} {cp.key_fingerprint(r['public_key']):17} "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['claimed_at'] or 0))}")
    return 0


def cmd_kits_approve(args: argparse.Namespace) -> int:
    open_fleet(args.data, args.registry).approve(args.kit)
    print(_("{kit} approved; it receives its certificate on its next claim attempt", kit=args.kit))
    return 0


def cmd_kits_revoke(args: argparse.Namespace) -> int:
    f = open_fleet(args.data, args.registry)
    serial, warning = fleet_ops.revoke_kit(f, args.kit, offline=args.offline)
    if warning:
        print("rekam-fleet: " + _("warning: {warning}", warning=warning), file=sys.stderr)
    print(_("{kit} revoked (certificate {serial} on {crl}); reload the broker: "
            "systemctl reload mosquitto (SIGHUP) so it re-reads the CRL", kit=args.kit, serial=serial or _("none"),
            crl=f.ca.crl))
    return 0


def cmd_kits_issue(args: argparse.Namespace) -> int:
    serial = fleet_ops.issue_certificate(open_fleet(args.data, args.registry), args.kit, Path(args.out),
                                         Path(args.csr) if args.csr else None)
    print(_("certificate {serial} for {kit} in {path}", serial=serial, kit=args.kit, path=args.out))
    return 0


def _parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in sets:
        key, sep, raw = s.partition("=")
        if not sep or "." not in key:
            raise SystemExit("rekam-fleet: " + _("--set {value}: use section.key=VALUE (VALUE in JSON, or a plain "
                                                 "string)", value=repr(s)))
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        section, k = key.split(".", 1)
        out.setdefault(section, {})[k] = value
    return out


def _pushed(kit: str, version: int, published: int | None) -> int:
    where = (_("signed, not published") if published is None else
             ngettext("published (retained) to {n} kit", "published (retained) to {n} kits", published))
    print(_("config v{version} for {kit} {where}", version=version, kit=kit, where=where))
    return 0


def cmd_kits_clock(args: argparse.Namespace) -> int:
    f = open_fleet(args.data, args.registry)
    if f.kit(args.kit) is None:
        raise FleetError(Reason(N_("unknown kit {kit}"), kit=args.kit))
    docs = f.clock_corrections(args.kit)
    if args.json:
        print(json.dumps(docs, indent=1))
        return 0
    if not docs:
        print(_("{kit}: no clock corrections received", kit=args.kit))
        return 0
    for d in docs:
        print(_("correction {id} received {received} issued {issued} source {source} boot {boot} key {key}",
                id=d["id"], received=time.strftime("%Y-%m-%d %H:%M", time.gmtime(d["received_at"])),
                issued=d["issued"], source=d["source"], boot=d["boot_id"], key=d["verified_key"]))
        for sg in d["segments"]:
            off = _("not correctable (rebooted before the clock was synchronised)") if sg["offset_s"] is None \
                else _("offset {offset} s", offset=f"{sg['offset_s']:+.3f}")
            print(f"  seq {sg['first_seq']}..{sg['last_seq']}  " + off)
    return 0


def cmd_config_push(args: argparse.Namespace) -> int:
    f = open_fleet(args.data, args.registry)
    updates = [json.loads(Path(args.file).read_text())] if args.file else []
    updates.append(_parse_sets(args.set or []))
    version, published = fleet_ops.push_config(f, args.kit, updates, [Path(p) for p in args.attach or []],
                                               note=args.note or "", replace=args.replace, offline=args.offline)
    return _pushed(args.kit, version, published)


def cmd_config_rollback(args: argparse.Namespace) -> int:
    version, published = fleet_ops.rollback_config(open_fleet(args.data, args.registry), args.kit, args.to,
                                                   offline=args.offline)
    return _pushed(args.kit, version, published)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(fleet_ops.config_report(open_fleet(args.data, args.registry), args.kit), indent=1))
    return 0


def cmd_cmd_send(args: argparse.Namespace) -> int:
    f = open_fleet(args.data, args.registry)
    cargs: dict[str, Any] = {}
    for a in args.arg or []:
        k, _sep, v = a.partition("=")
        try:
            cargs[k] = json.loads(v)
        except json.JSONDecodeError:
            cargs[k] = v
    res = fleet_ops.send_command(f, args.kit, args.name, cargs, args.ttl, args.wait)
    if res is None:
        print(_("no result within {wait} s (the command stays valid for {ttl} s)", wait=format(args.wait, ".0f"),
                ttl=args.ttl), file=sys.stderr)
        return 3
    print(json.dumps(res, indent=1))
    return 0 if res.get("ok") else 2


def cmd_status(args: argparse.Namespace) -> int:
    rows = open_fleet(args.data, args.registry).status_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    h = [_(x) for x in STATUS_HEADER]
    print(f"{h[0]:16} {h[1]:9} {h[2]:8} {h[3]:17} {h[4]:>8} {h[5]:>9} {h[6]:>9} {h[7]:>4} {h[8]}")
    for r in rows:
        seen = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["last_seen"])) if r["last_seen"] else "never"
        # online, halt and lock reasons come from the kit: escaped and cut (see `for_terminal`)
        flag = for_terminal(r["halted"], FLAG_WIDTH) if r["halted"] else (
            _("locked: {reason}", reason=for_terminal(r["locked"], FLAG_WIDTH)) if r["locked"] else "")
        if r.get("telemetry_unreadable"):
            flag = "; ".join(x for x in (_("telemetry unreadable"), flag) if x)
        print(f"{for_terminal(r['kit_id']):16} {r['state']:9} {for_terminal(r['online'], 8):8} {seen:17} "
              f"{_s(r['backlog']):>8} {_s(r['sd_free_mb']):>9} {_s(r['usb_free_mb']):>9} "
              f"{for_terminal(_s(r['config']), 4):>4} {flag}")
    return 0


def _s(v: Any) -> str:
    """A cell: "-" for nothing, counts and sizes with thousands separators (binary sizes, labelled MiB)."""
    if v is None:
        return "-"
    return format_count(v) if isinstance(v, int) and not isinstance(v, bool) else str(v)


def cmd_shards_add(args: argparse.Namespace) -> int:
    f = open_fleet(args.data, args.registry)
    conf = fleet_ops.add_shard(f, args.name, args.broker, args.control or None, note=args.note or "",
                               hosts=args.host or None, port=args.port, claim_port=args.claim_port)
    s = f.shard(args.name)
    print(_("broker shard {name} added: relay {relay}, control {control}", name=s.name, relay=", ".join(s.relay),
            control=", ".join(s.control) or "-"))
    if conf is not None:
        print("  " + _("broker     {conf} (mosquitto -c {conf})", conf=conf))
    print("  " + _("kits move to it with `rekam-fleet shards rebalance` (a config push)"))
    return 0


def cmd_shards_list(args: argparse.Namespace) -> int:
    f = open_fleet(args.data, args.registry)
    rows = []
    counts: dict[str, list[int]] = {}
    for r in f.kits():
        for i, n in enumerate(f.assigned(r["kit_id"])):
            counts.setdefault(n, [0, 0])[i] += 1
    for s in f.shards():
        rows.append({"name": s.name, "state": s.state, "relay": list(s.relay), "control": list(s.control),
                     "primary_kits": counts.get(s.name, [0, 0])[0], "failover_kits": counts.get(s.name, [0, 0])[1],
                     "note": s.note})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(_("no broker shards: every kit uses the fleet.json brokers ({brokers})",
                brokers=", ".join(f.settings.get("brokers", [])) or "-"))
        return 0
    h = [_(x) for x in SHARDS_HEADER]
    print(f"{h[0]:12} {h[1]:9} {h[2]:>8} {h[3]:>8} {h[4]}")
    for r in rows:
        print(f"{r['name']:12} {r['state']:9} {_s(r['primary_kits']):>8} {_s(r['failover_kits']):>8} "
              f"{', '.join(r['relay'])}")
    moving = len(f.moves())
    if moving:
        print(ngettext("{n} kit waits for `rekam-fleet shards rebalance`", "{n} kits wait for `rekam-fleet shards "
                       "rebalance`", moving))
    return 0


def cmd_shards_state(args: argparse.Namespace) -> int:
    open_fleet(args.data, args.registry).set_shard_state(args.name, args.state)
    print(_("broker shard {name} is now {state}; `rekam-fleet shards rebalance` moves the kits", name=args.name,
            state=args.state))
    return 0


def cmd_shards_assign(args: argparse.Namespace) -> int:
    if not args.auto and not args.primary:
        raise SystemExit("rekam-fleet: " + _("shards assign: give --primary SHARD (and --failover SHARD), or --auto"))
    f = open_fleet(args.data, args.registry)
    f.pin(args.kit, None if args.auto else args.primary, None if args.auto else args.failover)
    a = f.assignment(args.kit)
    print(_("{kit}: primary {primary}, failover {failover}", kit=args.kit, primary=a.primary,
            failover=a.failover or "-"))
    if f.assigned(args.kit) != a.shards:
        version, published = fleet_ops.push_config(f, args.kit, [], note=f"shard assign {'+'.join(a.shards)}",
                                                   offline=args.offline)
        return _pushed(args.kit, version, published)
    return 0


def cmd_shards_rebalance(args: argparse.Namespace) -> int:
    f = open_fleet(args.data, args.registry)
    if args.dry_run:
        for kit, old, a in f.moves()[: args.limit or None]:
            print(f"{kit:16} {'+'.join(old) or '-':24} -> {'+'.join(a.shards)}")
        return 0
    moved = fleet_ops.rebalance(f, offline=args.offline, limit=args.limit)
    for kit, old, new, version in moved:
        print(f"{kit:16} {'+'.join(old) or '-':24} -> {'+'.join(new):24} v{version}")
    print(ngettext("{n} kit moved (signed config pushed)", "{n} kits moved (signed config pushed)", len(moved)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    fleet_service.serve(open_fleet(args.data, args.registry))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Register `ca`, `kits`, `config`, `cmd`, `shards`, `status` and `serve` on the rekam-fleet parser."""

    def data(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data", default=os.environ.get("REKAM_FLEET_DATA", "."),
                       help=_("fleet folder (fleet.db, ca/)"))
        p.add_argument("--registry", default=os.environ.get("REKAM_FLEET_REGISTRY") or None, metavar="DSN",
                       help=_("fleet registry in PostgreSQL (postgresql://...) instead of fleet.db; default: "
                              "fleet.json's registry"))
        return p

    g = sub.add_parser("ca", help=_("fleet CA and broker configuration")).add_subparsers(dest="ca_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("init", help=_("create the fleet folder: CAs, broker/claim/fleet certificates, signing key")))
    p.add_argument("--host", action="append", required=True, help=_("broker host name or IP for its certificate"))
    p.add_argument("--broker", action="append", default=[], help=_("host:port of the main listener (fleet side)"))
    p.add_argument("--claim-broker", action="append", default=[], help=_("host:port of the claim listener"))
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--claim-port", type=int, default=8884)
    p.add_argument("--batch", default="batch1", help=_("claim certificate batch name"))
    p.add_argument("--claim-ttl-hours", type=float, default=24.0, help=_("pending claims are dropped after this"))
    p.set_defaults(func=cmd_ca_init)
    data(g.add_parser("crl", help=_("re-sign the CRL (run before it expires, then reload the broker)"))).set_defaults(
        func=cmd_ca_crl)

    g = sub.add_parser("kits", help=_("kit registry")).add_subparsers(dest="kits_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("list", help=_("every kit and its state")))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kits_list)
    p = data(g.add_parser("approve", help=_("approve a pending claim")))
    p.add_argument("kit")
    p.set_defaults(func=cmd_kits_approve)
    p = data(g.add_parser("revoke", help=_("revoke a kit (CRL, no more config or commands)")))
    p.add_argument("kit")
    p.add_argument("--offline", action="store_true", help=_("do not clear its retained config on the broker"))
    p.set_defaults(func=cmd_kits_revoke)
    p = data(g.add_parser("clock", help=_("the clock corrections a kit reported (records sealed before its clock "
                                          "was synchronised)")))
    p.add_argument("kit")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kits_clock)
    p = data(g.add_parser("issue", help=_("issue a kit certificate without a claim (from its CSR, or a new key)")))
    p.add_argument("kit")
    p.add_argument("--csr", help=_("the kit's CSR (PEM); without it a key is made here"))
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_kits_issue)

    g = sub.add_parser("config", help=_("signed remote config")).add_subparsers(dest="config_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("push", help=_("sign the next config version and publish it (retained)")))
    p.add_argument("kit", help=_("kit id, or '*' for every approved kit"))
    p.add_argument("--set", action="append", help=_("section.key=VALUE (JSON value)"))
    p.add_argument("--file", help=_("JSON file of sections {section: {key: value}}"))
    p.add_argument("--attach", action="append", help=_("file shipped inside the document (e.g. a datacenter key)"))
    p.add_argument("--note")
    p.add_argument("--replace", action="store_true", help=_("start from nothing instead of the previous version"))
    p.add_argument("--offline", action="store_true", help=_("sign and store only, do not publish"))
    p.set_defaults(func=cmd_config_push)
    p = data(g.add_parser("show", help=_("versions issued and what the kit reports")))
    p.add_argument("kit")
    p.set_defaults(func=cmd_config_show)
    p = data(g.add_parser("rollback", help=_("re-issue an earlier version as a new version")))
    p.add_argument("kit")
    p.add_argument("--to", type=int)
    p.add_argument("--offline", action="store_true")
    p.set_defaults(func=cmd_config_rollback)

    g = sub.add_parser("cmd", help=_("signed commands")).add_subparsers(dest="cmd_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("send", help=_("send a command and wait for its result")))
    p.add_argument("kit")
    p.add_argument("name", choices=cp.COMMANDS)
    p.add_argument("--arg", action="append", help=_("key=VALUE (JSON value)"))
    p.add_argument("--ttl", type=int, default=300, help=_("seconds the command stays valid"))
    p.add_argument("--wait", type=float, default=30)
    p.set_defaults(func=cmd_cmd_send)

    g = sub.add_parser("shards", help=_("broker shards: which brokers each kit uses")).add_subparsers(
        dest="shards_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("add", help=_("add a broker shard (kits move to it with rebalance)")))
    p.add_argument("name")
    p.add_argument("--broker", action="append", required=True,
                   help=_("relay broker URL of the shard (mqtts://host:port), repeatable, in priority order"))
    p.add_argument("--control", action="append", help=_("control broker host:port (default: from the mqtts URLs)"))
    p.add_argument("--host", action="append", help=_("also issue the shard broker's certificate for this host name "
                                                     "or IP and write its mosquitto config"))
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--claim-port", type=int, default=8884)
    p.add_argument("--note")
    p.set_defaults(func=cmd_shards_add)
    p = data(g.add_parser("list", help=_("shards, their state and how many kits each serves")))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_shards_list)
    p = data(g.add_parser("state", help=_("mark a shard active, draining or retired")))
    p.add_argument("name")
    p.add_argument("state", choices=("active", "draining", "retired"))
    p.set_defaults(func=cmd_shards_state)
    p = data(g.add_parser("assign", help=_("pin a kit to shards (or --auto) and push its config")))
    p.add_argument("kit")
    p.add_argument("--primary")
    p.add_argument("--failover")
    p.add_argument("--auto", action="store_true", help=_("drop the pin: back to the hashed assignment"))
    p.add_argument("--offline", action="store_true", help=_("sign and store only, do not publish"))
    p.set_defaults(func=cmd_shards_assign)
    p = data(g.add_parser("rebalance", help=_("push a config to every kit whose shards changed")))
    p.add_argument("--dry-run", action="store_true", help=_("only list the kits that would move"))
    p.add_argument("--limit", type=int, default=0, help=_("move at most this many kits (0: all)"))
    p.add_argument("--offline", action="store_true", help=_("sign and store only, do not publish"))
    p.set_defaults(func=cmd_shards_rebalance)

    p = data(sub.add_parser("status", help=_("table of kits: last seen, backlog, free space, halted")))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    data(sub.add_parser("serve", help=_("run the fleet service (claims, telemetry, results)"))).set_defaults(
        func=cmd_serve)
