"""Hooks: the inventory's ``hooks:`` commands, run with ``sh -c`` on the operator machine
around rollouts (deploy.rolling, deploy.rollback, deploy.bluegreen), restarts
(app.restart) and restores (db.restore).

- ``before_deploy`` runs first, before any host is contacted (the lock included); a
  command that fails or times out stops the task: BadInput (exit 2), nothing touched.
- ``after_deploy`` runs once the task succeeded, ``on_failure`` once it failed (or was
  refused, or interrupted); their own failures are reported and never change the result.

The environment of a hook is built from scratch, never copied from ours (which can hold
RELEASY_ADMIN_API_KEY and the other secrets): a usable PATH/HOME/locale, the RELEASY_*
variables below, and the variables the inventory names in ``hooks.pass_env`` (e.g. a chat
webhook's URL). Each command is bounded by ``hooks.timeout``; on expiry its whole process
group is killed. A dry run runs no hook.

    RELEASY_HOOK          before_deploy | after_deploy | on_failure
    RELEASY_ACTION        the task: deploy.rolling, deploy.rollback, deploy.bluegreen,
                          app.restart, db.restore
    RELEASY_ENVIRONMENT   the inventory's environment
    RELEASY_INVENTORY     the inventory file
    RELEASY_OPERATOR      user@machine running the task
    RELEASY_VERSION       the target release (when the task has one)
    RELEASY_FROM_VERSIONS after the task: what each app host ran before (app1=1.0.0 ...)
    RELEASY_HOSTS         the hosts the task acts on (space-separated)
    RELEASY_HOSTS_CHANGED after the task: the hosts it changed
    RELEASY_RESULT        after the task: ok | failed | refused | interrupted
    RELEASY_EXIT_CODE     after the task: the task's exit code
    RELEASY_ERROR         on_failure: the first line of the error (secrets masked)
    RELEASY_DURATION      after the task: seconds since it started (e.g. 12.4)
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .audit import operator_identity
from .errors import BadInput, first_line

HOOKED_ACTIONS = ("deploy.rolling", "deploy.rollback", "deploy.bluegreen", "app.restart",
                  "db.restore")
# Variables a shell script needs to work at all; nothing else of ours is passed.
_BASE_VARS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_OUTPUT_LINES = 20  # of a hook's output, shown in the task's output


@dataclass(frozen=True)
class HookResult:
    command: str
    code: int | None  # None: timed out (killed)
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self, timeout: int) -> str:
        if self.code is None:
            return f"timed out after {timeout} s (killed)"
        if self.code < 0:
            return f"killed by signal {-self.code}"
        return f"exited {self.code}"


def hook_env(*, kind: str, action: str, environment: str, inventory: str,
             hosts: Sequence[str], version: str | None = None,
             outcome: Mapping[str, Any] | None = None, result: str | None = None,
             exit_code: int | None = None, error: str | None = None,
             duration: float | None = None, pass_env: Sequence[str] = (),
             environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The whole environment of a hook command (pure; see the module docstring)."""
    env = {k: environ[k] for k in _BASE_VARS if k in environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.update({k: environ[k] for k in pass_env if k in environ})
    outcome = outcome or {}
    version = outcome.get("to") or version
    env.update({
        "RELEASY_HOOK": kind,
        "RELEASY_ACTION": action,
        "RELEASY_ENVIRONMENT": environment,
        "RELEASY_INVENTORY": inventory,
        "RELEASY_OPERATOR": operator_identity(),
        "RELEASY_HOSTS": " ".join(hosts),
    })
    if version:
        env["RELEASY_VERSION"] = str(version)
    froms = outcome.get("from_versions")
    if isinstance(froms, Mapping):
        env["RELEASY_FROM_VERSIONS"] = " ".join(f"{h}={v or '-'}" for h, v in froms.items())
    elif outcome.get("from"):
        env["RELEASY_FROM_VERSIONS"] = str(outcome["from"])
    if result is not None:
        env["RELEASY_RESULT"] = result
    if exit_code is not None:
        env["RELEASY_EXIT_CODE"] = str(exit_code)
    if error:
        env["RELEASY_ERROR"] = error
    if duration is not None:
        env["RELEASY_DURATION"] = f"{duration:.1f}"
    if "hosts_changed" in outcome:
        env["RELEASY_HOSTS_CHANGED"] = " ".join(outcome["hosts_changed"])
    return env


def run_command(command: str, env: Mapping[str, str], timeout: int,
                cwd: str | None = None) -> HookResult:
    """``sh -c COMMAND`` in its own process group, stdin closed, output captured;
    the group is killed when ``timeout`` expires."""
    started = time.monotonic()
    proc = subprocess.Popen(["sh", "-c", command], env=dict(env), cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        code = None
    return HookResult(command, code, out.decode("utf-8", "replace"),
                      time.monotonic() - started)


@dataclass
class HookRun:
    """The hooks of one task run: ``before()`` first, then ``after(...)`` exactly once."""

    session: Any
    action: str
    version: str | None = None
    hosts: Sequence[str] = ()
    started: float = field(default_factory=time.monotonic)

    @property
    def _hooks(self):
        return self.session.inventory.hooks

    def _targets(self) -> list[str]:
        """The hosts the task acts on: those given, else the app hosts (and the db host for
        a restore)."""
        if self.hosts:
            return list(self.hosts)
        inv = self.session.inventory
        names = [h.name for h in inv.hosts_in("app")]
        if self.action == "db.restore":
            names = [inv.db_host.name, *(n for n in names if n != inv.db_host.name)]
        return names

    def _env(self, kind: str, **extra: Any) -> dict[str, str]:
        inv = self.session.inventory
        return hook_env(kind=kind, action=self.action, environment=inv.environment,
                        inventory=str(inv.path), hosts=self._targets(), version=self.version,
                        pass_env=self._hooks.pass_env, **extra)

    def _run(self, kind: str, env: Mapping[str, str]) -> list[HookResult]:
        r = self.session.reporter
        label = f"hook {kind}"
        results = []
        for command in self._hooks.commands(kind):
            res = run_command(command, env, self._hooks.timeout,
                              cwd=str(self.session.inventory.path.parent))
            results.append(res)
            for line in res.output.splitlines()[-_OUTPUT_LINES:]:
                r.info(label, f"| {line}")
            if res.ok:
                r.info(label, f"`{command}` ok ({res.seconds:.1f} s)")
            else:
                r.error(label, f"`{command}` {res.describe(self._hooks.timeout)}")
                if kind == "before_deploy":
                    break  # the task stops: the rest would announce a deploy that never runs
        return results

    def before(self) -> None:
        if not self._hooks.commands("before_deploy"):
            return
        if self.session.dry_run:
            self.session.reporter.info("hooks", "dry run: the hooks are not run")
            return
        for res in self._run("before_deploy", self._env("before_deploy")):
            if not res.ok:
                last = (res.output.strip().splitlines() or [""])[-1]
                raise BadInput(
                    f"the before_deploy hook `{res.command}`"
                    f" {res.describe(self._hooks.timeout)}"
                    + (f" ({last})" if last else "")
                    + f"; {self.action} did not start and no host was contacted. Fix the"
                      f" hook (hooks.before_deploy in {self.session.inventory.path}) or the"
                      f" condition it checks, then run it again.")

    def after(self, *, result: str, exit_code: int,
              error: BaseException | None = None) -> None:
        """after_deploy (result ok) or on_failure; their failures are only reported."""
        if self.session.dry_run:
            return
        kind = "after_deploy" if result == "ok" else "on_failure"
        if not self._hooks.commands(kind):
            return
        tally = self.session.reporter.tally()
        outcome = dict(getattr(self.session, "outcome", {}) or {})
        outcome.setdefault("hosts_changed", [h for h, t in tally.items()
                                             if t.changed and h in self._host_names()])
        message = None
        if error is not None:
            message = self.session.reporter.masker(first_line(error))
        env = self._env(kind, outcome=outcome, result=result, exit_code=exit_code,
                        error=message, duration=time.monotonic() - self.started)
        try:
            self._run(kind, env)
        except OSError as exc:  # sh missing, cwd gone...: reported, result unchanged
            self.session.reporter.error(f"hook {kind}", f"could not run: {exc}")

    def _host_names(self) -> set[str]:
        return {h.name for h in self.session.inventory.hosts}
