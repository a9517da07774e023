"""Print the commented default /etc/rekam/rekam.toml for an installed kit (used by install.sh).

Generated from firmware.config.SCHEMA so it always lists every key with its default and meaning;
only the settings an installed kit must have are active, everything else is commented out.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

from firmware import config

# What differs on an installed kit, or must be visible there.
ACTIVE: dict[str, dict[str, Any]] = {
    "kit": {"state_dir": "/var/lib/rekam"},
    "datacenter": {"public_key_files": ["/etc/rekam/datacenter.pub"]},
    "usb": {"mount_point": "/media/rekam-usb", "require_mountpoint": True},
    "api": {"bind": "127.0.0.1", "port": 8470},
}


def toml_value(v: Any) -> str:
    """A TOML literal for the simple values the schema uses."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for the characters our defaults use
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {v!r}")


def render() -> str:
    """The whole file."""
    out = [
        "# rekam kit configuration (installed by `make install`; never overwritten by it).",
        "# Every key is listed with its default; uncomment to change. Reference: docs/configuration.md,",
        "# or `python -m firmware.config --markdown`. Check after editing: rekamd --check-config",
        "# (or `systemctl restart rekamd`: a bad key stops it with exit 78 and names the key).",
        "",
    ]
    for section, keys in config.SCHEMA.items():
        out.append(f"[{section}]")
        for name, key in keys.items():
            for line in textwrap.wrap(key.doc, 96):
                out.append(f"# {line}")
            active = ACTIVE.get(section, {})
            if name in active:
                out.append(f"{name} = {toml_value(active[name])}")
            else:
                out.append(f"# {name} = {toml_value(key.default)}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
