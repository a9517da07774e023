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

from babel.numbers import format_decimal

from firmware import config
from firmware.cli.common import load_config
from firmware.system.i18n import (
    N_,
    _,
    format_count,
    format_datetime,
    format_size,
    get_language,
    gettext,
    ngettext,
)

#: Column headings of `rekam records`.
HEADER = (N_("RECORD"), N_("STATE"), N_("SIZE"), N_("CREATED"), N_("NOTE"))


def register(sub: argparse._SubParsersAction) -> None:
    """Register the store commands."""
    p = sub.add_parser("status", help=_("records per state, free space and guard state per medium, mirror lag"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("records", help=_("list the newest records"))
    p.add_argument("--state", choices=["stored", "sent", "acked", "purged", "quarantined"])
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_records)

    sim = sub.add_parser("sim", help=_("simulation helpers")).add_subparsers(dest="sim_cmd", metavar="CMD")
    sim.required = True
    p = sim.add_parser("commit", help=_("commit N simulated enrollments into the kit's store"))
    p.add_argument("count", type=int)
    p.add_argument("--operator", default="sim-operator")
    p.add_argument("--pad-kb", type=int, default=0, help=_("pad each payload to this many KiB"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sim_commit)

    usb = sub.add_parser("usb", help=_("USB mirror stick")).add_subparsers(dest="usb_cmd", metavar="CMD")
    usb.required = True
    p = usb.add_parser("eject", help=_("flush and release the stick so it can be pulled"))
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


def when(iso: str | None) -> str:
    """A journal timestamp (ISO 8601, UTC) in the one date format of the CLI's language; "-" for none."""
    if not iso:
        return "-"
    import datetime as dt

    try:
        return format_datetime(dt.datetime.fromisoformat(iso.replace("Z", "+00:00")))
    except ValueError:
        return iso


def _running(st: dict[str, Any]) -> bool:
    d = st.get("daemon", {})
    return bool(d.get("version")) and d.get("running", True) is not False


def print_status(st: dict[str, Any]) -> None:
    """Human-readable status for a technician (the `cli` catalog's words, one number format)."""
    g = st["guard"]
    running = _running(st)
    if not running:  # the store's guard may say OK, but nothing captures while the daemon is down
        print(_("kit {kit}   capture: NOT POSSIBLE (the daemon is not running)", kit=st["kit_id"]))
        print("  ! " + _("start it: sudo systemctl start rekamd (or `make run` on a development machine)"))
    else:
        print(_("kit {kit}   capture: {level}", kit=st["kit_id"], level=g["level"])
              + ("" if g["capture_allowed"] else "  " + _("(HALTED)")))
    for r in g["reasons"]:
        print(f"  ! {_without_action(r)}")
    for m in st["media"]:
        if m["level"] == "HALT" and m["present"]:
            print("  > " + halt_action(m["name"]))
    rec = st["records"]
    print(_("records: ") + ", ".join(f"{k} {format_count(v['records'])}" for k, v in rec.items()))
    backlog = rec["stored"]["records"] + rec["sent"]["records"]
    unacked = rec["stored"]["bytes"] + rec["sent"]["bytes"]
    print(ngettext("backlog: {count} record, {size}; oldest unacknowledged: {oldest}",
                   "backlog: {count} records, {size}; oldest unacknowledged: {oldest}", backlog,
                   count=format_count(backlog), size=format_size(unacked), oldest=when(st["oldest_unacked"])))
    print(stick_line(st))
    up = st.get("relay")
    if isinstance(up, dict) and "state" in up:
        where = (_("{broker} (priority {priority})", broker=up["broker"], priority=up["broker_priority"])
                 if up.get("broker") else _("no broker"))
        c = up.get("counters", {})
        print(_("uplink: {state} to {where} since {since}; sent {sent}, acked {acked}, rejected {rejected}",
                state=up["state"], where=where, since=up.get("since", "-"),
                sent=format_count(c.get("records_sent", 0)), acked=format_count(c.get("records_acked", 0)),
                rejected=format_count(c.get("records_rejected", 0))))
        if up.get("oldest_unacked_age_s") is not None:
            hours = format_decimal(up["oldest_unacked_age_s"] / 3600, format="#,##0.0", locale=get_language())
            print("  " + _("oldest unacknowledged record is {hours} h old", hours=hours))
        if up.get("last_error") and up["state"] != "connected":
            print(f"  ! {up['last_error']}")
    elif running:
        print(_("uplink: not configured ([relay] brokers is empty): records stay on the kit and its stick"))
    for m in st["media"]:
        if not m["present"]:
            print(f"  {m['name']:4s} " + _("absent") + f"   {m['level']:4s} {m['reason']}")
            continue
        used = 1 - m["free_bytes"] / m["total_bytes"] if m["total_bytes"] else 0
        bar = "#" * int(used * 20)
        print(f"  {m['name']:4s} [{bar:20s}] "
              + _("{free} free of {total}, room for about {left} records",
                  free=format_size(m["free_bytes"]), total=format_size(m["total_bytes"]),
                  left=format_count(m["records_left"]))
              + f"  {m['level']} {_without_action(m['reason'])}")
    print_field(st)
    d = st.get("daemon", {})
    if running:
        print(_("daemon: running, version {version}, up {uptime} s", version=d.get("version"),
                uptime=format_count(int(d.get("uptime_s") or 0))))
    else:
        print(_("daemon: not running"))


def print_field(st: dict[str, Any]) -> None:
    """Battery, position and clock lines (issue #18), for the parts the kit has."""
    pw = st.get("power")
    if isinstance(pw, dict) and "level" in pw:
        pct = "?" if pw.get("percent") is None else format_decimal(pw["percent"], format="#,##0", locale=get_language())
        volts = "?" if pw.get("voltage_v") is None else format_decimal(pw["voltage_v"], format="#,##0.00",
                                                                       locale=get_language())
        state = (_("power lost") if pw.get("power_lost") else _("charging") if pw.get("charging")
                 else _("on battery"))
        print(_("battery: {percent} %, {volts} V, {state}", percent=pct, volts=volts, state=state)
              + f"  {pw['level'].upper()}" + (f" {pw['code']}" if pw.get("code") else ""))
        if pw.get("message"):
            print(f"  ! {pw['message']}")
        if pw.get("error"):
            print(f"  ! {pw['error']}")
    pos = st.get("gnss")
    if isinstance(pos, dict) and "fix" in pos:
        if pos["fix"] == "none":
            print(_("position: no fix ({reason})", reason=pos.get("reason", "")))
        else:
            where = f"{pos['lat']:.5f}, {pos['lon']:.5f}" if "lat" in pos else _("(not shown: private)")
            print(_("position: {fix} fix {where}, accuracy {accuracy} m, {satellites} satellites, {age} s old",
                    fix=pos["fix"].upper(), where=where, accuracy=pos.get("accuracy_m", "?"),
                    satellites=pos.get("satellites_used", "?"), age=pos.get("age_s", "?")))
    q = st.get("quality")
    if isinstance(q, dict) and q:
        bad = {n: c for n, c in q.items() if isinstance(c, dict) and c.get("state") == "unavailable"}
        ready = [n for n, c in q.items() if isinstance(c, dict) and c.get("state") == "ready"]
        print(_("quality checks: ready {ready}", ready=", ".join(ready) or "-")
              + ("  " + _("NOT LOADED {names}", names=", ".join(bad)) if bad else ""))
        for n, c in bad.items():
            print(f"  ! {n}: {c.get('error', '')}")
    clk = st.get("clock")
    if isinstance(clk, dict) and "synced" in clk:
        print((_("clock: synchronised ({source})", source=clk.get("source", "")) if clk["synced"]
               else _("clock: NOT synchronised"))
              + ("  " + _("{count} records await a time correction", count=clk["awaiting_correction"])
                 if clk.get("awaiting_correction") else ""))


def halt_action(medium: str) -> str:
    """What the operator does when `medium` ("sd" or "usb") is full, in the CLI's language (the guard's text)."""
    from firmware.store.capacity import HALT_ACTIONS

    return gettext(HALT_ACTIONS.get(medium, HALT_ACTIONS["sd"]))


def _without_action(reason: str) -> str:
    """A guard reason without the English "To do: ..." part (the CLI prints it translated on its own line)."""
    from firmware.store.capacity import HALT_ACTIONS

    for action in HALT_ACTIONS.values():
        reason = reason.replace(". " + action, "").replace(action, "")
    return reason.strip()


def stick_line(st: dict[str, Any]) -> str:
    """The mirror line: is a stick there, is it full or still being filled, and how many records are on none."""
    stick = st.get("stick") or {}
    lag = st["mirror_lag"]["records"]
    on_none = (ngettext("{count} record is on no stick yet", "{count} records are on no stick yet", lag,
                        count=format_count(lag)) if lag else _("every record is on a stick"))
    if not stick.get("present"):
        where = _("stick: absent")
        why = stick.get("message") or stick.get("error")  # the worded message (a faulted stick), else the detail
        if why:
            where += f" ({why})"
    elif stick.get("full"):
        where = _("stick {id}: FULL, {n} not copied", id=stick.get("stick_id"),
                  n=format_count(int(stick.get("not_mirrored") or 0)))
    elif stick.get("backfilling") and lag:
        where = _("stick {id}: present, copying", id=stick.get("stick_id"))
    else:
        where = _("stick {id}: present", id=stick.get("stick_id"))
    return f"{where}; {on_none}"


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
        return 0
    if not rows:
        print(_("no records") + (f" ({args.state})" if args.state else ""))
        return 0
    width = max(len(r["id"]) for r in rows)
    head = [gettext(h) for h in HEADER]
    created = [when(r["created"]) for r in rows]
    cw = max(len(head[3]), *(len(c) for c in created))
    print(f"{head[0]:{width}s}  {head[1]:11s} {head[2]:>10s}  {head[3]:{cw}s}  {head[4]}".rstrip())
    for r, c in zip(rows, created, strict=True):  # the state is the journal's word, as `--state` takes it
        print(f"{r['id']:{width}s}  {r['state']:11s} {format_size(r['size']):>10s}  {c:{cw}s}  "
              f"{r['reason'] or ''}".rstrip())
    return 0


def cmd_sim_commit(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise SystemExit("rekam: " + _("count must be >= 1"))
    cfg = load_config(args)
    url = _daemon(cfg)
    if url:
        from firmware.cli.localapi import ApiError, call

        try:
            res = call(url, "POST", "/api/v1/sim/commit",
                       {"count": args.count, "operator_id": args.operator, "pad_to_kb": args.pad_kb})
        except ApiError as e:
            # 507: capture halted part way ({"error", "reason", "committed"}); 500: a store error, same shape
            detail = e.detail if isinstance(e.detail, dict) else {"error": str(e.detail)}
            done = list(detail.get("committed") or [])
            _print_commits(done, args.json)
            if e.status == 507:
                _halted(len(done), str(detail.get("reason", "")))
            else:
                print("rekam: " + _("stopped after {n} records: {error}", n=format_count(len(done)),
                                    error=detail.get("error", "")), file=sys.stderr)
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
                    if not args.json and sys.stderr.isatty():
                        print(file=sys.stderr)
                    _print_commits(done, args.json)
                    _halted(i, e.reason)
                    return 2
                if not args.json and sys.stderr.isatty():
                    print(f"\r{i + 1}/{args.count}", end="", file=sys.stderr)
        if not args.json and sys.stderr.isatty():
            print(file=sys.stderr)
    _print_commits(done, args.json)
    return 0


def _halted(n: int, reason: str) -> None:
    """Say on stderr that capture halted after `n` records, why, and what to do about each full medium."""
    print("rekam: " + ngettext("capture halted after {count} record: {reason}",
                               "capture halted after {count} records: {reason}", n,
                               count=format_count(n), reason=_without_action(reason)), file=sys.stderr)
    for medium in ("sd", "usb"):
        if reason.startswith(f"{medium} ") or f"; {medium} " in reason:
            print("  > " + halt_action(medium), file=sys.stderr)


def _print_commits(done: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(done, indent=2))
    else:
        for d in done:
            print(_("captured {id} sha256 {sha} ", id=d["record_id"], sha=d["sha256"][:16])
                  + (_("mirrored") if d["mirrored"] else _("SD only (mirror backlog)")))


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
