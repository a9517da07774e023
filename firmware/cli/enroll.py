"""`rekam enroll` (terminal enrollment) and `rekam usb export` (copy every record to the stick now).

Both talk to the running daemon's local API (firmware/cli/localapi.py), like the web console: the
daemon owns the sensor, the camera and the store. `rekam enroll` signs in (PIN by getpass, or a
line of stdin when stdin is not a terminal, for scripts), asks for the NIK, then walks the
operator through face, fingers, duplicate check, supervisor decision and commit, printing one
feedback line per capture. Ctrl-C cancels the enrollment on the daemon (nothing is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from firmware.system.i18n import _, format_count, ngettext

API = "/api/v1"


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rekam enroll` and `rekam usb export` (the `usb` group is created by commands.store)."""
    p = sub.add_parser("enroll", help=_("enroll a resident from this terminal (face, fingers, commit)"))
    p.add_argument("--operator", help=_("operator id (asked when missing)"))
    p.add_argument("--nik", help=_("the resident's NIK (asked when missing)"))
    p.add_argument("--receipt-dir", help=_("save the receipt PNG and PDF into this folder"))
    p.add_argument("--auto", action="store_true",
                   help=_("capture without waiting for Enter before each attempt "
                          "(the sensor still waits for the finger)"))
    p.set_defaults(func=cmd_enroll)

    usb = sub.choices.get("usb")
    if usb is None:
        usb_sub = sub.add_parser("usb", help=_("USB mirror stick")).add_subparsers(dest="usb_cmd", metavar="CMD")
        usb_sub.required = True
    else:
        usb_sub = next(a for a in usb._actions if isinstance(a, argparse._SubParsersAction))
    p = usb_sub.add_parser("export", help=_("copy every record the stick lacks to it now, with progress"))
    p.add_argument("--batch", type=int, default=5, help=_("records per request (progress granularity)"))
    p.set_defaults(func=cmd_usb_export)


# --- plumbing -----------------------------------------------------------------------------


class Abort(Exception):
    """Stop the command with this message (exit status 1)."""


def _daemon_url(args: argparse.Namespace) -> str:
    from firmware.cli.common import load_config
    from firmware.cli.localapi import daemon_url

    cfg = load_config(args)
    url = daemon_url(cfg.state_dir)
    if url is None:
        raise Abort(_("the daemon is not running (no live api.json in {dir}); start rekamd first", dir=cfg.state_dir))
    return url


class Session:
    """The signed-in operator's calls to the daemon."""

    def __init__(self, url: str, out: Any = sys.stdout) -> None:
        self.url = url
        self.token: str | None = None
        self.out = out

    def call(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        from firmware.cli.localapi import call

        return call(self.url, method, API + path, body, token=self.token, raw=raw)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)


def _detail(e: Any) -> tuple[str, str]:
    """(code, message) of an ApiError (the enrollment API's `{"code", "message"}` or a validation list)."""
    d = e.detail
    if isinstance(d, dict):
        return str(d.get("code", "")), str(d.get("message", d))
    if isinstance(d, list):  # FastAPI validation errors: name the field
        parts = []
        for item in d:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", [])[1:])
                parts.append(f"{loc}: {item.get('msg', '')}")
        return "invalid", "; ".join(parts) or str(d)
    return "", str(d)


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        raise Abort(_("input ended")) from None


def _secret(prompt: str) -> str:
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt)
    return _ask(prompt)  # scripted input: one line of stdin


# --- rekam enroll ---------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    """Interactive terminal enrollment through the daemon."""
    from firmware.cli.localapi import ApiError

    try:
        s = Session(_daemon_url(args))
        _sign_in(s, args.operator)
        try:
            return _enroll(s, args)
        except KeyboardInterrupt:
            _cancel_quietly(s, "interrupted")
            return 130
    except Abort as e:
        print(f"rekam enroll: {e}", file=sys.stderr)
        return 1
    except ApiError as e:
        print(f"rekam enroll: {_detail(e)[1]}", file=sys.stderr)
        return 1


def _sign_in(s: Session, operator: str | None) -> None:
    from firmware.cli.localapi import ApiError

    for _attempt in range(3):
        op = operator or _ask(_("Operator id: ")).strip()
        pin = _secret(_("PIN: ")).strip()
        try:
            r = s.call("POST", "/auth/signin", {"operator_id": op, "pin": pin})
        except ApiError as e:
            code, msg = _detail(e)
            if code == "locked":  # said once, by the error handler (it ends the command)
                raise Abort(_signin_refused(code, msg, e.detail)) from None
            s.say("! " + _signin_refused(code, msg, e.detail))
            continue
        s.token = r["token"]
        s.say(_("Signed in: {name} ({id}, {role})", name=r["name"], id=r["operator_id"], role=r["role"]))
        return
    raise Abort(_("sign-in failed three times"))


def _signin_refused(code: str, msg: str, detail: Any) -> str:
    """One sentence for a refused sign-in, in the CLI's language: the lockout's minutes or the tries left
    counted with the right plural (the daemon's own message is English and carries the numbers)."""
    import re

    if code == "locked":
        retry = int(detail.get("retry_after_s", 0)) if isinstance(detail, dict) else 0
        minutes = max(1, -(-retry // 60))
        return ngettext("operator locked after too many wrong PINs; try again in {n} minute",
                        "operator locked after too many wrong PINs; try again in {n} minutes", minutes)
    if code in ("bad_pin", "unknown"):
        m = re.search(r"\((\d+) tries? left", msg)
        if m:
            return ngettext("sign-in refused: wrong operator id or PIN ({n} try left before lockout)",
                            "sign-in refused: wrong operator id or PIN ({n} tries left before lockout)",
                            int(m.group(1)))
        return _("sign-in refused: wrong operator id or PIN")
    return _("sign-in refused: {reason}", reason=msg)


def _cancel_quietly(s: Session, why: str) -> None:
    from firmware.cli.localapi import ApiError

    try:
        s.call("POST", "/enrollment/cancel")
        s.say(_("Enrollment cancelled ({why}); nothing was kept.", why=why))
    except (ApiError, OSError):
        pass


def _start(s: Session, nik: str | None) -> dict[str, Any]:
    """Ask for the NIK until the daemon accepts it; handles 'already enrolled here' with a reason."""
    from firmware.cli.localapi import ApiError

    while True:
        value = nik or _ask(_("Resident's NIK (16 digits): ")).strip()
        nik = None
        reason = ""
        while True:
            try:
                return s.call("POST", "/enrollment", {"nik": value, "override_reason": reason})
            except ApiError as e:
                code, msg = _detail(e)
                if code == "nik_enrolled" and not reason:
                    s.say(f"! {msg}")
                    reason = _ask(_("Reason to enroll again (empty: enter another NIK): ")).strip()
                    if reason:
                        continue
                elif code in ("halted", "locked", "busy"):
                    raise Abort(msg) from None
                else:
                    s.say(f"! {msg}")
                break


def _enroll(s: Session, args: argparse.Namespace) -> int:
    state = s.call("GET", "/enrollment")
    if state.get("active"):
        s.say(_("Resuming the enrollment in progress ({nik}, next: {step}).", nik=state["nik_masked"],
                step=state["step"]))
    else:
        state = _start(s, args.nik)
        s.say(_("Enrollment {id} started for NIK {nik}.", id=state["id"], nik=state["nik_masked"]))
    while state.get("active"):
        step = state["step"]
        if step == "face":
            _face(s, args.auto)
        elif step.startswith("finger:"):
            _finger(s, step[7:], state, args.auto)
        elif step.startswith("iris:"):
            _iris(s, step[5:], args.auto)
        elif step == "signature":
            _signature(s, args.auto)
        elif step == "dupcheck":
            _dupcheck(s)
        elif step == "supervisor":
            _supervisor(s)
        elif step == "review":
            return _review_commit(s, state, args.receipt_dir)
        state = s.call("GET", "/enrollment")
    s.say(_("The enrollment was closed (cancelled or rejected); nothing was stored."))
    return 1


def _choice(s: Session, what: str, auto: bool) -> str:
    """'' to capture, 'x' for an exception, 'c' to cancel."""
    if auto:
        return ""
    while True:
        a = _ask(_("{what} [Enter] capture  [x] exception  [c] cancel: ", what=what)).strip().lower()
        if a in ("", "x", "c"):
            return a
        s.say("  " + _("type nothing, x or c"))


def _feedback(s: Session, label: str, r: dict[str, Any]) -> None:
    if r.get("status") == "timeout":
        s.say(f"  {label}: {r['message']}")
        return
    mark = _("OK ") if r["accepted"] else (_("KEPT") if r["done"] else _("RETAKE"))
    score = round(float(r["score"]))
    s.say(f"  {label}: " + _("score {score} attempt {attempt} {mark} - {message}", score=score,
                             attempt=r["attempt"], mark=mark, message=r["message"]))


def _cancel_or_raise(s: Session) -> None:
    s.call("POST", "/enrollment/cancel")
    raise Abort(_("enrollment cancelled by the operator; nothing was kept"))


def _face(s: Session, auto: bool) -> None:
    s.say(_("Face photo: the resident looks straight at the camera, neutral expression, no glasses or cap."))
    a = _choice(s, _("Face:"), auto)
    if a == "c":
        _cancel_or_raise(s)
    if a == "x":
        reason = _ask(_("Why no photo (e.g. camera broken)? ")).strip()
        if reason:
            s.call("POST", "/enrollment/face/exception", {"reason": reason})
        return
    _feedback(s, _("face"), s.call("POST", "/enrollment/face"))


def _finger(s: Session, code: str, state: dict[str, Any], auto: bool) -> None:
    label = next((f["label"] for f in state["fingers"] if f["finger"] == code), code)
    s.say(_("Finger {code}: place the {label} flat on the sensor glass.", code=code, label=label))
    a = _choice(s, f"{code} {label}:", auto)
    if a == "c":
        _cancel_or_raise(s)
    if a == "x":
        reason = _ask(_("Why is the {label} not captured (missing, bandaged, injured)? ", label=label)).strip()
        if reason:
            s.call("POST", f"/enrollment/fingers/{code}/exception", {"reason": reason})
        return
    _feedback(s, f"{code} {label}", s.call("POST", f"/enrollment/fingers/{code}"))


def _iris(s: Session, eye: str, auto: bool) -> None:
    label = _("left eye") if eye == "left" else _("right eye")
    s.say(_("Iris, {eye}: hold the iris camera about 10 cm in front of it; the resident opens the eye wide.",
            eye=label))
    a = _choice(s, label + ":", auto)
    if a == "c":
        _cancel_or_raise(s)
    if a == "x":
        reason = _ask(_("Why is the {eye} not captured (missing, blind, prosthesis)? ", eye=label)).strip()
        if reason:
            s.call("POST", f"/enrollment/iris/{eye}/exception", {"reason": reason})
        return
    _feedback(s, label, s.call("POST", f"/enrollment/iris/{eye}"))


def _signature(s: Session, auto: bool) -> None:
    """The signature is drawn on the console's touch screen; the terminal waits for it or records an exception."""
    if auto:
        raise Abort(_("the signature is drawn on the console's touch screen; finish there"))
    a = _ask(_("Signature: let the resident sign on the console, then [Enter]  [x] cannot sign  [c] cancel: "))
    a = a.strip().lower()
    if a == "c":
        _cancel_or_raise(s)
    if a == "x":
        reason = _ask(_("Why can the resident not sign (e.g. thumbprint)? ")).strip()
        if reason:
            s.call("POST", "/enrollment/signature/exception", {"reason": reason})


def _dupcheck(s: Session) -> None:
    s.say(_("Duplicate check: searching this kit's earlier enrollments..."))
    r = s.call("POST", "/enrollment/dupcheck")
    if r["flagged"]:
        fingers = ", ".join(m["finger"] for m in r["matches"])
        s.say("! " + _("LIKELY DOUBLE ENROLLMENT: fingers {fingers} match record(s) {records}.", fingers=fingers,
                        records=", ".join(r["records"])))
        s.say("  " + _("A supervisor must decide before the record can be stored."))
    else:
        s.say("  " + _("no match: this resident is not enrolled under another NIK on this kit"))


def _supervisor(s: Session) -> None:
    from firmware.cli.localapi import ApiError

    sid = _ask(_("Supervisor id: ")).strip()
    pin = _secret(_("Supervisor PIN: ")).strip()
    decision = ""
    while decision not in ("accept", "reject"):
        decision = _ask(_("Decision [accept/reject]: ")).strip().lower()
    reason = ""
    while not reason:
        reason = _ask(_("Reason (required): ")).strip()
    try:
        s.call("POST", "/enrollment/supervisor", {"supervisor_id": sid, "pin": pin, "decision": decision,
                                                 "reason": reason})
    except ApiError as e:
        s.say("! " + _("supervisor decision refused: {reason}", reason=_detail(e)[1]))
        return
    s.say("  " + _("supervisor {id}: {decision}", id=sid, decision=decision))


def _review_commit(s: Session, state: dict[str, Any], receipt_dir: str | None) -> int:
    s.say(_("Review:"))
    face = state.get("face") or {}
    s.say(f"  NIK {state['nik_masked']}; " + _("face: ")
          + (_("exception ({reason})", reason=state["face_exception"]) if state.get("face_exception")
             else _("score {score}", score=face.get("score"))))
    for f in state["fingers"]:
        s.say(f"  {f['finger']} {f['label']}: "
              + (_("exception ({reason})", reason=f["exception"]) if f["exception"]
                 else _("score {score}", score=f["score"]) + (" " + _("(kept best)") if f["forced"] else "")))
    if _ask(_("Store this enrollment? [Y/n] ")).strip().lower() in ("n", "no", "t", "tidak"):
        _cancel_or_raise(s)
    r = s.call("POST", "/enrollment/commit")
    s.say(_("STORED record {id}", id=r["record_id"]))
    s.say(f"  sha256 {r['sha256']}")
    s.say("  " + (_("copied to the USB stick") if r["mirrored"] else "! " + _("NOT on a USB stick yet (insert one)")))
    if receipt_dir:
        d = Path(receipt_dir)
        d.mkdir(parents=True, exist_ok=True)
        for fmt in ("png", "pdf"):
            path = d / f"{r['record_id']}.{fmt}"
            path.write_bytes(s.call("GET", f"/receipts/{r['record_id']}.{fmt}", raw=True))
            s.say("  " + _("receipt saved: {path}", path=path))
    return 0


# --- rekam usb export -----------------------------------------------------------------------


def _bar(done: int, total: int, width: int = 30) -> str:
    frac = done / total if total else 1.0
    n = int(round(frac * width))
    return f"[{'#' * n}{'.' * (width - n)}] {done}/{total}"


def cmd_usb_export(args: argparse.Namespace) -> int:
    """Copy every record the stick lacks, in batches, with a progress bar.

    The daemon's USB watcher may be copying the same records in the background (it gives way to each of
    our batches, and may take a few between them), so progress counts what the stick holds, not only what
    our calls copied: done = lacking at the start - lacking now; the summary says who copied how many.
    """
    from firmware.cli.localapi import ApiError, call

    if args.batch < 1:
        print("rekam usb export: " + _("--batch must be at least 1"), file=sys.stderr)
        return 2
    try:
        url = _daemon_url(args)
        copied = done = 0
        target: int | None = None  # records the stick lacks (grows if new ones are captured meanwhile)
        tty = sys.stdout.isatty()
        while True:
            r = call(url, "POST", f"{API}/usb/export?limit={args.batch}")
            copied += r["copied"]
            if target is None:
                target = r["copied"] + r["remaining"]
            if target - r["remaining"] < done:  # new records arrived: they are to be copied too
                target = done + r["remaining"]
            progressed = target - r["remaining"] > done or r["copied"] > 0
            done = target - r["remaining"]
            line = _bar(done, target)
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            if r["remaining"] == 0 or not progressed:
                break
        if tty:
            print()
        if r["remaining"]:
            print("rekam usb export: " + ngettext(
                "{n} record could not be copied (see the daemon log)",
                "{n} records could not be copied (see the daemon log)", r["remaining"]), file=sys.stderr)
            return 1
        print(_("stick {stick}: all {total} records are on it", stick=r["stick_id"],
                total=format_count(r["total"]))
              + "; " + ngettext("{n} copied now", "{n} copied now", copied)
              + (("; " + ngettext("{n} by the kit's background copy", "{n} by the kit's background copy",
                                  done - copied)) if done > copied else ""))
        return 0
    except Abort as e:
        print(f"rekam usb export: {e}", file=sys.stderr)
        return 1
    except ApiError as e:
        print(f"rekam usb export: {_detail(e)[1]}", file=sys.stderr)
        return 1
