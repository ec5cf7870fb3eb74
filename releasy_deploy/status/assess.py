"""From facts to verdicts (pure): one host's row and its problems (`host_status`), which
app hosts every proxy lists (`rotation_of`), and the whole report with the fleet's
headlines (`build_report`)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .. import bluegreen
from ..commands import acme as acmecmd
from ..commands import app as appcmd
from ..commands import nginx as nginxcmd
from ..commands import postgres as pgcmd
from ..errors import DeployError, HostKeyError, UnreachableError, first_line
from ..facts import Fact, FileStat, LinkTarget, OsRelease, ServiceActive
from ..firewall_diff import summary_diff
from ..fleet import AppView, FleetFile, fleet_headlines
from ..hostos import describe, parse_release, supported_list
from ..inventory import Host, Inventory
from ..tiers import proxy_state
from ..tiers import proxy_render
from ..tiers import app_facts
from ..tiers.acme import CertInfo
from ..tiers.db import PgInstallation
from ..tiers.firewall_state import UfwConf, UfwDefaultsFile, UfwUserRules
from .model import (AppStatus, DbStatus, Disk, FirewallStatus, HostStatus, LockStatus,
                    ProxyStatus, StatusReport)
from .probes import (FIREWALL_FACTS, UNIT, StatusDisk, StatusExe, StatusPg, StatusVersion,
                     app_units, disk_paths)

#: a file system this full is reported as a problem.
DISK_FULL_PERCENT = 90


def app_server(inv: Inventory, host: Host) -> tuple[str, int]:
    """How the proxies' upstream file names ``host`` (split topology)."""
    return nginxcmd.check_servers([(host.private_address, inv.app.bind_port)])[0]


def _servers(text: str | None) -> tuple[list[tuple[str, int]] | None, str | None]:
    if text is None:
        return None, f"{nginxcmd.UPSTREAM_FILE} does not exist (run `fab proxy.setup`)"
    try:
        return nginxcmd.check_servers(nginxcmd.parse_upstream_servers(text)), None
    except ValueError as exc:
        return None, f"{nginxcmd.UPSTREAM_FILE}: {exc}"


def _firewall(inv: Inventory, host: Host, found: Mapping[Fact, Any]) -> FirewallStatus:
    installed = found[FIREWALL_FACTS[0]] is not None
    status, live = found[UfwConf()], found[UfwUserRules()]
    active = bool(status is not None and status.active)
    if not installed or live is None:
        return FirewallStatus(installed, active)
    diff = summary_diff(inv, host, live, active=active, defaults=found[UfwDefaultsFile()])
    return FirewallStatus(installed, active, missing=len(diff.add) + len(diff.recomment),
                          stale=len(diff.remove), unmanaged=len(diff.unexpected),
                          policy_differs=bool(diff.defaults or diff.ipv6))


def _live_on_single_host(inv: Inventory, host: Host, found: Mapping[Fact, Any]
                         ) -> tuple[str, bool | None, str | None]:
    """(live unit, in rotation, why not known) from the blue/green state."""
    try:
        live = bluegreen.find_live(bluegreen.parse_state(host.name, found, inv))
    except DeployError as exc:
        return UNIT, None, first_line(exc, host.name)
    if live.unit is None:
        return bluegreen.instance_unit(live.port), False, None
    return live.unit, True, None


def _app(inv: Inventory, host: Host, found: Mapping[Fact, Any],
         rotation: Mapping[str, bool | None]) -> tuple[AppStatus, str | None]:
    units = app_units(inv, host)
    note = None
    if inv.topology == "single":
        unit, in_rotation, note = _live_on_single_host(inv, host, found)
    else:
        unit, in_rotation = UNIT, rotation.get(host.name)
    bind = units[unit]
    props = found[app_facts.ReleasyUnit(unit)]
    pid = props.get("MainPID", "0")
    running = found[StatusVersion(bind)] or found[StatusExe(unit)]
    current = found[app_facts.ReleasyReleases()].current
    ports = {bluegreen.instance_unit(p): p for p in inv.app.bluegreen_ports}
    if unit in ports:  # a blue/green instance runs the release its link names
        running = running or bluegreen.version_of_link(
            found.get(LinkTarget(bluegreen.instance_link(ports[unit]))))
    app = AppStatus(unit=unit, active_state=props.get("ActiveState") or "inactive",
                    sub_state=props.get("SubState") or "", main_pid=int(pid) if pid.isdigit()
                    and int(pid) > 0 else None, current=current, running=running,
                    ready=bool(found[app_facts.ReleasyReady(appcmd.ready_url(bind))]),
                    in_rotation=in_rotation)
    return app, note


def host_status(inv: Inventory, host: Host, found: Mapping[Fact, Any] | BaseException,
                rotation: Mapping[str, bool | None]) -> HostStatus:
    """One row: what ``found`` (the host's facts, or why they could not be read) says,
    with the problems that make it unhealthy. Pure."""
    if isinstance(found, BaseException):
        reachable = not isinstance(found, (UnreachableError, HostKeyError))
        text = str(found) if isinstance(found, DeployError) else f"{type(found).__name__}: {found}"
        first = text.strip().splitlines()[0].removeprefix(f"{host.name}: ") if text.strip() else ""
        what = "unreachable" if reachable is False else "could not be read"
        return HostStatus(host.name, host.tiers, reachable, error=first,
                          problems=(f"{what}: {first}",))
    problems: list[str] = []
    app = proxy = db = None
    if host.has("app"):
        app, note = _app(inv, host, found, rotation)
        problems += _app_problems(host.name, app)
        if note:
            problems.append(note)
    if host.has("proxy"):
        servers, note = _servers(found[proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE)])
        cert = found[CertInfo(proxy_render.tls_paths(inv)[0])]
        days = cert.days_left() if cert is not None else None
        proxy = ProxyStatus(bool(found[ServiceActive("nginx")]),
                            None if servers is None else tuple(
                                nginxcmd.format_server(a, p) for a, p in servers), note,
                            _common_name(cert.issuer) if cert is not None else None,
                            None if days is None else int(days))
        if not proxy.nginx_active:
            problems.append("nginx is not running")
        problems += _cert_problems(inv, cert, days)
        if note:
            problems.append(note)
        elif inv.topology == "split":
            # By address, as `fab proxy.setup` takes them out (a known host on another port
            # shows as out of rotation instead).
            unknown = [nginxcmd.format_server(a, p)
                       for a, p in proxy_render.split_by_inventory(inv, servers or ())[1]]
            if unknown:
                problems.append(f"the upstream lists servers that are no app host of the"
                                f" inventory: {', '.join(unknown)} (`fab proxy.setup` takes"
                                f" them out)")
    if host.has("db"):
        if inv.database.kind == "postgres":
            pg = found[StatusPg(inv.database.name)]
            majors = found[PgInstallation()].cluster_majors
            db = DbStatus("postgres", bool(pg and pg[0]), pg[1] if pg else None,
                          "/".join(majors) or None)
            if not db.up:
                problems.append("PostgreSQL does not answer" if pg is not None
                                else "PostgreSQL is not installed (run `fab db.setup`)")
        else:
            st = found[FileStat(pgcmd.SQLITE_PATH)]
            db = DbStatus("sqlite", st is not None, st["size"] if st else None)
            if st is None:
                problems.append(f"the SQLite database {pgcmd.SQLITE_PATH} does not exist")
    firewall = _firewall(inv, host, found)
    problems += _firewall_problems(firewall)
    disks = tuple(Disk(label, path, *(found[StatusDisk(path)] or (None, None)))
                  for label, path in disk_paths(inv, host))
    for d in disks:
        if d.fs_used_percent is not None and d.fs_used_percent >= DISK_FULL_PERCENT:
            problems.append(f"the file system of {d.path} is {d.fs_used_percent}% full")
    release = parse_release(found[OsRelease()])
    if release is None:
        problems.append(f"runs {describe(found[OsRelease()])}: not supported "
                        f"({supported_list()})")
    problems = list(dict.fromkeys(problems))
    return HostStatus(host.name, host.tiers, True, None, app, proxy, db, firewall, disks,
                      tuple(problems),
                      release.short if release else describe(found[OsRelease()]))


def _common_name(dn: str) -> str:
    """``CN=Pebble Intermediate CA 1a,O=X`` -> ``Pebble Intermediate CA 1a`` (else the DN)."""
    match = re.search(r"(?:^|,)CN=((?:[^,\\]|\\.)*)", dn)
    return match.group(1) if match else dn


def _cert_problems(inv: Inventory, cert: Any, days: float | None) -> list[str]:
    if cert is None:
        return ["nginx has no TLS certificate (run `fab proxy.setup`)"]
    if days is None:
        return ["the TLS certificate cannot be read"]
    problems = []
    if days < acmecmd.UNHEALTHY_DAYS:
        problems.append(f"the TLS certificate expires in {days:.1f} days (from"
                        f" {_common_name(cert.issuer)}); renewal is not working")
    if inv.tls.mode == "acme" and cert.self_signed:
        problems.append("still the bootstrap self-signed certificate: the ACME CA has not"
                        " issued one (run `fab proxy.setup`)")
    return problems


def _app_problems(name: str, app: AppStatus) -> list[str]:
    problems = []
    if not app.active:
        state = app.active_state + (f" ({app.sub_state})" if app.sub_state else "")
        problems.append(f"{app.unit} is {state}, not active")
    if not app.ready:
        problems.append("/ready does not answer 200")
    if app.in_rotation is False:
        problems.append(f"out of rotation (`fab app.undrain --host {name}` puts it back)")
    if app.active and app.running and app.current and app.running != app.current:
        problems.append(f"runs {app.running} but current points at {app.current}"
                        f" (not restarted since the switch?)")
    return problems


def _firewall_problems(f: FirewallStatus) -> list[str]:
    if not f.installed:
        return ["the firewall (ufw) is not installed (run `fab firewall.apply`)"]
    if not f.active:
        return ["the firewall is not active (run `fab firewall.apply`)"]
    parts = [what for what, hit in ((f"{f.missing} planned rule(s) missing", f.missing),
                                    (f"{f.stale} stale rule(s) of ours", f.stale),
                                    ("default policies differ", f.policy_differs)) if hit]
    if parts:
        return [f"the firewall differs from the plan: {', '.join(parts)} (`fab"
                f" firewall.status` shows them, `fab firewall.apply` fixes them)"]
    return []


def rotation_of(inv: Inventory, found: Mapping[str, Mapping[Fact, Any] | BaseException]
                ) -> dict[str, bool | None]:
    """app host -> listed by every proxy (None when a proxy could not be read). Split
    topology only: on a single host the live blue/green instance says it."""
    if inv.topology != "split":
        return {}
    lists: list[list[tuple[str, int]] | None] = []
    for p in inv.hosts_in("proxy"):
        f = found.get(p.name)
        lists.append(None if isinstance(f, BaseException) or f is None
                     else _servers(f[proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE)])[0])
    out: dict[str, bool | None] = {}
    for h in inv.hosts_in("app"):
        server = app_server(inv, h)
        if any(servers is not None and server not in servers for servers in lists):
            out[h.name] = False
        elif any(servers is None for servers in lists):
            out[h.name] = None
        else:
            out[h.name] = True
    return out


def build_report(inv: Inventory, found: Mapping[str, Mapping[Fact, Any] | BaseException],
                 lock: LockStatus) -> StatusReport:
    """The report from every host's facts (or exception) and the lock state. Pure."""
    rotation = rotation_of(inv, found)
    hosts = tuple(host_status(inv, h, found[h.name], rotation) for h in inv.hosts)
    db = found.get(inv.db_host.name)
    record = None if isinstance(db, BaseException) or db is None else db.get(FleetFile())
    apps = {h.name: AppView(h.reachable, h.app.current if h.app else None,
                            h.app.ready if h.app else None)
            for h in hosts if "app" in h.tiers}
    headlines = fleet_headlines(apps, rotation, record) if inv.topology == "split" else []
    return StatusReport(inv.environment, inv.topology, hosts, lock, tuple(headlines))

