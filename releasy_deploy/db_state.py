"""What a database task reads before it acts (one facts round trip per host, read-only, also
in dry-run): the dumps and migration level on the db host, what runs on each app host, the
proxies' upstream lists; and the decisions taken on it before anything changes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import backups, schema
from .backups import Backup, BackupListing
from .commands import app as appcmd
from .commands import nginx as nginxcmd
from .commands import systemd
from .facts import Fact, read_facts
from .inventory import Inventory
from .tiers import proxy_state
from .tiers import app_facts

__all__ = ["AppUnits", "DbState", "gather_state", "units_on_hosts", "app_units", "unit_bind",
           "restore_level_problem"]


@dataclass(frozen=True)
class AppUnits:
    """One app host as a restore sees it."""

    host: str
    current: str | None
    units: Mapping[str, str]  # releasy.service (+ blue/green instances) -> ActiveState
    levels: Mapping[str, int]  # release -> recorded migration level

    @property
    def running(self) -> list[str]:
        return [u for u, state in self.units.items() if state in systemd.RUNNING_STATES]


@dataclass(frozen=True)
class DbState:
    backups: list[Backup]
    level: int | None
    apps: dict[str, AppUnits]
    upstreams: dict[str, list[tuple[str, int]] | None]  # proxy -> its servers (None: unread)

    @property
    def running_release(self) -> str | None:
        """The one release every app host points at, or None."""
        currents = {a.current for a in self.apps.values()}
        return currents.pop() if len(currents) == 1 else None


def units_on_hosts(running: Mapping[str, Sequence[str]]) -> str:
    """``releasy.service on app1, app2`` (hosts grouped by what runs on them)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for host, units in running.items():
        if units:
            groups.setdefault(tuple(units), []).append(host)
    if not groups:
        return "nothing (no Releasy unit is running)"
    return "; ".join(f"{', '.join(units)} on {', '.join(hosts)}"
                     for units, hosts in groups.items())


def app_units(inv: Inventory) -> list[str]:
    """The Releasy units that may run on an app host (blue/green only on a single host)."""
    units = [app_facts.SERVICE_UNIT]
    if inv.is_single_host:
        units += [appcmd.instance_unit(p) for p in inv.app.bluegreen_ports]
    return units


def unit_bind(inv: Inventory, host, unit: str) -> str:
    """Where ``unit`` listens on ``host`` (a blue/green instance: its own loopback port)."""
    for port in inv.app.bluegreen_ports if inv.is_single_host else ():
        if unit == appcmd.instance_unit(port):
            return appcmd.instance_bind(port)
    return appcmd.bind_address(inv, host)


def gather_state(session, *, with_apps: bool = True, with_rotation: bool = False) -> DbState:
    """ONE facts round trip per host, all in parallel (read-only: also in dry-run): the
    dumps and migration level on the db host, what runs on each app host, the proxies'
    upstream lists."""
    inv = session.inventory
    db = backups.backup_host(inv)
    upstream_fact = proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE)
    wanted: dict[str, list[Fact]] = {db.name: [BackupListing(), schema.level_fact(inv)]}
    if with_apps:
        for h in inv.hosts_in("app"):
            wanted.setdefault(h.name, []).extend(
                [app_facts.ReleasyReleases(), schema.RecordedLevels(),
                 *(app_facts.ReleasyUnit(u) for u in app_units(inv))])
    if with_rotation and not inv.is_single_host:
        for h in inv.hosts_in("proxy"):
            wanted.setdefault(h.name, []).append(upstream_fact)
    found = session.executor.each([inv.host(n) for n in wanted],
                                  lambda c: read_facts(c, wanted[c.name], sudo=True))
    apps = {}
    if with_apps:
        for h in inv.hosts_in("app"):
            f = found[h.name]
            apps[h.name] = AppUnits(
                h.name, f[app_facts.ReleasyReleases()].current,
                {u: f[app_facts.ReleasyUnit(u)].get("ActiveState", "unknown")
                 for u in app_units(inv)},
                f[schema.RecordedLevels()])
    upstreams: dict[str, list[tuple[str, int]] | None] = {}
    for name, names in wanted.items():
        if upstream_fact in names:
            text = found[name][upstream_fact]
            try:
                upstreams[name] = nginxcmd.parse_upstream_servers(text) if text else None
            except ValueError:
                upstreams[name] = None
    return DbState(found[db.name][BackupListing()], found[db.name][schema.level_fact(inv)],
                   apps, upstreams)




def restore_level_problem(backup: Backup, db_level: int | None,
                          running: Mapping[str, tuple[str | None, int | None]]) -> str | None:
    """Why restoring ``backup`` would leave Releasy unable to start, or None.

    ``running``: app host -> (its current release, the migration level recorded for that
    release). A release knows at least the level the database is at now (it runs on it)
    and the level recorded for it; a dump at a higher level holds migrations it does not
    know, and sqlx refuses to start on those (VersionMissing). A LOWER level is fine: the
    release applies the missing migrations itself when it starts.
    """
    blocked: dict[str, list[str]] = {}
    knows_of: dict[str, int] = {}
    for host, (version, recorded) in running.items():
        if version is None:
            continue
        known = max((x for x in (db_level, recorded) if x is not None), default=None)
        if known is not None and backup.level > known:
            blocked.setdefault(version, []).append(host)
            knows_of[version] = known
    if not blocked:
        return None
    parts = [f"{v} (on {', '.join(hosts)}) knows migrations up to {knows_of[v]}"
             for v, hosts in blocked.items()]
    return (f"{backup.name} is at migration level {backup.level}, but " + "; ".join(parts)
            + f": Releasy would refuse to start on it (the database would hold migrations the"
              f" binary does not know). Deploy a release that knows migration {backup.level}"
              f" first (`fab deploy.rolling --version V`), or pick a dump at level"
              f" {max(knows_of.values())} or lower (`fab db.backups`). Nothing was changed")

