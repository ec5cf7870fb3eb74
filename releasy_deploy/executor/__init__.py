"""The one place that talks SSH.

Tier code builds remote commands as argv lists (pure functions) and hands them to a
`HostConnection`, which renders them once with `shlex.join`, adds ``sudo -n --`` when the
SSH user is not root, runs them over the host's single Fabric connection, masks secrets in
everything it prints or raises, and skips mutating commands in dry-run.

Design notes (why, not what):
- Fabric's `Connection` opens and authenticates the session, but we verify host keys
  ourselves: Fabric installs AutoAddPolicy and ignores ``UserKnownHostsFile``, so we load the
  inventory's known_hosts into the paramiko client and reject anything unknown or changed.
- Commands run on a raw channel of the Fabric transport rather than through Invoke's
  Runner: the Runner decodes stdin as text (binary uploads would be mangled) and polls it on
  a thread; a channel gives exact bytes in and out, a guaranteed EOF on stdin and one
  ``exec`` request per command, which is also what `round_trips` counts.
- Secrets never travel in a command line (Fabric 3 inlines ``env=`` into it): content goes
  on stdin, and an argv that contains a known secret value is refused before it is sent.

This package's public names are all importable from here; its parts, one job each:
`argv` (building and rendering command lines, pure), `connect` (opening and verifying one
host's connection), `channel` (one command on one SSH channel), `host` (`HostConnection`:
running, uploading, errors), `faults` (``RELEASY_FAULT`` injection), `pool` (`Executor`:
every connection of a task, `Executor.each`, round-trip counts and traces).
"""
from __future__ import annotations

from .argv import (SUDO_PREFIX, STDERR_TAIL_LINES, render, render_masked, secret_values, tail,
                   validate_argv, with_cwd, with_env, with_sudo)
from .faults import INJECTED_FAULT_ARGV, FaultInjection
from .host import HostConnection, Result
from .pool import MAX_PARALLEL, CommandTrace, Executor

__all__ = [
    "Executor", "HostConnection", "Result", "CommandTrace", "FaultInjection",
    "INJECTED_FAULT_ARGV", "MAX_PARALLEL", "SUDO_PREFIX", "STDERR_TAIL_LINES", "render",
    "render_masked", "secret_values", "tail", "validate_argv", "with_cwd", "with_env",
    "with_sudo",
]
