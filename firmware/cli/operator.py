"""`rekam operator hash-pin | locks | unlock ID`: operator PINs and sign-in lockouts (a technician's tools).

`hash-pin` makes the ``pin_hash`` of an `[operators] list` entry (the PIN is asked twice, never echoed; or read
from stdin with ``--stdin``). `locks` and `unlock` read and clear the lockouts the daemon keeps in
``<state_dir>/lockout.sqlite`` (`firmware.enrollment.operators`): a supervisor locked out by wrong PINs (someone
guessing, or a forgotten PIN) is recovered with ``sudo rekam operator unlock spv`` instead of waiting up to a day.
SQLite takes the one short transaction while the daemon runs; run as root, the command acts as the state
directory's owner so the database's files stay the daemon's.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from firmware.cli.common import load_config
from firmware.system.i18n import _, format_datetime


def register(sub: argparse._SubParsersAction) -> None:
    """Register the operator commands."""
    g = sub.add_parser("operator", help=_("operator PINs and sign-in lockouts")).add_subparsers(
        dest="operator_cmd", metavar="CMD")
    g.required = True
    p = g.add_parser("hash-pin", help=_("make the pin_hash of an [operators] list entry (the PIN is asked twice)"))
    p.add_argument("--stdin", action="store_true", help=_("read the PIN from the first line of stdin"))
    p.set_defaults(func=cmd_hash_pin)
    p = g.add_parser("locks", help=_("operators locked out by wrong PINs, and until when"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_locks)
    p = g.add_parser("unlock", help=_("clear an operator's lockout and wrong-PIN count now"))
    p.add_argument("operator_id")
    p.set_defaults(func=cmd_unlock)


def cmd_hash_pin(args: argparse.Namespace) -> int:
    from firmware.enrollment.operators import hash_pin

    if args.stdin:
        pin = sys.stdin.readline().strip()
    else:
        pin = getpass.getpass(_("PIN: "))
        if getpass.getpass(_("PIN again: ")) != pin:
            print(_("rekam: the two PINs differ"), file=sys.stderr)
            return 2
    try:
        print(hash_pin(pin))
    except ValueError:
        print(_("rekam: a PIN is 4 to 12 digits"), file=sys.stderr)
        return 2
    return 0


def _lockouts(args: argparse.Namespace):  # -> Operators
    from firmware.enrollment.operators import Operators

    cfg = load_config(args)
    state = Path(cfg.state_dir)
    st = state.stat()
    if os.geteuid() == 0 and st.st_uid != 0:
        # Root would leave the WAL and shared-memory files root's, and the daemon (its own user) could then no
        # longer write its lockouts: act as the state directory's owner.
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
    return Operators([], db_path=state / "lockout.sqlite")


def cmd_locks(args: argparse.Namespace) -> int:
    ops = _lockouts(args)
    rows = ops.locks()
    if args.json:
        print(json.dumps([{"operator_id": oid, "until": until} for oid, until in rows]))
        return 0
    if not rows:
        print(_("no operator is locked out"))
    for oid, until in rows:
        print(_("{id}: locked until {until}", id=oid, until=format_datetime(until)))
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    ops = _lockouts(args)
    if ops.unlock(args.operator_id):
        print(_("operator {id} unlocked: they may sign in now", id=args.operator_id))
    else:
        print(_("operator {id} was not locked (wrong-PIN count cleared)", id=args.operator_id))
    return 0
