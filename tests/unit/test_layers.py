"""The library's layers, checked on the source: the operator edge on top, then the flows,
then the tiers' steps and helpers, then `commands/` (pure builders), with the executor the
only module that talks SSH. A module may import its own layer or lower ones, never higher;
the edge (`cli.py`, `fabfile/`) is the only place that knows about exit codes and prompts.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "releasy_deploy"

# Lower number = lower layer. Unlisted library modules are "helpers" (layer 2).
EDGE, FLOWS, TIERS, HELPERS, COMMANDS, BASE = 5, 4, 3, 2, 1, 0
LAYER_OF = {
    "cli": EDGE,
    "rollout": FLOWS, "maintenance": FLOWS, "bluegreen": FLOWS, "site": FLOWS,
    "status": FLOWS, "dbshell": FLOWS, "db_tasks": FLOWS, "restore_flow": FLOWS,
    # The runner (engine), the lock, and the steps it runs: the tiers' and the backups'.
    "engine": TIERS, "tiers": TIERS, "lock": TIERS, "backups": TIERS, "restores": TIERS,
    # What blue/green decides from (its planner in engine/ reads it).
    "bluegreen_state": TIERS,
    "db_state": TIERS,
    "commands": COMMANDS,
    "errors": BASE, "inventory": BASE, "packages": BASE, "templates": BASE,
    # The inventory's own parts: the hooks' schema, the environments' files.
    "hook_schema": BASE, "inventory_files": BASE,
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "releasy_deploy" or len(parts) < 2:
        return -1
    return LAYER_OF.get(parts[1], HELPERS)


def _imports_of(node: ast.AST, path: Path) -> list[tuple[str, ast.AST]]:
    """(absolute module name, node) for each module one import statement imports."""
    if isinstance(node, ast.Import):
        return [(alias.name, node) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = _module_name(path).rsplit(".", 1)[0].split(".")
        base = base[: len(base) - node.level + 1]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    # `from . import rollout` imports the module rollout.
    names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
    return [(n, node) for n in names]


def _imports(path: Path) -> list[tuple[str, ast.AST]]:
    """(absolute module name, node) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    return [found for node in ast.walk(tree) for found in _imports_of(node, path)]


# Package __init__ files count when they hold code (the lock's does).
LIBRARY = sorted(p for p in LIB.rglob("*.py")
                 if p.name != "__init__.py" or "def " in p.read_text())


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_layer(path):
    mine = _layer(_module_name(path))
    higher = sorted({name for name, _ in _imports(path)
                     if _layer(name) > mine and not name.startswith(_module_name(path))})
    assert not higher, f"{path.name} (layer {mine}) imports higher layers: {higher}"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_edge_knows_invoke_and_prompts(path):
    if _module_name(path) == "releasy_deploy.cli":
        return
    names = {name.split(".")[0] for name, _ in _imports(path)}
    assert "invoke" not in names, f"{path.name} imports invoke: only cli.py raises Exit"
    calls = [n for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "input"]
    assert not calls, f"{path.name} prompts with input(): ask Session.confirm instead"


def test_only_the_executor_talks_ssh():
    talking = sorted(str(p.relative_to(LIB)) for p in LIBRARY
                     if {"paramiko", "fabric"} & {n.split(".")[0] for n, _ in _imports(p)})
    # The executor package (connections, one-command channels), its long-lived channels (the
    # lock's tunnel and line channels) and db.psql's pty channel: the executor layer,
    # nothing above it.
    assert {p for p in talking if not p.startswith("executor/")} <= {
        "channels.py", "interactive.py"}, talking


# The one deferred import: psycopg costs ~0.2 s and only the PostgreSQL lock needs it.
DEFERRED_IMPORTS = {("lock/postgres.py", "psycopg")}


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_imports_inside_functions(path):
    """A module's dependencies are on its first lines: nothing is imported for a side
    effect or late to dodge a cycle."""
    tree = ast.parse(path.read_text(), str(path))
    late = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    late += [name for name, n in _imports_of(node, path)]
    where = str(path.relative_to(LIB))
    assert {(where, name) for name in late} <= DEFERRED_IMPORTS, \
        f"{where} imports inside a function: {late}"


def test_commands_are_pure_builders():
    for path in sorted((LIB / "commands").glob("*.py")):
        lib = {n for n, _ in _imports(path) if n.startswith("releasy_deploy.")}
        allowed = {n for n in lib if n.startswith("releasy_deploy.commands")
                   or _layer(n) == BASE}
        assert lib == allowed, f"{path.name} imports {sorted(lib - allowed)}"


def _tier_family(module: str) -> str | None:
    """``app`` for releasy_deploy.tiers.app and its split-out parts (app_facts, app_setup,
    ...), ``proxy`` likewise; None for other modules."""
    parts = module.split(".")
    if parts[:2] != ["releasy_deploy", "tiers"] or len(parts) < 3:
        return None
    family = parts[2].split("_")[0]
    return family if family in ("app", "proxy") else None


@pytest.mark.parametrize("path", sorted((LIB / "tiers").glob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_app_and_proxy_tiers_do_not_import_each_other(path):
    """What both tiers need (the upstream file's path, ...) lives in `commands/`."""
    mine = _tier_family(_module_name(path))
    others = sorted({name for name, _ in _imports(path)
                     if _tier_family(name) not in (None, mine)})
    assert mine is None or not others, f"{path.name} ({mine} tier) imports {others}"
