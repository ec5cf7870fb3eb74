"""Which secret values the app hosts get: secrets must never drift (pure logic).

Upstream hashes API keys with ``RELEASY_API_KEY_PEPPER``: changing or dropping it silently
invalidates every API key. The same holds in its own way for the admin API key and the
artifact storage keys. So, per secret:

- the hosts' values (kept file, else releasy.env) win when the operator's side lacks it:
  a run without the secret (cron, a second operator) keeps what the hosts have;
- an operator value different from the hosts' (or hosts disagreeing among themselves) is
  refused, naming the secret and where the values differ, unless the operator asked for
  that secret's rotation explicitly (``--rotate-secret NAME``);
- ``api_key_pepper`` is generated on first install when nobody has one (like the database
  password), and on a rotation without a new value.
"""
from __future__ import annotations

import secrets as _random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from .commands.kept_secrets import KEPT_FILE, VARIABLES, KeptState

__all__ = ["ROTATION_EFFECTS", "GENERATED", "Resolution", "SecretDrift", "resolve",
           "check_rotation_names", "generate"]

# What a rotation breaks, said before it is done.
ROTATION_EFFECTS: Mapping[str, str] = {
    "admin_api_key": "the old admin API key stops working: every script or operator using it"
                     " needs the new one",
    "api_key_pepper": "every API key issued so far stops working (upstream hashes them with"
                      " the pepper): all clients need new API keys",
    "artifact_access_key": "Releasy uses the new object storage credentials at once: they"
                           " must already be valid at the storage",
    "artifact_secret_key": "Releasy uses the new object storage credentials at once: they"
                           " must already be valid at the storage",
}

# Secrets the tool creates itself when none exists anywhere.
GENERATED = frozenset({"api_key_pepper"})

MIN_LENGTH = 16


def generate() -> str:
    """A new random secret (43 URL-safe characters, 256 bits)."""
    return _random.token_urlsafe(32)


class SecretDrift(ValueError):
    """A secret's value would change without an explicit rotation (message names no value)."""


@dataclass(frozen=True, repr=False)
class Resolution:
    values: Mapping[str, str]  # what every app host gets
    kept_from_hosts: tuple[str, ...] = ()  # names the operator lacked, kept from the hosts
    generated: tuple[str, ...] = ()
    rotated: tuple[str, ...] = ()  # names whose value changes by request
    notes: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        return (f"Resolution(set={sorted(self.values)}, kept={self.kept_from_hosts}, "
                f"generated={self.generated}, rotated={self.rotated})")


def check_rotation_names(names: Iterable[str]) -> tuple[str, ...]:
    """The requested rotations, validated; ValueError naming the unknown ones."""
    out = tuple(dict.fromkeys(names))
    bad = [n for n in out if n not in VARIABLES]
    if bad:
        raise ValueError(f"--rotate-secret: unknown secret {', '.join(bad)}; known: "
                         f"{', '.join(VARIABLES)}")
    return out


def _holders(hosts: Mapping[str, KeptState], name: str) -> dict[str, list[str]]:
    """value -> where it is held ("app1", "app2 (releasy.env)")."""
    seen: dict[str, list[str]] = {}
    for host, state in hosts.items():
        if state.kept is not None and name in state.kept:
            seen.setdefault(state.kept[name], []).append(host)
        env_value = state.env.get(name)
        if env_value is not None and (state.kept is None or state.kept.get(name) != env_value):
            seen.setdefault(env_value, []).append(f"{host} (releasy.env)")
    return seen


def resolve(operator: Mapping[str, str], hosts: Mapping[str, KeptState],
            rotate: Iterable[str] = (), *, make: Callable[[], str] = generate) -> Resolution:
    """The values every app host must have. Raises SecretDrift (naming the secret, hosts and
    what to do; never a value) when a value would change without a requested rotation."""
    rotate = check_rotation_names(rotate)
    bad_hosts = [f"{h}: {s.problem}" for h, s in hosts.items() if s.problem]
    if bad_hosts:
        raise SecretDrift("cannot trust the kept secrets: " + "; ".join(bad_hosts)
                          + f". Inspect it as root (it must be a root:root 0600 file in a "
                            f"root:root 0700 directory), fix or remove it, and re-run")
    values: dict[str, str] = {}
    kept, generated, rotated, problems = [], [], [], []
    for name, variable in VARIABLES.items():
        held = _holders(hosts, name)
        mine = operator.get(name)
        if name in rotate:
            new = mine if mine is not None else (make() if name in GENERATED else None)
            if new is None:
                problems.append(f"--rotate-secret {name}: set the new value first "
                                f"(export {variable} or put it in the secrets file)")
                continue
            values[name] = new
            if set(held) != {new}:
                rotated.append(name)
            continue
        if len(held) > 1:
            where = "; ".join(", ".join(w) for w in held.values())
            problems.append(f"{name}: the app hosts hold different values ({where}); choose"
                            f" one, set it ({variable}) and re-run with --rotate-secret {name}")
            continue
        if held:
            (host_value, where), = held.items()
            if mine is None:
                values[name] = host_value
                kept.append(name)
            elif mine != host_value:
                problems.append(
                    f"{name}: your value ({variable}) differs from the one kept on "
                    f"{', '.join(where)} ({KEPT_FILE}); changing it would break what depends "
                    f"on it ({ROTATION_EFFECTS[name]}). Unset {variable} to keep the hosts' "
                    f"value, or re-run with --rotate-secret {name} to replace it")
            else:
                values[name] = mine
            continue
        if mine is not None:
            values[name] = mine
        elif name in GENERATED:
            values[name] = make()
            generated.append(name)
    if problems:
        raise SecretDrift("refusing to change secrets (nothing was changed):\n  "
                          + "\n  ".join(problems))
    return Resolution(values, tuple(kept), tuple(generated), tuple(rotated))
