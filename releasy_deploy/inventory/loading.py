"""Reading the inventory: which file, one YAML document read with its duplicate keys
reported, and RELEASY_ENV's environment file merged over the shared one, then handed to
the parser."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .. import inventory_files
from .model import DEFAULT_INVENTORY, ENV_VAR, Inventory
from .parser import _Parser
from .problems import FILE, ROOT, InventoryError, Problem
from .values import _join

# libyaml's parser when PyYAML was built with it (the wheels are): ~10x faster on an
# inventory full of comments, same documents and error marks.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def inventory_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Which inventory to use: ``explicit`` > ``$RELEASY_INVENTORY`` > ``./hosts.yaml``."""
    for candidate in (explicit, os.environ.get(ENV_VAR)):
        if candidate is not None and str(candidate) != "":
            return Path(candidate).expanduser()
    return Path(DEFAULT_INVENTORY)


def load_inventory(path: str | os.PathLike[str] | None = None, *,
                   check_files: bool = True) -> Inventory:
    """Read, parse and validate the inventory; raise InventoryError listing every problem.

    ``check_files=False`` skips the checks that need files next to the inventory
    (known_hosts, TLS certificate/key, identity file, local release directory,
    sha256_file): useful to validate an inventory away from the operator's machine.
    """
    problems: list[Problem] = []
    try:
        selection = inventory_files.select() if path is None else None
    except ValueError as exc:
        raise InventoryError([Problem(inventory_files.ENV_SELECT_VAR, FILE, str(exc))]) from None
    if selection is not None:
        return _load_environment(selection, check_files, problems)
    p = inventory_path(path)
    data = load_yaml_file(p, problems)
    if data is UNREADABLE:
        raise InventoryError(problems)
    return _Parser(p, check_files, problems).run(data)


def _load_environment(sel: inventory_files.Selection, check_files: bool,
                      problems: list[Problem]) -> Inventory:
    """RELEASY_ENV: the environment's file merged over the shared one, every value
    remembering its file (see `inventory_files`)."""
    env = load_yaml_file(sel.path, problems)
    base = load_yaml_file(sel.base, problems) if sel.base is not None else None
    if env is UNREADABLE or base is UNREADABLE:
        raise InventoryError(problems)
    problems += [Problem(*found) for found in inventory_files.environment_problems(sel, base, env)]
    origins = inventory_files.Origins(str(sel.path))
    merged = inventory_files.merge(base, env, str(sel.base), str(sel.path), origins)
    if merged is not None and not isinstance(merged, dict):
        problems.append(Problem(str(sel.path), ROOT, "must be a mapping of inventory keys"))
        raise InventoryError(problems)
    merged = inventory_files.defaults_for(sel, merged or {}, origins)
    return _Parser(sel.path, check_files, problems, origins=origins,
                   base_path=sel.base).run(merged)


def parse_inventory(data: Any, path: str | os.PathLike[str], *,
                    check_files: bool = True) -> Inventory:
    """Validate already-loaded YAML data; ``path`` names the file and anchors relative paths."""
    return _Parser(Path(path), check_files, []).run(data)


# --------------------------------------------------------------------------- YAML loading

UNREADABLE = object()


def load_yaml_file(path: Path, problems: list[Problem], *, quote_errors: bool = True) -> Any:
    """Load one YAML document, recording problems instead of raising.

    Returns ``UNREADABLE`` when nothing usable could be read. Duplicate mapping keys are
    reported (YAML itself would silently keep the last one). With ``quote_errors=False``
    syntax errors carry only their position, never a snippet of the file (secrets).
    """
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(Problem(file, FILE, (
            f"no such file (looked for {path.absolute()}); pass the inventory path, set "
            f"{ENV_VAR}=PATH, or start from the example hosts.yaml in the repository")))
        return UNREADABLE
    except UnicodeDecodeError as e:
        problems.append(Problem(file, FILE, f"not UTF-8 text (byte {e.start})"))
        return UNREADABLE
    except OSError as e:
        problems.append(Problem(file, FILE, f"cannot read: {e.strerror or e}"))
        return UNREADABLE

    found = len(problems)
    try:
        return _read_document(_SAFE_LOADER, text, file, problems)
    except yaml.YAMLError:
        del problems[found:]  # the second read reports them again
    # Read again by the pure-Python parser for its message: libyaml's says "found character
    # that cannot start any token" where this one names the tab.
    try:
        return _read_document(yaml.SafeLoader, text, file, problems)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else FILE
        what = e.problem or "invalid YAML"
        if quote_errors and e.context:
            what = f"{what} ({e.context})"
        problems.append(Problem(file, where, f"YAML syntax error: {what}"))
        return UNREADABLE
    except yaml.YAMLError as e:
        problems.append(Problem(file, FILE, f"YAML error: {e if quote_errors else type(e).__name__}"))
        return UNREADABLE


def _read_document(loader_class: type, text: str, file: str, problems: list[Problem]) -> Any:
    """The one document of ``text`` (None when empty), its duplicate keys reported."""
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _report_duplicate_keys(node, "", file, problems, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _report_duplicate_keys(node: yaml.Node, ypath: str, file: str,
                           problems: list[Problem], seen: set[int]) -> None:
    if id(node) in seen:  # aliases share nodes; also guards recursive documents
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                _report_duplicate_keys(value, ypath, file, problems, seen)
                continue
            if key.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" overrides are intended
                _report_duplicate_keys(value, ypath, file, problems, seen)
                continue
            child = _join(ypath, key.value)
            line = key.start_mark.line + 1
            ident = (key.tag, key.value)
            if ident in first:
                problems.append(Problem(file, child, (
                    f"duplicate key (first on line {first[ident]}, again on line {line}); "
                    "YAML would silently keep only the last one")))
            else:
                first[ident] = line
            _report_duplicate_keys(value, child, file, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _report_duplicate_keys(item, f"{ypath}[{i}]", file, problems, seen)
