"""Rolling deploys and rollbacks across the app hosts: preflight (facts, checks) and the
planners' inputs; the plan is executed by the engine (`releasy_deploy.engine`).

``fab deploy.rolling --version V`` runs these stages (`releasy_deploy.pipeline`), each
logged with its host and duration, to the terminal and the JSON event log:

1. preflight: the artifact is found and its sha256 verified (locally, before any SSH);
   the deploy lock is taken; ONE batched facts round trip per host, all hosts in parallel,
   reads what the rest decides on (releases, unit state, /ready, free space, recorded
   migration levels; the proxies' upstream lists; the database's migration level and the
   dumps on the db host, the fleet record). Every app host must be in rotation and ready.
   Hosts an earlier, killed rollout left out of rotation are put back if they are ready
   (converge), unless the fleet record names them as behind (`releasy_deploy.fleet`):
   those are updated in place and stay out. With ``--skip-unreachable`` an unreachable app host is
   left out of everything (taken out of rotation first) and recorded as behind.
2. stage: V is uploaded and unpacked on every app host that lacks it, in parallel; nothing
   is switched.
3. backup: a dump of the database on the db host (`releasy_deploy.backups`), before the
   first instance of V starts.
4. migrate: the first host is drained (removed from every proxy's upstream list, nginx
   reloaded, then we wait until the old nginx workers finished their in-flight requests:
   upstream does not drain on SIGTERM), switched, restarted ALONE and polled on /ready with
   a deadline: its start-up is where upstream runs the migrations, under its own advisory
   lock, which ours never touches. Its migration level is recorded for V. Re-added.
5. roll: the other hosts in batches of N (never every host out at once): drain, switch,
   start, /ready, validate (/version through the host, when the binary has one), re-add.
   A batch goes back into rotation in the same upstream change that drains the next one:
   one nginx reload per batch (n + 1 in all, not 2n), capacity steady at n - N.
6. finish: the migration level is recorded; old releases are pruned (keep
   ``app.releases_keep``, never the current, the previous or one a blue/green instance
   uses); an audit record is appended on every host; the lock is released.

Failure anywhere stops the rollout: the hosts being changed go back to their previous
release, are verified ready and re-added; hosts not reached are untouched; the proxies end
with every healthy host in rotation; `RolloutFailed` carries a one-paragraph explanation
(host, stage, last journal lines and, for a failed migration, the pre-deploy dump and the
exact command restoring it). Re-running converges: hosts already on V and ready are skipped.

``fab deploy.rollback [--to V] [--restore-db]`` uses the same mechanics towards an older
release, after checking the database is not ahead of it (`releasy_deploy.schema`); with
``--restore-db`` it restores the dump taken before the migrations the target does not know
(all app hosts are stopped meanwhile: a restore is downtime), then starts the target.

Here: the two tasks' entry points and their flags; their parts, one job each:
`preflight` (the facts read before anything changes, and what refuses a start),
`verdict` (where a rollback goes and whether a dump must be restored, pure), `restore`
(the rollback across migrations: stop, restore, start).
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from .. import backups as backups_mod
from .. import schema
from ..commands import app as appcmd
from ..engine.plan import canary_problem, plan_release_rollout, serving_problems
from ..engine.recovery import names as _names
from ..engine.runner import Preflight, RollingRunner, server_of
from ..errors import BadInput, DeployError
from ..inventory import Inventory, check_version
from ..lock import deploy_lock
from ..pipeline import Pipeline
from ..releases import fetch_release, newest_release
from ..session import Session
from .preflight import gather, preflight_problems
from .restore import restore_and_start
from .verdict import default_target, rollback_verdict

__all__ = ["NEWEST", "rolling", "rollback", "ready_timeout_of", "resolve_version"]

NEWEST = "newest"  # --version newest: the newest stable release the source lists


def ready_timeout_of(inv: Inventory, ready_timeout: Any) -> float:
    """``--ready-timeout`` of every rollout task (deploy.*, app.restart): seconds, 1 to
    3600; None: the inventory's app.ready_timeout."""
    if ready_timeout is None:
        return float(inv.app.ready_timeout)
    try:
        timeout = float(ready_timeout)
    except (TypeError, ValueError):
        raise BadInput(f"--ready-timeout must be a number of seconds, got"
                       f" {ready_timeout!r}") from None
    if not 1 <= timeout <= 3600:
        raise BadInput(f"--ready-timeout must be between 1 and 3600 seconds, got {timeout:g}")
    return timeout


def _check_common(inv: Inventory, batch: Any, ready_timeout: Any) -> tuple[int, float]:
    try:
        batch = int(batch)
    except (TypeError, ValueError):
        raise BadInput(f"--batch must be a whole number, got {batch!r}") from None
    if batch < 1:
        raise BadInput(f"--batch must be 1 or more, got {batch}")
    timeout = ready_timeout_of(inv, ready_timeout)
    apps = inv.hosts_in("app")
    if len(apps) < 2:
        raise BadInput(
            f"a rolling rollout needs at least two app hosts, so that one keeps serving while"
            f" the other restarts; {inv.path} lists {len(apps)} ({_names(h.name for h in apps)})."
            f" On a single host use `fab deploy.bluegreen --version V` (zero downtime).")
    return batch, timeout


def resolve_version(inv: Inventory, version: str) -> str:
    if version == NEWEST:
        newest = newest_release(inv.release)
        if newest is None:
            raise BadInput(f"--version newest: the release source ({inv.release.source}) offers"
                           f" no stable release with a pinned checksum")
        return newest
    try:
        return check_version(version)
    except ValueError as exc:
        raise BadInput(f"{exc} (or `newest`)") from None


def rolling(session: Session, version: str, *, batch: Any = 1, yes: bool = False,
            wait: float = 0, ready_timeout: Any = None, only_if_newer: bool = False,
            skip_unreachable: bool = False, canary: Any = None) -> None:
    """``fab deploy.rolling``: roll ``version`` (or ``newest``) over the app hosts.

    Raises BadInput (2) for bad flags or artifacts, LockBusy (3), RolloutFailed (1/4).
    ``only_if_newer``: do nothing unless some app host runs an older release than
    ``version`` and none runs a newer one (for cron). ``skip_unreachable``: app hosts
    that cannot be reached are taken out of rotation (if they are in) and left behind,
    recorded so on the db host; the db host and every proxy must still answer.
    ``canary``: change only the first N hosts that need ``version`` (the first runs the
    migrations), keep them in rotation beside the others and stop; the same command
    without it continues.
    """
    inv = session.inventory
    batch, timeout = _check_common(inv, batch, ready_timeout)
    if canary is not None:
        try:
            canary = int(canary)
        except (TypeError, ValueError):
            raise BadInput(f"--canary must be a whole number of hosts, got {canary!r}") from None
    pipe = Pipeline("deploy.rolling", session.reporter)
    with ExitStack() as stack:
        with pipe.stage("preflight", what="artifact, lock, every host's state"):
            version = resolve_version(inv, version)
            release = fetch_release(inv, version)
            lock = stack.enter_context(deploy_lock(session, version=version, wait=wait))
            pre = gather(session, skip_unreachable=skip_unreachable)
            if only_if_newer and not _older_somewhere(session, pre, version):
                return
            states = list(pre.apps.values())
            schema.refuse_if_behind(version, [st.levels for st in states], pre.backups,
                                    pre.db_level)
            problems = preflight_problems(states, version)
            problems += serving_problems(pre.apps.values(), pre.unreachable)
            refusal = canary_problem(states, version, canary) if canary is not None else None
            if refusal:
                raise BadInput(refusal + ". Nothing was changed.")
            if problems:
                raise DeployError("preflight: not starting the rollout (nothing was changed):\n  "
                                  + "\n  ".join(problems))
            plan = plan_release_rollout(
                states, version, batch, flow="deploy.rolling", title="Rolling deploy",
                backup=True, stage_release=True, canary=canary,
                unreachable=unreachable_in_rotation(session, pre),
                held_advice=f"Continue: `fab deploy.rolling --version {version}` (the other"
                            f" hosts); go back: `fab deploy.rollback`.")
            r = RollingRunner(session, pipe, lock, pre, plan, release=release,
                              ready_timeout=timeout)
            r.check_disk()
        _say_batch_lowered(session, pipe, batch, len(pre.apps))
        r.run(yes)


def unreachable_in_rotation(session: Session, pre: Preflight) -> list[tuple[str, bool]]:
    """(unreachable app host, listed by a proxy) pairs: what the plan says of them."""
    listed = {s for servers in pre.upstreams.values() for s in servers}
    inv = session.inventory
    return [(n, server_of(inv, inv.host(n)) in listed) for n in pre.unreachable]


def _older_somewhere(session: Session, pre: Preflight, version: str) -> bool:
    """--only-if-newer: False (nothing to do) when an app host runs a release newer than
    ``version``; hosts already on it are skipped by the rollout itself."""
    key = appcmd.version_key
    newer = [f"{n} runs {st.current}" for n, st in pre.apps.items()
             if st.current is not None and key(st.current) > key(version)]
    if newer:
        session.reporter.info("deploy.rolling",
                              f"--only-if-newer: {_names(newer)}, newer than {version}:"
                              f" nothing to do")
        return False
    return True


def rollback(session: Session, *, to: str | None = None, restore_db: bool = False,
             backup: str | None = None, yes: bool = False, batch: Any = 1, wait: float = 0,
             ready_timeout: Any = None) -> None:
    """``fab deploy.rollback``: back to ``to`` (default: the newest installed release
    older than the current one), refusing if the database is ahead of it unless
    ``restore_db`` (then the matching dump is restored first, with every app host stopped).
    """
    inv = session.inventory
    batch, timeout = _check_common(inv, batch, ready_timeout)
    if to is not None:
        try:
            check_version(to)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    if backup is not None and backups_mod.parse_backup_name(backup) is None:
        raise BadInput(f"--backup {backup!r} is not a dump name (like"
                       f" {inv.environment}_20260101T120000Z_from-1.0.0_to-1.1.0_m2.dump)")
    pipe = Pipeline("deploy.rollback", session.reporter)
    with ExitStack() as stack:
        with pipe.stage("preflight", what="lock, every host's state, migration check"):
            lock = stack.enter_context(deploy_lock(session, version=to, wait=wait))
            pre = gather(session)
            target = to or default_target(pre)
            release = None
            if not all(st.holds(target) for st in pre.apps.values()):
                release = fetch_release(inv, target)
            source = schema.known_level(target, [st.levels for st in pre.apps.values()],
                                        pre.backups)
            verdict = rollback_verdict(
                environment=inv.environment, kind=inv.database.kind, target=target,
                target_level=source.level, level_source=source.source,
                db_level=pre.db_level, backups=pre.backups, restore_db=restore_db,
                backup_name=backup, db_host=inv.db_host.name)
            if verdict.refusal:
                raise BadInput(verdict.refusal + ". Nothing was changed.")
            if verdict.note:
                session.reporter.info(pipe.name, verdict.note)
            if verdict.restore is None:
                problems = preflight_problems(list(pre.apps.values()), target)
                if problems:
                    raise DeployError("preflight: not starting the rollback (nothing was"
                                      " changed):\n  " + "\n  ".join(problems))
            plan = plan_release_rollout(list(pre.apps.values()), target, batch,
                                        flow="deploy.rollback", title="Rollback",
                                        backup=False, stage_release=True)
            r = RollingRunner(session, pipe, lock, pre, plan, release=release,
                              ready_timeout=timeout)
            r.check_disk()
        if verdict.restore is None:
            _say_batch_lowered(session, pipe, batch, len(pre.apps))
            r.run(yes)
        else:
            restore_and_start(r, verdict, yes)


def _say_batch_lowered(session: Session, pipe: Pipeline, batch: int, app_hosts: int) -> None:
    if batch > app_hosts - 1:
        session.reporter.info(pipe.name, f"--batch {batch} lowered to {app_hosts - 1}: one"
                                         f" app host always stays in rotation")

