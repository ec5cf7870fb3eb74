"""The argv a host connection sends, built and rendered without SSH (pure, unit-tested):
checked word lists, the ``sudo -n --``, ``env`` and ``cd`` prefixes, the one-line shell
rendering (masked for display), the tail of an error output, the secret values to mask."""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SUDO_PREFIX: tuple[str, ...] = ("sudo", "-n", "--")
STDERR_TAIL_LINES = 20
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def validate_argv(argv: Sequence[str]) -> list[str]:
    """Return argv as a list after checking it is a non-empty list of NUL-free str."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of str, not one string: build commands as lists")
    items = list(argv)
    if not items:
        raise ValueError("argv is empty")
    for i, item in enumerate(items):
        # The value itself is not shown: it might be a secret.
        if not isinstance(item, str):
            raise TypeError(f"argv[{i}] is {type(item).__name__}, not str (convert it explicitly)")
        if "\x00" in item:
            raise ValueError(f"argv[{i}] contains a NUL byte, which no remote command can receive")
    return items


def render(argv: Sequence[str]) -> str:
    """Render an argv list as one POSIX shell command line (every word quoted as needed)."""
    return shlex.join(validate_argv(argv))


def render_masked(argv: Sequence[str], mask: Callable[[str], str]) -> str:
    """Render for display: mask each word before quoting, so quoting cannot split a secret."""
    return shlex.join(mask(a) for a in validate_argv(argv))


def with_sudo(argv: Sequence[str], *, is_root: bool) -> list[str]:
    """Prefix ``sudo -n --`` for non-root users; ``-n`` fails fast instead of prompting."""
    items = validate_argv(argv)
    return items if is_root else [*SUDO_PREFIX, *items]


def with_env(argv: Sequence[str], env: Mapping[str, str] | None) -> list[str]:
    """Prefix ``env K=V ...`` (visible in the process list: never for secrets)."""
    items = validate_argv(argv)
    if not env:
        return items
    pairs = []
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"invalid environment variable name {key!r}")
        pairs.append(f"{key}={value}")
    return ["env", *pairs, *items]


def with_cwd(argv: Sequence[str], cwd: str | None) -> list[str]:
    items = validate_argv(argv)
    if cwd is None:
        return items
    if not cwd.startswith("/"):
        raise ValueError(f"cwd must be an absolute path, got {cwd!r}")
    return ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *items]


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def secret_values(secrets: Any) -> dict[str, str]:
    """Accept a Secrets object (``.values`` mapping), a plain mapping, or None."""
    if secrets is None:
        return {}
    if isinstance(secrets, Mapping):
        return {str(k): v for k, v in secrets.items() if isinstance(v, str)}
    values = getattr(secrets, "values", None)
    if isinstance(values, Mapping):
        return {str(k): v for k, v in values.items() if isinstance(v, str)}
    raise TypeError("secrets must be a Secrets object with a .values mapping, or a mapping")
