"""Several environments from one checkout: ``RELEASY_ENV=staging`` reads
``inventories/base.yaml`` (shared settings, optional) and ``inventories/staging.yaml`` over
it, merged key by key.

The merge is deep for mappings (a key the environment's file sets replaces the base's value
at that key; mappings present in both are merged the same way, level by level); any other
value, lists included, is replaced as a whole; ``key: null`` in the environment's file
removes the base's value (the default applies). Every key remembers the file it came from,
so an error still names the file to edit and the YAML path in it.

Pure: no SSH, only local files."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_SELECT_VAR = "RELEASY_ENV"
DIR_VAR = "RELEASY_INVENTORIES"
DEFAULT_DIR = "inventories"
BASE_NAME = "base"
_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_LAST = re.compile(r"(?:\.[A-Za-z0-9_-]+|\[[^\[\]]*\])\Z")


@dataclass
class Origins:
    """Which file each YAML path of the merged document came from."""

    default: str
    by_path: dict[str, str] = field(default_factory=dict)

    def file_of(self, ypath: str) -> str:
        """The file of ``ypath`` or of its nearest ancestor that has one."""
        p = ypath
        while p:
            if p in self.by_path:
                return self.by_path[p]
            shorter = _LAST.sub("", p)
            if shorter == p:
                break
            p = shorter
        return self.default


def join(ypath: str, key: str) -> str:
    """The inventory parser's path syntax (dotted keys, bracketed others)."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return f"{ypath}.{key}" if ypath else key
    return f'{ypath}["{key}"]'


def _mark(value: Any, ypath: str, file: str, origins: Origins) -> None:
    origins.by_path[ypath] = file
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str):
                _mark(v, join(ypath, k), file, origins)


def merge(base: Any, over: Any, base_file: str, over_file: str,
          origins: Origins, ypath: str = "") -> Any:
    """``over`` deep-merged onto ``base``; records in ``origins`` where each key came from."""
    if not (isinstance(base, Mapping) and isinstance(over, Mapping)):
        chosen, file = (over, over_file) if over is not None else (base, base_file)
        if ypath:
            _mark(chosen, ypath, file, origins)
        elif isinstance(chosen, Mapping):
            for k, v in chosen.items():
                if isinstance(k, str):
                    _mark(v, join("", k), file, origins)
        return chosen
    out: dict[Any, Any] = {}
    for k, v in base.items():
        if k not in over:
            out[k] = v
            if isinstance(k, str):
                _mark(v, join(ypath, k), base_file, origins)
    for k, v in over.items():
        child = join(ypath, k) if isinstance(k, str) else ypath
        if v is None and k in base:
            continue  # "key: null" removes the base's value
        if k in base and isinstance(base[k], Mapping) and isinstance(v, Mapping):
            origins.by_path[child] = over_file
            out[k] = merge(base[k], v, base_file, over_file, origins, child)
        else:
            out[k] = v
            if isinstance(k, str):
                _mark(v, child, over_file, origins)
    return out


@dataclass(frozen=True)
class Selection:
    """What RELEASY_ENV selected: the environment's file and the base file (if any)."""

    name: str
    path: Path
    base: Path | None


def select(environ: Mapping[str, str] = os.environ) -> Selection | None:
    """None without RELEASY_ENV; ValueError (with what to do) for a bad selection."""
    name = environ.get(ENV_SELECT_VAR, "")
    if not name:
        return None
    if environ.get("RELEASY_INVENTORY"):
        raise ValueError(f"both {ENV_SELECT_VAR}={name} and RELEASY_INVENTORY are set: set"
                         f" one of them (RELEASY_INVENTORY names one file, {ENV_SELECT_VAR} an"
                         f" environment of {environ.get(DIR_VAR) or DEFAULT_DIR}/)")
    if not _NAME_RE.fullmatch(name) or name == BASE_NAME:
        raise ValueError(f"{ENV_SELECT_VAR}={name!r} is not an environment name (a lowercase"
                         f" letter, then up to 31 of a-z 0-9 '-'; not {BASE_NAME!r}, the"
                         f" shared settings)")
    directory = Path(environ.get(DIR_VAR) or DEFAULT_DIR).expanduser()
    path = directory / f"{name}.yaml"
    base = directory / f"{BASE_NAME}.yaml"
    return Selection(name, path, base if base.exists() else None)


def environment_problems(sel: Selection, base: Any, env: Any) -> list[tuple[str, str, str]]:
    """(file, ypath, message) for an ``environment:`` key that contradicts the selection:
    the lock and the audit records are per environment, so the shared file must not name
    one and the environment's file must name its own."""
    found = []
    if sel.base is not None and isinstance(base, Mapping) and "environment" in base:
        found.append((str(sel.base), "environment", (
            f"the shared settings must not name an environment (the lock and audit records"
            f" are per environment): remove it; {ENV_SELECT_VAR} names it")))
    if isinstance(env, Mapping) and env.get("environment") not in (None, sel.name):
        found.append((str(sel.path), "environment", (
            f"{env.get('environment')!r} contradicts {ENV_SELECT_VAR}={sel.name} (this file"
            f" is {sel.path.name}): make them the same, or remove the key")))
    return found


def defaults_for(sel: Selection, merged: dict[str, Any], origins: Origins) -> dict[str, Any]:
    """The environment's name and its own secrets file (``<name>.secrets.yaml`` beside),
    unless the files say otherwise: two environments never share either by accident."""
    out = dict(merged)
    if out.get("environment") is None:
        out["environment"] = sel.name
        origins.by_path["environment"] = str(sel.path)
    secrets = out.get("secrets")
    if secrets is None or (isinstance(secrets, Mapping) and "file" not in secrets):
        out["secrets"] = {**(secrets or {}), "file": f"{sel.name}.secrets.yaml"}
        origins.by_path["secrets.file"] = str(sel.path)
    return out
