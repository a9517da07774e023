"""Structured logging for journald: ``level logger: message key=value ...`` or one JSON object a line.

Under systemd (JOURNAL_STREAM set) the time stamp is left to journald and the level is given as
a ``<N>`` syslog prefix, so ``journalctl -u rekamd -p warning`` filters correctly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class TextFormatter(logging.Formatter):
    """Human-readable lines; with `journald` a syslog priority prefix instead of a time stamp."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        name = record.name.removeprefix("firmware.").removeprefix("hw.")
        if self.journald:
            return f"<{_SYSLOG.get(record.levelno, 6)}>{record.levelname.lower()} {name}: {msg}"
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{ts} {record.levelname.lower():7s} {name}: {msg}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (for log shipping)."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
             "msg": record.getMessage()}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once, for the daemon or a CLI command."""
    handler = logging.StreamHandler(sys.stderr)
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journald))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
