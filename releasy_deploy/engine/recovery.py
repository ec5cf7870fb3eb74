"""The one recovery path of every rolling flow, as data, and the failure paragraph.

When a batch fails, `plan_recovery` decides (purely, from what each host had reached) which
hosts are restarted on the release they ran before and which are in rotation afterwards;
the runner carries that out and `explain_failure` says where everything stands.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .. import errors
from ..backups import Backup
from .plan import CHANGING_STEPS, UNIT


@dataclass(frozen=True)
class Recovery:
    """What to put back after a batch failed."""

    #: host -> the release it ran at preflight (None: it had none), restarted on it, then
    #: re-added only once ready.
    put_back: Mapping[str, str | None]
    #: in rotation afterwards, whatever the put-back hosts do (inventory order).
    rotation: tuple[str, ...]


def plan_recovery(*, app_names: Sequence[str], reached: Mapping[str, str],
                  failed: Iterable[str], succeeded: Iterable[str], rotation: Iterable[str],
                  pending: Iterable[str], ready_before: Mapping[str, bool],
                  previous: Mapping[str, str | None]) -> Recovery:
    """``reached``: the last step each host of the batch started; ``failed``: hosts whose
    steps failed; ``succeeded``: hosts of the batch that finished (ready, to be re-added);
    ``rotation``/``pending``: in rotation / waiting to be re-added before the failure.

    A failed host that got as far as a changing step is put back on its previous release;
    one that failed before (lock check, drain) still runs what it ran, so it is re-added if
    it was serving at preflight. Hosts that finished stay in.
    """
    failed = list(failed)
    put_back = {n: previous.get(n) for n in failed if reached.get(n) in CHANGING_STEPS}
    unchanged = {n for n in failed if n not in put_back and ready_before.get(n, False)}
    wanted = {*rotation, *pending, *succeeded, *unchanged}
    return Recovery(put_back, tuple(n for n in app_names if n in wanted))


@dataclass(frozen=True)
class FailureReport:
    action: str  # "Rolling deploy" / "Rollback" / "Rolling restart"
    environment: str
    version: str  # the target, or "their current releases"
    host: str
    stage: str
    step: str
    reason: str
    reverted: Mapping[str, tuple[str | None, bool]] = field(default_factory=dict)
    reverted_notes: Mapping[str, str] = field(default_factory=dict)
    succeeded: Sequence[str] = ()  # hosts of the failed batch that are on V and back
    done: Sequence[str] = ()  # hosts this rollout finished earlier
    untouched: Sequence[str] = ()
    rotation: Sequence[str] = ()
    rotation_error: str | None = None
    journal: str = ""
    migration_failed: bool = False
    backup: Backup | None = None
    backup_host: str = ""
    backups_enabled: bool = True
    level_before: int | None = None
    level_now: int | None = None
    from_version: str | None = None
    advice: str = ""  # how hosts left out come back (flow-specific)


def names(hosts: Iterable[str]) -> str:
    return ", ".join(hosts) or "none"


def first_line(exc: BaseException, host: str | None = None) -> str:
    """An error's first line, without a leading "HOST: " (the paragraph names the host) or
    closing punctuation (the paragraph adds its own)."""
    return errors.first_line(exc, host).rstrip(".:")


def explain_failure(r: FailureReport) -> str:
    """The one-paragraph explanation of a stopped rollout, then the journal lines."""
    parts = [f"{r.action} of {r.environment} to {r.version} stopped at {r.host}, stage"
             f" {r.stage} (step {r.step}): {r.reason}."]
    for host, (previous, ok) in r.reverted.items():
        note = r.reverted_notes.get(host, "")
        if previous is None:
            parts.append(f"{host} had no previous release to go back to{note}.")
        elif ok:
            parts.append(f"{host} was switched back to {previous}, is ready and back in"
                         f" rotation.")
        else:
            parts.append(f"{host} could not be brought back on {previous}{note}: it stays"
                         f" out of rotation.")
    if r.succeeded:
        parts.append(f"Finished in the same batch, on {r.version} and in rotation:"
                     f" {names(r.succeeded)}.")
    if r.done:
        parts.append(f"Already on {r.version} from this rollout: {names(r.done)}.")
    parts.append(f"Not reached, untouched: {names(r.untouched)}.")
    if r.rotation_error:
        parts.append(f"Restoring the rotation FAILED ({r.rotation_error}); check the proxies"
                     f" (`fab proxy.setup` keeps the live list; --reset-upstreams lists every"
                     f" app host).")
    else:
        parts.append(f"In rotation now: {names(r.rotation)}.")
    if r.migration_failed:
        if r.backup is not None:
            where = (f"The failure came from a database migration. The dump taken before this"
                     f" deploy is on {r.backup_host}: {r.backup.path}.")
        elif not r.backups_enabled:
            where = ("The failure came from a database migration; no dump was taken before"
                     " this deploy (database.backup_before_deploy is false).")
        else:
            where = "The failure came from a database migration."
        parts.append(where)
        if r.level_now is not None and r.level_before is not None:
            if r.level_now == r.level_before:
                parts.append(f"The database is still at migration level {r.level_now}, as"
                             f" before: the failed migration was rolled back, the old release"
                             f" keeps working and nothing needs restoring.")
                if r.backup is not None:
                    parts.append(f"To restore the dump anyway: `fab deploy.rollback --to"
                                 f" {r.from_version} --restore-db --backup {r.backup.name}`.")
            else:
                restore = (f"`fab deploy.rollback --to {r.from_version} --restore-db --backup"
                           f" {r.backup.name}` (loses writes made since {r.backup.when})"
                           if r.backup is not None else "a dump taken before the deploy")
                parts.append(f"The database is now at migration level {r.level_now} (was"
                             f" {r.level_before}): {r.from_version} may refuse to start on it"
                             f" until it is restored: {restore}.")
    if r.advice:
        parts.append(r.advice)
    text = " ".join(parts)
    if r.journal.strip():
        text += f"\nLast journal lines of {UNIT} on {r.host}:\n" + "\n".join(
            f"    {line}" for line in r.journal.rstrip("\n").splitlines())
    return text
