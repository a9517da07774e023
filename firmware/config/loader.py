"""Read and validate a configuration: TOML -> `RekamConfig`, or a `ConfigError` naming every problem.

The models (firmware/config/models.py) do the checking; this module turns pydantic's errors into the
lines operators see, one per bad key, all at once::

    store.reserve_floor_mb = -1: must be >= 0
    unknown key store.reserv_mb (known: reserve_floor_mb, ...)
    unknown section [stor] (known: kit, datacenter, ...)
    [usb] must be a table, got 5
"""

from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from firmware.config.checks import checking_files_in
from firmware.config.models import SECTIONS, RekamConfig
from firmware.errors import EX_CONFIG, ConfigError, Problem
from firmware.system.fsutil import read_regular
from firmware.system.i18n import N_

DEFAULT_PATH = Path("/etc/rekam/rekam.toml")
#: The shipped file with every key commented is ~30 KB; a config past 1 MiB is not one (nor a FIFO or a device).
MAX_CONFIG_BYTES = 1 << 20
__all__ = ["DEFAULT_PATH", "EX_CONFIG", "defaults", "load", "problems", "validate"]

# pydantic error type -> what the value must be
_TYPE_NAMES = {"int_type": N_("an integer"), "float_type": N_("a number"), "bool_type": N_("true or false"),
               "string_type": N_("a string"), "list_type": N_("a list"), "dict_type": N_("a table")}
# ... and the Python name used for a list's items ("a list of str"), as before the models
_ITEM_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
               "dict_type": "dict", "list_type": "list"}


def _bounds(field: FieldInfo) -> tuple[Any, Any]:
    lo = hi = None
    for m in field.metadata:
        lo = getattr(m, "ge", lo)
        hi = getattr(m, "le", hi)
    return lo, hi


def _allowed(field: FieldInfo, err: Any, item: bool) -> str:
    """What the value must be, in words, for one pydantic error on `field` (a `Problem`: English as a str,
    translated when shown)."""
    kind = err["type"]
    if kind == "rekam_must":
        why = Problem(str(err["ctx"]["allowed"]))  # the check's phrase: translated when the catalog knows it
        return Problem(N_("a list whose items are {allowed}"), allowed=why) if item else why
    if kind in _TYPE_NAMES:
        return Problem(N_("a list of {type}"), type=_ITEM_NAMES[kind]) if item else Problem(_TYPE_NAMES[kind])
    if kind in ("greater_than_equal", "less_than_equal"):
        lo, hi = _bounds(field)
        if hi is None:
            return Problem(">= {lo}", lo=lo)
        if lo is None:
            return Problem("<= {hi}", hi=hi)
        return Problem(N_("between {lo} and {hi}"), lo=lo, hi=hi)
    if kind == "finite_number":
        return Problem(N_("a finite number"))
    if kind == "literal_error":
        choices = typing.get_args(field.annotation)
        if not isinstance(err["input"], type(choices[0])):
            return Problem(_TYPE_NAMES["string_type"] if isinstance(choices[0], str) else _TYPE_NAMES["int_type"])
        return Problem(N_("one of {choices}"), choices=", ".join(repr(c) for c in choices))
    return err["msg"]


def problems(error: ValidationError, data: Mapping[str, Any]) -> list[str]:
    """One line per problem of a `RekamConfig` validation (one per key even if several list items are bad)."""
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for err in error.errors(include_url=False):
        loc = err["loc"]
        section = str(loc[0])
        if len(loc) == 1:
            if err["type"] == "extra_forbidden":
                out.append(Problem(N_("unknown section [{section}] (known: {known})"), section=section,
                                   known=", ".join(SECTIONS)))
            elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
                out.append(Problem(N_("[{section}] must be a table, got {value}"), section=section,
                                   value=repr(err["input"])))
            elif err["type"] == "rekam_problem" and "key" in (err.get("ctx") or {}):  # two keys out of order
                ctx = dict(err["ctx"])
                msgid, key, value = ctx.pop("msgid"), ctx.pop("key"), ctx.pop("value")
                ctx["lo_key"] = f"{section}.{ctx['lo_key']}"
                out.append(Problem("{where} = {value}: {what}", where=f"{section}.{key}", value=value,
                                   what=Problem(msgid, **ctx)))
            else:
                out.append(f"[{section}]: {err['msg']}")
            continue
        model, key = SECTIONS[section], str(loc[1])
        if err["type"] == "extra_forbidden":
            out.append(Problem(N_("unknown key {key} (known: {known})"), key=f"{section}.{key}",
                               known=", ".join(model.model_fields)))
            continue
        if err["type"] == "rekam_problem":  # about one item: name it with its index
            where = section + "." + key + "".join(f"[{i}]" for i in loc[2:])
            ctx = dict(err.get("ctx") or {})
            msgid = ctx.pop("msgid", None)  # checks.problem() carries its template for the translation
            what = Problem(msgid, **ctx) if msgid else err["msg"]
            out.append(Problem("{where} = {value}: {what}", where=where, value=repr(err["input"]), what=what))
            continue
        if (section, key) in seen:
            continue
        seen.add((section, key))
        field = model.model_fields[key]
        item = len(loc) > 2
        value = data[section][key] if item else err["input"]
        if field.annotation is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # an integer stands for a number: report it as the number it became
        out.append(Problem(N_("{key} = {value}: must be {allowed}"), key=f"{section}.{key}", value=repr(value),
                           allowed=_allowed(field, err, item)))
    return out


def validate(data: Mapping[str, Any], source: str = "config", base_dir: Path | None = None) -> RekamConfig:
    """Validate a parsed TOML mapping against the models, fill defaults, and return a `RekamConfig`.

    Raises `ConfigError` naming every bad key, its value and what is allowed. Datacenter key files are
    read relative to `base_dir` (default: the current directory).
    """
    if not isinstance(data, Mapping):
        raise ConfigError([Problem(N_("the document must be a TOML table"))], source)
    # strict models take dicts, not any mapping
    doc = {s: dict(v) if isinstance(v, Mapping) else v for s, v in data.items()}
    base = base_dir or Path.cwd()
    try:
        with checking_files_in(base):
            cfg = RekamConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(problems(e, doc), source) from None
    return cfg.with_origin(source, base)


def load(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> RekamConfig:
    """Read and validate the TOML file at `path` (default /etc/rekam/rekam.toml).

    `overrides` maps ``section.key`` to a value that replaces the file's.
    """
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = read_regular(p, MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(N_("file not found: {path}"), path=p)], str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem(N_("cannot read {path}: {error}"), path=p, error=e)], str(p)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem(N_("not valid TOML: {error}"), error=e)], str(p)) from None
    except RecursionError:  # tomllib recurses per nesting level: ``a = [[[[...`` is no configuration
        raise ConfigError([Problem(N_("not valid TOML: {error}"), error="nested too deeply")], str(p)) from None
    if overrides:
        for dotted, value in overrides.items():
            section, key = dotted.split(".", 1)
            data.setdefault(section, {})[key] = value
    return validate(data, str(p), p.resolve().parent)


def defaults(**sections: dict[str, Any]) -> RekamConfig:
    """A configuration of defaults with some sections overridden (tests and tools)."""
    return validate(sections, "<defaults>")
