"""What every `rekam` command group shares: finding and loading the kit config."""

from __future__ import annotations

import argparse
import os
from typing import Any

from firmware import config


def load_config(args: argparse.Namespace, *, optional: bool = False,
                overrides: dict[str, Any] | None = None) -> config.Config:
    """The config named by --config, $REKAM_CONFIG, or /etc/rekam/rekam.toml.

    `optional`: hardware checks (`rekam sensor`, `rekam camera`) also run with no config file at all, on
    the defaults (corpus from $REKAM_CORPUS). A bad file raises `ConfigError`, so `rekam` exits 78.
    """
    path = getattr(args, "config", None) or os.environ.get("REKAM_CONFIG") or None
    if path is None and (config.DEFAULT_PATH.exists() or not optional):
        path = str(config.DEFAULT_PATH)
    if path is None:
        corpus = os.environ.get("REKAM_CORPUS")
        return config.defaults(simulation={"corpus_dir": corpus}) if corpus else config.defaults()
    return config.load(path, overrides=overrides)
