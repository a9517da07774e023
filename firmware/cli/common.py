"""What every `rekam` command group shares: finding and loading the kit config."""

from __future__ import annotations

import argparse
import os
from typing import Any

from firmware import config
from firmware.system import i18n

#: Environment variable that picks the CLI's language over the kit's `[kit] language` (a visiting technician).
LANG_ENV = "REKAM_LANG"


def choose_language(configured: str | None = None) -> None:
    """Speak $REKAM_LANG if set (and known), else `configured` (the kit's `[kit] language`), else Indonesian."""
    wanted = os.environ.get(LANG_ENV) or configured or i18n.DEFAULT_LANGUAGE
    i18n.set_language(i18n.normalize(wanted))


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
        cfg = config.defaults(simulation={"corpus_dir": corpus}) if corpus else config.defaults()
    else:
        cfg = config.load(path, overrides=overrides)
    choose_language(cfg.kit.language)
    return cfg
