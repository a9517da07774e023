"""The kit's periodic health message (also the ``status`` command's answer), and the OS readings in it."""

from __future__ import annotations

import datetime as dt
import platform
import time
from pathlib import Path
from typing import Any

from firmware import __version__
from firmware.control.update import report as update_report

FIELD_PARTS = ("power", "gnss", "clock")


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
    parts = {**(getattr(host, "hardware", None) or {}), **(getattr(host, "services", None) or {})}
    health = part_health({k: v for k, v in parts.items() if k not in FIELD_PARTS})  # those have their own keys
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
        **field_status(host),
        "update": update_report(),  # the last software update's outcome, with its code (docs/updates.md)
    }


def field_status(host: Any) -> dict[str, Any]:
    """The kit in the field (issue #18): ``power`` (level, code, percent, voltage, charging, power lost),
    ``position`` (the GNSS fix, or its type only when positions are private) and ``clock`` (synchronised, from
    what, and the newest signed corrections of records sealed before it was); a part the kit lacks is left out."""
    services = getattr(host, "services", None) or {}
    out: dict[str, Any] = {}
    for key, name in (("power", "power"), ("position", "gnss"), ("clock", "clock")):
        svc = services.get(name)
        if svc is not None and hasattr(svc, "status"):
            try:
                out[key] = svc.status()
            except Exception as e:  # telemetry must always answer
                out[key] = {"error": f"{type(e).__name__}: {e}"}
    return out


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
