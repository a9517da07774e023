"""`rekam-fleet`: the data center and fleet side.

Commands here: `keygen` (a data-center X25519 key pair), `open` (verify and decrypt one sealed
record), `verify` (check a record's layout and signature without a key). The other groups register
from their modules (`EXTRA_MODULES`): fleet (`provisioning.fleet_cli`), ingest/archive, import, export.
Data-center errors (`firmware.errors.DataCenterError`: FleetError, CaError, ArchiveError) are printed
here, in one place, and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from firmware.errors import DataCenterError
from firmware.system import i18n
from firmware.system.i18n import _
from firmware.wire import record_format as rf
from provisioning.texts import shown

#: Environment variable that picks the language (as for `rekam`); the default is Indonesian.
LANG_ENV = "REKAM_LANG"
# further command groups register here
EXTRA_MODULES: list[str] = ["provisioning.fleet_cli", "provisioning.ingest", "provisioning.usb_import",
                             "provisioning.interchange.export", "provisioning.release"]


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / "datacenter.key", out / "datacenter.pub"
    if key_path.exists() and not args.force:
        print("rekam-fleet: " + _("{path} exists (use --force to replace it; records sealed to it would be lost)",
                                  path=key_path), file=sys.stderr)
        return 1
    priv, pub = rf.generate_datacenter_keypair()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path.write_bytes(pub)
    kid = rf.key_id(rf.raw_public(rf.load_recipient_key(pub)))
    print(_("data-center key {kid}", kid=kid))
    print("  " + _("private: {path} (keep offline, mode 0600)", path=key_path))
    print("  " + _("public:  {path} (goes into each kit's datacenter.public_key_files)", path=pub_path))
    return 0


def _read_record(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SystemExit("rekam-fleet: " + _("cannot read {path}: {error}", path=path, error=e.strerror or e)) from None


def cmd_verify(args: argparse.Namespace) -> int:
    rc = 0
    for f in args.files:
        try:
            p = rf.parse(_read_record(f))
            print(_("{file}: ok  record {record}  kit {kit}  signer {signer}", file=f, record=p.header.record_id,
                    kit=p.header.kit_id, signer=rf.key_id(p.header.kit_key)))
        except rf.RecordFormatError as e:
            print(f"{f}: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
    return rc


def cmd_open(args: argparse.Namespace) -> int:
    data = _read_record(args.file)
    try:
        key = rf.load_datacenter_private_key(Path(args.key).read_bytes())
    except (OSError, ValueError) as e:
        print("rekam-fleet: " + _("cannot use key {path}: {error}", path=args.key, error=e), file=sys.stderr)
        return 2
    trusted = None
    if args.kit_key:
        import base64

        trusted = base64.b64decode(args.kit_key)
    try:
        hdr, plain = rf.open_record(data, key, trusted)
        payload = rf.Payload.decode(plain)
    except rf.TruncatedRecord as e:
        print("rekam-fleet: " + _("{file}: truncated: {error}", file=args.file, error=e), file=sys.stderr)
        return 3
    except rf.BadSignature as e:
        print("rekam-fleet: " + _("{file}: bad signature: {error}", file=args.file, error=e), file=sys.stderr)
        return 4
    except rf.WrongKey as e:
        print("rekam-fleet: " + _("{file}: wrong key: {error}", file=args.file, error=e), file=sys.stderr)
        return 5
    except rf.RecordFormatError as e:
        print("rekam-fleet: " + _("{file}: invalid record: {error}", file=args.file, error=e), file=sys.stderr)
        return 6
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for a in payload.attachments:
            safe = Path(a.name).name  # attachment names come from the record: never a path
            (out / safe).write_bytes(a.data)
        (out / "manifest.json").write_text(json.dumps(payload.manifest, indent=2, ensure_ascii=False))
    summary = {"record_id": hdr.record_id, "kit_id": hdr.kit_id, "seq": hdr.seq, "created": hdr.created,
               "clock_synced": hdr.clock_synced, "manifest": payload.manifest,
               "attachments": [{"name": a.name, "type": a.content_type, "size": len(a.data)}
                               for a in payload.attachments]}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    i18n.localize_argparse()
    ap = argparse.ArgumentParser(prog="rekam-fleet", description=_("rekam data center and fleet tools"))
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("keygen", help=_("create a data-center X25519 key pair"))
    p.add_argument("--out", required=True, help=_("folder for datacenter.key and datacenter.pub"))
    p.add_argument("--force", action="store_true", help=_("replace an existing key pair"))
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("open", help=_("verify and decrypt one sealed record"))
    p.add_argument("file")
    p.add_argument("--key", required=True, help=_("data-center private key (PEM)"))
    p.add_argument("--kit-key", help=_("the kit's registered Ed25519 public key (base64) to pin the signer"))
    p.add_argument("--out", help=_("write the manifest and attachments into this folder"))
    p.set_defaults(func=cmd_open)
    p = sub.add_parser("verify", help=_("check layout and kit signature of records (no key needed)"))
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_verify)
    for name in EXTRA_MODULES:
        importlib.import_module(name).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rekam-fleet`: Indonesian unless $REKAM_LANG says otherwise (data-center staff too)."""
    # This thread only, and restored on return: a caller in the same process (a test) keeps its language.
    with i18n.use_language(i18n.normalize(os.environ.get(LANG_ENV) or i18n.DEFAULT_LANGUAGE)):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader that went away (`| head`) is handled below
        return code
    except BrokenPipeError:
        # stdout's reader went away (`rekam-fleet open ... | head`): stop quietly, no traceback, status 0;
        # stdout now points at /dev/null so the flush at exit cannot fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except DataCenterError as e:
        print(_("rekam-fleet: {message}", message=shown(e)), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
