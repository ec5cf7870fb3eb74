"""The inventory's ``hooks:`` section: commands run on the operator machine around
rollouts, restarts and restores (see `releasy_deploy.hooks`, which runs them).

    hooks:
      before_deploy: ["./scripts/notify 'starting'"]   # non-zero exit: the task stops (exit 2)
      after_deploy: [...]                               # reported, never changes the result
      on_failure: [...]
      timeout: 30            # seconds per command (1..600)
      pass_env: [CHAT_WEBHOOK_URL]   # variables of this shell the hooks may see

Validated like the rest of the inventory: every problem names its YAML path. Pure: no
import of the inventory parser (it imports this module)."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HOOK_KINDS = ("before_deploy", "after_deploy", "on_failure")
HOOKS_KEYS = (*HOOK_KINDS, "timeout", "pass_env")
DEFAULT_TIMEOUT = 30
MAX_TIMEOUT = 600
MAX_COMMAND = 4096
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Set by the tool itself (RELEASY_ACTION, ...) or secrets (RELEASY_ADMIN_API_KEY, ...):
# never passed through from the operator's shell.
RESERVED_PREFIX = "RELEASY_"


@dataclass(frozen=True)
class Hooks:
    before_deploy: tuple[str, ...] = ()
    after_deploy: tuple[str, ...] = ()
    on_failure: tuple[str, ...] = ()
    timeout: int = DEFAULT_TIMEOUT
    pass_env: tuple[str, ...] = ()

    def commands(self, kind: str) -> tuple[str, ...]:
        return getattr(self, kind)

    @property
    def any(self) -> bool:
        return any(self.commands(k) for k in HOOK_KINDS)


def _what(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"[:80]


def _strings(value: Any, path: str, error: Callable[[str, str], None], *,
             check: Callable[[str], str | None]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        error(path, f"must be a list of strings; got {_what(value)}")
        return ()
    out: list[str] = []
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        if not isinstance(item, str) or not item.strip():
            error(p, f"must be a non-empty string; got {_what(item)}")
            continue
        problem = check(item)
        if problem:
            error(p, problem)
            continue
        out.append(item)
    return tuple(out)


def _command_problem(cmd: str) -> str | None:
    if len(cmd) > MAX_COMMAND:
        return f"is {len(cmd)} characters long; put it in a script (at most {MAX_COMMAND})"
    if "\0" in cmd:
        return "contains a NUL character"
    return None


def _env_name_problem(name: str) -> str | None:
    if not ENV_NAME_RE.fullmatch(name):
        return f"{name!r} is not an environment variable name (letters, digits, _)"
    if name.startswith(RESERVED_PREFIX):
        return (f"{name}: RELEASY_* variables are the tool's own (and its secrets): hooks"
                f" get the RELEASY_* variables the README lists, never these")
    return None


def parse_hooks(value: Any, error: Callable[[str, str], None]) -> Hooks:
    """``value`` is the YAML under ``hooks``; ``error(ypath, message)`` records a problem."""
    if value is None:
        return Hooks()
    if not isinstance(value, dict):
        error("hooks", f"must be a mapping (allowed keys: {', '.join(HOOKS_KEYS)});"
                       f" got {_what(value)}")
        return Hooks()
    for key in value:
        if key not in HOOKS_KEYS:
            error(f"hooks.{key}" if isinstance(key, str) else "hooks",
                  f"unknown key; allowed keys: {', '.join(HOOKS_KEYS)}")
    lists = {k: _strings(value.get(k), f"hooks.{k}", error, check=_command_problem)
             for k in HOOK_KINDS}
    timeout = value.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int) \
            or not 1 <= timeout <= MAX_TIMEOUT:
        error("hooks.timeout", f"must be whole seconds from 1 to {MAX_TIMEOUT}; got"
                               f" {_what(timeout)}")
        timeout = DEFAULT_TIMEOUT
    pass_env = _strings(value.get("pass_env"), "hooks.pass_env", error,
                        check=_env_name_problem)
    return Hooks(**lists, timeout=timeout, pass_env=pass_env)
