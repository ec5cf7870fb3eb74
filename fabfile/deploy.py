"""Rollouts and the deploy lock.

Exit codes: 0 ok (also "nothing to do"), 1 the rollout failed (the message says where, and
what was put back), 2 bad input or refused (nothing changed; also: a confirmation was
needed but stdin is not a terminal and --yes was not given), 3 another deploy holds the
lock, 4 a host is unreachable."""
from invoke import task

from releasy_deploy.cli import (JSON_LOG_ENV, READ_ONLY, BadInput, confirm, operator_task,
                                session, use_json_log)
from releasy_deploy.lazy import lazy_module

rollout = lazy_module("releasy_deploy.rollout")
lock_ops = lazy_module("releasy_deploy.lock")

_COMMON_HELP = {
    "batch": "app hosts changed at a time after the first one (default 1; one host always"
             " stays in rotation)",
    "yes": "do not ask for confirmation (required when stdin is not a terminal, e.g. cron)",
    "dry-run": "read every host's state and show the plan and what would change; change"
               " nothing (the lock is not taken)",
    "wait": "seconds to wait for the deploy lock if another deploy holds it (default 0: fail"
            " at once with exit code 3)",
    "ready-timeout": "seconds a started instance has to answer /ready (default:"
                     " app.ready_timeout of the inventory)",
    "json-log": f"also append one JSON object per event to this file (same as {JSON_LOG_ENV})",
}


def _summary(s):
    tally = s.reporter.tally()
    if any(h.name in tally for h in s.inventory.hosts):  # not for bad input: no host touched
        s.reporter.summary()


@task
@operator_task(dry=READ_ONLY)
def lock(c):
    """Show who holds the deploy lock of this environment, or 'free'."""
    with session() as s:
        holder = lock_ops.holder_info(s)
        env = s.inventory.environment
        if holder is None:
            print(f"deploy lock of {env}: free")
        else:
            print(f"deploy lock of {env}: held by {holder.describe()} ({holder.where})")


@task(help={"yes": "do not ask for confirmation (required when stdin is not a terminal)"})
@operator_task
def unlock(c, yes=False):
    """End the session holding the deploy lock (a dead or stuck deploy), naming whom it ends.

    The holder's rollout, if it is still running, stops at its next step (lock lost); hosts
    it was changing may be left out of rotation: the next deploy puts them back."""
    with session(action="deploy.unlock", audited=True) as s:
        env = s.inventory.environment
        holder = lock_ops.holder_info(s)
        if holder is None:
            print(f"deploy lock of {env}: free; nothing to end")
            return
        confirm(f"End the deploy lock session of {holder.describe()} ({holder.where})?",
                yes=yes)
        ended = lock_ops.force_unlock(s)
        if ended is None:
            print(f"deploy lock of {env}: already free")
        else:
            print(f"deploy lock of {env}: ended the session of {ended.describe()}"
                  f" ({ended.where})")


@task(help={"reason": "why deploys are frozen (shown to everyone whose deploy is refused)"})
@operator_task
def freeze(c, reason=""):
    """Freeze deploys of this environment: every deploy (cron's too) refuses with exit code 3
    and the reason until `fab deploy.unfreeze`."""
    try:
        lock_ops.check_reason(reason)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    with session(action="deploy.freeze", audited=True, args={"reason": reason}) as s:
        env = s.inventory.environment
        if lock_ops.freeze(s, reason):
            print(f"deploys of {env} frozen: {' '.join(reason.split())}")
        else:
            record = lock_ops.frozen(s)
            print(f"deploys of {env} were already frozen by {record['by']} since"
                  f" {record['since']}: {record['reason']} (unchanged)")


@task
@operator_task
def unfreeze(c):
    """Lift `fab deploy.freeze`."""
    with session(action="deploy.unfreeze", audited=True) as s:
        env = s.inventory.environment
        record = lock_ops.unfreeze(s)
        if record is None:
            print(f"deploys of {env} were not frozen (unchanged)")
        else:
            print(f"deploys of {env} unfrozen (frozen by {record['by']} since"
                  f" {record['since']}: {record['reason']})")


@task(help={"version": "release to deploy, e.g. 1.2.3, or `newest`: the newest stable release"
                       " the release source offers",
            "only-if-newer": "do nothing (exit 0) unless some app host runs an older release"
                             " than --version and none runs a newer one (for cron)",
            "skip-unreachable": "deploy to the app hosts that answer; unreachable ones are"
                                " taken out of rotation first and recorded as behind (the db"
                                " host and every proxy must answer)",
            "canary": "deploy only the first N app hosts that need --version (the first runs"
                      " the migrations), keep them in rotation beside the others and stop;"
                      " the same command without --canary continues, `fab deploy.rollback`"
                      " goes back",
            **_COMMON_HELP})
@operator_task(dry="dry_run")
def rolling(c, version, batch=1, yes=False, dry_run=False, wait=0, ready_timeout=None,
            only_if_newer=False, skip_unreachable=False, json_log=None, canary=None):
    """Rolling deploy: preflight, stage, backup, migrate (first host alone), roll, finish."""
    use_json_log(json_log)
    with session(dry_run=dry_run, action="deploy.rolling", hooked=True, version=version) as s:
        try:
            rollout.rolling(s, version, batch=batch, yes=yes, wait=float(wait),
                            ready_timeout=ready_timeout, only_if_newer=only_if_newer,
                            skip_unreachable=skip_unreachable, canary=canary)
        finally:
            _summary(s)


@task(help={"to": "release to go back to (default: the newest installed release older than"
                  " the current one)",
            "restore-db": "if the database holds migrations the target does not know, restore"
                          " the dump taken before them first (loses writes made since; all"
                          " app hosts are stopped during the restore)",
            "backup": "with --restore-db: the dump to restore (a file name in"
                      " /var/backups/releasy on the db host) instead of the automatic choice",
            **_COMMON_HELP})
@operator_task(dry="dry_run")
def rollback(c, to=None, restore_db=False, backup=None, batch=1, yes=False, dry_run=False,
             wait=0, ready_timeout=None, json_log=None):
    """Roll back to the previous (or --to) release with the rolling mechanics; migration aware."""
    use_json_log(json_log)
    with session(dry_run=dry_run, action="deploy.rollback", hooked=True, version=to) as s:
        try:
            rollout.rollback(s, to=to, restore_db=restore_db, backup=backup, yes=yes,
                             batch=batch, wait=float(wait), ready_timeout=ready_timeout)
        finally:
            _summary(s)
