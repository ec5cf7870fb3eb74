"""The operator edge, shared by every fab task: load the inventory once, build the session
(executor, reporter, the JSON-log option), ask for confirmation on a terminal, and turn the
library's typed errors into a short message and a documented exit code (no traceback
unless --debug). Nothing in the library imports this module."""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping, Sequence

from invoke import Exit

from .errors import (BadInput, DeployError, LockHeld, ParallelError, Terminated, first_line,
                     interruption, is_unreachable)
from .lazy import lazy_module

# Loaded by the first task that runs (not by `fab --list`): see releasy_deploy/lazy.py.
# Only annotations name their classes (`from __future__ import annotations`: never run).
_audit = lazy_module("releasy_deploy.audit")
_executor = lazy_module("releasy_deploy.executor")
_hooks = lazy_module("releasy_deploy.hooks")
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
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): what was started was ended, the message says where
EXIT_TERMINATED = 143   # SIGTERM: the same

JSON_LOG_ENV = "RELEASY_JSON_LOG"
# With a JSON log: RELEASY_TRACE=1 adds one "command" event per SSH command (host, masked
# command, start, seconds), for the benchmark.
TRACE_ENV = "RELEASY_TRACE"
# Tests of the recovery paths: RELEASY_FAULT=N fails the task's N-th host-changing command
# (0: only count them), N:drop drops that host's SSH connection there instead; the count is
# printed on stderr at the end.
FAULT_ENV = "RELEASY_FAULT"


__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_LOCK_BUSY", "EXIT_UNREACHABLE",
           "EXIT_INTERRUPTED", "EXIT_TERMINATED",
           "JSON_LOG_ENV", "TRACE_ENV", "CORE_HOSTS_KEY", "READ_ONLY", "BadInput",
           "CoreFlags", "core_flags", "core_flag_refusals", "session", "confirm",
           "exit_code_for", "fault_injection", "operator_task", "use_json_log"]

# ------------------------------------------------------------------------------ core flags
#: Where `fabfile.adhoc.ReleasyExecutor` leaves fab's -H/--hosts value for the task: the
#: task runs ONCE with that host list as a filter, never once per host.
CORE_HOSTS_KEY = "releasy_core_hosts"
#: ``operator_task(dry=READ_ONLY)``: the task only reads, so -R/--dry changes nothing.
READ_ONLY = "read-only"


@dataclass(frozen=True)
class CoreFlags:
    """What fab's own (core) flags asked for, read from the task's configuration (so a
    config file setting ``run.dry`` counts like -R)."""

    hosts: tuple[str, ...] = ()  # -H/--hosts
    dry: bool = False  # -R/--dry
    echo: bool = False  # -e/--echo
    warn: bool = False  # -w/--warn-only
    pty: bool = False  # -p/--pty
    hide: str | None = None  # --hide
    command_timeout: float | None = None  # -T/--command-timeout
    connect_timeout: float | None = None  # -t/--connect-timeout
    identities: tuple[str, ...] = ()  # -i/--identity
    ssh_config: str | None = None  # -S/--ssh-config
    login_password: bool = False  # --prompt-for-login-password
    passphrase: bool = False  # --prompt-for-passphrase
    sudo_password: bool = False  # --prompt-for-sudo-password


def core_flags(config: Any) -> CoreFlags:
    """The core flags in an invoke/fabric `Config` (missing keys: not given)."""
    def get(path: str, default: Any = None) -> Any:
        node = config
        for key in path.split("."):
            try:
                node = node[key]
            except (KeyError, TypeError, AttributeError):
                return default
        return default if node is None else node

    hosts = str(get(CORE_HOSTS_KEY, "") or "")
    keys = get("connect_kwargs.key_filename", ()) or ()
    return CoreFlags(
        hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()),
        dry=bool(get("run.dry", False)), echo=bool(get("run.echo", False)),
        warn=bool(get("run.warn", False)), pty=bool(get("run.pty", False)),
        hide=get("run.hide") or None, command_timeout=get("timeouts.command"),
        connect_timeout=get("connect_kwargs.timeout"),
        identities=tuple([keys] if isinstance(keys, str) else keys),
        ssh_config=getattr(config, "_runtime_ssh_path", None) or None,
        login_password=get("connect_kwargs.password") is not None,
        passphrase=get("connect_kwargs.passphrase") is not None,
        sudo_password=get("sudo.password") is not None)


#: Core flags no task takes, and why: what to use instead.
_NEVER = (
    ("warn", "-w/--warn-only", "a failed step always stops the task (and puts back what it"
                               " changed); there is no carrying on past a failure"),
    ("pty", "-p/--pty", "commands never run in a pseudo-terminal (`fab db.psql` opens its own)"),
    ("hide", "--hide", "output is printed per host by the task itself (RELEASY_PROGRESS=plain"
                       " for plain lines)"),
    ("command_timeout", "-T/--command-timeout", "each step has its own bound (--ready-timeout,"
                                                " --wait, app.ready_timeout)"),
    ("identities", "-i/--identity", "the key comes from the inventory (ssh.identity_file, a"
                                    " host's identity_file)"),
    ("ssh_config", "-S/--ssh-config", "SSH settings come from the inventory (ssh:, hosts:,"
                                      " jump_hosts:), never from an ssh_config file"),
    ("login_password", "--prompt-for-login-password", "hosts are reached with the"
                                                      " inventory's key only"),
    ("passphrase", "--prompt-for-passphrase", "use a key without a passphrase in"
                                              " ssh.identity_file"),
    ("sudo_password", "--prompt-for-sudo-password", "a non-root SSH user needs passwordless"
                                                    " sudo (sudo -n)"),
)


def core_flag_refusals(flags: CoreFlags, task: str, *, hosts: str | None,
                       dry: str | None) -> list[str]:
    """Why fab's core flags cannot be honoured for ``task`` ([]: they can). ``hosts``:
    the task's parameter -H fills (None: the task takes no host subset); ``dry``: the
    parameter -R sets, `READ_ONLY`, or None (the task has no dry run). Pure."""
    problems = [f"{flag} is not supported: {why}" for attr, flag, why in _NEVER
                if getattr(flags, attr)]
    if flags.hosts and hosts is None:
        problems.append(f"-H/--hosts: `fab {task}` acts on the hosts its task defines and"
                        f" takes no subset of them" + _HOSTS_ADVICE.get(task, ""))
    if flags.dry and dry is None:
        problems.append(f"-R/--dry: `fab {task}` has no dry run (it would run for real)")
    return problems


_HOSTS_ADVICE = {
    "deploy.rolling": "; `--canary N` deploys the first N app hosts and stops",
    "deploy.rollback": "; it rolls every app host back",
    "deploy.bluegreen": "; it runs on the single host of the inventory",
}

_CORE: contextvars.ContextVar[CoreFlags] = contextvars.ContextVar("core", default=CoreFlags())


@contextmanager
def session(dry_run: bool = False, *, need_secrets: bool = True, action: str | None = None,
            audited: bool = False, hooked: bool = False, version: str | None = None,
            hosts: Sequence[str] = (), args: Mapping[str, Any] | None = None
            ) -> Iterator[_session.Session]:
    """Inventory and secrets validated before any connection is made.

    ``audited``: the task (``action``) changes hosts and appends an audit record on every
    host when it ends, unless it was refused (bad input, lock busy: nothing changed) or a
    dry run; ``args`` are its flags for that record. ``hooked``: the inventory's hooks run
    around it (``version`` and ``hosts`` for their environment; see `hooks`)."""
    inventory = _inventory.load_inventory()
    core = _CORE.get()
    if core.connect_timeout:  # -t/--connect-timeout: instead of ssh.connect_timeout
        inventory = dataclasses.replace(inventory, ssh=dataclasses.replace(
            inventory.ssh, connect_timeout=float(core.connect_timeout)))
    secrets = _secrets.load_secrets(inventory) if need_secrets else _secrets.Secrets({})
    json_path = os.environ.get(JSON_LOG_ENV) or None
    reporter = _output.Reporter(json_path=json_path)
    faults = fault_injection(os.environ.get(FAULT_ENV, ""))
    executor = _executor.Executor(
        inventory, dry_run=dry_run, reporter=reporter, secrets=secrets,
        trace=bool(json_path and os.environ.get(TRACE_ENV)), faults=faults, echo=core.echo)
    s = _session.Session(inventory, secrets, executor, reporter, confirm=confirm)
    hook_run = _hooks.HookRun(s, action or "", version, hosts) if hooked else None
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


def _task_ended(s: _session.Session, audit_action: str | None,
                hook_run: _hooks.HookRun | None,
                args: Mapping[str, Any] | None, started: float,
                exc: BaseException | None) -> None:
    """The audit record of a task that changes hosts, then the after/failure hooks."""
    if exc is None:
        result, code = "ok", EXIT_OK
    elif interruption(exc) is not None:  # Ctrl-C / SIGTERM, itself or as a failure's cause
        result, code = "interrupted", exit_code_for(exc)
    else:
        code = exit_code_for(exc)
        result = "refused" if code in (EXIT_BAD_INPUT, EXIT_LOCK_BUSY) else "failed"
    if audit_action and not s.dry_run and result != "refused":
        text = result if exc is None else f"{result}: {s.reporter.masker(first_line(exc))}"
        changed = {h: t.changed for h, t in s.reporter.tally().items()}
        entry = _audit.task_entry(audit_action, s.inventory.environment, result=text,
                                  seconds=time.monotonic() - started, changed=changed,
                                  args=args or {})
        try:
            _audit.write(s.executor, _audit.entry_hosts(s.inventory, changed, exc is None),
                         entry)
        except DeployError as werr:
            s.reporter.error(s.inventory.environment,
                             f"audit record not written everywhere: {first_line(werr)}")
    if hook_run is not None:
        hook_run.after(result=result, exit_code=code, error=exc)


def use_json_log(path: str | None) -> None:
    """``--json-log FILE`` of the rollout tasks: the same as RELEASY_JSON_LOG=FILE."""
    if path:
        os.environ[JSON_LOG_ENV] = os.path.abspath(os.path.expanduser(path))


def fault_injection(value: str) -> _executor.FaultInjection | None:
    """``RELEASY_FAULT``: ``N`` (the N-th host-changing command fails) or ``N:drop`` (the
    host's SSH connection drops there); anything else: no injection."""
    at, _, mode = value.partition(":")
    if not at.isdigit() or mode not in ("", "drop"):
        return None
    return _executor.FaultInjection(int(at), drop=mode == "drop")


def _log_executor_facts(path: str, executor: _executor.Executor) -> None:
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
    stopped = interruption(exc)
    if stopped is not None:
        return EXIT_TERMINATED if isinstance(stopped, Terminated) else EXIT_INTERRUPTED
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


def operator_task(fn: Callable | None = None, *, hosts: str | None = None,
                  dry: str | None = None) -> Callable:
    """Wrap a task body: expected failures become `Exit(message, code)`, never a traceback;
    fab's core flags are honoured or refused (exit 2) before anything is touched.

    ``hosts``: the task's parameter that fab's -H/--hosts fills (a comma-separated list of
    inventory host names, as the parameter itself takes); None: -H is refused. ``dry``:
    the parameter -R/--dry sets (``"dry_run"``), `READ_ONLY`, or None: -R is refused."""
    if fn is None:
        return functools.partial(operator_task, hosts=hosts, dry=dry)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _sigterm_raises():
            return _run(fn, args, kwargs, hosts=hosts, dry=dry)

    return wrapper


def _task_name(fn: Callable) -> str:
    """The task's name as fab lists it (`fabfile/__init__.py` builds the namespace)."""
    module = fn.__module__.rsplit(".", 1)[-1]
    name = fn.__name__.replace("_", "-")
    if module in ("site", "status", "adhoc"):
        return name
    namespace = {"bluegreen": "deploy"}.get(module, module)
    return f"{namespace}.{'backups' if name == 'list-backups' else name}"


def _apply_core_flags(fn: Callable, c: Any, kwargs: dict[str, Any], *, hosts: str | None,
                      dry: str | None) -> dict[str, Any]:
    """The task's keyword arguments with -H and -R applied; BadInput when a core flag
    cannot be honoured."""
    task = _task_name(fn)
    if isinstance(getattr(c, "host", None), str):
        # A Fabric Connection: Fabric's own executor expanded -H into one run per host.
        raise BadInput(f"-H/--hosts: fab ran `{task}` once per host (fabric.yaml's executor"
                       f" was not loaded); run fab from the project directory")
    flags = core_flags(c.config)
    problems = core_flag_refusals(flags, task, hosts=hosts, dry=dry)
    if problems:
        raise BadInput("; ".join(problems) + ". Nothing was changed.")
    kwargs = dict(kwargs)
    if flags.hosts and hosts is not None:
        given = kwargs.get(hosts)
        wanted = ",".join(flags.hosts)
        if given and given != wanted:
            raise BadInput(f"-H {wanted} and --{hosts} {given} disagree: give the hosts once."
                           f" Nothing was changed.")
        kwargs[hosts] = wanted
    if flags.dry and dry not in (None, READ_ONLY):
        kwargs[dry] = True
    return kwargs


def _terminate(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread (a KeyboardInterrupt), so a task
    ends what it started on the hosts exactly as on Ctrl-C; exit code 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(fn: Callable, args: tuple, kwargs: dict[str, Any], *, hosts: str | None,
         dry: str | None):
    """The core flags applied, then the task body; expected failures become
    `Exit(message, code)`."""
    token = None
    try:
        if args:
            kwargs = _apply_core_flags(fn, args[0], kwargs, hosts=hosts, dry=dry)
            token = _CORE.set(core_flags(args[0].config))
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
    except Terminated:
        raise Exit("terminated (SIGTERM)", code=EXIT_TERMINATED) from None
    except KeyboardInterrupt:
        raise Exit("interrupted", code=EXIT_INTERRUPTED) from None
    finally:
        if token is not None:
            _CORE.reset(token)
