"""Secrets: never in hosts.yaml; from environment variables and/or a 0600 file.

The file (``secrets.file`` in the inventory, default ``secrets.yaml`` beside it) is a flat
YAML mapping of the names below to strings. It may be absent. If present it must not be
accessible by group or others (0600 or 0400), otherwise it is refused before being read.
An environment variable with a non-empty value overrides the file's key of the same secret.

Error messages name files, keys and variables, never values.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .inventory import (FILE, ROOT, UNREADABLE, Inventory, InventoryError, Problem,
                        did_you_mean, load_yaml_file)

__all__ = ["SECRET_ENV_VARS", "Secrets", "load_secrets"]

# secret name -> environment variable (same names Releasy itself reads)
SECRET_ENV_VARS: Mapping[str, str] = MappingProxyType({
    "admin_api_key": "RELEASY_ADMIN_API_KEY",
    "api_key_pepper": "RELEASY_API_KEY_PEPPER",
    "artifact_access_key": "RELEASY_ARTIFACT_ACCESS_KEY",
    "artifact_secret_key": "RELEASY_ARTIFACT_SECRET_KEY",
})

MIN_LENGTH = 16

_NAME_SHAPE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


@dataclass(frozen=True, repr=False)
class Secrets:
    """Secret values by name. Printing it shows which secrets are set, never their values."""

    values: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    file: Path | None = None  # where missing secrets can be added (for messages)

    def get(self, name: str) -> str | None:
        """The value, or None if unset. An unknown name is a programming error (KeyError)."""
        if name not in SECRET_ENV_VARS:
            raise KeyError(f"unknown secret {name!r}; known: {', '.join(SECRET_ENV_VARS)}")
        return self.values.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.values

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in SECRET_ENV_VARS if n in self.values)

    def require(self, *names: str) -> None:
        """Raise InventoryError naming every secret of ``names`` that is not set."""
        missing = [n for n in names if self.get(n) is None]
        if missing:
            raise InventoryError(_missing(n, self.file) for n in missing)

    def __repr__(self) -> str:
        return f"Secrets(set={list(self.names)!r})"

    __str__ = __repr__


def _missing(name: str, file: Path | None) -> Problem:
    where = f" or add `{name}: ...` to {file} (mode 0600)" if file else ""
    return Problem(str(file) if file else "environment", name,
                   f"secret is not set: export {SECRET_ENV_VARS[name]}{where}")


def _value_problem(value: Any) -> str | None:
    """What is wrong with a secret value, described without quoting it."""
    if not isinstance(value, str):
        kind = "nothing (null)" if value is None else f"a YAML {type(value).__name__}"
        return f"must be a string (quote it); got {kind}"
    if not value:
        return "is empty"
    if value != value.strip():
        return "has leading or trailing whitespace (Releasy would trim it)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains control characters (newline, tab, ...)"
    if len(value) < MIN_LENGTH:
        # Short values are guessable, and the masker could not hide them reliably.
        return (f"is shorter than {MIN_LENGTH} characters; use a random value (e.g."
                " `openssl rand -base64 32`)")
    return None


def _read_file(path: Path, problems: list[Problem]) -> dict[str, str]:
    file = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}  # environment variables may supply everything
    except OSError as e:
        problems.append(Problem(file, FILE, f"cannot stat secrets file: {e.strerror or e}"))
        return {}
    if not stat.S_ISREG(st.st_mode):
        problems.append(Problem(file, FILE, "secrets file is not a regular file"))
        return {}
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        problems.append(Problem(file, FILE, (
            f"secrets file is accessible by group/others (mode {mode:04o}); refusing to use "
            f"it. Run `chmod 600 {path}`")))
        return {}

    data = load_yaml_file(path, problems, quote_errors=False)
    if data is UNREADABLE or data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(Problem(file, ROOT, (
            f"must be a mapping of secret names to strings; names: {', '.join(SECRET_ENV_VARS)}")))
        return {}
    values: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not set(key) <= _NAME_SHAPE or len(key) > 64:
            # Could be a pasted secret: do not echo it.
            problems.append(Problem(file, "(key not shown)", (
                "a key that is not a secret name; known names: " + ", ".join(SECRET_ENV_VARS))))
            continue
        if key not in SECRET_ENV_VARS:
            problems.append(Problem(file, key, (
                f"unknown secret{did_you_mean(key, SECRET_ENV_VARS)}; known names: "
                f"{', '.join(SECRET_ENV_VARS)}")))
            continue
        bad = _value_problem(value)
        if bad:
            problems.append(Problem(file, key, bad))
            continue
        values[key] = value
    return values


def load_secrets(inv: Inventory, environ: Mapping[str, str] = os.environ) -> Secrets:
    """Read the secrets file (if any) and the environment; raise InventoryError on problems.

    Also requires the artifact storage keys when the inventory configures artifact storage.
    An environment variable set to the empty string counts as unset.
    """
    problems: list[Problem] = []
    values = _read_file(inv.secrets_file, problems)
    for name, var in SECRET_ENV_VARS.items():
        value = environ.get(var)
        if value is None or value == "":
            continue
        bad = _value_problem(value)
        if bad:
            problems.append(Problem("environment", var, bad))
            continue
        values[name] = value
    if inv.app.artifact_storage is not None:
        for name in ("artifact_access_key", "artifact_secret_key"):
            if name not in values and not any(p.path in (name, SECRET_ENV_VARS[name])
                                               for p in problems):
                p = _missing(name, inv.secrets_file)
                problems.append(Problem(p.file, p.path,
                                        p.message + " (app.artifact_storage is configured)"))
    if problems:
        raise InventoryError(problems)
    return Secrets(MappingProxyType(values), inv.secrets_file)
