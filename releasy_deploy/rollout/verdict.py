"""Where a rollback goes and what it needs (pure): the default target release
(`default_target`), and whether the database allows it or a dump must be restored first
(`rollback_verdict`, from the migration levels and the dumps on the db host)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .. import backups as backups_mod
from .. import schema
from ..backups import Backup
from ..commands import app as appcmd
from ..engine.runner import Preflight
from ..errors import BadInput


def previous_release(installed: Iterable[str], current: str | None) -> str | None:
    """The newest installed release older than ``current`` (by version order)."""
    if current is None:
        return None
    older = [v for v in installed
             if appcmd.version_key(v) < appcmd.version_key(current)]
    return max(older, key=appcmd.version_key) if older else None


@dataclass(frozen=True)
class RollbackVerdict:
    target: str
    target_level: int | None
    db_level: int
    restore: Backup | None = None  # restore this dump first
    refusal: str | None = None  # why not (BadInput)
    note: str | None = None  # said before going on


def rollback_verdict(*, environment: str, kind: str, target: str, target_level: int | None,
                     level_source: str, db_level: int, backups: Sequence[Backup],
                     restore_db: bool, backup_name: str | None,
                     db_host: str) -> RollbackVerdict:
    """May we roll back to ``target``, and must a dump be restored first? Pure."""
    base = dict(target=target, target_level=target_level, db_level=db_level)
    mine = [b for b in backups if b.environment == environment and b.kind == kind]
    chosen: Backup | None = None
    if backup_name is not None:
        chosen = next((b for b in mine if b.name == backup_name), None)
        if chosen is None:
            listed = ", ".join(b.name for b in mine[-5:]) or "none"
            return RollbackVerdict(**base, refusal=(
                f"no dump named {backup_name} in {backups_mod.BACKUP_DIR} on {db_host}"
                f" (newest there: {listed})"))
    if target_level is None:
        if not restore_db:
            return RollbackVerdict(**base, refusal=(
                f"there is no record of which database migrations release {target} ran"
                f" against ({schema.SCHEMA_FILE} is written by rollouts, and no dump was"
                f" taken when leaving {target}), and the database is at migration level"
                f" {db_level}. Releasy {target} refuses to start if the database holds a"
                f" migration it does not know. If you know {target} handles level"
                f" {db_level}, deploy it with `fab deploy.rolling --version {target}`;"
                f" otherwise restore a dump with --restore-db --backup NAME"))
        if chosen is None:
            leaving = [b for b in mine if b.from_version == target]
            chosen = leaving[-1] if leaving else None
        if chosen is None:
            return RollbackVerdict(**base, refusal=(
                f"--restore-db: no dump taken while {target} was running exists on"
                f" {db_host}; pick one with --backup NAME (`ls {backups_mod.BACKUP_DIR}`)"))
        return RollbackVerdict(**base, restore=chosen)
    if chosen is not None and chosen.level > target_level:
        return RollbackVerdict(**base, refusal=(
            f"{chosen.name} is at migration level {chosen.level}, above the {target_level}"
            f" release {target} ran against ({level_source}): {target} could not start on it"))
    if db_level <= target_level and chosen is None:
        note = None
        if restore_db:
            note = (f"--restore-db: not needed, the database is at migration level {db_level}"
                    f" and {target} ran against {target_level}; nothing is restored")
        return RollbackVerdict(**base, note=note)
    suggestion = chosen or backups_mod.choose_restore_point(mine, target_level, environment,
                                                            kind)
    if not restore_db:
        if suggestion is None:
            how = (f"and no dump at level {target_level} or lower is left on {db_host}"
                   f" ({backups_mod.BACKUP_DIR}): rolling back is not possible without one")
        else:
            how = (f"To roll back anyway, restore the dump taken before those migrations"
                   f" ({suggestion.name}, taken {suggestion.when}): `fab deploy.rollback --to"
                   f" {target} --restore-db`. That loses every write made since"
                   f" {suggestion.when}")
        return RollbackVerdict(**base, refusal=(
            f"refusing to roll back to {target}: it ran against database migrations up to"
            f" {target_level} ({level_source}), but the database is at {db_level}. Releasy"
            f" {target} would refuse to start (its binary does not know"
            f" {_migrations(target_level + 1, db_level)}). " + how))
    if suggestion is None:
        return RollbackVerdict(**base, refusal=(
            f"--restore-db: no dump at migration level {target_level} or lower is left in"
            f" {backups_mod.BACKUP_DIR} on {db_host}, so {target} cannot be given a database"
            f" it can start on"))
    return RollbackVerdict(**base, restore=suggestion)


def _migrations(low: int, high: int) -> str:
    return f"migration {low}" if low == high else f"migrations {low} to {high}"


def default_target(pre: Preflight) -> str:
    """The newest release older than the (common) current one that is installed on every
    app host and actually ran here (a migration level is recorded for it): a release that
    was staged but failed, like 1.2.0-rc.1 before 1.2.0, is not "the previous release".
    Without any such record, the newest older installed release. A fleet on two releases
    (a canary, a rollout stopped half-way) goes back to the older of them."""
    currents = {n: st.current for n, st in pre.apps.items()}
    if len(set(currents.values())) == 2 and None not in currents.values():
        # A canary (or a rollout stopped half-way): back to what the other hosts run.
        return min(currents.values(), key=appcmd.version_key)
    if len(set(currents.values())) != 1:
        shown = ", ".join(f"{n}: {v}" for n, v in currents.items())
        raise BadInput(f"the app hosts run different releases ({shown}); say which one to roll"
                       f" back to with --to VERSION")
    current = next(iter(currents.values()))
    common = set.intersection(*(set(st.installed) for st in pre.apps.values()))
    ran = {v for v in common if any(v in st.levels for st in pre.apps.values())}
    target = previous_release(ran, current) or previous_release(common, current)
    if target is None:
        raise BadInput(f"no release older than {current} is installed on every app host; name"
                       f" one with --to VERSION (its tarball must be in the release source)")
    return target

