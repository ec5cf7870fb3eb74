"""The rollout's preflight read: ONE batched facts round trip per host, all hosts in
parallel (the app hosts' releases, unit, /ready, free space, recorded migration levels and
blue/green instance links; the proxies' upstream lists; the database's migration level,
the dumps and the fleet record on the db host), turned into the planners' `Preflight`, and
`preflight_problems`, why a rollout must not start."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import backups as backups_mod
from .. import schema
from ..commands import app as appcmd
from ..commands import nginx as nginxcmd
from ..commands import probes
from ..engine.plan import AppState, hold_out_behind
from ..engine.recovery import first_line as _first_line
from ..engine.recovery import names as _names
from ..engine.runner import Preflight, server_of
from ..errors import DeployError, StepFailed, UnreachableError
from ..facts import DiskFree, Fact, OsRelease, tolerant_reader
from ..fleet import FleetFile
from ..hostos import check_release
from ..inventory import VERSION_RE, Host, Inventory
from ..session import Session
from ..tiers import proxy_state
from ..tiers import app_facts

UNIT = app_facts.SERVICE_UNIT


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
        return probes.INSTANCES_PROBE

    def parse(self, out: str, code: int) -> frozenset[str]:
        return parse_instance_links(out, code)


def _app_facts(inv: Inventory, host: Host) -> list[Fact]:
    bind = app_facts.bind_address(inv, host)
    return [app_facts.ReleasyReleases(), app_facts.ReleasyUnit(UNIT),
            app_facts.ReleasyReady(appcmd.ready_url(bind)), DiskFree(appcmd.RELEASY_ROOT),
            schema.RecordedLevels(), InstanceReleases()]


def _proxy_facts() -> list[Fact]:
    return [proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE)]


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
        text = found[h.name][proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE)]
        if text is None:
            raise DeployError(f"{h.name}: {nginxcmd.UPSTREAM_FILE} does not exist: nginx is not"
                              f" set up for Releasy there; run `fab proxy.setup` (or `fab"
                              f" site`) first", host=h.name)
        try:
            upstreams[h.name] = nginxcmd.check_servers(nginxcmd.parse_upstream_servers(text))
        except ValueError as exc:
            raise DeployError(f"{h.name}: {nginxcmd.UPSTREAM_FILE}: {exc}; run `fab"
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
        rel: appcmd.ReleaseState = f[app_facts.ReleasyReleases()]
        server = server_of(inv, h)
        apps[h.name] = AppState(
            name=h.name, current=rel.current, installed=tuple(rel.installed()),
            markers={v: m for v, (m, _) in rel.releases.items()},
            active=f[app_facts.ReleasyUnit(UNIT)].get("ActiveState", "unknown"),
            ready=f[app_facts.ReleasyReady(appcmd.ready_url(app_facts.bind_address(inv, h)))],
            free_bytes=f[DiskFree(appcmd.RELEASY_ROOT)],
            levels=f[schema.RecordedLevels()], instance_releases=f[InstanceReleases()],
            in_rotation=all(server in servers for servers in upstreams.values()))
    record = db[FleetFile()]
    return Preflight(hold_out_behind(apps, record), upstreams, level,
                     db[backups_mod.BackupListing()], unreachable, record)



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
