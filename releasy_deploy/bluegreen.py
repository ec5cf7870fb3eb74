"""Blue/green deploy on a single host: ``fab deploy.bluegreen --version V``.

Two instances of the template unit ``releasy@PORT.service`` alternate between the two ports
of ``app.bluegreen_ports`` (default 8080/8081); exactly one is live, i.e. the one port the
proxy's upstream file lists. A deploy:

1. preflight: verify the artifact locally, take the deploy lock (the same lock as every
   rollout), read the host's state in ONE round trip and decide which instance is live;
2. stage: upload and unpack V (`tiers.app.stage_release`), not activated;
   backup: dump the database (`backups.create`, when ``database.backup_before_deploy``,
   the default) before V can migrate it, as a rolling deploy does;
3. start: point ``/opt/releasy/instances/IDLE`` at V, write ``instance-IDLE.env``
   (RELEASY_BIND_ADDR=127.0.0.1:IDLE) and start ``releasy@IDLE``: it migrates, then binds.
   Wait for ``/ready`` (`tiers.app.wait_ready`), then for `WARMUP_SUCCESSES` answers in a
   row (warm-up);
4. switch: the proxy's upstream becomes 127.0.0.1:IDLE (`tiers.proxy.set_upstreams`:
   ``nginx -t`` then reload), then wait until the nginx workers from before the reload
   finished their in-flight requests to the old instance (upstream does not drain on
   SIGTERM, so stopping it earlier would cut them);
5. finish: enable the new instance at boot; stop and disable the old one; point
   ``/opt/releasy/current`` at V (so ``app.setup`` and status see the live release); record
   the migration level each release ran against (`releasy_deploy.schema`, what
   ``deploy.rollback`` judges from); write the audit record (the rolling deploy's fields).

A release older than the database's migrations (known from its recorded level or a dump)
is refused in preflight: its binary would not start (sqlx VersionMissing).

Failure before the switch (stage, start, warm-up, a refused nginx configuration) stops and
removes the idle instance and leaves the live one, and the proxy, untouched: no request is
lost. Failure after the switch is not rolled back (the new instance is live and was ready);
re-running the same command converges (see below).

Hand-over from the plain unit. ``fab app.setup`` runs ``releasy.service`` on
``app.bind_port`` (one of the two ports). The first blue/green deploy treats it as the live
instance: V starts as ``releasy@OTHER``, the proxy switches to it, then ``releasy.service``
is stopped AND disabled, so a reboot brings up only the live instance. From then on the two
``releasy@`` instances alternate. `current` always follows the live version.

Converging. Every run decides from the host's state, never from memory: a unit of ours
running on the idle port (a killed deploy's leftover, or ``releasy.service`` started again
by ``app.setup``) is stopped before the idle instance starts; when V is already live the
run only converges the finish step (live instance enabled, every other unit stopped, after
in-flight requests drained, and disabled, `current`), which is a no-op the second time.
Anything else listening on the idle port is refused before anything changes.

``app.setup`` after a hand-over: today it sees ``releasy.service`` disabled and inactive,
so it enables and starts it again on ``app.bind_port`` (a second process out of rotation,
or a crash loop when the live instance holds that port). Blue/green reports that as a
conflict, with what it found, and stops and disables ``releasy.service`` on its next run.

The deploy is a plan (`engine.bluegreen.plan_bluegreen`: typed steps, each with what
undoing it means) run by the one sequence runner (`engine.sequence.run_sequence`); this
module holds the steps' actions and the failure paragraphs; the state it decides from is
`bluegreen_state`, its scripts `commands.bluegreen`. ``--dry-run`` prints the same plan.

Only the single-host topology: there the app binds loopback, the proxy is local and the
firewall needs no rule for either port. Split topologies use ``deploy.rolling``.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

from . import audit, schema
from . import backups as backups_mod
from .bluegreen_state import (LOOPBACK, PLAIN_UNIT, HostState, Listening, Live,
                              NotBlueGreenReady, UnitState, fact_names, find_live, parse_state,
                              read_state, version_of_link)
from .commands import nginx as nginxcmd
from .commands.bluegreen import (WARMUP_SUCCESSES, cleanup_script, finish_script,
                                 instance_bind, instance_env_file, instance_link,
                                 instance_unit, render_instance_env, warmup_argv)
from .engine.bluegreen import (FLOW, Plan, before_switch_paragraph, finish_commands,
                               finish_paragraph, indent, plan_bluegreen, plan_deploy,
                               schema_refusal, start_script, switch_paragraph)
from .engine.sequence import Failure, Kept, Step, run_sequence
from .errors import BadInput, DeployError, StepFailed
from .executor import HostConnection, tail
from .lock import LockInfo, deploy_lock
from .pipeline import Pipeline
from .releases import LocalRelease, fetch_release
from .rollout import ready_timeout_of
from .session import Session
from .tiers import app as app_tier
from .tiers import proxy as proxy_tier

__all__ = [
    "STAGES", "PLAIN_UNIT", "WARMUP_SUCCESSES", "DRAIN_TIMEOUT_S", "UnitState", "HostState",
    "Live", "Plan", "Outcome", "NotBlueGreenReady", "instance_unit", "instance_link",
    "instance_env_file", "instance_bind", "render_instance_env", "version_of_link",
    "fact_names", "parse_state", "find_live", "plan_deploy", "schema_refusal", "start_script",
    "finish_commands", "finish_script", "cleanup_script", "warmup_argv", "read_state", "run",
    "Listening", "plan_bluegreen", "Flow", "Cleanup",
]

PIPELINE = FLOW
STAGES = ("preflight", "stage", "backup", "start", "switch", "finish", "failed")
#: longest wait for in-flight requests of the old instance (nginx's proxy_read_timeout).
DRAIN_TIMEOUT_S = nginxcmd.DRAIN_TIMEOUT_S
AUDIT_ACTION = FLOW


@dataclass
class Outcome:
    """What happened, for the task's last line and for tests."""

    host: str
    from_version: str | None
    to_version: str
    result: str  # "deployed" or "already live" (what a dry run found it would be)
    live_unit: str
    live_port: int
    dry_run: bool = False
    seconds: float = 0.0


def _run_checked(c: HostConnection, script: str, label: str, *, hint: str) -> None:
    res = c.run_script(script, sudo=True, check=False, label=label)
    if res.ok or res.dry_run:
        return
    said = c.mask(res.stderr.strip() or res.stdout.strip()) or "(no output)"
    raise DeployError(f"{c.name}: {label} failed (exit code {res.exit_code}):\n"
                      f"{indent(tail(said))}\n  {hint}", host=c.name)


def _start_idle(c: HostConnection, state: HostState, plan: Plan, timeout: float) -> None:
    unit, bind = plan.new_unit, instance_bind(plan.idle_port)
    stopping = f" (stopping {', '.join(plan.stop_first)} first)" if plan.stop_first else ""
    if c.dry_run:
        c.reporter.would(c.name, f"start {unit} with {plan.version} on {bind}{stopping}, wait"
                                 f" for /ready and {WARMUP_SUCCESSES} answers in a row")
        return
    _run_checked(c, start_script(state, plan), f"start {unit} with {plan.version}",
                 hint=f"see `journalctl -u {unit}` on {c.name}")
    c.reporter.changed(c.name, f"{unit} started with {plan.version} on {bind}{stopping}")
    started = time.monotonic()
    waited = app_tier.wait_ready(c, bind, timeout, unit=unit)  # migrations run before this
    left = max(1, int(timeout - (time.monotonic() - started)))
    res = c.run(warmup_argv(bind, unit, timeout=left), mutates=False, check=False,
                timeout=left + 30)
    said = c.mask(res.stdout.strip() or res.stderr.strip())
    if not res.ok:
        raise DeployError(
            f"{c.name}: {unit} answered /ready once but did not stay ready: {said}\n"
            f"  Last lines of `journalctl -u {unit}`:\n"
            f"{indent(app_tier.journal_tail(c, unit))}", host=c.name)
    c.reporter.info(c.name, f"{unit} ready at http://{bind}/ready after {waited:.1f} s; {said}")


def _drain(session: Session, host: str, old: str) -> None:
    """Wait until the nginx workers from before the last reload finished their in-flight
    requests (to ``old``, the instance about to stop), on every proxy host."""
    if session.dry_run:
        session.reporter.would(host, f"wait for in-flight requests to {old} to finish")
        return

    def drain(conn: HostConnection) -> bool:
        started = time.monotonic()
        gone = proxy_tier.wait_old_workers_gone(conn, DRAIN_TIMEOUT_S)
        if gone:
            conn.reporter.info(conn.name, f"in-flight requests to {old} finished"
                                          f" ({time.monotonic() - started:.1f} s)")
        else:  # reported by wait_old_workers_gone with the pids
            conn.reporter.info(conn.name, f"stopping the old instance anyway: requests running"
                                          f" longer than {DRAIN_TIMEOUT_S:g} s may be cut")
        return gone

    session.executor.each(session.inventory.hosts_in("proxy"), drain)


def _switch(session: Session, host: str, plan: Plan) -> None:
    """Point every proxy at the new instance (nginx -t, reload), then drain the old one."""
    proxy_tier.set_upstreams(session, [(LOOPBACK, plan.idle_port)])
    _drain(session, host, instance_bind(plan.live.port))


def _finish(c: HostConnection, state: HostState, plan: Plan, *,
            level_now: int | None = None) -> bool:
    """Converge the end state in one round trip; True if anything visible changed."""
    steps = finish_commands(state, plan, level_now=level_now)
    if steps and not c.dry_run:
        _run_checked(c, finish_script(steps),
                     f"enable {plan.target_unit}, stop the other instances",
                     hint=f"check `systemctl status 'releasy*'` on {c.name}, then re-run the"
                          f" same command: it converges")
    shown = [what for what, _argv in steps if what]
    for what in shown:
        if c.dry_run:
            c.reporter.would(c.name, f"change: {what}")
        else:
            c.reporter.changed(c.name, what)
    if not shown:
        version = plan.version if plan.start else plan.live.version
        c.reporter.unchanged(c.name, f"{plan.target_unit} live on"
                                     f" {instance_bind(plan.target_port)} and enabled, no other"
                                     f" instance running, current -> releases/{version}")
    return bool(shown)


def _switched(session: Session, plan: Plan) -> bool | None:
    """After a failure in the switch stage: does a proxy already use the new port?
    None when that cannot be told (the new instance is then left running: safer)."""
    try:
        found = session.executor.each(session.inventory.hosts_in("proxy"),
                                      proxy_tier.current_upstreams)
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        return None
    return any((LOOPBACK, plan.idle_port) in servers for servers in found.values())


def _cleanup_idle(c: HostConnection, plan: Plan) -> bool | None:
    """True: stopped and unlinked; False: the script failed; None: could not run it."""
    try:
        res = c.run_script(cleanup_script(plan.idle_port), sudo=True, check=False,
                           label=f"stop {plan.new_unit}, remove its link")
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        return None
    return res.ok


def _audit(session: Session, host: Any, plan: Plan, result: str, *, started: float,
           changed: bool, backup: Any = None, **fields: object) -> None:
    """Append the audit record on the host (the rolling deploy's fields, plus which units
    and ports); a failure to do so is reported, not raised: it must not hide the deploy's
    own outcome."""
    entry = audit.record(AUDIT_ACTION, session.inventory.environment, to=plan.version,
                         result=result, from_versions={host.name: plan.live.version},
                         hosts_changed=[host.name] if changed else [],
                         backup=backup.name if backup is not None else None,
                         seconds=round(time.monotonic() - started, 1),
                         from_unit=plan.live.unit, from_port=plan.live.port, **fields)
    session.outcome.update(entry)
    try:
        audit.write(session.executor, [host], entry)
    except Exception as exc:  # noqa: BLE001
        session.reporter.error(host.name, f"could not write the audit record: {exc}")


@dataclass(frozen=True)
class Cleanup:
    """What undoing the start did: ``cleaned`` as `_cleanup_idle` says; ``level``: the
    database's migration level afterwards (None: unread)."""

    cleaned: bool | None
    level: int | None = None


class Flow:
    """The blue/green steps' actions (step kind -> callable, `actions`) and the failure
    hook (`on_failure`) that turns the runner's `Failure` into the audit record and the
    one failure paragraph."""

    def __init__(self, session: Session, c: HostConnection, state: HostState, plan: Plan, *,
                 release: LocalRelease | None = None, timeout: float = 0,
                 started: float = 0.0, record: Callable[..., None] | None = None) -> None:
        """``record(result, changed=, **fields)``: where the audit record goes (default:
        appended on the host, `_audit`)."""
        self.s, self.c, self.state, self.plan = session, c, state, plan
        self.host = session.inventory.hosts_in("app")[0]
        self.release, self.timeout, self.started = release, timeout, started
        self.record = record or self._append_audit
        self.dump: Any = None  # the backup step's dump
        self.level_now: int | None = None  # the database's level after the start

    def actions(self) -> dict[str, Any]:
        return {"stage": self.stage, "backup": self.backup, "start": self.start,
                "switch": self.switch, "finish": self.finish, "converge": self.converge,
                "stop_idle": self.stop_idle, "check_switch": self.check_switch}

    def _append_audit(self, result: str, *, changed: bool, **fields: Any) -> None:
        _audit(self.s, self.host, self.plan, result, started=self.started, changed=changed,
               **fields)

    # ------------------------------------------------------------------ the steps
    def stage(self, _step: Step) -> None:
        app_tier.stage_release(self.c, self.release)

    def backup(self, _step: Step) -> Any:
        self.dump = backups_mod.create(self.s, from_version=self.plan.live.version,
                                       to_version=self.plan.version,
                                       level=self.state.db_level, existing=self.state.backups)
        return self.dump

    def start(self, _step: Step) -> int | None:
        _start_idle(self.c, self.state, self.plan, self.timeout)
        self.level_now = None if self.s.dry_run else schema.read_level(self.s)
        return self.level_now

    def switch(self, _step: Step) -> None:
        _switch(self.s, self.host.name, self.plan)

    def finish(self, _step: Step) -> None:
        _finish(self.c, self.state, self.plan, level_now=self.level_now)
        self.record("ok", changed=True, backup=self.dump, live_unit=self.plan.new_unit,
                    live_port=self.plan.idle_port, schema_level=self.level_now)

    def converge(self, _step: Step) -> bool:
        """The live version again: only the finish step, converged."""
        plan, state = self.plan, self.state
        stops = [argv[2] for _what, argv in finish_commands(state, plan)
                 if argv[:2] == ["systemctl", "stop"]]
        if stops:  # e.g. a deploy killed after its switch left the old one running
            _drain(self.s, self.host.name, ", ".join(stops))
        changed = _finish(self.c, state, plan)
        self.record("already live" + (", converged" if changed else ""), changed=changed,
                    live_unit=plan.target_unit, live_port=plan.target_port,
                    schema_level=state.db_level)
        return changed

    # ------------------------------------------------------------------ the undo
    def stop_idle(self, _step: Step) -> Cleanup:
        """Undo of the start: stop the idle instance (never in rotation), remove its link."""
        if self.s.dry_run:
            return Cleanup(True)
        cleaned = _cleanup_idle(self.c, self.plan)
        try:
            level = schema.read_level(self.s)
        except Exception:  # noqa: BLE001 - the explanation says less then
            level = None
        return Cleanup(cleaned, level)

    def check_switch(self, _step: Step) -> str | Kept:
        """Undo of a failed switch: nothing while no proxy uses the new port (the start's
        undo then stops the idle instance); once one does, or when that cannot be told,
        the new instance stays (`Kept`): stopping it could cut the site."""
        switched = _switched(self.s, self.plan)
        if switched is False:
            return f"no proxy uses {instance_bind(self.plan.idle_port)}"
        return Kept(f"{self.plan.new_unit} {'is' if switched else 'may be'} live",
                    found=switched)

    # ------------------------------------------------------------------ a failure
    def on_failure(self, f: Failure) -> BaseException | None:
        """The audit record, the error line and the paragraph, from the `Failure`; None
        re-raises the original error (bad input keeps its exit code, Ctrl-C stays an
        interrupt)."""
        exc, kind, stage = f.cause, f.step.kind, f.step.stage
        plan, name, version = self.plan, self.host.name, self.plan.version
        backup = f.done.get("backup")
        if kind == "converge":
            return None  # nothing was started or switched: the error as it is
        if kind == "finish":
            if not isinstance(exc, DeployError):
                return None
            self.s.reporter.error(name, f"{version} is live, but finishing failed (details"
                                        f" below)")
            self.record("switched, then finish failed", changed=True, backup=backup,
                        live_unit=plan.new_unit, live_port=plan.idle_port,
                        schema_level=self.level_now)
            return StepFailed(finish_paragraph(name, plan, exc), host=name, cause=exc)
        kept = f.kept
        if kept is not None:
            switched = kept.found
            self.record("failed in switch" + ("" if switched else " (switch state unknown)"),
                        changed=True, backup=backup,
                        live_unit=plan.new_unit if switched else None)
            self.s.reporter.error(name, f"deploy.bluegreen of {version} failed during the"
                                        f" switch (details below)")
            if not isinstance(exc, Exception):
                return None
            return StepFailed(switch_paragraph(name, plan, exc, switched=switched),
                              host=name, cause=exc)
        undone = f.undo_result("stop_idle")
        cleanup = (Cleanup(True) if undone is None else undone.result
                   if isinstance(undone.result, Cleanup) else Cleanup(None))
        self.record(f"failed in {stage}, before the switch", changed=undone is not None,
                    backup=backup, live_unit=plan.live.unit, live_port=plan.live.port,
                    schema_level=cleanup.level)
        self.s.reporter.error(name, f"deploy.bluegreen of {version} failed in stage"
                                    f" '{stage}', before the switch (details below)")
        if isinstance(exc, BadInput) or not isinstance(exc, Exception):
            return None
        return StepFailed(before_switch_paragraph(
            name, stage, plan, exc, cleaned=cleanup.cleaned,
            level_before=self.state.db_level, level_now=cleanup.level, backup=backup),
            host=name, cause=exc)


def run(session: Session, version: str | None, *, wait: float = 0, yes: bool = False,
        ready_timeout: Any = None, lock: LockInfo | None = None) -> Outcome:
    """Blue/green deploy of ``version`` on the single app host (see the module docstring).

    ``version`` None: the live release, restarted through the same switch (a fresh instance
    picks up a changed env file or unit; `fab site` / `fab app.setup` on a single host that
    serves). ``lock``: the deploy lock the caller already holds (else it is taken here).
    Raises BadInput (exit 2, nothing touched) for a split topology, a bad artifact or a
    release older than the database's migrations; LockBusy (exit 3) when another deploy
    holds the lock; DeployError otherwise.
    """
    inv = session.inventory
    started = time.monotonic()
    if not inv.is_single_host:
        raise BadInput(
            f"deploy.bluegreen runs two instances side by side on one host; {inv.path} has"
            f" {len(inv.hosts)} hosts ({inv.topology} topology): use `fab deploy.rolling"
            f" --version {version}` there")
    timeout = ready_timeout_of(inv, ready_timeout)
    restart = version is None
    # BadInput before any host is contacted (a restart stages nothing).
    release = None if version is None else fetch_release(inv, version)
    host = inv.hosts_in("app")[0]
    c = session.executor.conn(host)
    reporter = session.reporter
    pipe = Pipeline(PIPELINE, reporter)

    with ExitStack() as stack:
        with pipe.stage("preflight", host.name, f"{version or 'restart'}: lock, live instance"):
            held = lock if lock is not None else stack.enter_context(
                deploy_lock(session, version=version, wait=wait))
            state = read_state(c, inv)
            if version is None:
                version = find_live(state).version or state.releases.current
                if version is None:
                    raise DeployError(f"{host.name}: no live release to restart", host=host.name)
            plan = plan_deploy(state, version, restart=restart)
            reporter.info(host.name, f"live: {plan.live.describe()}")
            if plan.live.unit is not None and not plan.live.ready:
                reporter.info(host.name, "the live instance does not answer /ready: deploying"
                                         " anyway (the new one must be ready before the switch)")
            for note in plan.notes:
                reporter.info(host.name, note)
            if state.db_level is None:
                raise DeployError(f"{host.name}: cannot read the database's migration level"
                                  f" (_sqlx_migrations in {inv.database.name}): is the database"
                                  f" up? `fab db.setup` checks it", host=host.name)
            refusal = schema_refusal(state, version) if plan.start and not restart else None
            if refusal:
                raise BadInput(refusal)
            steps = plan_bluegreen(
                state, plan, stage=release is not None,
                backup=inv.database.backup_before_deploy and not restart,  # restart: no migration
                proxies=[h.name for h in inv.hosts_in("proxy")])
            for line in steps.describe():
                reporter.info(host.name, f"plan: {line}")

        if plan.start and not session.dry_run:
            session.confirm(f"Blue/green deploy of {inv.environment} to {version} on"
                            f" {host.name}: start {plan.new_unit} beside"
                            f" {plan.live.describe()}, switch the proxy to it, stop the old"
                            f" one. Go?", yes=yes)
        flow = Flow(session, c, state, plan, release=release, timeout=timeout, started=started)
        run_sequence(steps, flow.actions(), pipe=pipe, lock=held, on_failure=flow.on_failure)
    return Outcome(host.name, plan.live.version, version,
                   "deployed" if plan.start else "already live", plan.target_unit,
                   plan.target_port, session.dry_run, time.monotonic() - started)
