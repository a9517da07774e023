"""`rekam quality finger|face|iris FILE... [--json]`: run the on-device quality checks on image files."""

from __future__ import annotations

import argparse

from firmware.system.i18n import _


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rekam quality finger` and `rekam quality face`."""
    q = sub.add_parser("quality", help=_("score fingerprint or face images as the kit would"))
    qs = q.add_subparsers(dest="kind", metavar="KIND")
    qs.required = True
    for kind, what in (("finger", _("quality of fingerprint images (any size; converted to the sensor format)")),
                       ("face", _("quality of face photos (JPEG/PNG)")),
                       ("iris", _("quality of near-infrared eye images (ISO/IEC 29794-6)"))):
        p = qs.add_parser(kind, help=what)
        p.add_argument("files", nargs="+", metavar="FILE")
        p.add_argument("--json", action="store_true", help=_("machine-readable output"))
        p.set_defaults(func={"finger": _finger, "face": _face, "iris": _iris}[kind])


def _finger(args: argparse.Namespace) -> int:
    from firmware.quality.finger.cli import run

    return run(args)


def _face(args: argparse.Namespace) -> int:
    from firmware.quality.face.cli import run

    return run(args)


def _iris(args: argparse.Namespace) -> int:
    from firmware.quality.iris.cli import run

    return run(args)
