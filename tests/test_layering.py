"""Layering rules: firmware -> hw; hw imports neither firmware nor provisioning; provisioning imports only
firmware's record-format and protocol modules. And no import cycles at module level."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("firmware", "hw", "provisioning")
PROVISIONING_MAY_USE = {"firmware.record_format", "firmware.protocol", "firmware.control_protocol"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            rel = p.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_layering() -> None:
    mods = modules()
    problems = []
    for name, path in mods.items():
        top = name.split(".")[0]
        for imp in imports(path, top_level_only=False):
            target = imp.split(".")[0]
            if top == "hw" and target in ("firmware", "provisioning"):
                problems.append(f"{name} imports {imp}")
            if top == "firmware" and target == "provisioning":
                problems.append(f"{name} imports {imp}")
            if top == "provisioning" and target == "firmware" and imp != "firmware":
                # (`from firmware import x` also lists the bare package, whose __init__ holds only the version)
                base = ".".join(imp.split(".")[:2])
                if base not in PROVISIONING_MAY_USE:
                    problems.append(f"{name} imports {imp}")
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_no_import_cycles() -> None:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for imp in imports(path, top_level_only=True):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):
                deps.add(imp)
        graph[name] = deps
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        seen[n] = 1
        stack.append(n)
        for d in graph.get(n, ()):
            if seen.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in seen:
                visit(d)
        stack.pop()
        seen[n] = 2

    for n in graph:
        if n not in seen:
            visit(n)
