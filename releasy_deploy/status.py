"""``fab status``: the whole inventory in one table, read in one round trip per host.

Every host gets ONE batched facts script (`releasy_deploy.facts.read_facts`), all hosts in
parallel, holding every probe its tiers need:

- app hosts: the unit's state and MainPID, the release ``current`` points at and the one
  the process actually runs (GET /version when the binary has it, else the release
  directory of ``/proc/MainPID/exe``), ``/ready``, disk use of /opt/releasy and the data
  directory. On a single host the blue/green instances (``releasy@PORT``) are read too and
  the live one is the one the proxy lists (`releasy_deploy.bluegreen.find_live`);
- proxy hosts: nginx's state and the servers the upstream file lists. An app host is "in
  rotation" when every proxy lists it;
- the db host: PostgreSQL answering and the size of the app's database (SQLite: the size
  of the database file), disk use of the data directory;
- every host: ufw's state and rules, compared with the plan (`releasy_deploy.firewall`).

The deploy lock holder costs the db host one more round trip and a query through an SSH
tunnel (`lock.holder_info`: the same answer as ``fab deploy.lock``), right after its facts
while the other hosts are still being read.

Nothing here changes anything and no local secret is needed. An unreachable host is a
row marked unreachable, not a failure of the task. `StatusReport.problems` lists what is
unhealthy; the task exits 1 when there is anything in it (see `fabfile/status.py`).
"""
from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import bluegreen
from .commands import acme as acmecmd
from .commands import app as appcmd
from .commands import nginx as nginxcmd
from .commands import postgres as pgcmd
from .engine.runner import parse_version_probe, version_probe_argv
from .errors import DeployError, HostKeyError, UnreachableError, first_line
from .executor import HostConnection
from .firewall_diff import summary_diff
from .fleet import AppView, FleetFile, fleet_headlines
from .facts import Fact, FileStat, LinkTarget, OsRelease, PackageVersion, ServiceActive, read_facts
from .inventory import TIERS, VERSION_RE, Host, Inventory
from .lock import holder_info
from .hostos import describe, parse_release, supported_list
from .packages import FIREWALL_PACKAGES
from .session import Session, select_hosts
from .tiers import app as app_tier
from .tiers.acme import CertInfo
from .tiers.db import PgInstallation
from .tiers.firewall_state import UfwConf, UfwDefaultsFile, UfwUserRules
from .tiers import proxy as proxy_tier

__all__ = [
    "Disk", "AppStatus", "ProxyStatus", "DbStatus", "FirewallStatus", "HostStatus",
    "LockStatus", "StatusReport", "StatusDisk", "StatusExe", "StatusVersion", "StatusPg",
    "fact_names", "parse_disk", "parse_exe_release",
    "parse_pg", "host_status", "build_report", "render_table", "gather", "status",
    "to_json_text", "app_server", "rotation_of",
    "DISK_FULL_PERCENT", "PG_DATA_DIR",
]

UNIT = app_tier.SERVICE_UNIT
PG_DATA_DIR = "/var/lib/postgresql"
#: a file system this full is reported as a problem.
DISK_FULL_PERCENT = 90
#: seconds each network probe (curl, pg_isready) may take: status must stay quick.
PROBE_TIMEOUT_S = 3

# ------------------------------------------------------------------------------ probes
# $PATH -> "KB PERCENT": du of the directory, use% of its file system; exit 3 if absent.
_DISK_SHELL = """[ -d {q} ] || exit 3
set -- $(du -sk -- {q} 2>/dev/null | cut -f1) $(df -Pk -- {q} | awk 'NR == 2 {{ print $5 }}')
echo "${{1:-?}} ${{2:-?}}\""""

# The executable of the unit's main process (its release dir for a compiled binary).
_EXE_SHELL = """pid=$(systemctl show --property=MainPID --value -- {q})
[ "${{pid:-0}}" -gt 0 ] || exit 3
readlink "/proc/$pid/exe\""""


def _pg_shell(database: str) -> str:
    """Prints "down", or "up SIZE" (bytes of the database; "up ?" when it cannot be read)."""
    ready = pgcmd.pg_ready_shell(pgcmd.SOCKET_DIR, timeout=PROBE_TIMEOUT_S)
    size = shlex.join([*pgcmd.psql_argv(database), "-c",
                       "SELECT pg_database_size(current_database())"])
    # cd /: runuser keeps root's cwd, which postgres may not enter.
    return (f"cd / || exit 4\n{ready} || {{ echo down; exit 0; }}\n"
            f"s=$({size} 2>/dev/null) && echo \"up $s\" || echo 'up ?'")


def parse_disk(out: str, code: int) -> tuple[int | None, int | None] | None:
    """``KB PERCENT`` -> (bytes used by the directory, use% of its file system); None when
    the directory does not exist."""
    if code != 0:
        return None
    words = out.split()
    kb = int(words[0]) if words and words[0].isdigit() else None
    pct = words[1].rstrip("%") if len(words) > 1 else ""
    return (kb * 1024 if kb is not None else None, int(pct) if pct.isdigit() else None)


def parse_exe_release(out: str, code: int) -> str | None:
    """The release a process runs, from ``readlink /proc/PID/exe``:
    ``/opt/releasy/releases/V/releasy-server`` -> V (None for anything else, e.g. an
    interpreter running a script). A release directory removed since still names it."""
    if code != 0:
        return None
    path = out.strip().removesuffix(" (deleted)")
    m = re.fullmatch(re.escape(appcmd.RELEASES_DIR) + r"/([^/]+)/[^/]+", path)
    return m.group(1) if m and VERSION_RE.fullmatch(m.group(1)) else None


def parse_pg(out: str, code: int) -> tuple[bool, int | None] | None:
    """(up, database size in bytes) from `_pg_shell`; None when the probe itself failed
    (PostgreSQL not installed)."""
    words = out.split()
    if code != 0 or not words or words[0] not in ("up", "down"):
        return None
    if words[0] == "down":
        return (False, None)
    size = words[1] if len(words) > 1 else ""
    return (True, int(size) if size.isdigit() else None)


@dataclass(frozen=True)
class StatusDisk(Fact):
    """(bytes used by the directory ``path``, use% of its file system), or None."""

    path: str

    def shell(self) -> str:
        return _DISK_SHELL.format(q=shlex.quote(self.path))

    def parse(self, out: str, code: int) -> tuple[int | None, int | None] | None:
        return parse_disk(out, code)


@dataclass(frozen=True)
class StatusExe(Fact):
    """The release the unit's main process runs, from its executable, or None."""

    unit: str

    def shell(self) -> str:
        return _EXE_SHELL.format(q=shlex.quote(self.unit))

    def parse(self, out: str, code: int) -> str | None:
        return parse_exe_release(out, code)


@dataclass(frozen=True)
class StatusVersion(Fact):
    """The ``version`` GET /version on ``bind`` answers, or None."""

    bind: str

    def shell(self) -> str:
        return shlex.join(version_probe_argv(self.bind))

    def parse(self, out: str, code: int) -> str | None:
        return parse_version_probe(out)[1]


@dataclass(frozen=True)
class StatusPg(Fact):
    """(up, size of ``database`` in bytes), or None when the probe itself failed."""

    database: str

    def shell(self) -> str:
        return _pg_shell(self.database)

    def parse(self, out: str, code: int) -> tuple[bool, int | None] | None:
        return parse_pg(out, code)


# ------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class Disk:
    label: str  # "releasy" (/opt/releasy), "data", "pgdata"
    path: str
    used_bytes: int | None  # None: the directory does not exist
    fs_used_percent: int | None


@dataclass(frozen=True)
class AppStatus:
    unit: str  # the live unit: releasy.service, or releasy@PORT.service on a single host
    active_state: str  # systemd's ActiveState: active, failed, inactive, activating...
    sub_state: str
    main_pid: int | None
    current: str | None  # the release /opt/releasy/current points at
    running: str | None  # the release the live process runs (None: cannot tell)
    ready: bool  # GET /ready answered 2xx
    in_rotation: bool | None  # every proxy lists it (None: a proxy could not be read)

    @property
    def active(self) -> bool:
        return self.active_state == "active"


@dataclass(frozen=True)
class ProxyStatus:
    nginx_active: bool
    servers: tuple[str, ...] | None  # the upstream file's servers; None: missing/unparsable
    note: str | None = None
    cert_issuer: str | None = None  # of the certificate nginx serves (None: none found)
    cert_days: int | None = None  # whole days until it expires


@dataclass(frozen=True)
class DbStatus:
    kind: str  # postgres | sqlite
    up: bool
    size_bytes: int | None
    major: str | None = None  # PostgreSQL: the major of the host's cluster (None: none yet)


@dataclass(frozen=True)
class FirewallStatus:
    installed: bool
    active: bool
    missing: int = 0  # planned rules not there
    stale: int = 0  # rules of ours that are not planned (apply removes them)
    unmanaged: int = 0  # rules someone added by hand (apply keeps them)
    policy_differs: bool = False

    @property
    def matches_plan(self) -> bool:
        return self.installed and self.active and not (self.missing or self.stale
                                                       or self.policy_differs)


@dataclass(frozen=True)
class HostStatus:
    name: str
    tiers: tuple[str, ...]
    reachable: bool
    error: str | None = None  # why it was not reachable / could not be read
    app: AppStatus | None = None
    proxy: ProxyStatus | None = None
    db: DbStatus | None = None
    firewall: FirewallStatus | None = None
    disks: tuple[Disk, ...] = ()
    problems: tuple[str, ...] = ()
    os: str | None = None  # "Debian 13", or what /etc/os-release says on another system


@dataclass(frozen=True)
class LockStatus:
    holder: str | None  # "user@machine pid=N version=V since ..." or None when free
    error: str | None = None  # could not be read (then holder is None)


@dataclass(frozen=True)
class StatusReport:
    environment: str
    topology: str
    hosts: tuple[HostStatus, ...]
    lock: LockStatus
    #: what needs the operator first: a host the proxies route to that is unreachable or
    #: not ready, a host behind the fleet's release ("HOST: what"); listed first
    headlines: tuple[str, ...] = ()

    @property
    def problems(self) -> list[str]:
        return list(dict.fromkeys([*self.headlines, *(f"{h.name}: {p}" for h in self.hosts
                                                      for p in h.problems)]))

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def releases(self) -> dict[str, list[str]]:
        """release -> the app hosts whose current release it is (newest first)."""
        found: dict[str, list[str]] = {}
        for h in self.hosts:
            if h.app is not None and h.app.current is not None:
                found.setdefault(h.app.current, []).append(h.name)
        return dict(sorted(found.items(), key=lambda kv: appcmd.version_key(kv[0]),
                           reverse=True))

    def fleet_line(self) -> str | None:
        """A fleet on several releases (a canary, a rollout stopped half-way), said in one
        line with what to do next; None when every app host runs one release."""
        releases = self.releases
        if len(releases) < 2:
            return None
        parts = "; ".join(f"{v} on {', '.join(hosts)}" for v, hosts in releases.items())
        newest, oldest = next(iter(releases)), list(releases)[-1]
        return (f"MIXED FLEET: {parts}. Continue: `fab deploy.rolling --version {newest}`;"
                f" go back: `fab deploy.rollback` (to {oldest})")

    def to_json(self) -> dict[str, Any]:
        """The machine-readable document printed by ``fab status --json``."""
        return {
            "environment": self.environment,
            "topology": self.topology,
            "healthy": self.healthy,
            "problems": self.problems,
            "headlines": list(self.headlines),
            "releases": self.releases,
            "mixed_releases": len(self.releases) > 1,
            "lock": {"held": self.lock.holder is not None, "holder": self.lock.holder,
                     "error": self.lock.error},
            "hosts": [_host_json(h) for h in self.hosts],
        }


def _host_json(h: HostStatus) -> dict[str, Any]:
    data = asdict(h)
    if h.firewall is not None:
        data["firewall"]["matches_plan"] = h.firewall.matches_plan
    data["healthy"] = not h.problems
    return data


# ------------------------------------------------------------------------------ what to read
def _app_units(inv: Inventory, host: Host) -> dict[str, str]:
    """unit -> bind address of every unit that may be the live Releasy on ``host``."""
    units = {UNIT: app_tier.bind_address(inv, host)}
    if inv.topology == "single":
        for port in inv.app.bluegreen_ports:
            units[bluegreen.instance_unit(port)] = bluegreen.instance_bind(port)
    return units


def _disk_paths(inv: Inventory, host: Host) -> list[tuple[str, str]]:
    paths = []
    if host.has("app"):
        paths += [("releasy", appcmd.RELEASY_ROOT), ("data", appcmd.DATA_DIR)]
    if host.has("db") and inv.database.kind == "postgres":
        paths.append(("pgdata", PG_DATA_DIR))
    return paths


FIREWALL_FACTS = (PackageVersion(FIREWALL_PACKAGES[0]), UfwConf(), UfwUserRules(),
                  UfwDefaultsFile())


def fact_names(inv: Inventory, host: Host) -> list[Fact]:
    """Every fact ``fab status`` reads on ``host``: ONE facts round trip."""
    names: list[Fact] = [OsRelease(), *FIREWALL_FACTS]
    names += [StatusDisk(path) for _, path in _disk_paths(inv, host)]
    if host.has("app"):
        names.append(app_tier.ReleasyReleases())
        for unit, bind in _app_units(inv, host).items():
            names += [app_tier.ReleasyUnit(unit), app_tier.ReleasyReady(appcmd.ready_url(bind)),
                      StatusVersion(bind), StatusExe(unit)]
        if inv.topology == "single":
            names += bluegreen.fact_names(inv)
    if host.has("proxy"):
        names += [proxy_tier.ProxyText(proxy_tier.UPSTREAM_FILE), ServiceActive("nginx"),
                  CertInfo(proxy_tier.tls_paths(inv)[0])]
    if host.has("db"):
        names.append(FleetFile())
        if inv.database.kind == "postgres":
            names += [StatusPg(inv.database.name), PgInstallation()]
        else:
            names.append(FileStat(pgcmd.SQLITE_PATH))
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------ pure assembly
def app_server(inv: Inventory, host: Host) -> tuple[str, int]:
    """How the proxies' upstream file names ``host`` (split topology)."""
    return nginxcmd.check_servers([(host.private_address, inv.app.bind_port)])[0]


def _servers(text: str | None) -> tuple[list[tuple[str, int]] | None, str | None]:
    if text is None:
        return None, f"{proxy_tier.UPSTREAM_FILE} does not exist (run `fab proxy.setup`)"
    try:
        return nginxcmd.check_servers(nginxcmd.parse_upstream_servers(text)), None
    except ValueError as exc:
        return None, f"{proxy_tier.UPSTREAM_FILE}: {exc}"


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
    units = _app_units(inv, host)
    note = None
    if inv.topology == "single":
        unit, in_rotation, note = _live_on_single_host(inv, host, found)
    else:
        unit, in_rotation = UNIT, rotation.get(host.name)
    bind = units[unit]
    props = found[app_tier.ReleasyUnit(unit)]
    pid = props.get("MainPID", "0")
    running = found[StatusVersion(bind)] or found[StatusExe(unit)]
    current = found[app_tier.ReleasyReleases()].current
    ports = {bluegreen.instance_unit(p): p for p in inv.app.bluegreen_ports}
    if unit in ports:  # a blue/green instance runs the release its link names
        running = running or bluegreen.version_of_link(
            found.get(LinkTarget(bluegreen.instance_link(ports[unit]))))
    app = AppStatus(unit=unit, active_state=props.get("ActiveState") or "inactive",
                    sub_state=props.get("SubState") or "", main_pid=int(pid) if pid.isdigit()
                    and int(pid) > 0 else None, current=current, running=running,
                    ready=bool(found[app_tier.ReleasyReady(appcmd.ready_url(bind))]),
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
        servers, note = _servers(found[proxy_tier.ProxyText(proxy_tier.UPSTREAM_FILE)])
        cert = found[CertInfo(proxy_tier.tls_paths(inv)[0])]
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
            known = {app_server(inv, h) for h in inv.hosts_in("app")}
            unknown = [nginxcmd.format_server(a, p) for a, p in servers or () if (a, p) not in known]
            if unknown:
                problems.append(f"the upstream lists servers that are no app host of the"
                                f" inventory: {', '.join(unknown)}")
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
                  for label, path in _disk_paths(inv, host))
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
                     else _servers(f[proxy_tier.ProxyText(proxy_tier.UPSTREAM_FILE)])[0])
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


# ------------------------------------------------------------------------------ rendering
def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return "?"


def _cells(h: HostStatus) -> list[str]:
    tiers = ",".join(t for t in TIERS if t in h.tiers)
    if not h.reachable:
        return [h.name, tiers, "UNREACHABLE"] + [""] * 8
    if h.error is not None:
        return [h.name, tiers, "ERROR"] + [""] * 8
    release = service = ready = rotation = database = "-"
    services = []
    if h.app is not None:
        a = h.app
        release = a.running or ("?" if a.active else "stopped" if a.current else "none")
        if a.current != a.running:
            release += f" (current {a.current or 'none'})"
        unit = a.unit.removesuffix(".service")
        pid = f" pid {a.main_pid}" if a.main_pid else ""
        state = a.active_state if a.active else a.active_state.upper()
        services.append(f"{unit} {state}{pid}")
        ready = "yes" if a.ready else "NO"
        rotation = {True: "in", False: "OUT", None: "?"}[a.in_rotation]
        if h.proxy is not None and a.in_rotation:  # single host: say which instance
            rotation = f"in ({unit})"
    if h.proxy is not None:
        services.append("nginx " + ("active" if h.proxy.nginx_active else "INACTIVE"))
        if h.proxy.cert_issuer is not None:
            services.append(f"cert {h.proxy.cert_issuer}, {h.proxy.cert_days} days")
        if h.app is None:
            rotation = "?" if h.proxy.servers is None else f"{len(h.proxy.servers)} server(s)"
    if services:
        service = ", ".join(services)
    if h.db is not None:
        if h.db.kind == "postgres":
            name = f"postgres {h.db.major}" if h.db.major else "postgres"
            database = f"{name} up {_size(h.db.size_bytes)}" if h.db.up else f"{name} DOWN"
        else:
            database = f"sqlite {_size(h.db.size_bytes)}" if h.db.up else "sqlite MISSING"
    f = h.firewall
    if f is None or not f.installed:
        firewall = "NOT INSTALLED"
    elif not f.active:
        firewall = "INACTIVE"
    elif not f.matches_plan:
        firewall = "DIFFERS"
    else:
        firewall = "ok"
    if f is not None and f.unmanaged:
        firewall += f" (+{f.unmanaged} by hand)"
    parts = [f"{d.label} {_size(d.used_bytes)}" if d.used_bytes is not None
             else f"{d.label} none" for d in h.disks]
    pcts = [d.fs_used_percent for d in h.disks if d.fs_used_percent is not None]
    disk = " ".join(parts) + (f" (fs {max(pcts)}%)" if pcts else "") if parts else "-"
    return [h.name, tiers, "ok", h.os or "?", release, service, ready, rotation, firewall, disk,
            database]


HEADERS = ["HOST", "TIERS", "SSH", "OS", "RELEASE", "SERVICE", "READY", "ROTATION", "FIREWALL",
           "DISK", "DATABASE"]


def render_table(report: StatusReport) -> str:
    """The table, the lock line and the verdict (problems listed one per line)."""
    rows = [HEADERS] + [_cells(h) for h in report.hosts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    fleet = report.fleet_line()
    if fleet is not None:
        lines.append(fleet)
    if report.lock.error is not None:
        lines.append(f"deploy lock: unknown ({report.lock.error})")
    elif report.lock.holder is None:
        lines.append("deploy lock: free")
    else:
        lines.append(f"deploy lock: held by {report.lock.holder}")
    if report.healthy:
        lines.append(f"{report.environment}: healthy")
    else:
        lines.append(f"{report.environment}: UNHEALTHY")
        lines += [f"  ! {p}" for p in report.headlines]
        lines += [f"  - {p}" for p in report.problems if p not in report.headlines]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the task
def gather(session: Session) -> tuple[dict[str, Mapping[Fact, Any] | BaseException],
                                      LockStatus]:
    """(host -> its facts, or the exception that stopped reading them; the lock state).
    All hosts in parallel, ONE facts round trip each; the db host's worker then asks who
    holds the deploy lock (not at all when the host could not be read: no second wait for
    a connection time-out)."""
    inv = session.inventory
    db = inv.db_host.name
    lock = [LockStatus(None, f"{db} could not be read")]

    def read(c: HostConnection) -> Mapping[Fact, Any] | BaseException:
        try:
            found = read_facts(c, fact_names(inv, c.host), sudo=True)
        except DeployError as exc:  # a row of the table, not a failure of the task
            return exc
        if c.name == db:
            lock[0] = _lock_status(session)
        return found

    return session.executor.each(inv.hosts, read), lock[0]


def _lock_status(session: Session) -> LockStatus:
    try:
        info = holder_info(session)
    except Exception as exc:  # noqa: BLE001 - shown in the table; status goes on
        text = str(exc).strip() if isinstance(exc, DeployError) else (
            f"{type(exc).__name__}: {session.executor.masker(str(exc))}")
        return LockStatus(None, (text.splitlines() or ["?"])[0])
    return LockStatus(None if info is None else info.describe())


def status(session: Session, only: str | None = None) -> StatusReport:
    """Read every host and the deploy lock, and build the report; ``only`` (``--host
    H[,H...]``, fab's -H): the report shows and judges those hosts only (every host is
    still read: an app host's rotation is what the proxies say)."""
    shown = {h.name for h in select_hosts(session.inventory, only, "--host")} if only else None
    found, lock = gather(session)
    report = build_report(session.inventory, found, lock)
    if shown is None:
        return report
    return replace(report, hosts=tuple(h for h in report.hosts if h.name in shown))


def to_json_text(report: StatusReport) -> str:
    """``fab status --json``: the document, indented, one key order."""
    return json.dumps(report.to_json(), indent=2)
