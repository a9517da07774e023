"""Kit configuration: one TOML file, validated completely before anything starts.

Every key is defined once, in the typed pydantic models of `firmware.config.models` (type, default,
allowed values, a one-line description); `docs/configuration.md` is generated from them
(`python -m firmware.config --markdown`). `load` / `validate` return a `RekamConfig`
(``cfg.relay.backoff_min_s``); a bad file yields a `ConfigError` listing every problem as
``key = value: what is allowed``, which `ConfigError.report()` prints; programs then exit with
status 78 (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from firmware.config.checks import FINGER_CODES, valid_pin_hash
from firmware.config.docs import markdown, python_type
from firmware.config.loader import DEFAULT_PATH, defaults, load, problems, validate
from firmware.config.models import (
    SECTIONS,
    ApiConfig,
    CameraConfig,
    ControlConfig,
    DaemonConfig,
    DatacenterConfig,
    EnrollmentConfig,
    GpioConfig,
    KitConfig,
    OperatorsConfig,
    QualityFaceConfig,
    QualityFingerConfig,
    RekamConfig,
    RelayConfig,
    Section,
    SensorConfig,
    SimulationConfig,
    StoreConfig,
    UsbConfig,
)
from firmware.errors import EX_CONFIG, ConfigError

#: The name every stage uses for a validated configuration.
Config = RekamConfig


@dataclass(frozen=True)
class Key:
    """One key as a plain record (type, default, doc): a read-only view of the models for tools."""

    type: type
    default: Any
    doc: str


#: Section -> key -> `Key`, derived from the models (systemd/gen_config.py and tests read it).
SCHEMA: dict[str, dict[str, Key]] = {
    section: {name: Key(python_type(f), f.default, f.description or "") for name, f in model.model_fields.items()}
    for section, model in SECTIONS.items()
}

__all__ = [
    "DEFAULT_PATH", "EX_CONFIG", "FINGER_CODES", "SCHEMA", "SECTIONS", "ApiConfig", "CameraConfig", "Config",
    "ConfigError", "ControlConfig", "DaemonConfig", "DatacenterConfig", "EnrollmentConfig", "GpioConfig", "Key",
    "KitConfig", "OperatorsConfig", "QualityFaceConfig", "QualityFingerConfig", "RekamConfig", "RelayConfig",
    "Section", "SensorConfig", "SimulationConfig", "StoreConfig", "UsbConfig", "defaults", "load", "main",
    "markdown", "problems", "valid_pin_hash", "validate",
]


def main(argv: list[str] | None = None) -> int:
    """`python -m firmware.config [PATH] [--markdown]`: validate a config or print the key reference."""
    ap = argparse.ArgumentParser(description="Validate a rekam config or print the key reference.")
    ap.add_argument("path", nargs="?")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown())
        return 0
    try:
        load(a.path)
    except ConfigError as e:
        return e.report()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
