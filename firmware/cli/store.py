"""`rekam status`, `rekam records`, `rekam sim commit N`, `rekam usb eject`.

Each goes through the running daemon's local API; when no daemon owns the state directory
they open the store directly (a technician on a stopped kit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from firmware import config
from firmware.cli.common import load_config

MIB = 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    """Register the store commands."""
    p = sub.add_parser("status", help="records per state, free space and guard state per medium, mirror lag")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("records", help="list the newest records")
    p.add_argument("--state", choices=["stored", "sent", "acked", "purged", "quarantined"])
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_records)

    sim = sub.add_parser("sim", help="simulation helpers").add_subparsers(dest="sim_cmd", metavar="CMD")
    sim.required = True
    p = sim.add_parser("commit", help="commit N simulated enrollments into the kit's store")
    p.add_argument("count", type=int)
    p.add_argument("--operator", default="sim-operator")
    p.add_argument("--pad-kb", type=int, default=0, help="pad each payload to this many KiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sim_commit)

    usb = sub.add_parser("usb", help="USB mirror stick").add_subparsers(dest="usb_cmd", metavar="CMD")
    usb.required = True
    p = usb.add_parser("eject", help="flush and release the stick so it can be pulled")
    p.set_defaults(func=cmd_usb_eject)




@contextmanager
def direct_store(cfg: config.Config, recover: bool = True) -> Iterator[Any]:
    """Open the store in this process (only when no daemon runs; StoreLocked otherwise)."""
    from firmware.seal import identity
    from firmware.store.store import Store

    st = Store(cfg, identity.load_or_create(cfg.state_dir))
    st.open(recover=recover)
    try:
        yield st
    finally:
        st.close()


def _daemon(cfg: config.Config) -> str | None:
    from firmware.cli.localapi import daemon_url

    return daemon_url(cfg.state_dir)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    url = _daemon(cfg)
    if url:
        from firmware.cli.localapi import call

        st = call(url, "GET", "/api/v1/status")
    else:
        with direct_store(cfg) as s:
            st = s.status()
        st["daemon"] = {"running": False}
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print_status(st)
    return 0 if st["guard"]["level"] != "HALT" else 2


def print_status(st: dict[str, Any]) -> None:
    """Human-readable status for a technician."""
    g = st["guard"]
    print(f"kit {st['kit_id']}   capture: {g['level']}" + ("" if g["capture_allowed"] else "  (HALTED)"))
    for r in g["reasons"]:
        print(f"  ! {r}")
    rec = st["records"]
    print("records: " + ", ".join(f"{k} {v['records']}" for k, v in rec.items()))
    unacked = rec["stored"]["bytes"] + rec["sent"]["bytes"]
    print(f"backlog: {rec['stored']['records'] + rec['sent']['records']} records, {unacked / MIB:.1f} MiB; "
          f"oldest unacknowledged: {st['oldest_unacked'] or '-'}")
    print(f"mirror lag: {st['mirror_lag']['records']} records on no stick")
    up = st.get("relay")
    if isinstance(up, dict) and "state" in up:
        where = f"{up['broker']} (priority {up['broker_priority']})" if up.get("broker") else "no broker"
        c = up.get("counters", {})
        print(f"uplink: {up['state']} to {where} since {up.get('since', '-')}; sent {c.get('records_sent', 0)}, "
              f"acked {c.get('records_acked', 0)}, rejected {c.get('records_rejected', 0)}")
        if up.get("oldest_unacked_age_s") is not None:
            print(f"  oldest unacknowledged record is {up['oldest_unacked_age_s'] / 3600:.1f} h old")
        if up.get("last_error") and up["state"] != "connected":
            print(f"  ! {up['last_error']}")
    elif st.get("daemon", {}).get("version"):
        print("uplink: not configured ([relay] brokers is empty): records stay on the kit and its stick")
    for m in st["media"]:
        if not m["present"]:
            print(f"  {m['name']:4s} absent   {m['level']:4s} {m['reason']}")
            continue
        used = 1 - m["free_bytes"] / m["total_bytes"] if m["total_bytes"] else 0
        bar = "#" * int(used * 20)
        print(f"  {m['name']:4s} [{bar:20s}] {m['free_bytes'] / MIB:,.0f} MiB free, room for {m['records_left']:,} "
              f"records  {m['level']} {m['reason']}")
    d = st.get("daemon", {})
    print("daemon: " + (f"running, version {d.get('version')}, up {d.get('uptime_s')} s" if d.get("version")
                        else "not running"))


def cmd_records(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    url = _daemon(cfg)
    if url:
        from urllib.parse import urlencode

        from firmware.cli.localapi import call

        q = {"limit": args.limit, **({"state": args.state} if args.state else {})}
        rows = call(url, "GET", "/api/v1/records?" + urlencode(q))
    else:
        with direct_store(cfg, recover=False) as s:
            rows = [r.__dict__ for r in s.j.records(state=args.state, limit=args.limit, newest_first=True)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['id']}  {r['state']:11s} {r['size'] / 1024:8.0f} KiB  {r['created']}  {r['reason']}")
    return 0


def cmd_sim_commit(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise SystemExit("rekam: count must be >= 1")
    cfg = load_config(args)
    url = _daemon(cfg)
    if url:
        from firmware.cli.localapi import ApiError, call

        try:
            res = call(url, "POST", "/api/v1/sim/commit",
                       {"count": args.count, "operator_id": args.operator, "pad_to_kb": args.pad_kb})
        except ApiError as e:
            print(f"rekam: {e.detail}", file=sys.stderr)
            return 2
        done = res["committed"]
    else:
        from firmware.capture.simulated import SimulatedCapture
        from firmware.store.capacity import CaptureHalted

        src = SimulatedCapture(cfg.path(cfg.simulation.corpus_dir), pad_to=args.pad_kb * 1024)
        done = []
        with direct_store(cfg) as s:
            for i in range(args.count):
                try:
                    done.append(s.commit(src.capture(args.operator).encode(), operator_id=args.operator).as_dict())
                except CaptureHalted as e:
                    print(f"rekam: capture halted after {i} records: {e.reason}", file=sys.stderr)
                    _print_commits(done, args.json)
                    return 2
                if not args.json and sys.stderr.isatty():
                    print(f"\r{i + 1}/{args.count}", end="", file=sys.stderr)
        if not args.json and sys.stderr.isatty():
            print(file=sys.stderr)
    _print_commits(done, args.json)
    return 0


def _print_commits(done: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(done, indent=2))
    else:
        for d in done:
            print(f"captured {d['record_id']} sha256 {d['sha256'][:16]} "
                  + ("mirrored" if d["mirrored"] else "SD only (mirror backlog)"))


def cmd_usb_eject(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    was_mounted = True
    if cfg.usb.require_mountpoint:
        from hw import usbstick

        was_mounted = usbstick.mounted_at(cfg.usb_dir) is not None
    url = _daemon(cfg)
    if url:
        from firmware.cli.localapi import call

        call(url, "POST", "/api/v1/usb/eject")
    else:
        os.sync()
    if cfg.usb.require_mountpoint:
        # The daemon has flushed and forgotten the stick; now unmount it: directly (or through
        # `systemctl stop rekam-usb-mount@<dev>`) as root, else via the rekam-usb-eject.path
        # request file (no polkit, no sudo). Already gone (the daemon asked itself) is fine.
        # See docs/pi-setup.md.
        try:
            usbstick.eject(cfg.usb_dir)
        except (usbstick.StickError, OSError) as e:
            print(f"rekam: stick flushed but NOT unmounted: {e}", file=sys.stderr)
            return 1
        if not was_mounted:
            print(f"no stick mounted at {cfg.usb_dir}")
            return 0
    print("stick released: it can be pulled out now")
    return 0
