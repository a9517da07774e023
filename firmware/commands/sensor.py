"""`rekam sensor ...` commands (placeholder until its issue lands: registers nothing)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # noqa: D401
    """Register this group's subcommands."""
