"""The control plane's small JSON state files (remote-config state, lock, operators set by command)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from firmware.system.fsutil import atomic_write

log = logging.getLogger(__name__)


def read_json(path: Path, default: Any) -> Any:
    """The parsed file, `default` if it is missing; an unreadable file is logged and gives `default`."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        log.error("unreadable control file path=%s error=%s; using defaults", path, e)
        return default


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` atomically (fsync'd) as indented, sorted JSON."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())
