"""Rolling deploys and rollbacks across the app hosts, as a named pipeline.

``fab deploy.rolling --version V`` runs these stages (`releasy_deploy.pipeline`), each
logged with its host and duration, to the terminal and the JSON event log:

1. preflight: the artifact is found and its sha256 verified (locally, before any SSH);
   the deploy lock is taken; ONE batched facts round trip per host, all hosts in parallel,
   reads what the rest decides on (releases, unit state, /ready, free space, recorded
   migration levels; the proxies' upstream lists; the database's migration level and the
   dumps on the db host). Every app host must be in rotation and ready. Hosts an earlier,
   killed rollout left out of rotation are put back if they are ready (converge).
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

import json
import math
import re
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import audit, interrupts, schema
from . import backups as backups_mod
from .backups import Backup
from .cli import EXIT_FAILED, EXIT_UNREACHABLE, BadInput, Session, confirm, exit_code_for
from .commands import app as appcmd
from .commands import nginx as nginxcmd
from .commands import systemd
from .errors import DeployError, ParallelError
from .executor import HostConnection
from .inventory import VERSION_RE, Host, Inventory, ReleaseSource, check_version
from .lock import LockInfo, deploy_lock
from .pipeline import Pipeline
from .releases import LocalRelease, fetch_release
from .remote import Probe, facts, register_fact
from .tiers import app as app_tier
from .tiers import proxy as proxy_tier

__all__ = [
    "NEWEST", "RolloutFailed", "AppState", "rolling", "rollback", "plan_batches",
    "hosts_to_roll", "preflight_problems", "releases_to_prune", "previous_release",
    "available_versions", "newest_release", "rollback_verdict", "explain_failure",
    "FailureReport", "version_probe_argv", "parse_version_probe", "disk_needed",
]

NEWEST = "newest"  # --version newest: the newest stable release the source lists
UNIT = app_tier.SERVICE_UNIT
#: seconds to wait for old nginx workers to finish in-flight requests after a drain.
DRAIN_TIMEOUT_S = 90.0
JOURNAL_LINES = 12
DISK_MARGIN_BYTES = 16 * 1024 * 1024
_MIGRATION_FAILED = re.compile(r"migration[^\n]*fail|fail[^\n]*migration", re.IGNORECASE)


class RolloutFailed(DeployError):
    """A rollout stopped; the message is the explanation paragraph (exit code 1, or 4
    when the cause was an unreachable host)."""

    exit_code_hint = EXIT_FAILED

    def __init__(self, message: str, *, host: str | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message, host=host)
        if cause is not None and exit_code_for(cause) == EXIT_UNREACHABLE:
            self.exit_code_hint = EXIT_UNREACHABLE


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


register_fact("releasy_instance_releases")(
    lambda _: Probe(INSTANCES_PROBE, parse_instance_links))


@dataclass(frozen=True)
class AppState:
    """What preflight saw on one app host."""

    name: str
    current: str | None
    installed: tuple[str, ...] = ()  # complete releases, oldest first
    markers: Mapping[str, str | None] = field(default_factory=dict)  # version -> sha256
    active: str = "unknown"  # ActiveState of releasy.service
    ready: bool = False
    free_bytes: int | None = None
    levels: Mapping[str, int] = field(default_factory=dict)  # recorded migration levels
    instance_releases: frozenset[str] = frozenset()
    in_rotation: bool = True

    def holds(self, version: str, sha256: str | None = None) -> bool:
        if version not in self.installed:
            return False
        return sha256 is None or self.markers.get(version) == sha256


@dataclass
class Preflight:
    apps: dict[str, AppState]  # inventory order
    upstreams: dict[str, list[tuple[str, int]]]  # proxy host -> servers it lists
    db_level: int
    backups: list[Backup]


def _server(inv: Inventory, host: Host) -> tuple[str, int]:
    return nginxcmd.check_servers([(host.private_address, inv.app.bind_port)])[0]


def _app_facts(inv: Inventory, host: Host) -> list[str]:
    bind = app_tier.bind_address(inv, host)
    return ["releasy_releases", f"releasy_unit:{UNIT}", f"releasy_ready:{appcmd.ready_url(bind)}",
            f"disk_free:{appcmd.RELEASY_ROOT}", schema.RECORDED_FACT, "releasy_instance_releases"]


def _proxy_facts() -> list[str]:
    return [f"proxy_text:{proxy_tier.UPSTREAM_FILE}"]


def _db_facts(inv: Inventory) -> list[str]:
    return [schema.level_fact(inv), backups_mod.LISTING_FACT]


def gather(session: Session) -> Preflight:
    """ONE facts round trip per host (app, proxy and db facts of a host batched), all
    hosts in parallel; read-only, so it also runs in dry-run."""
    inv = session.inventory
    wanted: dict[str, list[str]] = {}
    for h in inv.hosts:
        names: list[str] = []
        if h.has("app"):
            names += _app_facts(inv, h)
        if h.has("proxy"):
            names += _proxy_facts()
        if h.has("db"):
            names += _db_facts(inv)
        if names:
            wanted[h.name] = names
    targets = [inv.host(n) for n in wanted]
    found = session.executor.each(targets, lambda c: facts(c, wanted[c.name], sudo=True))

    upstreams: dict[str, list[tuple[str, int]]] = {}
    for h in inv.hosts_in("proxy"):
        text = found[h.name][f"proxy_text:{proxy_tier.UPSTREAM_FILE}"]
        if text is None:
            raise DeployError(f"{h.name}: {proxy_tier.UPSTREAM_FILE} does not exist: nginx is not"
                              f" set up for Releasy there; run `fab proxy.setup` (or `fab"
                              f" site`) first", host=h.name)
        try:
            upstreams[h.name] = nginxcmd.check_servers(nginxcmd.parse_upstream_servers(text))
        except ValueError as exc:
            raise DeployError(f"{h.name}: {proxy_tier.UPSTREAM_FILE}: {exc}; run `fab"
                              f" proxy.setup --reset-upstreams`", host=h.name) from None

    apps: dict[str, AppState] = {}
    for h in inv.hosts_in("app"):
        f = found[h.name]
        rel: appcmd.ReleaseState = f["releasy_releases"]
        server = _server(inv, h)
        apps[h.name] = AppState(
            name=h.name, current=rel.current, installed=tuple(rel.installed()),
            markers={v: m for v, (m, _) in rel.releases.items()},
            active=f[f"releasy_unit:{UNIT}"].get("ActiveState", "unknown"),
            ready=f[f"releasy_ready:{appcmd.ready_url(app_tier.bind_address(inv, h))}"],
            free_bytes=f[f"disk_free:{appcmd.RELEASY_ROOT}"],
            levels=f[schema.RECORDED_FACT], instance_releases=f["releasy_instance_releases"],
            in_rotation=all(server in servers for servers in upstreams.values()))
    db = found[inv.db_host.name]
    level = db[schema.level_fact(inv)]
    if level is None:
        raise DeployError(f"{inv.db_host.name}: cannot read the database's migration level"
                          f" (_sqlx_migrations in {inv.database.name}): is the database up?"
                          f" `fab db.setup` checks it", host=inv.db_host.name)
    return Preflight(apps, upstreams, level, db[backups_mod.LISTING_FACT])


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
        elif not s.in_rotation and not s.ready and s.current != version:
            problems.append(f"{s.name}: out of rotation and not answering /ready ({UNIT} is"
                            f" {s.active}, release {s.current}); bring it back (`fab"
                            f" app.setup`, then re-run this rollout, which re-adds ready hosts)")
    return problems


def hosts_to_roll(states: Sequence[AppState], version: str) -> list[str]:
    """Hosts that still need V, those already out of rotation first (they serve nothing,
    so starting with them costs no capacity)."""
    todo = [s for s in states if not (s.current == version and s.ready)]
    return [s.name for s in sorted(todo, key=lambda s: s.in_rotation)]


def plan_batches(todo: Sequence[str], batch: int, app_hosts: int, *,
                 migrate_first: bool) -> tuple[str | None, list[list[str]]]:
    """(first host, started alone to run the migrations | None, then batches).

    A batch never holds every app host: at least one stays in rotation.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if app_hosts < 2:
        raise ValueError("a rolling rollout needs at least two app hosts")
    size = min(batch, app_hosts - 1)
    rest = list(todo)
    first = rest.pop(0) if migrate_first and rest else None
    return first, [rest[i:i + size] for i in range(0, len(rest), size)]


def releases_to_prune(installed: Iterable[str], keep: int,
                      protect: Iterable[str | None] = ()) -> list[str]:
    """Oldest releases beyond ``keep`` (by version order), never a protected one (the
    current, the previous, one a blue/green instance runs). Protected ones count towards
    ``keep``; if they alone exceed it, nothing else is kept."""
    protected = {p for p in protect if p}
    ordered = sorted(set(installed), key=appcmd.version_key)
    kept = set(protected)
    for v in reversed(ordered):
        if len(kept) >= keep:
            break
        kept.add(v)
    return [v for v in ordered if v not in kept]


def previous_release(installed: Iterable[str], current: str | None) -> str | None:
    """The newest installed release older than ``current`` (by version order)."""
    if current is None:
        return None
    older = [v for v in installed
             if appcmd.version_key(v) < appcmd.version_key(current)]
    return max(older, key=appcmd.version_key) if older else None


def disk_needed(tarball_bytes: int, unpacked_bytes: int) -> int:
    """Free bytes a host needs under /opt/releasy to stage a release (the uploaded
    tarball and the unpacked binary coexist for a moment)."""
    return tarball_bytes + unpacked_bytes + DISK_MARGIN_BYTES


def _unpacked_size(path: Path) -> int:
    with tarfile.open(path, mode="r:gz") as tar:
        return sum(m.size for m in tar.getmembers())


def is_stable(version: str) -> bool:
    return "-" not in version.partition("+")[0]


_TARBALL = re.compile(r"releasy-server-(?P<v>.+)-linux-(?P<arch>[A-Za-z0-9_]+)\.tar\.gz")


def available_versions(source: ReleaseSource) -> list[str]:
    """Versions the release source offers with a pinned checksum, oldest first. Local
    directory: its tarballs; URL: the versions pinned in release.sha256 / sha256_file."""
    found: set[str] = set()
    if source.is_url:
        found.update(source.sha256)
        if source.sha256_file is not None and source.sha256_file.is_file():
            for line in source.sha256_file.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) == 2:
                    m = _TARBALL.fullmatch(parts[1].lstrip("*"))
                    if m and m["arch"] == source.arch and VERSION_RE.fullmatch(m["v"]):
                        found.add(m["v"])
    elif source.directory is not None and source.directory.is_dir():
        for p in source.directory.iterdir():
            m = _TARBALL.fullmatch(p.name)
            if m and m["arch"] == source.arch and VERSION_RE.fullmatch(m["v"]) and p.is_file():
                try:
                    if source.expected_sha256(m["v"]) is not None:
                        found.add(m["v"])
                except Exception:  # noqa: BLE001 - a malformed sidecar: not offered
                    continue
    return sorted(found, key=appcmd.version_key)


def newest_release(source: ReleaseSource, *, prereleases: bool = False) -> str | None:
    """The newest version the source offers (pre-releases like 1.2.0-rc.1 excluded)."""
    versions = [v for v in available_versions(source) if prereleases or is_stable(v)]
    return versions[-1] if versions else None


def version_probe_argv(bind: str) -> list[str]:
    """curl on the app host: the body of GET /version, then an ``@status CODE`` line."""
    return ["curl", "-sS", "--max-time", "5", "-w", "\n@status %{http_code}\n",
            f"http://{bind}/version"]


def parse_version_probe(stdout: str) -> tuple[int | None, str | None]:
    """(HTTP status, the ``version`` of a JSON body) from `version_probe_argv`'s output."""
    body, sep, status = stdout.rstrip("\n").rpartition("\n@status ")
    if not sep:
        return None, None
    code = int(status) if status.strip().isdigit() else None
    try:
        data = json.loads(body) if body.strip() else None
    except ValueError:
        data = None
    version = data.get("version") if isinstance(data, dict) else None
    return code, version if isinstance(version, str) else None


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


@dataclass(frozen=True)
class FailureReport:
    action: str  # "Rolling deploy" / "Rollback"
    environment: str
    version: str
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


def _names(hosts: Iterable[str]) -> str:
    return ", ".join(hosts) or "none"


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
                     f" {_names(r.succeeded)}.")
    if r.done:
        parts.append(f"Already on {r.version} from this rollout: {_names(r.done)}.")
    parts.append(f"Not reached, untouched: {_names(r.untouched)}.")
    if r.rotation_error:
        parts.append(f"Restoring the rotation FAILED ({r.rotation_error}); check the proxies"
                     f" (`fab proxy.setup` keeps the live list; --reset-upstreams lists every"
                     f" app host).")
    else:
        parts.append(f"In rotation now: {_names(r.rotation)}.")
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
    text = " ".join(parts)
    if r.journal.strip():
        text += f"\nLast journal lines of {UNIT} on {r.host}:\n" + "\n".join(
            f"    {line}" for line in r.journal.rstrip("\n").splitlines())
    return text


def recent_journal_argv(unit: str, seconds: float, lines: int = JOURNAL_LINES) -> list[str]:
    """The unit's last journal lines of the past ``seconds`` only (whole seconds, rounded
    up): what an earlier attempt logged must not be read as this one's failure."""
    return [*systemd.journal_argv(unit, lines), "--since", f"-{max(1, math.ceil(seconds))}s"]


def _first_line(exc: BaseException, host: str | None = None) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].rstrip(".:")
    if host and line.startswith(f"{host}: "):
        line = line[len(host) + 2:]
    return line


# ======================================================================================
# The rollout
# ======================================================================================
class _HostsFailed(Exception):
    """Some hosts of a batch failed in the parallel switch/start/ready/validate part."""

    def __init__(self, failures: Mapping[str, BaseException], results: Iterable[str]) -> None:
        super().__init__("; ".join(f"{h}: {_first_line(e, h)}" for h, e in failures.items()))
        self.failures = dict(failures)
        self.succeeded = list(results)


class _Rollout:
    def __init__(self, session: Session, pipe: Pipeline, lock: LockInfo, pre: Preflight, *,
                 action: str, label: str, version: str, release: LocalRelease | None,
                 batch: int, ready_timeout: float, take_backup: bool) -> None:
        self.s = session
        self.inv = session.inventory
        self.ex = session.executor
        self.pipe = pipe
        self.lock = lock
        self.pre = pre
        self.action = action  # "deploy.rolling" / "deploy.rollback" (audit)
        self.label = label  # "Rolling deploy" / "Rollback" (messages)
        self.version = version
        self.release = release
        self.batch = batch
        self.ready_timeout = ready_timeout
        self.take_backup = take_backup
        self.app_names = list(pre.apps)
        self.rotation = [n for n, st in pre.apps.items() if st.in_rotation]
        self.steps: dict[str, str] = {}
        self.done: list[str] = []
        self.pending_readd: list[str] = []  # ready on V, back in rotation with the next drain
        self.restarted_at: dict[str, float] = {}  # host -> when we restarted it (monotonic)
        self.backup: Backup | None = None
        self.skipped: list[str] = []  # already on the target when the rollout started
        self.started = time.monotonic()

    # -- helpers -------------------------------------------------------------------------
    @property
    def dry(self) -> bool:
        return self.s.dry_run

    def servers(self, names: Iterable[str]) -> list[tuple[str, int]]:
        wanted = set(names)
        return [_server(self.inv, self.inv.host(n)) for n in self.app_names if n in wanted]

    def bind(self, name: str) -> str:
        return app_tier.bind_address(self.inv, self.inv.host(name))

    def set_rotation(self, names: Iterable[str]) -> None:
        wanted = set(names)
        ordered = [n for n in self.app_names if n in wanted]
        if not ordered:
            raise DeployError("refusing to leave no app host in rotation")
        proxy_tier.set_upstreams(self.s, self.servers(ordered))
        self.rotation = ordered

    def info(self, host: str, msg: str) -> None:
        self.s.reporter.info(host, msg)

    # -- preflight follow-ups --------------------------------------------------------------
    def converge_rotation(self) -> None:
        """Hosts a killed rollout left out of rotation go back in if they are ready; an
        upstream list that differs from the inventory's (unknown servers) is rewritten."""
        back = [n for n, st in self.pre.apps.items() if not st.in_rotation and st.ready]
        want = [n for n in self.app_names if n in self.rotation or n in back]
        expected = self.servers(want)
        if all(servers == expected for servers in self.pre.upstreams.values()):
            return
        for n in back:
            self.info(n, "out of rotation (left there by an earlier rollout?) and ready:"
                         " putting it back")
        self.set_rotation(want)

    def check_disk(self) -> None:
        if self.release is None:
            return
        need = disk_needed(self.release.size, _unpacked_size(self.release.path))
        short = [f"{n}: {st.free_bytes // 2**20} MiB free under {appcmd.RELEASY_ROOT}, need"
                 f" {need // 2**20} MiB" for n, st in self.pre.apps.items()
                 if not st.holds(self.version, self.release.sha256)
                 and st.free_bytes is not None and st.free_bytes < need]
        if short:
            raise DeployError("not enough disk space to stage " + self.version + ":\n  "
                              + "\n  ".join(short) + f"\n  Free some space (old releases in"
                              f" {appcmd.RELEASES_DIR}) and re-run; nothing was changed.")

    def plan_text(self, todo: Sequence[str], first: str | None,
                  batches: Sequence[Sequence[str]]) -> str:
        lines = []
        for n in todo:
            st = self.pre.apps[n]
            role = " (first, alone: any migrations run here)" if n == first else ""
            lines.append(f"{n}: {st.current} -> {self.version}{role}")
        skipped = [n for n in self.app_names if n not in todo]
        if skipped:
            lines.append(f"already on {self.version}: {', '.join(skipped)}")
        sizes = sorted({len(b) for b in batches})
        if batches:
            lines.append(f"then {len(batches)} batch(es) of {'/'.join(map(str, sizes))}")
        if self.take_backup:
            lines.append(f"database dump on {self.inv.db_host.name} first")
        return "; ".join(lines)

    # -- stages ------------------------------------------------------------------------------
    def stage_release(self) -> None:
        if self.release is None:
            return
        rel = self.release
        lacking = [n for n, st in self.pre.apps.items() if not st.holds(rel.version, rel.sha256)]
        with self.pipe.stage("stage", what=f"upload and unpack {rel.version} on"
                                           f" {_names(lacking)} (not activated)"):
            if lacking:
                self.ex.each(lacking, lambda c: app_tier.stage_release(c, rel))
            for n in self.app_names:
                if n not in lacking:
                    self.s.reporter.unchanged(n, f"release {rel.version} already staged")

    def take_dump(self, from_version: str | None) -> None:
        if not self.take_backup:
            return
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

    def switch_start(self, c: HostConnection) -> None:
        """On one drained host: switch, restart, wait for /ready, validate."""
        name = c.name
        st = self.pre.apps[name]
        before = st.current
        bind = self.bind(name)
        if st.current == self.version and st.active == "active":
            # V already runs here but is not ready: an earlier rollout was cut while it
            # started, maybe in a long migration. Restarting would throw that work away:
            # give it the ready timeout first.
            self.steps[name] = "ready"
            try:
                waited = app_tier.wait_ready(c, bind, self.ready_timeout)
            except DeployError as exc:
                self.info(name, f"{self.version} did not become ready"
                                f" ({_first_line(exc, name)}): restarting it")
            else:
                self.steps[name] = "validate"
                self.validate(c, bind)
                self.info(name, f"{self.version} (started earlier) ready after {waited:.1f} s")
                return
        self.steps[name] = "switch"
        app_tier.activate_release(c, self.version)
        self.steps[name] = "start"
        self.restarted_at[name] = time.monotonic()
        app_tier.restart_service(c)
        self.steps[name] = "ready"
        waited = app_tier.wait_ready(c, bind, self.ready_timeout)
        self.steps[name] = "validate"
        self.validate(c, bind)
        self.info(name, f"{before} -> {self.version}: ready after {waited:.1f} s")

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

    def drain(self, names: Sequence[str]) -> None:
        """Take ``names`` out of rotation and put the previous batch back, in ONE upstream
        change (one nginx reload), then wait until old workers finished their requests."""
        leaving = [n for n in names if n in self.rotation]
        back = [n for n in self.pending_readd if n not in names]
        if not leaving and not back:
            return
        remaining = [n for n in self.app_names
                     if (n in self.rotation or n in back) and n not in names]
        if not remaining:
            raise DeployError(f"draining {_names(names)} would leave no app host in rotation")
        self.set_rotation(remaining)
        self.pending_readd = []
        if leaving:
            self.ex.each(self.inv.hosts_in("proxy"),
                         lambda c: proxy_tier.wait_old_workers_gone(c, DRAIN_TIMEOUT_S))

    def readd_pending(self) -> None:
        if self.pending_readd:
            self.set_rotation([*self.rotation, *self.pending_readd])
            self.pending_readd = []

    def roll(self, stage: str, names: Sequence[str], *, readd_now: bool) -> None:
        """Drain, switch, start, ready, validate one batch, then re-add it: now (the last
        batch) or together with draining the next one (one reload instead of two). On
        failure, put it back on its previous release and raise RolloutFailed."""
        label = "+".join(names)
        what = (f"drain {label}, switch to {self.version}, start"
                + (" alone (migrations run here)" if stage == "migrate" else "")
                + ", wait for /ready, re-add")
        try:
            with self.pipe.stage(stage, label, what):
                for n in names:
                    self.steps[n] = "lock check"
                # Inside the recovered block: a lost lock still puts ready hosts back.
                self.lock.ensure_held()
                for n in names:
                    self.steps[n] = "drain"
                self.drain(names)
                if len(names) == 1:  # no thread pool (and no second copy of the error)
                    try:
                        self.switch_start(self.ex.conn(names[0]))
                    except Exception as exc:  # noqa: BLE001 - recovered below
                        raise _HostsFailed({names[0]: exc}, []) from None
                else:
                    try:
                        self.ex.each(names, self.switch_start)
                    except ParallelError as exc:
                        raise _HostsFailed(exc.failures, exc.results) from None
                for n in names:
                    self.steps[n] = "re-add"
                self.pending_readd += list(names)
                if readd_now:
                    self.readd_pending()
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure recovers
            with interrupts.deferred("putting the hosts back and restoring the rotation"):
                self.recover(stage, names, exc)
        self.done += list(names)

    # -- failure -----------------------------------------------------------------------------
    def recover(self, stage: str, names: Sequence[str], exc: BaseException) -> None:
        if isinstance(exc, _HostsFailed):
            failures, succeeded = exc.failures, exc.succeeded
        else:
            failures, succeeded = {n: exc for n in names}, []
        switched = [n for n in failures if self.steps.get(n) in ("switch", "start", "ready",
                                                                 "validate")]
        host = next(iter(failures))
        journals: dict[str, str] = {}
        reverted: dict[str, tuple[str | None, bool]] = {}
        notes: dict[str, str] = {}
        rotation_error = None
        with self.pipe.stage("failed", "+".join(names),
                             "put the changed hosts back on their previous release"):
            for n in switched:
                journals[n] = self.journal_since_restart(n)

            def revert(c: HostConnection) -> bool:
                previous = self.pre.apps[c.name].current
                if previous is None:
                    return False
                app_tier.activate_release(c, previous)
                app_tier.restart_service(c)
                app_tier.wait_ready(c, self.bind(c.name), self.ready_timeout)
                self.info(c.name, f"back on {previous}: ready")
                return True

            for n in switched:
                reverted[n] = (self.pre.apps[n].current, False)
            if switched:
                try:
                    results = self.ex.each(switched, revert)
                except ParallelError as rexc:
                    results = rexc.results
                    for n, e in rexc.failures.items():
                        notes[n] = f" ({_first_line(e, n)})"
                for n, ok in results.items():
                    reverted[n] = (self.pre.apps[n].current, bool(ok))
            # Hosts that failed before being switched still run their release: re-add them
            # only if they were serving before (they were ready at preflight).
            unswitched = [n for n in failures if n not in switched
                          and self.pre.apps[n].ready]
            healthy = [*self.rotation, *self.pending_readd, *succeeded, *unswitched,
                       *[n for n, (_, ok) in reverted.items() if ok]]
            try:
                self.set_rotation(healthy)
            except Exception as rexc:  # noqa: BLE001 - reported in the explanation
                rotation_error = _first_line(rexc)
        migration = False
        level_now = None
        if stage == "migrate":
            migration = bool(_MIGRATION_FAILED.search(journals.get(host, "")))
            try:
                level_now = schema.read_level(self.s)
            except Exception:  # noqa: BLE001 - the explanation says less then
                level_now = None
            migration = migration or (level_now is not None and level_now != self.pre.db_level)
        untouched = [n for n in self.app_names
                     if n not in self.done and n not in names and n not in self.skipped]
        report = FailureReport(
            action=self.label, environment=self.inv.environment, version=self.version,
            host=host, stage=stage, step=self.steps.get(host, "?"),
            reason=_first_line(failures[host], host), reverted=reverted, reverted_notes=notes,
            succeeded=succeeded, done=self.done, untouched=untouched,
            rotation=self.rotation, rotation_error=rotation_error,
            journal=journals.get(host, ""), migration_failed=migration, backup=self.backup,
            backup_host=self.inv.db_host.name,
            backups_enabled=self.inv.database.backup_before_deploy,
            level_before=self.pre.db_level, level_now=level_now,
            from_version=self.pre.apps[host].current)
        text = explain_failure(report)
        self.audit("failed", failed_host=host, stage=stage, reason=report.reason)
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
            return f"(journal not readable: {_first_line(exc, name)})"

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
        if current is None or current == self.version:
            return {}
        if any(current in st.levels for st in self.pre.apps.values()):
            return {}
        return {current: self.pre.db_level}

    def finish(self) -> None:
        with self.pipe.stage("finish", what="record the migration level, prune old releases,"
                                            " audit record on every host"):
            level = schema.read_level(self.s)
            keep = self.inv.app.releases_keep

            def tidy(c: HostConnection) -> None:
                st = self.pre.apps[c.name]
                installed = {*st.installed, self.version}
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
            if self.rotation != self.app_names:
                self.set_rotation(self.app_names)
            self.audit("ok", schema_level=level)
        elapsed = time.monotonic() - self.started
        self.info(self.pipe.name, f"{self.label.lower()} to {self.version} done:"
                                        f" {_names(self.done)} in {elapsed:.1f} s, every app"
                                        f" host in rotation")

    def audit(self, result: str, **extra: Any) -> None:
        entry = audit.record(
            self.action, self.inv.environment, to=self.version, result=result,
            from_versions={n: st.current for n, st in self.pre.apps.items()},
            hosts_changed=list(self.done), backup=self.backup.name if self.backup else None,
            seconds=round(time.monotonic() - self.started, 1), **extra)
        try:
            audit.write(self.ex, self.inv.hosts, entry)
        except Exception as exc:  # noqa: BLE001 - never hide the rollout's own outcome
            self.s.reporter.error(self.inv.environment, f"audit record not written everywhere:"
                                                        f" {_first_line(exc)}")

    # -- the whole rolling run ---------------------------------------------------------------
    def run(self, yes: bool) -> None:
        states = list(self.pre.apps.values())
        todo = hosts_to_roll(states, self.version)
        self.skipped = [n for n in self.app_names if n not in todo]
        migrate_first = not any(st.current == self.version and st.ready for st in states)
        first, batches = plan_batches(todo, self.batch, len(self.app_names),
                                      migrate_first=migrate_first)
        if self.batch > len(self.app_names) - 1:
            self.info(self.pipe.name, f"--batch {self.batch} lowered to"
                                            f" {len(self.app_names) - 1}: one app host always"
                                            f" stays in rotation")
        if not todo:
            if not self.dry:
                self.converge_rotation()
            self.info(self.pipe.name, f"every app host already runs {self.version} and"
                                            f" is ready: nothing to do")
            return
        self.take_backup = self.take_backup and migrate_first
        plan = self.plan_text(todo, first, batches)
        self.info(self.pipe.name, f"plan: {plan}")
        from_versions = {self.pre.apps[n].current for n in todo}
        from_version = from_versions.pop() if len(from_versions) == 1 else None
        if self.dry:
            self.converge_rotation()
            self.dry_run_report(first, batches, from_version)
            return
        confirm(f"{self.label} of {self.inv.environment} to {self.version}: {plan}. Go?",
                yes=yes)
        self.converge_rotation()
        self.stage_release()
        self.take_dump(from_version)
        if first is not None:
            self.roll("migrate", [first], readd_now=not batches)
            self.after_migrate()
        for i, names in enumerate(batches):
            self.roll("roll", names, readd_now=i == len(batches) - 1)
        self.finish()

    def after_migrate(self) -> None:
        """The first host is ready on V: the database is at V's level now; record it (and
        the previous release's level) on every app host at once."""
        level = schema.read_level(self.s)
        if level != self.pre.db_level:
            self.info(self.inv.db_host.name, f"migration level {self.pre.db_level} -> {level}"
                                             f" (applied once, by {self.done[-1]})")
        self.record_levels({n: {self.version: level, **self.from_levels()}
                            for n in self.app_names})

    def dry_run_report(self, first: str | None, batches: Sequence[Sequence[str]],
                       from_version: str | None) -> None:
        self.stage_release()
        self.take_dump(from_version)
        r = self.s.reporter
        for stage, names in ([("migrate", [first])] if first else []) + [
                ("roll", list(b)) for b in batches]:
            label = "+".join(names)
            r.would(label, f"{stage}: drain {label} from every proxy, switch"
                           f" {'/'.join(sorted({str(self.pre.apps[n].current) for n in names}))}"
                           f" -> {self.version}, restart {UNIT}, wait for /ready (up to"
                           f" {self.ready_timeout:g} s), validate, re-add")
        r.would(self.pipe.name, "finish: record the migration level, prune releases"
                                      f" beyond {self.inv.app.releases_keep}, audit record")


# Public name of the per-host steps (drain, start, /ready, re-add, recover), for
# `releasy_deploy.maintenance` (app.restart), which reuses them.
Rollout = _Rollout


# ======================================================================================
# Entry points
# ======================================================================================
def _check_common(inv: Inventory, batch: Any, ready_timeout: Any) -> tuple[int, float]:
    try:
        batch = int(batch)
    except (TypeError, ValueError):
        raise BadInput(f"--batch must be a whole number, got {batch!r}") from None
    if batch < 1:
        raise BadInput(f"--batch must be 1 or more, got {batch}")
    if ready_timeout is None:
        timeout = float(inv.app.ready_timeout)
    else:
        try:
            timeout = float(ready_timeout)
        except (TypeError, ValueError):
            raise BadInput(f"--ready-timeout must be a number of seconds, got"
                           f" {ready_timeout!r}") from None
        if not 1 <= timeout <= 3600:
            raise BadInput(f"--ready-timeout must be between 1 and 3600 seconds, got {timeout:g}")
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
            wait: float = 0, ready_timeout: Any = None, only_if_newer: bool = False) -> None:
    """``fab deploy.rolling``: roll ``version`` (or ``newest``) over the app hosts.

    Raises BadInput (2) for bad flags or artifacts, LockBusy (3), RolloutFailed (1/4).
    ``only_if_newer``: do nothing unless some app host runs an older release than
    ``version`` and none runs a newer one (for cron).
    """
    inv = session.inventory
    batch, timeout = _check_common(inv, batch, ready_timeout)
    pipe = Pipeline("deploy.rolling", session.reporter)
    with ExitStack() as stack:
        with pipe.stage("preflight", what="artifact, lock, every host's state"):
            version = resolve_version(inv, version)
            release = fetch_release(inv, version)
            lock = stack.enter_context(deploy_lock(session, version=version, wait=wait))
            pre = gather(session)
            if only_if_newer and not _older_somewhere(session, pre, version):
                return
            problems = preflight_problems(list(pre.apps.values()), version)
            if problems:
                raise DeployError("preflight: not starting the rollout (nothing was changed):\n  "
                                  + "\n  ".join(problems))
            r = _Rollout(session, pipe, lock, pre, action="deploy.rolling",
                         label="Rolling deploy", version=version, release=release,
                         batch=batch, ready_timeout=timeout, take_backup=True)
            r.check_disk()
        r.run(yes)


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
    Without any such record, the newest older installed release."""
    currents = {n: st.current for n, st in pre.apps.items()}
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
            r = _Rollout(session, pipe, lock, pre, action="deploy.rollback", label="Rollback",
                         version=target, release=release, batch=batch, ready_timeout=timeout,
                         take_backup=False)
            r.check_disk()
        if verdict.restore is None:
            r.run(yes)
        else:
            _restore_and_start(r, verdict, yes)


def _restore_and_start(r: _Rollout, verdict: RollbackVerdict, yes: bool) -> None:
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
    confirm(f"Roll {inv.environment} back to {r.version} restoring {dump.name}: every write"
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

    try:
        with r.pipe.stage("restore", db, f"stop every app host, restore {dump.name}"):
            for n in names:
                r.steps[n] = "stop"
            s.executor.each(names, stop)
            backups_mod.restore(s, dump)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
        # The database is unchanged (one transaction): restart what ran before.
        note = ""
        with r.pipe.stage("failed", what="restart every app host on its release"):
            try:
                s.executor.each(names, start_on(currents))
            except ParallelError as sexc:
                note = f" Restarting failed on {_names(sexc.failures)}: check them."
        r.audit("failed", stage="restore", reason=_first_line(exc))
        raise RolloutFailed(
            f"Rollback of {inv.environment} to {r.version} stopped while restoring"
            f" {dump.path} on {db}: {_first_line(exc, db)}. The restore runs in one"
            f" transaction, so the database is unchanged; every app host was restarted on the"
            f" release it ran before.{note}", host=db, cause=exc) from None

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
                f" other app hosts are stopped."
                + (f"\nLast journal lines of {UNIT} on {host}:\n" + "\n".join(
                    f"    {line}" for line in journal.splitlines()) if journal else ""),
                host=host, cause=failed[host]) from None
    r.finish()
