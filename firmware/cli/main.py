"""`rekam`: the operator and technician command line.

Each command group lives in its own module under `firmware.cli` and exposes
``register(subparsers)``; importing one must stay cheap (heavy imports go inside handlers).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from firmware import __version__

COMMAND_MODULES = [
    "firmware.cli.store",
    "firmware.cli.sensor",
    "firmware.cli.quality",
    "firmware.cli.camera",
    "firmware.cli.identity",
    "firmware.cli.enroll",
    "firmware.cli.provision",
]


def build_parser() -> argparse.ArgumentParser:
    """The `rekam` argument parser with every command group registered."""
    ap = argparse.ArgumentParser(prog="rekam", description="rekam enrollment kit: operator and technician CLI")
    ap.add_argument("--version", action="version", version=f"rekam {__version__}")
    ap.add_argument("--config", default=None, help="config file (default /etc/rekam/rekam.toml)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rekam`; returns the process exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
