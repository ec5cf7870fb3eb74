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
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from . import audit, interrupts, schema
from . import backups as backups_mod
from .backups import Backup
from .commands import app as appcmd
from .commands import nginx as nginxcmd
from .commands import systemd
from .engine.plan import (AppState, canary_problem, hold_out_behind, hosts_to_roll,
                          plan_batches, plan_release_rollout, serving_problems)
from .engine.recovery import FailureReport, explain_failure
from .engine.recovery import first_line as _first_line
from .engine.recovery import names as _names
from .engine.runner import (JOURNAL_LINES, Preflight, RollingRunner, RolloutFailed,
                            parse_version_probe, releases_to_prune, server_of,
                            version_probe_argv)
from .errors import (BadInput, DeployError, ParallelError, RestoreFailed, StepFailed,
                     UnreachableError)
from .executor import HostConnection
from .facts import DiskFree, Fact, OsRelease, tolerant_reader
from .fleet import FleetFile
from .hostos import check_release
from .inventory import VERSION_RE, Host, Inventory, check_version
from .lock import deploy_lock
from .pipeline import Pipeline
from .releases import available_versions, fetch_release, is_stable, newest_release
from .session import Session
from .tiers import app as app_tier
from .tiers import maintenance_page
from .tiers import proxy as proxy_tier

__all__ = [
    "NEWEST", "RolloutFailed", "AppState", "rolling", "rollback", "plan_batches",
    "hosts_to_roll", "preflight_problems", "releases_to_prune", "previous_release",
    "available_versions", "newest_release", "rollback_verdict", "explain_failure",
    "FailureReport", "version_probe_argv", "parse_version_probe", "gather", "Preflight",
]

NEWEST = "newest"  # --version newest: the newest stable release the source lists
UNIT = app_tier.SERVICE_UNIT


# ======================================================================================
# Facts
# ======================================================================================
INSTANCES_PROBE = f"""for l in {appcmd.INSTANCES_DIR}/*; do
  [ -L "$l" ] && readlink -- "$l"
done
exit 0"""


def parse_instance_links(out: str, code: int = 0) -> frozenset[str]:
    """Versions that blue/green instance links (``instances/PORT -> releases/V``) use."""
    found = set()
    for line in out.splitlines():
        target = line.strip().rstrip("/")
        version = target.rsplit("/", 1)[-1]
        if "releases/" in target and VERSION_RE.fullmatch(version):
            found.add(version)
    return frozenset(found)


@dataclass(frozen=True)
class InstanceReleases(Fact):
    """The releases blue/green instance links use (kept by a prune)."""

    def shell(self) -> str:
        return INSTANCES_PROBE

    def parse(self, out: str, code: int) -> frozenset[str]:
        return parse_instance_links(out, code)


def _app_facts(inv: Inventory, host: Host) -> list[Fact]:
    bind = app_tier.bind_address(inv, host)
    return [app_tier.ReleasyReleases(), app_tier.ReleasyUnit(UNIT),
            app_tier.ReleasyReady(appcmd.ready_url(bind)), DiskFree(appcmd.RELEASY_ROOT),
            schema.RecordedLevels(), InstanceReleases()]


def _proxy_facts() -> list[Fact]:
    return [proxy_tier.ProxyText(proxy_tier.UPSTREAM_FILE)]


def _db_facts(inv: Inventory) -> list[Fact]:
    return [schema.level_fact(inv), backups_mod.BackupListing(), FleetFile()]


def gather(session: Session, *, skip_unreachable: bool = False) -> Preflight:
    """ONE facts round trip per host (app, proxy and db facts of a host batched), all
    hosts in parallel; read-only, so it also runs in dry-run.

    An unreachable app-only host fails the preflight (`StepFailed`, exit 4), naming
    ``--skip-unreachable``; with ``skip_unreachable`` it is left out of the preflight
    (`Preflight.unreachable`). The db host and every proxy must always answer."""
    inv = session.inventory
    wanted: dict[str, list[Fact]] = {}
    for h in inv.hosts:
        names: list[Fact] = []
        if h.has("app"):
            names += _app_facts(inv, h)
        if h.has("proxy"):
            names += _proxy_facts()
        if h.has("db"):
            names += _db_facts(inv)
        if names:
            wanted[h.name] = [OsRelease(), *names]
    targets = [inv.host(n) for n in wanted]
    app_only = [h.name for h in inv.hosts_in("app") if h.tiers == ("app",)]
    found = session.executor.each(targets, tolerant_reader(wanted, app_only))
    unreachable = {n: _first_line(exc, n) for n, exc in found.items()
                   if isinstance(exc, UnreachableError)}
    if unreachable and not skip_unreachable:
        why = "; ".join(unreachable.values())
        raise StepFailed(
            f"preflight: {_names(unreachable)} unreachable ({why})."
            f" Nothing was changed. To deploy to the other app hosts: `fab deploy.rolling"
            f" --version V --skip-unreachable` (it takes {_names(unreachable)} out of"
            f" rotation first and records it as behind).", unreachable=True)
    found = {n: f for n, f in found.items() if n not in unreachable}
    for name, seen in found.items():
        check_release(name, seen[OsRelease()])  # refused before anything changes

    upstreams: dict[str, list[tuple[str, int]]] = {}
    for h in inv.hosts_in("proxy"):
        text = found[h.name][proxy_tier.ProxyText(proxy_tier.UPSTREAM_FILE)]
        if text is None:
            raise DeployError(f"{h.name}: {proxy_tier.UPSTREAM_FILE} does not exist: nginx is not"
                              f" set up for Releasy there; run `fab proxy.setup` (or `fab"
                              f" site`) first", host=h.name)
        try:
            upstreams[h.name] = nginxcmd.check_servers(nginxcmd.parse_upstream_servers(text))
        except ValueError as exc:
            raise DeployError(f"{h.name}: {proxy_tier.UPSTREAM_FILE}: {exc}; run `fab"
                              f" proxy.setup --reset-upstreams`", host=h.name) from None

    db = found[inv.db_host.name]
    level = db[schema.level_fact(inv)]
    if level is None:
        raise DeployError(f"{inv.db_host.name}: cannot read the database's migration level"
                          f" (_sqlx_migrations in {inv.database.name}): is the database up?"
                          f" `fab db.setup` checks it", host=inv.db_host.name)
    apps: dict[str, AppState] = {}
    for h in inv.hosts_in("app"):
        if h.name in unreachable:
            continue
        f = found[h.name]
        rel: appcmd.ReleaseState = f[app_tier.ReleasyReleases()]
        server = server_of(inv, h)
        apps[h.name] = AppState(
            name=h.name, current=rel.current, installed=tuple(rel.installed()),
            markers={v: m for v, (m, _) in rel.releases.items()},
            active=f[app_tier.ReleasyUnit(UNIT)].get("ActiveState", "unknown"),
            ready=f[app_tier.ReleasyReady(appcmd.ready_url(app_tier.bind_address(inv, h)))],
            free_bytes=f[DiskFree(appcmd.RELEASY_ROOT)],
            levels=f[schema.RecordedLevels()], instance_releases=f[InstanceReleases()],
            in_rotation=all(server in servers for servers in upstreams.values()))
    record = db[FleetFile()]
    return Preflight(hold_out_behind(apps, record), upstreams, level,
                     db[backups_mod.BackupListing()], unreachable, record)


# ======================================================================================
# Pure decisions (unit-tested)
# ======================================================================================
def preflight_problems(states: Sequence[AppState], version: str) -> list[str]:
    """Why the rollout must not start; [] when it may. A host out of rotation that is not
    ready is only acceptable when it already runs V (an earlier rollout was cut there: it
    is simply rolled again)."""
    problems = []
    for s in states:
        if s.current is None:
            problems.append(f"{s.name}: no release is installed; provision it first (`fab"
                            f" app.setup --version X` or `fab site --version X`)")
        elif s.in_rotation and not s.ready:
            problems.append(f"{s.name}: in rotation but not answering /ready ({UNIT} is"
                            f" {s.active}, release {s.current}); a rollout would take more"
                            f" capacity out. Fix it first (`journalctl -u {UNIT}` on"
                            f" {s.name}), or `fab app.setup` to restart it")
        elif not s.in_rotation and not s.ready and s.current != version and not s.held_out:
            # (a host held out, behind the fleet, is updated in place whatever it does now:
            # its old release may well refuse the database's newer migrations)
            problems.append(f"{s.name}: out of rotation and not answering /ready ({UNIT} is"
                            f" {s.active}, release {s.current}); bring it back (`fab"
                            f" app.setup`, then re-run this rollout, which re-adds ready hosts)")
    return problems


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



# ======================================================================================
# Entry points
# ======================================================================================
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
            _restore_and_start(r, verdict, yes)


def _say_batch_lowered(session: Session, pipe: Pipeline, batch: int, app_hosts: int) -> None:
    if batch > app_hosts - 1:
        session.reporter.info(pipe.name, f"--batch {batch} lowered to {app_hosts - 1}: one"
                                         f" app host always stays in rotation")


def _restore_and_start(r: RollingRunner, verdict: RollbackVerdict, yes: bool) -> None:
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
        where = (f"every app host was started on {r.version}" if applied else
                 "every app host was restarted on the release it ran before")
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
                f" other app hosts are stopped. The maintenance page stays on until `fab"
                f" proxy.maintenance --off`."
                + (f"\nLast journal lines of {UNIT} on {host}:\n" + "\n".join(
                    f"    {line}" for line in journal.splitlines()) if journal else ""),
                host=host, cause=failed[host]) from None
    maintenance_page.switch_for_downtime(s, False, was_on=was_on)
    r.finish()
