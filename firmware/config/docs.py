"""The configuration reference (docs/configuration.md), rendered from the models."""

from __future__ import annotations

import typing
from typing import Any

from pydantic.fields import FieldInfo

from firmware.config.models import SECTIONS

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
          dict: "a table"}


def python_type(field: FieldInfo) -> type:
    """The plain Python type of a field's values: str, int, float, bool, list or dict."""
    ann: Any = field.annotation
    if typing.get_origin(ann) is typing.Literal:
        return type(typing.get_args(ann)[0])
    return typing.get_origin(ann) or ann


def type_name(field: FieldInfo) -> str:
    """The type as the reference names it ("an integer", "a list", ...)."""
    t = python_type(field)
    return _NAMES.get(t, t.__name__)


def markdown() -> str:
    """Render the reference of every key (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "One TOML file, `/etc/rekam/rekam.toml` by default (`rekamd --config PATH`). Relative paths are",
        "resolved against the file's directory. Unknown sections and keys are errors (a typo must not",
        "silently fall back to a default). On any error `rekamd` prints every bad key, its value and",
        "what is allowed, and exits with status 78 (EX_CONFIG).",
        "",
        "The keys are defined once, as typed pydantic models in `firmware/config/models.py` (one model per",
        "section; `cfg.<section>.<key>` in the code). This page is generated from them by",
        "`python -m firmware.config --markdown`; do not edit by hand.",
        "",
    ]
    for section, model in SECTIONS.items():
        lines += [f"## [{section}]", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            default = repr(field.default).replace("'", '"').replace("True", "true").replace("False", "false")
            doc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {type_name(field)} | `{default}` | {doc} |")
        lines.append("")
    return "\n".join(lines)
