"""A rollback across migrations (``fab deploy.rollback --restore-db``): every app host
stops (downtime, a maintenance page meanwhile), the current database is saved, the chosen
dump is restored, every host switches to the target and starts, the first alone. A failure
restarts what can be restarted and says exactly where the data is."""
from __future__ import annotations

from collections.abc import Mapping

from .. import backups as backups_mod
from .. import interrupts
from ..commands import app as appcmd
from ..commands import systemd
from ..engine.recovery import first_line as _first_line
from ..engine.recovery import names as _names
from ..engine.runner import JOURNAL_LINES, RollingRunner, RolloutFailed
from ..errors import DeployError, ParallelError, RestoreFailed, StepFailed
from ..executor import HostConnection
from ..tiers import app_facts
from ..tiers import app as app_tier
from ..tiers import maintenance_page
from .verdict import RollbackVerdict

UNIT = app_facts.SERVICE_UNIT


def restore_and_start(r: RollingRunner, verdict: RollbackVerdict, yes: bool) -> None:
    """Rollback across migrations: every app host stops (downtime), the dump is restored,
    all hosts switch to the target, the first starts alone, then the rest."""
    s, inv, dump = r.s, r.inv, verdict.restore
    assert dump is not None
    db = inv.db_host.name
    names = r.app_names
    currents = {n: st.current for n, st in r.pre.apps.items()}
    newest_current = max(filter(None, currents.values()), key=appcmd.version_key,
                         default=None)
    plan = (f"stop {UNIT} on {_names(names)} (Releasy is DOWN until the restore is done),"
            f" save the current database (migration level {verdict.db_level}) to a new dump,"
            f" restore {dump.path} (level {dump.level}, taken {dump.when}), switch every app"
            f" host to {r.version} and start it")
    r.info(r.pipe.name, f"plan: {plan}")
    if r.dry:
        r.stage_release()
        s.reporter.would(db, f"dump the current database, then restore {dump.path}")
        for n in names:
            s.reporter.would(n, f"stop {UNIT}, switch {currents[n]} -> {r.version}, start")
        return
    s.confirm(f"Roll {inv.environment} back to {r.version} restoring {dump.name}: every write"
            f" made since {dump.when} is LOST, and Releasy is down while the database is"
            f" restored ({plan}). Go?", yes=yes)
    r.stage_release()
    uniform = set(currents.values())
    with r.pipe.stage("backup", db, "save the current database before restoring"):
        r.backup = backups_mod.create(s, from_version=uniform.pop() if len(uniform) == 1
                                      else None, to_version=r.version, level=verdict.db_level,
                                      existing=r.pre.backups, protect=[dump.name])
    r.lock.ensure_held()

    def stop(c: HostConnection) -> None:
        c.run(systemd.systemctl("stop", UNIT), sudo=True)
        c.reporter.changed(c.name, f"{UNIT} stopped (database restore)")

    def start_on(version_of: Mapping[str, str | None]):
        def start(c: HostConnection) -> None:
            app_tier.activate_release(c, version_of[c.name] or r.version)
            app_tier.restart_service(c)
            app_tier.wait_ready(c, r.bind(c.name), r.ready_timeout)
            c.reporter.info(c.name, f"ready on {version_of[c.name]}")
        return start

    def target_of(applied: bool | None) -> Mapping[str, str | None]:
        # The restored database suits the target; the old one the releases that ran.
        return {n: r.version for n in names} if applied else currents

    # Clients get a 503 maintenance page (Retry-After) meanwhile, never a raw 502.
    was_on = maintenance_page.switch_for_downtime(s, True)
    try:
        with r.pipe.stage("restore", db, f"stop every app host, restore {dump.name}"):
            for n in names:
                r.steps[n] = "stop"
            s.executor.each(names, stop)
            backups_mod.restore(s, dump)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
        # What became of the database was read on it (RestoreFailed.applied).
        applied = exc.applied if isinstance(exc, RestoreFailed) else False
        note = ""
        with interrupts.deferred("restarting the app hosts after the stopped restore"), \
                r.pipe.stage("failed", what="restart every app host"):
            try:
                s.executor.each(names, start_on(target_of(applied)))
            except ParallelError as sexc:
                note = (f" Restarting failed on {_names(sexc.failures)}: check them; the"
                        f" maintenance page stays on until `fab proxy.maintenance --off`.")
            else:
                maintenance_page.switch_for_downtime(s, False, was_on=was_on)
        r.audit("failed", stage="restore", reason=_first_line(exc))
        outcome = (str(exc).splitlines()[-1].strip() if isinstance(exc, RestoreFailed)
                   else "The restore had not begun: the database is unchanged.")
        where = (f"Every app host was started on {r.version}" if applied else
                 "Every app host was restarted on the release it ran before")
        raise RolloutFailed(
            f"Rollback of {inv.environment} to {r.version} stopped while restoring"
            f" {dump.path} on {db}: {_first_line(exc, db)}. {outcome} {where}.{note}",
            host=db, cause=exc.cause if isinstance(exc, RestoreFailed) else exc) from None

    target = {n: r.version for n in names}
    first, rest = names[0], names[1:]
    for stage, batch in (("migrate", [first]), ("roll", rest)):
        try:
            with r.pipe.stage(stage, "+".join(batch), f"switch to {r.version} and start"):
                s.executor.each(batch, start_on(target))
            r.done += batch
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
            failed = exc.failures if isinstance(exc, ParallelError) else {first: exc}
            host = next(iter(failed))
            journal = ""
            try:
                journal = app_tier.journal_tail(s.executor.conn(host), UNIT, JOURNAL_LINES)
            except Exception:  # noqa: BLE001
                pass
            r.audit("failed", stage=stage, reason=_first_line(failed[host], host))
            raise RolloutFailed(
                f"Rollback of {inv.environment} to {r.version} stopped at {host}, stage {stage}:"
                f" {_first_line(failed[host], host)}. The database WAS restored from"
                f" {dump.path}; the data as it was just before is in {r.backup.path}"
                f" (`fab deploy.rollback --to {newest_current} --restore-db --backup"
                f" {r.backup.name}` goes back to it). Started fine: {_names(r.done)}; the"
                f" other app hosts are stopped: once the cause is fixed, `fab app.setup"
                f" --version {r.version}` starts them on {r.version}, which the restored"
                f" database suits (a plain `fab app.setup` starts the release each host points"
                f" at, which may migrate it forward again). The maintenance page stays on"
                f" until `fab proxy.maintenance --off`."
                + (f"\nLast journal lines of {UNIT} on {host}:\n" + "\n".join(
                    f"    {line}" for line in journal.splitlines()) if journal else ""),
                host=host, cause=failed[host]) from None
    # The page off as soon as every host is back (before the records of `finish`); a
    # proxy that keeps it fails the rollback once those are written.
    try:
        maintenance_page.end_downtime(s, was_on=was_on)
        left_on = None
    except DeployError as exc:
        left_on = exc
    r.finish()
    if left_on is not None:
        raise StepFailed(
            f"Rollback of {inv.environment} to {r.version} done (every app host runs it on the"
            f" database restored from {dump.path}), but the maintenance page was not switched"
            f" off:\n{left_on}\n  `fab proxy.maintenance --off` ends it.",
            host=left_on.host, cause=left_on)
