"""The console's narrow port: the daemon implements all of `KitPort`, and the console reaches no further."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from firmware.console.port import KitPort

CONSOLE = Path(__file__).resolve().parents[2] / "firmware" / "console"


def port_members() -> set[str]:
    return {n for n, _ in inspect.getmembers(KitPort) if not n.startswith("_")} - set(dir(object))


def test_the_daemon_implements_every_member_of_the_port() -> None:
    from firmware.daemon import ConsolePort

    members = port_members()
    assert {"status", "records", "record", "audit_events", "commit_simulated", "eject_usb", "export_usb",
            "enrollment", "kit_id", "site", "simulation", "is_stopping"} <= members
    missing = sorted(m for m in members if not hasattr(ConsolePort, m))
    assert not missing, f"ConsolePort lacks {missing}"
    for name in members:
        want, have = getattr(KitPort, name), getattr(ConsolePort, name)
        assert isinstance(have, property) == isinstance(want, property), name
        if callable(want) and not isinstance(want, property):
            assert list(inspect.signature(have).parameters) == list(inspect.signature(want).parameters), name


def test_console_touches_no_private_attribute_of_another_object() -> None:
    # `self._x` is the object's own business; `other._x` (svc._lock, store.j, kit._stop...) is not.
    bad = []
    for path in sorted(CONSOLE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if (node.attr.startswith("_") and not node.attr.startswith("__") and not own) or node.attr == "j":
                bad.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not bad, "console reaches into other objects:\n" + "\n".join(bad)
