"""A database restore that did not finish (failed, timed out, Ctrl-C, SIGTERM): end what is
left of it on the db host, read from the database whether its transaction committed, start
again what ran before, and say where things stand.

`backups.restore` runs the restore (`commands/restore.py` builds it: its own process group,
a named database session, its transaction id in a state directory) and hands a restore that
did not finish to `stopped`. `fab db.restore` is a plan run by `engine.sequence`
(`restore_flow`); its failure hook builds the paragraph from the runner's `Failure` record
(`not_restored`, `not_back`): what was put back and whether the dump was applied. The cause
is kept on the error, so an interrupted task exits 130/143.
"""
from __future__ import annotations

from typing import Any

from . import interrupts
from .commands import restore as restorecmd
from .engine.sequence import Failure
from .errors import DeployError, RestoreFailed, StepFailed, first_line

__all__ = ["stopped", "outcome_text", "not_restored", "not_back"]


def stopped(conn, kind: str, target: str, backup_path: str, what: str,
            cause: BaseException | None, run: str) -> RestoreFailed:
    """End what is left of the restore ``run`` into ``target`` that did not finish and read
    its outcome (PostgreSQL: on the database; SQLite: its backup API replaces the file in
    one step, so a failure it reported changed nothing)."""
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
            res = conn.run(restorecmd.stop_argv(target, run), sudo=True, check=False,
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


def not_restored(f: Failure, *, db: str, dump: Any, safety: Any) -> StepFailed:
    """`fab db.restore` stopped before its dump was in (maintenance page, stop, restore):
    the runner has started again what ran before and taken the page off once the hosts
    were back (`Failure.undone`); the paragraph says whether the dump was applied, as read
    on the database."""
    exc = f.cause
    applied = exc.applied if isinstance(exc, RestoreFailed) else False
    note = ""
    started = f.undo_result("start")
    if started is not None and not started.ok:
        note = (f" Starting Releasy again failed as well ({first_line(started.error)}):"
                f" check the app hosts; the maintenance page stays on until"
                f" `fab proxy.maintenance --off`.")
    lines = str(exc).splitlines() or [type(exc).__name__]
    if not isinstance(exc, DeployError):
        lines = [f"{db}: the restore of {dump.name} stopped: {first_line(exc)}"]
    if started is None:
        done = "Nothing had been stopped."
    else:
        done = (f"What was running was started again"
                f"{' (on the restored data)' if applied else ''}.{note}")
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
    return StepFailed("\n".join([*lines, f"  {done}", after]), host=db, cause=cause)


def not_back(f: Failure, *, db: str, dump: Any, safety: Any) -> DeployError:
    """The dump is in, but Releasy did not come back (or the maintenance page did not come
    off): nothing is put back (the restored data stays), the page stays on."""
    exc = f.cause
    said = str(exc) if isinstance(exc, DeployError) else first_line(exc)
    if f.step.kind == "start":
        text = (f"the database WAS restored from {dump.name}, but Releasy did not come back"
                f" on every app host:\n{said}\n  The data as it was before the restore is in"
                f" {safety.path} on {db} (`fab db.restore --file {safety.name}` goes back to"
                f" it). Releasy stays stopped where it did not come back: once the cause is"
                f" fixed, `fab site` starts it again. The maintenance page stays on until `fab"
                f" proxy.maintenance --off`.")
    else:
        text = (f"the database WAS restored from {dump.name} and Releasy is back, but the"
                f" maintenance page was not switched off:\n{said}\n  `fab proxy.maintenance"
                f" --off` ends it; the data as it was before the restore is in {safety.path}"
                f" on {db}.")
    if isinstance(exc, DeployError) and f.step.kind == "start":
        return DeployError(text)
    return StepFailed(text, cause=exc)
