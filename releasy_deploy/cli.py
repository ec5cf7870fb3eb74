"""The operator edge, shared by every fab task: load the inventory once, build the session
(executor, reporter, the JSON-log option), ask for confirmation on a terminal, and turn the
library's typed errors into a short message and a documented exit code (no traceback
unless --debug). Nothing in the library imports this module."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from invoke import Exit

from .errors import BadInput, DeployError, LockHeld, ParallelError, is_unreachable
from .lazy import lazy_module

# Loaded by the first task that runs (not by `fab --list`): see releasy_deploy/lazy.py.
_executor = lazy_module("releasy_deploy.executor")
_inventory = lazy_module("releasy_deploy.inventory")
_output = lazy_module("releasy_deploy.output")
_secrets = lazy_module("releasy_deploy.secrets")
_session = lazy_module("releasy_deploy.session")

# Exit codes: documented in the README; cron wrappers rely on them.
EXIT_OK = 0
EXIT_FAILED = 1        # a step failed on a host (see the message)
EXIT_BAD_INPUT = 2     # inventory, secrets, flags or release artifact are wrong: nothing touched
EXIT_LOCK_BUSY = 3     # another deploy holds the environment's lock
EXIT_UNREACHABLE = 4   # a host could not be reached or its host key did not verify

JSON_LOG_ENV = "RELEASY_JSON_LOG"
# With a JSON log: RELEASY_TRACE=1 adds one "command" event per SSH command (host, masked
# command, start, seconds), for the benchmark.
TRACE_ENV = "RELEASY_TRACE"
# Tests of the recovery paths: RELEASY_FAULT=N fails the task's N-th host-changing command
# (0: only count them); the count is printed on stderr at the end.
FAULT_ENV = "RELEASY_FAULT"


__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_LOCK_BUSY", "EXIT_UNREACHABLE",
           "JSON_LOG_ENV", "TRACE_ENV", "BadInput", "session", "confirm",
           "exit_code_for", "operator_task"]


@contextmanager
def session(dry_run: bool = False, *, need_secrets: bool = True) -> Iterator[Any]:
    """The task's `Session`: inventory (parsed once per process) and secrets validated
    before any connection is made."""
    inventory = _inventory.load_inventory()
    secrets = _secrets.load_secrets(inventory) if need_secrets else _secrets.Secrets({})
    json_path = os.environ.get(JSON_LOG_ENV) or None
    reporter = _output.Reporter(json_path=json_path)
    fault_at = os.environ.get(FAULT_ENV, "")
    faults = _executor.FaultInjection(int(fault_at)) if fault_at.isdigit() else None
    executor = _executor.Executor(inventory, dry_run=dry_run, reporter=reporter, secrets=secrets,
                        trace=bool(json_path and os.environ.get(TRACE_ENV)), faults=faults)
    try:
        yield _session.Session(inventory, secrets, executor, reporter, confirm=confirm)
    finally:
        executor.close()
        reporter.close()
        if faults is not None:
            print(faults.summary(), file=sys.stderr, flush=True)
        if json_path:
            _log_executor_facts(json_path, executor)


def _log_executor_facts(path: str, executor: Any) -> None:
    """Append what the task cost in SSH terms to the JSON log: one ``round_trips`` event per
    host contacted (exec requests, connections opened), then the trace if one was kept."""
    now = _iso(time.time())
    hosts = dict.fromkeys([*executor.connections_opened, *executor.round_trips])
    records = [{"ts": now, "host": h, "event": "round_trips",
                "round_trips": executor.round_trips.get(h, 0),
                "connections": executor.connections_opened.get(h, 0)} for h in hosts]
    records += [{"ts": _iso(executor.created_at + t.started_s), "event": "command", **asdict(t)}
                for t in executor.trace or ()]
    if records:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _iso(seconds: float) -> str:
    # The Reporter's format, so events and commands sort together by "ts".
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def confirm(question: str, *, yes: bool) -> None:
    """Ask before a destructive step. Never prompts without a terminal (cron): there it
    fails unless --yes was given, instead of hanging."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise BadInput(f"{question}\n  stdin is not a terminal, so nobody can answer: "
                       "re-run with --yes to confirm")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise BadInput("not confirmed; nothing was changed")


def _debug_enabled() -> bool:
    # `fab --debug` turns on invoke's debug logging; we show tracebacks then.
    return logging.getLogger().isEnabledFor(logging.DEBUG) or bool(
        os.environ.get("RELEASY_DEBUG"))


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of a library error (see the README's table)."""
    if isinstance(exc, (_inventory.InventoryError, BadInput)):
        return EXIT_BAD_INPUT
    if isinstance(exc, LockHeld):
        return EXIT_LOCK_BUSY
    if isinstance(exc, ParallelError):
        # Every host failed the same way (all unreachable, all bad input): say so.
        codes = {exit_code_for(e) for e in exc.failures.values()}
        return codes.pop() if len(codes) == 1 else EXIT_FAILED
    if is_unreachable(exc):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def operator_task(fn: Callable) -> Callable:
    """Wrap a task body: expected failures become `Exit(message, code)`, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DeployError, _inventory.InventoryError) as exc:
            debug = _debug_enabled()
            if debug:
                traceback.print_exc()
            sys.stdout.flush()
            # One screen: long detail blocks (journal tails of many hosts) are cut to their
            # last lines; --debug shows everything.
            text = str(exc) if debug else _output.one_screen(str(exc))
            raise Exit(f"error: {text}", code=exit_code_for(exc)) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper
