"""The kit's periodic health message (also the ``status`` command's answer), and the OS readings in it."""

from __future__ import annotations

import datetime as dt
import platform
import time
from pathlib import Path
from typing import Any

from firmware import __version__
from firmware.control.update import report as update_report


def part_health(parts: dict[str, Any]) -> dict[str, Any]:
    """``status()`` (else ``health()``) of every part; a part that fails answers with its error."""
    out: dict[str, Any] = {}
    for name, obj in parts.items():
        if name in out or obj is None:
            continue
        try:
            fn = getattr(obj, "status", None) or getattr(obj, "health", None)
            if callable(fn):
                s = fn()
                out[name] = s if isinstance(s, dict) else {"status": str(s)}
            else:
                err = str(getattr(obj, "error", "") or "")
                out[name] = {"ok": not err, "error": err}
        except Exception as e:  # health must always answer
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return out


def telemetry(host: Any, kit_id: str, started: float, config_version: int, locked: str,
              control: dict[str, Any]) -> dict[str, Any]:
    """The telemetry body for `host` (a `firmware.control.host.ControlHost`)."""
    st = host.store.status()
    rec = st["records"]
    guard = st["guard"]
    health = part_health({**(getattr(host, "hardware", None) or {}), **(getattr(host, "services", None) or {})})
    oldest = st.get("oldest_unacked")
    age = None
    if oldest:
        try:
            age = int(time.time() - dt.datetime.fromisoformat(oldest.replace("Z", "+00:00")).timestamp())
        except ValueError:
            age = None
    started = getattr(host, "started", started)
    return {
        "kit_id": kit_id,
        "at": int(time.time()),
        "media": [{"name": m["name"], "present": m.get("present", True), "free_bytes": m.get("free_bytes"),
                   "total_bytes": m.get("total_bytes"), "records_left": m.get("records_left"),
                   "level": m.get("level"), "reason": m.get("reason", "")} for m in st["media"]],
        "guard": {"level": guard["level"], "reasons": guard["reasons"]},
        "halted": guard["level"] == "HALT",
        "halt_reasons": guard["reasons"] if guard["level"] == "HALT" else [],
        "backlog": {"records": rec["stored"]["records"] + rec["sent"]["records"],
                    "bytes": rec["stored"]["bytes"] + rec["sent"]["bytes"]},
        "oldest_unacked": oldest,
        "oldest_unacked_age_s": age,
        "mirror_lag": st["mirror_lag"],
        "stick": st["stick"],
        "health": health,
        "cpu_temp_c": cpu_temperature(),
        "uptime_s": round(time.monotonic() - started, 1),
        "os_uptime_s": os_uptime(),
        "versions": {"firmware": __version__, "python": platform.python_version(), "config": config_version},
        "locked": locked,
        "control": control,
        "update": update_report(),  # the last software update's outcome, with its code (docs/updates.md)
    }


def cpu_temperature(path: Path = Path("/sys/class/thermal/thermal_zone0/temp")) -> float | None:
    """SoC temperature in °C, or None where there is no thermal zone."""
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def os_uptime() -> float | None:
    """Seconds since the OS booted (``/proc/uptime``), or None."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
