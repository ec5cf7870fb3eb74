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
from typing import Any, Callable, Iterator, Mapping, Sequence

from invoke import Exit

from . import audit
from .errors import (BadInput, DeployError, LockHeld, ParallelError, first_line,
                     is_unreachable)
from .executor import Executor, FaultInjection
from .hooks import HookRun
from .inventory import InventoryError, load_inventory
from .output import Reporter, one_screen
from .secrets import Secrets, load_secrets
from .session import Session

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
           "JSON_LOG_ENV", "TRACE_ENV", "BadInput", "Session", "session", "confirm",
           "exit_code_for", "operator_task"]


@contextmanager
def session(dry_run: bool = False, *, need_secrets: bool = True, action: str | None = None,
            audited: bool = False, hooked: bool = False, version: str | None = None,
            hosts: Sequence[str] = (), args: Mapping[str, Any] | None = None
            ) -> Iterator[Session]:
    """Inventory and secrets validated before any connection is made.

    ``audited``: the task (``action``) changes hosts and appends an audit record on every
    host when it ends, unless it was refused (bad input, lock busy: nothing changed) or a
    dry run; ``args`` are its flags for that record. ``hooked``: the inventory's hooks run
    around it (``version`` and ``hosts`` for their environment; see `hooks`)."""
    inventory = load_inventory()
    secrets = load_secrets(inventory) if need_secrets else Secrets({})
    json_path = os.environ.get(JSON_LOG_ENV) or None
    reporter = Reporter(json_path=json_path)
    fault_at = os.environ.get(FAULT_ENV, "")
    faults = FaultInjection(int(fault_at)) if fault_at.isdigit() else None
    executor = Executor(inventory, dry_run=dry_run, reporter=reporter, secrets=secrets,
                        trace=bool(json_path and os.environ.get(TRACE_ENV)), faults=faults)
    s = Session(inventory, secrets, executor, reporter, confirm=confirm)
    hook_run = HookRun(s, action or "", version, hosts) if hooked else None
    started = time.monotonic()
    try:
        if hook_run is not None:
            hook_run.before()
        try:
            yield s
        except BaseException as exc:
            _task_ended(s, action if audited else None, hook_run, args, started, exc)
            raise
        _task_ended(s, action if audited else None, hook_run, args, started, None)
    finally:
        executor.close()
        reporter.close()
        if faults is not None:
            print(faults.summary(), file=sys.stderr, flush=True)
        if json_path:
            _log_executor_facts(json_path, executor)


def _task_ended(s: Session, audit_action: str | None, hook_run: HookRun | None,
                args: Mapping[str, Any] | None, started: float,
                exc: BaseException | None) -> None:
    """The audit record of a task that changes hosts, then the after/failure hooks."""
    if exc is None:
        result, code = "ok", EXIT_OK
    elif isinstance(exc, KeyboardInterrupt):
        result, code = "interrupted", 130
    else:
        code = exit_code_for(exc)
        result = "refused" if code in (EXIT_BAD_INPUT, EXIT_LOCK_BUSY) else "failed"
    if audit_action and not s.dry_run and result != "refused":
        text = result if exc is None else f"{result}: {s.reporter.masker(first_line(exc))}"
        changed = {h: t.changed for h, t in s.reporter.tally().items()}
        try:
            audit.write(s.executor, s.inventory.hosts, audit.task_entry(
                audit_action, s.inventory.environment, result=text,
                seconds=time.monotonic() - started, changed=changed, args=args or {}))
        except DeployError as werr:
            s.reporter.error(s.inventory.environment,
                             f"audit record not written everywhere: {first_line(werr)}")
    if hook_run is not None:
        hook_run.after(result=result, exit_code=code, error=exc)


def _log_executor_facts(path: str, executor: Executor) -> None:
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
    if isinstance(exc, (InventoryError, BadInput)):
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
        except (DeployError, InventoryError) as exc:
            debug = _debug_enabled()
            if debug:
                traceback.print_exc()
            sys.stdout.flush()
            # One screen: long detail blocks (journal tails of many hosts) are cut to their
            # last lines; --debug shows everything.
            text = str(exc) if debug else one_screen(str(exc))
            raise Exit(f"error: {text}", code=exit_code_for(exc)) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper
