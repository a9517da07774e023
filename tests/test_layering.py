"""Layering rules, checked on every import, top-level and inside functions (docs/architecture.md).

* The foundation (`firmware` itself for its version, `firmware.errors`, `firmware.system`) imports
  nothing of the tree but the foundation.
* `firmware.wire` (wire formats) adds only itself; `firmware.config` adds `wire`.
* The stages of the data path, lowest first: capture, quality, seal, store, enrollment, relay, control,
  console, cli, and the composition root `firmware.daemon`. A stage may import `hw`, the foundation,
  `wire`, `config`, its own folder and stages below it; never one above.
* `hw` imports only `hw`, `firmware.errors`, `firmware.system.backoff` and `firmware.wire.safejson` (the error
  root, the one backoff helper and the one bounded JSON parser sit below the drivers).
* `provisioning` imports only `provisioning`, the foundation and `firmware.wire`.
* No import cycles between modules, counting imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("firmware", "hw", "provisioning")
STAGES = ("capture", "quality", "seal", "store", "enrollment", "relay", "control", "console", "cli", "daemon")
FOUNDATION = ("firmware", "firmware.errors", "firmware.system")
HW_MAY_USE = ("firmware.errors", "firmware.system.backoff", "firmware.wire.safejson")


def modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the three packages under `root`, by dotted name."""
    out = {}
    for pkg in PACKAGES:
        for p in (root / pkg).rglob("*.py"):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(path: Path, name: str, mods: dict[str, Path]) -> dict[str, int]:
    """The tree's modules `path` imports anywhere in it (resolved to existing modules) -> first line."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                add(full if full in mods else base, node.lineno)
    return found


def within(mod: str, prefixes: tuple[str, ...] | str) -> bool:
    """True if `mod` is one of `prefixes` or inside one of them."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(mod == p or mod.startswith(p + ".") for p in prefixes if p != "firmware") or (
        "firmware" in prefixes and mod == "firmware")


def stage_of(mod: str) -> int | None:
    """Rank of the data-path stage `mod` belongs to (None outside the stages)."""
    parts = mod.split(".")
    if parts[0] == "firmware" and len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return None


def allowed(src: str, dst: str) -> bool:
    """Whether module `src` may import module `dst`."""
    top = src.split(".")[0]
    if top == "hw":
        return dst.startswith("hw") or within(dst, HW_MAY_USE)
    if top == "provisioning":
        return dst.startswith("provisioning") or within(dst, FOUNDATION) or within(dst, "firmware.wire")
    if within(src, FOUNDATION):
        return within(dst, FOUNDATION)
    if within(src, "firmware.wire"):
        return within(dst, FOUNDATION) or within(dst, "firmware.wire")
    if within(src, "firmware.config"):
        return within(dst, FOUNDATION) or within(dst, ("firmware.wire", "firmware.config"))
    if dst.startswith("provisioning"):
        return False
    if dst.startswith("hw") or within(dst, FOUNDATION) or within(dst, ("firmware.wire", "firmware.config")):
        return True
    s, d = stage_of(src), stage_of(dst)
    if s is None or d is None:
        return False  # a module outside every known folder: put it in one
    return d <= s


def violations(root: Path = REPO) -> list[str]:
    """Every import that breaks a layering rule, as 'path:line: a imports b'."""
    mods = modules(root)
    out = []
    for name, path in sorted(mods.items()):
        for dst, line in sorted(imports(path, name, mods).items()):
            if not allowed(name, dst):
                out.append(f"{path.relative_to(root)}:{line}: {name} imports {dst}")
    return out


def cycles(root: Path = REPO) -> list[list[str]]:
    """Import cycles between modules (all imports, including those inside functions)."""
    mods = modules(root)
    graph = {n: {d for d in imports(p, n, mods) if not n.startswith(d + ".")} for n, p in mods.items()}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_layering() -> None:
    problems = violations()
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_no_import_cycles() -> None:
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_firmware_top_level_holds_only_the_root_and_stage_folders() -> None:
    top = {p.name for p in (REPO / "firmware").iterdir() if not p.name.startswith((".", "__pycache__"))}
    folders = {"system", "config", "wire", *STAGES} - {"daemon"}
    # locale/ holds the message catalogs (.po data, read by firmware.system.i18n), never code.
    assert top <= {"__init__.py", "daemon.py", "errors.py", "locale", *folders}, sorted(top - folders)
    assert not list((REPO / "firmware" / "locale").rglob("*.py"))


def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_catches_planted_violations(tmp_path: Path) -> None:
    # A store module importing the relay inside a function, hw importing a stage, provisioning reaching
    # into the store, and a cycle made only of function-level imports: each must be reported.
    _plant(tmp_path, {
        "firmware/__init__.py": "",
        "firmware/store/__init__.py": "",
        "firmware/store/store.py": "def f():\n    from firmware.relay import relay\n",
        "firmware/relay/__init__.py": "",
        "firmware/relay/relay.py": "from firmware.store import store\n",
        "hw/__init__.py": "",
        "hw/x.py": "def g():\n    import firmware.store.store\n",
        "provisioning/__init__.py": "",
        "provisioning/y.py": "from firmware.store.store import Store\nfrom firmware.wire import ids\n",
        "firmware/wire/__init__.py": "",
        "firmware/wire/ids.py": "",
    })
    v = violations(tmp_path)
    assert any("firmware.store.store imports firmware.relay.relay" in x and "store.py:2" in x for x in v), v
    assert any("hw.x imports firmware.store.store" in x for x in v), v
    assert any("provisioning.y imports firmware.store.store" in x for x in v), v
    assert not any("imports firmware.wire.ids" in x for x in v), v
    assert any("firmware.store.store" in c and "firmware.relay.relay" in c for c in cycles(tmp_path))
