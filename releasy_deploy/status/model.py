"""The status report as data: one `HostStatus` row per host (its app, proxy, database,
firewall and disks, and the problems found), the deploy lock's `LockStatus`, and the
`StatusReport` over them with its verdict, the fleet's releases and the JSON document of
``fab status --json``. Frozen dataclasses, no I/O."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..commands import app as appcmd


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
