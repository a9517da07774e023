"""`rekam`: the operator and technician command line.

Each command group lives in its own module under `firmware.cli` and exposes
``register(subparsers)``; importing one must stay cheap (heavy imports go inside handlers).
Commands just raise: `main` maps every `RekamError` family that escapes one to a message on stderr
and an exit status (`EXIT_CODES`; a bad config prints every problem and exits 78).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import TextIO

from firmware import __version__
from firmware.errors import EX_CONFIG, ApiError, CaptureHalted, ConfigError, RekamError
from firmware.system import i18n
from firmware.system.i18n import _

COMMAND_MODULES = [
    "firmware.cli.store",
    "firmware.cli.sensor",
    "firmware.cli.quality",
    "firmware.cli.camera",
    "firmware.cli.identity",
    "firmware.cli.enroll",
    "firmware.cli.provision",
    "firmware.cli.update",
    "firmware.cli.operator",
]

#: Exit status for an error family a command lets escape; the first matching family wins.
EXIT_CODES: list[tuple[type[RekamError], int]] = [
    (ConfigError, EX_CONFIG),  # 78, sysexits EX_CONFIG, as rekamd
    (CaptureHalted, 2),  # the store refuses new records (as `rekam sim commit` reports it)
    (RekamError, 1),  # anything else the kit raises on purpose: sensor, camera, identity, store locked, ...
]


def report_error(e: RekamError, stream: TextIO | None = None) -> int:
    """Print `e` for the operator (stderr by default) and return the exit status of its family."""
    if isinstance(e, ConfigError):
        return e.report(stream)
    out = stream if stream is not None else sys.stderr
    # The message itself is translated where it is raised (the daemon answers in the kit's language); here only
    # the framing, and the English text stays exactly as it was (scripts and tests read it).
    if isinstance(e, ApiError):
        print(_("rekam: HTTP {status}: {detail}", status=e.status, detail=e.detail), file=out)
    else:
        print(_("rekam: {message}", message=e), file=out)
    return next(code for family, code in EXIT_CODES if isinstance(e, family))


def build_parser() -> argparse.ArgumentParser:
    """The `rekam` argument parser with every command group registered."""
    i18n.localize_argparse()
    ap = argparse.ArgumentParser(prog="rekam", description=_("rekam enrollment kit: operator and technician CLI"))
    ap.add_argument("--version", action="version", version=f"rekam {__version__}",
                    help=_("show the version and exit"))
    ap.add_argument("--config", default=None, help=_("config file (default /etc/rekam/rekam.toml)"))
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rekam`; returns the process exit status."""
    from firmware.cli.common import choose_language

    choose_language()  # until a command loads the config and its [kit] language
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader that went away (`| head`) is handled below
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return reader_gone()
    except RekamError as e:
        return report_error(e)


def reader_gone() -> int:
    """stdout's reader went away (`rekam records | head`): stop quietly, no traceback at exit, status 0."""
    try:  # what is still buffered can go nowhere: point stdout at /dev/null so the exit flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
