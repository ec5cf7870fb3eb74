"""Inventories for unit tests: one builder that parses a YAML text after changing values by
their YAML path, so each test file states only the topology it needs and what it changes.
No files are read (``check_files=False``); the inventory's own path is a placeholder."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from releasy_deploy.inventory import Inventory, parse_inventory

PLACEHOLDER_PATH = Path("/srv/deploy/hosts.yaml")


def set_path(data: dict, dotted: str, value: Any) -> None:
    """``data[a][b] = value`` for ``a.b`` (or ``a__b``, usable as a keyword argument)."""
    node = data
    *parents, last = dotted.replace("__", ".").split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def build(text: str | dict, path: Path | str = PLACEHOLDER_PATH, **changes: Any) -> Inventory:
    """``text`` (YAML, or the data itself) parsed as an inventory at ``path``, after
    ``changes`` (YAML path -> value)."""
    data = copy.deepcopy(text) if isinstance(text, dict) else yaml.safe_load(text)
    for dotted, value in changes.items():
        set_path(data, dotted, value)
    return parse_inventory(data, Path(path), check_files=False)
