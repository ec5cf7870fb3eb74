"""The one runner of every rolling flow (deploy, rollback, restart).

It executes a `plan.RollingPlan` stage by stage: stage the release, dump the database,
then each batch — lock check, drain (one nginx reload that also re-adds the previous
batch), the plan's host steps on every host of the batch in parallel, re-add — then the
finish. Progress lines and JSON events come from the stages (`pipeline.Pipeline`). When a
batch fails, `recovery.plan_recovery` decides what to put back, the runner does it, writes
the audit record and raises `RolloutFailed` with the one failure paragraph.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import audit, interrupts, schema
from .. import backups as backups_mod
from ..backups import Backup
from ..commands import app as appcmd
from ..commands import nginx as nginxcmd
from ..errors import DeployError, ParallelError, StepFailed
from ..executor import HostConnection
from ..fleet import FleetRecord, fleet_release, next_record, write_record
from ..lock import LockInfo
from ..pipeline import Pipeline
from ..releases import LocalRelease
from ..session import Session
from ..tiers import app_facts
from ..tiers import app as app_tier
from ..tiers import proxy as proxy_tier
from .plan import UNIT, AppState, Batch, RollingPlan
from .steps import (JOURNAL_LINES, disk_needed, parse_version_probe, recent_journal_argv,
                    releases_to_prune, server_of, unpacked_size, version_probe_argv)
from .recovery import FailureReport, explain_failure, first_line, names, plan_recovery

__all__ = ["RolloutFailed", "Preflight", "RollingRunner", "DRAIN_TIMEOUT_S", "JOURNAL_LINES",
           "recent_journal_argv", "version_probe_argv", "parse_version_probe", "disk_needed",
           "releases_to_prune", "server_of"]

DRAIN_TIMEOUT_S = nginxcmd.DRAIN_TIMEOUT_S
_MIGRATION_FAILED = re.compile(r"migration[^\n]*fail|fail[^\n]*migration", re.IGNORECASE)


class RolloutFailed(StepFailed):
    """A rollout stopped; the message is the explanation paragraph (exit code 1, or 4
    when the cause was an unreachable host)."""


@dataclass
class Preflight:
    apps: dict[str, AppState]  # inventory order; reachable app hosts only
    upstreams: dict[str, list[tuple[str, int]]]  # proxy host -> servers it lists
    db_level: int
    backups: list[Backup]
    #: app hosts that could not be reached (--skip-unreachable): host -> why
    unreachable: dict[str, str] = field(default_factory=dict)
    fleet: FleetRecord | None = None  # what the last rollout recorded on the db host


class _HostsFailed(Exception):
    """Some hosts of a batch failed in the parallel part (their host steps)."""

    def __init__(self, failures: Mapping[str, BaseException], results: Iterable[str]) -> None:
        super().__init__("; ".join(f"{h}: {first_line(e, h)}" for h, e in failures.items()))
        self.failures = dict(failures)
        self.succeeded = list(results)


# ------------------------------------------------------------------------------ the runner
class RollingRunner:
    """Executes one `RollingPlan` under a held deploy lock."""

    def __init__(self, session: Session, pipe: Pipeline, lock: LockInfo, pre: Preflight,
                 plan: RollingPlan, *, release: LocalRelease | None,
                 ready_timeout: float) -> None:
        self.s = session
        self.inv = session.inventory
        self.ex = session.executor
        self.pipe = pipe
        self.lock = lock
        self.pre = pre
        self.plan = plan
        self.release = release
        self.ready_timeout = ready_timeout
        self.app_names = list(pre.apps)
        self.rotation = [n for n, st in pre.apps.items() if st.in_rotation]
        self.steps: dict[str, str] = {}  # host -> the step it is at (for the failure report)
        self.done: list[str] = []
        self.pending_readd: list[str] = []  # ready, back in rotation with the next drain
        self.restarted_at: dict[str, float] = {}  # host -> when we restarted it (monotonic)
        self.backup: Backup | None = None
        self.started = time.monotonic()
        # One database session checks the lock; the batch's threads take turns.
        self._lock_check = threading.Lock()

    # -- helpers -------------------------------------------------------------------------
    @property
    def dry(self) -> bool:
        return self.s.dry_run

    @property
    def version(self) -> str:
        return self.plan.target_text

    def servers(self, wanted: Iterable[str]) -> list[tuple[str, int]]:
        chosen = set(wanted)
        return [server_of(self.inv, self.inv.host(n)) for n in self.app_names if n in chosen]

    def bind(self, name: str) -> str:
        return app_facts.bind_address(self.inv, self.inv.host(name))

    def set_rotation(self, wanted: Iterable[str]) -> None:
        chosen = set(wanted)
        ordered = [n for n in self.app_names if n in chosen]
        if not ordered:
            raise DeployError("refusing to leave no app host in rotation")
        proxy_tier.set_upstreams(self.s, self.servers(ordered))
        self.rotation = ordered

    def info(self, host: str, msg: str) -> None:
        self.s.reporter.info(host, msg)

    def ensure_lock(self) -> None:
        """LockLost unless our deploy lock is still held: checked before every step that
        changes a host, so a lost lock stops the flow before the next change."""
        with self._lock_check:
            self.lock.ensure_held()

    # -- preflight follow-ups --------------------------------------------------------------
    def converge_rotation(self) -> None:
        """Hosts a killed rollout left out of rotation go back in if they are ready; an
        upstream list that differs from the inventory's (unknown servers) is rewritten."""
        back = [n for n, st in self.pre.apps.items()
                if not st.in_rotation and st.ready and not st.held_out]
        want = [n for n in self.app_names if n in self.rotation or n in back]
        expected = self.servers(want)
        if all(servers == expected for servers in self.pre.upstreams.values()):
            return
        for n in back:
            self.info(n, "out of rotation (left there by an earlier rollout?) and ready:"
                         " putting it back")
        listed = {s for servers in self.pre.upstreams.values() for s in servers}
        for n in self.pre.unreachable:
            if server_of(self.inv, self.inv.host(n)) in listed:
                self.info(n, "unreachable: taking it out of every proxy's rotation first;"
                             " its in-flight requests could not be waited for")
        self.set_rotation(want)

    def check_disk(self) -> None:
        if self.release is None:
            return
        need = disk_needed(self.release.size, unpacked_size(self.release.path))
        short = [f"{n}: {st.free_bytes // 2**20} MiB free under {appcmd.RELEASY_ROOT}, need"
                 f" {need // 2**20} MiB" for n, st in self.pre.apps.items()
                 if not st.holds(self.version, self.release.sha256)
                 and st.free_bytes is not None and st.free_bytes < need]
        if short:
            raise DeployError("not enough disk space to stage " + self.version + ":\n  "
                              + "\n  ".join(short) + f"\n  Free some space (old releases in"
                              f" {appcmd.RELEASES_DIR}) and re-run; nothing was changed.")

    # -- stages ------------------------------------------------------------------------------
    def stage_release(self) -> None:
        if self.release is None:
            return
        rel = self.release
        lacking = [n for n, st in self.pre.apps.items() if not st.holds(rel.version, rel.sha256)]
        with self.pipe.stage("stage", what=f"upload and unpack {rel.version} on"
                                           f" {names(lacking)} (not activated)"):
            if lacking:
                self.ex.each(lacking, lambda c: app_tier.stage_release(c, rel))
            for n in self.app_names:
                if n not in lacking:
                    self.s.reporter.unchanged(n, f"release {rel.version} already staged")

    def take_dump(self, from_version: str | None) -> None:
        db = self.inv.db_host.name
        if not self.inv.database.backup_before_deploy:
            self.info(db, "no dump before the rollout (database.backup_before_deploy: false)")
            return
        with self.pipe.stage("backup", db, "dump the database before the first new instance"
                                           " starts"):
            self.backup = backups_mod.create(self.s, from_version=from_version,
                                             to_version=self.version,
                                             level=self.pre.db_level,
                                             existing=self.pre.backups)

    def host_steps(self, c: HostConnection) -> None:
        """On one (drained) host: the plan's host steps, in order."""
        name = c.name
        st = self.pre.apps[name]
        bind = self.bind(name)
        steps = self.plan.host_steps
        if "switch" in steps and st.current == self.plan.target and st.active == "active":
            # V already runs here but is not ready: an earlier rollout was cut while it
            # started, maybe in a long migration. Restarting would throw that work away:
            # give it the ready timeout first.
            self.steps[name] = "ready"
            try:
                waited = app_tier.wait_ready(c, bind, self.ready_timeout)
            except DeployError as exc:
                self.info(name, f"{self.version} did not become ready"
                                f" ({first_line(exc, name)}): restarting it")
            else:
                self.steps[name] = "validate"
                self.validate(c, bind)
                self.info(name, f"{self.version} (started earlier) ready after {waited:.1f} s")
                return
        waited = 0.0
        for step in steps:
            if step in ("switch", "start"):
                self.ensure_lock()  # before the step is recorded: a lost lock changed nothing
            self.steps[name] = step
            if step == "switch":
                app_tier.activate_release(c, self.plan.target)
            elif step == "start":
                self.restarted_at[name] = time.monotonic()
                app_tier.restart_service(c)
            elif step == "ready":
                waited = app_tier.wait_ready(c, bind, self.ready_timeout)
            elif step == "validate":
                self.validate(c, bind)
        if self.plan.target is None:
            self.info(name, f"{UNIT} restarted on {st.current}: ready after {waited:.1f} s")
        else:
            self.info(name, f"{st.current} -> {self.version}: ready after {waited:.1f} s")

    def validate(self, c: HostConnection, bind: str) -> None:
        res = c.run(version_probe_argv(bind), check=False, mutates=False)
        status, seen = parse_version_probe(res.stdout)
        if status == 200 and seen is not None:
            if seen != self.version:
                raise DeployError(f"{c.name}: GET http://{bind}/version reports {seen}, expected"
                                  f" {self.version}: the running process is not the new release",
                                  host=c.name)
            self.info(c.name, f"GET /version through the host: {seen}")
        else:
            self.info(c.name, f"no version endpoint (GET /version: {status or 'no answer'});"
                              f" validated by /ready on the switched release")

    def drain(self, hosts: Sequence[str]) -> None:
        """Take ``hosts`` out of rotation and put the previous batch back, in ONE upstream
        change (one nginx reload), then wait until old workers finished their requests."""
        leaving = [n for n in hosts if n in self.rotation]
        back = [n for n in self.pending_readd if n not in hosts]
        if not leaving and not back:
            return
        remaining = [n for n in self.app_names
                     if (n in self.rotation or n in back) and n not in hosts]
        if not remaining:
            raise DeployError(f"draining {names(hosts)} would leave no app host in rotation")
        self.set_rotation(remaining)
        self.pending_readd = []
        if leaving:
            self.ex.each(self.inv.hosts_in("proxy"),
                         lambda c: proxy_tier.wait_old_workers_gone(c, DRAIN_TIMEOUT_S))

    def readd_pending(self) -> None:
        if self.pending_readd:
            self.set_rotation([*self.rotation, *self.pending_readd])
            self.pending_readd = []

    def roll(self, batch: Batch, *, readd_now: bool) -> None:
        """Drain, the host steps, then re-add one batch: now (the last batch) or together
        with draining the next one (one reload instead of two). On failure, recover and
        raise RolloutFailed."""
        hosts = list(batch.hosts)
        try:
            with self.pipe.stage(batch.stage, batch.label, self.plan.stage_words(batch)):
                for n in hosts:
                    self.steps[n] = "lock check"
                # Inside the recovered block: a lost lock still puts ready hosts back.
                self.ensure_lock()
                if batch.rotates:
                    for n in hosts:
                        self.steps[n] = "drain"
                    self.drain(hosts)
                if len(hosts) == 1:  # no thread pool (and no second copy of the error)
                    try:
                        self.host_steps(self.ex.conn(hosts[0]))
                    except Exception as exc:  # noqa: BLE001 - recovered below
                        raise _HostsFailed({hosts[0]: exc}, []) from None
                else:
                    try:
                        self.ex.each(hosts, self.host_steps)
                    except ParallelError as exc:
                        raise _HostsFailed(exc.failures, exc.results) from None
                if batch.rotates:
                    for n in hosts:
                        self.steps[n] = "re-add"
                    self.pending_readd += hosts
                    if readd_now:
                        self.readd_pending()
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure recovers
            # A second Ctrl-C must not leave hosts out of rotation: noted, obeyed after.
            with interrupts.deferred("putting the hosts back and restoring the rotation"):
                self.recover(batch, exc)
        self.done += hosts

    # -- failure -----------------------------------------------------------------------------
    def recover(self, batch: Batch, exc: BaseException) -> None:
        if isinstance(exc, _HostsFailed):
            failures, succeeded = exc.failures, exc.succeeded
        else:
            failures, succeeded = {n: exc for n in batch.hosts}, []
        if not batch.rotates:
            # In place, out of rotation: nothing of this batch goes into the rotation.
            succeeded = []
        plan = plan_recovery(
            app_names=self.app_names, reached=self.steps, failed=failures,
            succeeded=succeeded, rotation=self.rotation,
            pending=self.pending_readd,
            ready_before={n: st.ready and batch.rotates for n, st in self.pre.apps.items()},
            previous={n: st.current for n, st in self.pre.apps.items()})
        host = next(iter(failures))
        journals: dict[str, str] = {}
        reverted: dict[str, tuple[str | None, bool]] = {}
        notes: dict[str, str] = {}
        rotation_error = None
        with self.pipe.stage("failed", batch.label,
                             "put the changed hosts back on their previous release"):
            for n in plan.put_back:
                journals[n] = self.journal_since_restart(n)

            def revert(c: HostConnection) -> bool:
                previous = plan.put_back[c.name]
                if previous is None:
                    return False
                app_tier.activate_release(c, previous)
                app_tier.restart_service(c)
                app_tier.wait_ready(c, self.bind(c.name), self.ready_timeout)
                self.info(c.name, f"back on {previous}: ready")
                return True

            for n, previous in plan.put_back.items():
                reverted[n] = (previous, False)
            if plan.put_back:
                try:
                    results = self.ex.each(list(plan.put_back), revert)
                except ParallelError as rexc:
                    results = rexc.results
                    for n, e in rexc.failures.items():
                        notes[n] = f" ({first_line(e, n)})"
                for n, ok in results.items():
                    reverted[n] = (plan.put_back[n], bool(ok))
            back = [n for n, (_, ok) in reverted.items() if ok and batch.rotates]
            if batch.rotates:
                try:
                    self.set_rotation([*plan.rotation, *back])
                except Exception as rexc:  # noqa: BLE001 - reported in the explanation
                    rotation_error = first_line(rexc)
        migration = False
        level_now = None
        if batch.stage == "migrate":
            migration = bool(_MIGRATION_FAILED.search(journals.get(host, "")))
            try:
                level_now = schema.read_level(self.s)
            except Exception:  # noqa: BLE001 - the explanation says less then
                level_now = None
            migration = migration or (level_now is not None and level_now != self.pre.db_level)
        untouched = [n for n in self.app_names
                     if n not in self.done and n not in batch.hosts
                     and n not in self.plan.skipped]
        report = FailureReport(
            action=self.plan.title, environment=self.inv.environment, version=self.version,
            host=host, stage=batch.stage, step=self.steps.get(host, "?"),
            reason=first_line(failures[host], host), reverted=reverted, reverted_notes=notes,
            succeeded=succeeded, done=self.done, untouched=untouched,
            rotation=self.rotation, rotation_error=rotation_error,
            journal=journals.get(host, ""), migration_failed=migration, backup=self.backup,
            backup_host=self.inv.db_host.name,
            backups_enabled=self.inv.database.backup_before_deploy,
            level_before=self.pre.db_level, level_now=level_now,
            from_version=self.pre.apps[host].current, advice=self.plan.left_out_advice)
        text = explain_failure(report)
        self.audit("failed", failed_host=host, stage=batch.stage, reason=report.reason)
        raise RolloutFailed(text, host=host, cause=failures[host])

    def journal_since_restart(self, name: str) -> str:
        """The last journal lines of the unit since we restarted it (a little before, so
        the old process's exit shows too); best effort."""
        conn = self.ex.conn(name)
        try:
            if name not in self.restarted_at:
                return app_tier.journal_tail(conn, UNIT, JOURNAL_LINES)
            seconds = time.monotonic() - self.restarted_at[name] + 2
            res = conn.run(recent_journal_argv(UNIT, seconds), sudo=True, mutates=False,
                           check=False)
            return conn.mask((res.stdout or res.stderr).rstrip("\n"))
        except Exception as exc:  # noqa: BLE001 - the explanation goes on without it
            return f"(journal not readable: {first_line(exc, name)})"

    # -- finish ------------------------------------------------------------------------------
    def record_levels(self, levels_for: Mapping[str, Mapping[str, int]]) -> None:
        """Write .schema-version files: host -> {version: level} (one round trip each)."""
        targets = [n for n, lv in levels_for.items() if lv]
        if not targets or self.dry:
            return
        self.ex.each(targets, lambda c: c.run(schema.record_script_argv(levels_for[c.name]),
                                              sudo=True))

    def from_levels(self) -> dict[str, int]:
        """The release every app host ran at preflight, with the level it ran against,
        when that is certain: all hosts on it, all ready, none recorded yet."""
        currents = {st.current for st in self.pre.apps.values()}
        if len(currents) != 1 or not all(st.ready for st in self.pre.apps.values()):
            return {}
        (current,) = currents
        if current is None or current == self.plan.target:
            return {}
        if any(current in st.levels for st in self.pre.apps.values()):
            return {}
        return {current: self.pre.db_level}

    def after_migrate(self) -> None:
        """The first host is ready on V: the database is at V's level now; record it (and
        the previous release's level) on every app host at once."""
        level = schema.read_level(self.s)
        if level != self.pre.db_level:
            self.info(self.inv.db_host.name, f"migration level {self.pre.db_level} -> {level}"
                                             f" (applied once, by {self.done[-1]})")
        self.record_levels({n: {self.version: level, **self.from_levels()}
                            for n in self.app_names})

    def finish(self) -> None:
        if not self.plan.records_release:
            with self.pipe.stage("finish", what="audit record on every host"):
                self.readd_pending()
                self.audit("ok")
            elapsed = time.monotonic() - self.started
            self.info(self.pipe.name, f"{self.plan.title.lower()} done: {names(self.done)} in"
                                      f" {elapsed:.1f} s; in rotation: {names(self.rotation)}")
            return
        with self.pipe.stage("finish", what="record the migration level, prune old releases,"
                                            " audit record on every host"):
            level = schema.read_level(self.s)
            keep = self.inv.app.releases_keep

            def tidy(c: HostConnection) -> None:
                st = self.pre.apps[c.name]
                staged = c.name not in self.plan.held or self.plan.stage_release
                installed = {*st.installed, *([self.version] if staged else [])}
                previous = st.current if st.current != self.version else None
                prune = releases_to_prune(installed, keep, [self.version, previous,
                                                            *st.instance_releases])
                commands = [schema.record_script_argv({self.version: level,
                                                       **self.from_levels()})]
                commands += [["rm", "-rf", "--", f"{appcmd.RELEASES_DIR}/{v}"] for v in prune]
                if c.dry_run:
                    for v in prune:
                        c.reporter.would(c.name, f"remove old release {v} (keeping {keep})")
                    return
                c.run_script(appcmd.script_of(commands), sudo=True,
                             label=f"record migration level {level}, prune old releases")
                for v in prune:
                    c.reporter.changed(c.name, f"old release {appcmd.RELEASES_DIR}/{v} removed"
                                               f" (keeping {keep})")

            self.readd_pending()
            self.ex.each(self.app_names, tidy)
            serving = self.serving()
            if self.rotation != serving:
                self.set_rotation(serving)
            if not self.plan.held:  # a canary or --limit leaves a mixed fleet: no new record
                self.record_fleet(level)
            self.audit("ok", schema_level=level, **({"held": list(self.plan.held)}
                                                    if self.plan.held else {}))
        elapsed = time.monotonic() - self.started
        out = [n for n in self.inv_app_names() if n not in self.rotation]
        where = (f"in rotation: {names(self.rotation)}; out: {names(out)}" if out
                 else "every app host in rotation")
        self.info(self.pipe.name, f"{self.plan.title.lower()} to {self.version} done:"
                                  f" {names(self.done)} in {elapsed:.1f} s, {where}")
        for n in out:
            if n in self.pre.unreachable:
                self.info(n, f"unreachable, skipped: behind {self.version}. Once it is back,"
                             f" `fab deploy.rolling --version {self.version} --yes` updates it"
                             f" (it stays out of rotation), then `fab app.undrain --host {n}`")
            else:
                self.info(n, f"out of rotation on {self.version}: `fab app.undrain --host {n}`"
                             f" puts it back")
        if self.plan.held:
            self.say_held()

    def say_held(self) -> None:
        """The plan stopped before the held hosts on purpose: who runs what, and what next."""
        plan, apps = self.plan, self.pre.apps
        on_target = [n for n in self.app_names if n not in plan.held]
        kept = "; ".join(f"{n} on {apps[n].current}" for n in plan.held)
        self.info(self.pipe.name, f"stopped as asked: {names(on_target)} on {self.version};"
                                  f" {kept} (both in rotation). {plan.held_advice}".rstrip())

    def serving(self) -> list[str]:
        """The app hosts a finished rollout leaves in rotation: all it reached, except
        those held out (behind the fleet at preflight: only `fab app.undrain` re-adds)."""
        return [n for n in self.app_names if not self.pre.apps[n].held_out]

    def inv_app_names(self) -> list[str]:
        return [h.name for h in self.inv.hosts_in("app")]

    def record_fleet(self, level: int | None) -> None:
        """The fleet record on the db host: the release this rollout left the fleet on,
        and the hosts it could not reach (behind)."""
        record = next_record(self.pre.fleet, release=self.version, level=level,
                             skipped=self.pre.unreachable, updated=self.app_names,
                             by=self.plan.flow, at=audit.now(),
                             was=fleet_release({n: st.current for n, st in self.pre.apps.items()
                                                if st.in_rotation}))
        before = self.pre.fleet
        if before is None or (before.release, before.level, dict(before.behind)) != (
                record.release, record.level, dict(record.behind)):
            write_record(self.ex.conn(self.inv.db_host.name), record)

    def audit(self, result: str, **extra: Any) -> None:
        entry = audit.record(
            self.plan.flow, self.inv.environment, to=self.version, result=result,
            from_versions={n: st.current for n, st in self.pre.apps.items()},
            hosts_changed=list(self.done), backup=self.backup.name if self.backup else None,
            seconds=round(time.monotonic() - self.started, 1), **extra)
        self.s.outcome.update(entry)
        try:
            audit.write(self.ex, [h for h in self.inv.hosts
                                  if h.name not in self.pre.unreachable], entry)
        except Exception as exc:  # noqa: BLE001 - never hide the rollout's own outcome
            self.s.reporter.error(self.inv.environment, f"audit record not written everywhere:"
                                                        f" {first_line(exc)}")

    # -- the whole plan ----------------------------------------------------------------------
    def run(self, yes: bool) -> None:
        """Execute the plan: confirm, converge the rotation, stage, dump, the batches in
        order, finish. In dry-run: say what each stage would do, change nothing."""
        plan = self.plan
        if not plan.batches:
            if not self.dry:
                self.converge_rotation()
                if plan.records_release and self.pre.unreachable:
                    self.record_fleet(self.pre.db_level)
            if plan.held:
                self.info(self.pipe.name, f"no host to change within the limit: nothing to"
                                          f" do (not on {self.version}: {names(plan.held)})")
                return
            self.info(self.pipe.name, f"every app host already runs {self.version} and"
                                      f" is ready: nothing to do")
            return
        text = plan.describe(self.pre.apps, self.inv.db_host.name)
        self.info(self.pipe.name, f"plan: {text}")
        from_versions = {self.pre.apps[n].current for n in plan.hosts}
        from_version = from_versions.pop() if len(from_versions) == 1 else None
        if self.dry:
            if plan.target is not None:
                self.converge_rotation()
            self.dry_run_report(from_version)
            return
        if plan.target is None:
            question = f"{plan.title} of {UNIT} in {self.inv.environment}: {text}. Go?"
        else:
            question = f"{plan.title} of {self.inv.environment} to {self.version}: {text}. Go?"
        self.s.confirm(question, yes=yes)
        if plan.target is not None:
            self.converge_rotation()
        if plan.stage_release:
            self.stage_release()
        if plan.backup:
            self.take_dump(from_version)
        rotating = [b for b in plan.batches if b.rotates]
        for b in plan.batches:
            self.roll(b, readd_now=bool(rotating) and b is rotating[-1])
            if b.stage == "migrate":
                self.after_migrate()
        self.finish()

    def dry_run_report(self, from_version: str | None) -> None:
        plan = self.plan
        if plan.stage_release:
            self.stage_release()
        if plan.backup:
            self.take_dump(from_version)
        r = self.s.reporter
        for b in plan.batches:
            if not b.rotates:
                r.would(b.label, f"restart {UNIT} (out of rotation: it stays out)")
                continue
            if plan.target is None:
                r.would(b.label, f"drain {b.label} from every proxy, restart {UNIT}, wait for"
                                 f" /ready (up to {self.ready_timeout:g} s), re-add")
                continue
            was = "/".join(sorted({str(self.pre.apps[n].current) for n in b.hosts}))
            r.would(b.label, f"{b.stage}: drain {b.label} from every proxy, switch {was} ->"
                             f" {self.version}, restart {UNIT}, wait for /ready (up to"
                             f" {self.ready_timeout:g} s), validate, re-add")
        if plan.records_release:
            r.would(self.pipe.name, "finish: record the migration level, prune releases"
                                    f" beyond {self.inv.app.releases_keep}, audit record")
        if plan.held:
            r.would(self.pipe.name, f"stop there: {names(plan.held)} keep their release."
                                    f" {plan.held_advice}".rstrip())
