"""A database restore that did not finish (failed, timed out, Ctrl-C, SIGTERM): end what is
left of it on the db host, read from the database whether its transaction committed, start
again what ran before, and say where things stand.

`backups.restore` runs the restore (`commands/restore.py` builds it: its own process group,
a named database session, its transaction id in a state directory) and hands a restore that
did not finish to `stopped`; `backups.restore_task` hands the whole task's failure to
`task_stopped`, which restarts the app hosts (Ctrl-C/SIGTERM deferred meanwhile) and builds
the paragraph. The cause is kept on the error, so an interrupted task exits 130/143.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import interrupts
from .commands import restore as restorecmd
from .errors import DeployError, RestoreFailed, StepFailed, first_line
from .tiers import maintenance_page

__all__ = ["stopped", "outcome_text", "task_stopped"]


def stopped(conn, kind: str, target: str, backup_path: str, what: str,
            cause: BaseException | None) -> RestoreFailed:
    """End what is left of a restore into ``target`` that did not finish and read its
    outcome (PostgreSQL: on the database; SQLite: its backup API replaces the file in one
    step, so a failure it reported changed nothing)."""
    if kind != "postgres":
        if cause is None:
            return RestoreFailed(f"{conn.name}: {what}\n  SQLite's restore replaces the file"
                                 f" in one step: the database is unchanged.", host=conn.name,
                                 applied=False)
        return RestoreFailed(f"{conn.name}: {what}\n  {outcome_text('', '')}",
                             host=conn.name, cause=cause)
    outcome = restorecmd.UNKNOWN
    why = ""
    with interrupts.deferred(f"ending the restore of {backup_path} on {conn.name} and"
                             f" reading its outcome"):
        try:
            res = conn.run(restorecmd.stop_argv(target), sudo=True, check=False,
                           mutates=False, timeout=restorecmd.STOP_WAIT_TENTHS / 10 + 30)
            outcome = restorecmd.parse_outcome(res.stdout)
        except DeployError as exc:
            why = f" ({first_line(exc, conn.name)})"
    return RestoreFailed(f"{conn.name}: {what}\n  {outcome_text(outcome, why)}",
                         host=conn.name, cause=cause,
                         applied={restorecmd.COMMITTED: True, restorecmd.ABORTED: False,
                                  restorecmd.NOT_STARTED: False}.get(outcome))


def outcome_text(outcome: str, why: str = "") -> str:
    """What became of the restore's transaction, in words (pure)."""
    if outcome == restorecmd.COMMITTED:
        return ("The restore WAS fully applied: its transaction committed (read on the"
                " database after the restore was ended).")
    if outcome == restorecmd.ABORTED:
        return ("Nothing of the restore was applied: its transaction was rolled back (read on"
                " the database after the restore was ended), so the database is unchanged.")
    if outcome == restorecmd.NOT_STARTED:
        return ("Nothing of the restore was applied: it was ended before its transaction"
                " began, so the database is unchanged.")
    return (f"Whether the restore was applied could not be read{why}: it is all or nothing"
            f" (one transaction); compare the data (`fab db.psql`) before going on.")


def task_stopped(session: Any, pipe: Any, *, db: str, dump: Any, safety: Any,
                 busy: Sequence[str], start: Callable[[Any], None], was_on: bool,
                 exc: BaseException) -> StepFailed:
    """`fab db.restore` did not finish: start again what ran before (Ctrl-C/SIGTERM deferred:
    the hosts must not stay down), take the maintenance page off once they are back, then
    the paragraph: whether the dump was applied, as read on the database."""
    applied = exc.applied if isinstance(exc, RestoreFailed) else False
    note = ""
    with interrupts.deferred("starting Releasy again after the stopped restore"):
        with pipe.stage("failed", what="start again what ran before"):
            try:
                if busy:
                    session.executor.each(busy, start)
            except DeployError as sexc:
                note = (f" Starting Releasy again failed as well ({first_line(sexc)}): check"
                        f" the app hosts; the maintenance page stays on until"
                        f" `fab proxy.maintenance --off`.")
            else:
                maintenance_page.switch_for_downtime(session, False, was_on=was_on)
    lines = str(exc).splitlines() or [type(exc).__name__]
    if not isinstance(exc, DeployError):
        lines = [f"{db}: the restore of {dump.name} stopped: {first_line(exc)}"]
    started = f"what was running was started again{' (on the restored data)' if applied else ''}"
    if applied:
        after = (f"  To go back to the data from before the restore: `fab db.restore --file"
                 f" {safety.name}`.")
    else:
        after = (f"  Check the dump (`fab db.backups`) and re-run `fab db.restore --file"
                 f" {dump.name}`, or restore another one; the data as it was before is also"
                 f" in {safety.path}.")
    if not isinstance(exc, RestoreFailed):
        lines.append("  The restore had not begun: the database is unchanged.")
    cause = exc.cause if isinstance(exc, RestoreFailed) else exc
    return StepFailed("\n".join([*lines, f"  {started[0].upper()}{started[1:]}.{note}", after]),
                      host=db, cause=cause)
