"""`rekam identity init|show`: the kit's identity (kit id + Ed25519 signing key) and its claim state.

`init` is what rekam-firstboot.service runs before rekamd on every boot until the kit is claimed:
it creates the identity once (atomically, mode 0600) and reports whether the fleet has claimed the
kit. The claim itself is run by rekamd (`firmware.control.claim`, when ``[control] enabled``), which
retries until the network is up and the fleet approves; until then the kit enrolls and buffers
sealed records on SD and stick. A claimed kit has its certificate and the pinned fleet key in
``<state_dir>/control/`` (`rekam provision status` for the details).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from firmware import config
from firmware.cli import common
from firmware.system.i18n import _


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rekam identity`."""
    ident = sub.add_parser("identity", help=_("kit identity and claim state")).add_subparsers(dest="identity_cmd",
                                                                                          metavar="CMD")
    ident.required = True
    p = ident.add_parser("init", help=_("create the kit identity if missing (first boot) and report the claim state"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_init)
    p = ident.add_parser("show", help=_("kit id, public key and fingerprint, board serial, claim state"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)


def load_config(args: argparse.Namespace) -> config.Config:
    """The kit config (--config, $REKAM_CONFIG, /etc/rekam/rekam.toml); ConfigError: `rekam` exits 78.

    The data-center key is not needed to create or show the kit's identity, and on a fresh kit it
    may not be installed yet: its check is left out here (rekamd still refuses to start without it).
    """
    return common.load_config(args, overrides={"datacenter.public_key_files": []})


def fingerprint(public_key_raw: bytes) -> str:
    """Short, read-aloud form of the public key: first 16 hex digits of its SHA-256 in groups of 4."""
    h = hashlib.sha256(public_key_raw).hexdigest()[:16]
    return "-".join(h[i:i + 4] for i in range(0, 16, 4))


def board_serial(path: Path) -> str:
    """The board's serial number (Raspberry Pi device tree), or "" where there is none."""
    try:
        return path.read_bytes().rstrip(b"\0\n").decode("ascii", "replace")
    except OSError:
        return ""


def claim_state(cfg: config.Config) -> dict[str, Any]:
    """{"claimed": bool, "control_enabled": bool, ...claim.json fields} from the control-plane files."""
    from firmware.control.claim import ControlPaths

    paths = ControlPaths.of(cfg)
    out: dict[str, Any] = {"claimed": paths.provisioned(), "control_enabled": bool(cfg.control.enabled)}
    if out["claimed"]:
        try:
            data = json.loads(paths.claim_state.read_text())
            out.update(data if isinstance(data, dict) else {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            out["error"] = f"unreadable {paths.claim_state}: {e}"  # part of the --json document: stays English
    return out


def _describe(cfg: Any, ident: Any, created: bool) -> dict[str, Any]:
    return {"kit_id": ident.kit_id, "public_key": ident.public_key_b64,
            "fingerprint": fingerprint(ident.public_key_raw), "created_now": created,
            "board_serial": board_serial(Path(cfg.kit.hardware_serial_file)), "site": cfg.kit.site,
            "state_dir": str(cfg.state_dir), "claim": claim_state(cfg)}


def _print(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(_("kit {kit}", kit=info["kit_id"]) + ("  " + _("(identity created now)") if info["created_now"] else ""))
    print(_("public key  {key}", key=info["public_key"]))
    print(_("fingerprint {fingerprint}", fingerprint=info["fingerprint"]))
    print(_("board       {board}   site {site}", board=info["board_serial"] or "-", site=info["site"] or "-"))
    c = info["claim"]
    details = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("claimed", "control_enabled"))
    if c["claimed"]:
        print(_("claimed     yes ({details})", details=details or _("no details")))
    elif c["control_enabled"]:
        print(_("claimed     not claimed yet: rekamd claims by itself once the network is up and the fleet approves; "
                "meanwhile the kit enrolls and buffers sealed records on SD and stick"))
    else:
        print(_("claimed     not claimed yet, and [control] enabled = false: the kit will not claim; it enrolls and "
                "buffers sealed records on SD and stick"))


def cmd_init(args: argparse.Namespace) -> int:
    """Create the identity if absent; report it and the claim state."""
    from firmware.seal import identity

    cfg = load_config(args)
    existed = (cfg.state_dir / "identity" / "kit.json").exists()
    try:
        ident = identity.load_or_create(cfg.state_dir)
    except (identity.IdentityError, OSError) as e:
        print("rekam: " + _("kit identity error: {error}", error=e), file=sys.stderr)
        return 1
    info = _describe(cfg, ident, created=not existed)
    # The claim runs in rekamd (it needs the network and retries for hours); nothing to wait for here.
    _print(info, args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show an existing identity (never creates one)."""
    from firmware.seal import identity

    cfg = load_config(args)
    if not (cfg.state_dir / "identity" / "kit.json").exists():
        print("rekam: " + _("no kit identity in {path} yet: run `rekam identity init` "
                            "(rekam-firstboot.service does it at boot)", path=cfg.state_dir / "identity"),
              file=sys.stderr)
        return 1
    try:
        ident = identity.load(cfg.state_dir)
    except identity.IdentityError as e:
        print("rekam: " + _("kit identity error: {error}", error=e), file=sys.stderr)
        return 1
    _print(_describe(cfg, ident, created=False), args.json)
    return 0
