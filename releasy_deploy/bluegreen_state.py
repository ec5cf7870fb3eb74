"""What a blue/green deploy decides from: the host's state read in one round trip (typed
facts: both instances' units, links, env files, ports, /ready answers, the proxy's upstream,
the database's migration level and the pre-deploy dumps), and which instance is live.
Read-only; also what `fab status` shows of the instances."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from . import backups as backups_mod
from . import schema
from .commands import app as appcmd
from .commands import bluegreen as bgcmd
from .commands import nginx as nginxcmd
from .commands import systemd
from .commands.bluegreen import instance_bind, instance_env_file, instance_link, instance_unit
from .errors import DeployError
from .executor import HostConnection
from .facts import Fact, FileSha256, FileStat, LinkTarget, OsRelease, read_facts
from .hostos import check_release
from .inventory import Inventory
from .tiers import proxy_state
from .tiers import app_facts

__all__ = ["PLAIN_UNIT", "LOOPBACK", "NotBlueGreenReady", "Listening", "UnitState",
           "HostState", "Live", "version_of_link", "fact_names", "parse_state", "read_state",
           "find_live"]

PLAIN_UNIT = app_facts.SERVICE_UNIT  # releasy.service, what app.setup runs
LOOPBACK = "127.0.0.1"

_RUNNING_STATES = systemd.RUNNING_STATES
_ENABLED_STATES = frozenset({"enabled", "enabled-runtime", "linked", "linked-runtime"})
_port = appcmd.check_port


class NotBlueGreenReady(DeployError):
    """The host is not in a state a blue/green deploy can start from (nothing changed)."""


def version_of_link(target: str | None) -> str | None:
    """The release version a link target (``/opt/releasy/releases/V`` or
    ``releases/V``) names, or None."""
    return appcmd.ReleaseState(current_target=target).current if target else None


@dataclass(frozen=True)
class Listening(Fact):
    """Something listens on TCP ``port``."""

    port: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _port(self.port)

    def shell(self) -> str:
        return bgcmd.listening_shell(self.port)

    def parse(self, out: str, code: int) -> bool:
        return code == 0 and bool(out.strip())


@dataclass(frozen=True)
class UnitState:
    """``systemctl show`` of one unit, reduced to what the plan needs."""

    name: str
    active_state: str = "inactive"
    unit_file_state: str = ""
    main_pid: int = 0
    need_daemon_reload: bool = False

    @classmethod
    def from_show(cls, name: str, props: Mapping[str, str]) -> UnitState:
        pid = props.get("MainPID", "0")
        return cls(name, props.get("ActiveState") or "inactive",
                   props.get("UnitFileState") or "", int(pid) if pid.isdigit() else 0,
                   props.get("NeedDaemonReload") == "yes")

    @property
    def active(self) -> bool:
        return self.active_state == "active"

    @property
    def running(self) -> bool:
        """Up or on its way (including a crash loop's auto-restart): it may hold its port."""
        return self.active_state in _RUNNING_STATES

    @property
    def failed(self) -> bool:
        return self.active_state == "failed"

    @property
    def enabled(self) -> bool:
        return self.unit_file_state in _ENABLED_STATES


@dataclass(frozen=True)
class HostState:
    """Everything a blue/green deploy decides from, read in one round trip."""

    host: str
    ports: tuple[int, int]
    bind_port: int  # where releasy.service listens
    units: Mapping[str, UnitState]  # releasy.service and both instances
    links: Mapping[int, str | None]  # port -> instance link target
    env_sums: Mapping[int, str | None]  # port -> sha256 of instance-PORT.env
    listening: Mapping[int, bool]  # port -> something listens on it
    ready: Mapping[int, bool]  # port -> GET /ready answered 2xx
    releases: appcmd.ReleaseState
    upstream_text: str | None  # the proxy's upstream file; None: absent
    template_installed: bool
    db_level: int | None = None  # the database's _sqlx_migrations level (None: unreadable)
    levels: Mapping[str, int] = field(default_factory=dict)  # release -> recorded level
    backups: tuple = ()  # the pre-deploy dumps on the host (backups.Backup), oldest first

    def units_on(self, port: int) -> list[str]:
        """Our units that listen on ``port`` when running."""
        units = [instance_unit(port)]
        if port == self.bind_port:
            units.append(PLAIN_UNIT)
        return units


def fact_names(inv: Inventory) -> list[Fact]:
    """Everything preflight reads, as ONE facts call (on a single host the proxy and the
    database are local too)."""
    names: list[Fact] = [
        app_facts.ReleasyUnit(PLAIN_UNIT), app_facts.ReleasyReleases(),
        proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE),
        FileStat(f"{appcmd.UNIT_DIR}/{appcmd.TEMPLATE_UNIT}"),
        schema.level_fact(inv), schema.RecordedLevels(), backups_mod.BackupListing()]
    for port in inv.app.bluegreen_ports:
        names += [app_facts.ReleasyUnit(instance_unit(port)), LinkTarget(instance_link(port)),
                  FileSha256(instance_env_file(port)), Listening(port),
                  app_facts.ReleasyReady(appcmd.ready_url(instance_bind(port)))]
    return names


def parse_state(host: str, found: Mapping[Fact, Any], inv: Inventory) -> HostState:
    ports = inv.app.bluegreen_ports
    units = {PLAIN_UNIT: UnitState.from_show(PLAIN_UNIT,
                                             found[app_facts.ReleasyUnit(PLAIN_UNIT)])}
    for port in ports:
        unit = instance_unit(port)
        units[unit] = UnitState.from_show(unit, found[app_facts.ReleasyUnit(unit)])
    return HostState(
        host=host, ports=ports, bind_port=inv.app.bind_port, units=units,
        links={p: found[LinkTarget(instance_link(p))] for p in ports},
        env_sums={p: found[FileSha256(instance_env_file(p))] for p in ports},
        listening={p: bool(found[Listening(p)]) for p in ports},
        ready={p: bool(found[app_facts.ReleasyReady(appcmd.ready_url(instance_bind(p)))])
               for p in ports},
        releases=found[app_facts.ReleasyReleases()],
        upstream_text=found[proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE)],
        template_installed=found[FileStat(f"{appcmd.UNIT_DIR}/{appcmd.TEMPLATE_UNIT}")]
        is not None,
        db_level=found[schema.level_fact(inv)],
        levels=found[schema.RecordedLevels()],
        backups=tuple(found[backups_mod.BackupListing()]),
    )


def read_state(c: HostConnection, inv: Inventory) -> HostState:
    """The host's blue/green state: ONE round trip (read-only: also runs in dry-run)."""
    found = read_facts(c, [OsRelease(), *fact_names(inv)], sudo=True)
    check_release(c.name, found[OsRelease()])  # refused before anything changes
    return parse_state(c.name, found, inv)


@dataclass(frozen=True)
class Live:
    """The instance the proxy sends traffic to."""

    port: int
    unit: str | None  # None: nothing of ours runs there (the site is down)
    version: str | None
    ready: bool

    def describe(self) -> str:
        where = instance_bind(self.port)
        if self.unit is None:
            return f"nothing (the proxy sends traffic to {where}, where no Releasy unit runs)"
        state = "ready" if self.ready else "NOT answering /ready"
        return f"{self.unit} on {where} running {self.version or 'an unknown release'} ({state})"


def find_live(state: HostState) -> Live:
    """Which instance the proxy sends traffic to. Raises NotBlueGreenReady when the host
    was never set up, or the proxy's upstream is not one of our loopback ports."""
    h = state.host
    if not state.template_installed:
        raise NotBlueGreenReady(
            f"{h}: the unit template {appcmd.UNIT_DIR}/{appcmd.TEMPLATE_UNIT} is not installed:"
            f" the app tier is not set up. Run `fab site --version VERSION` first.", host=h)
    if state.upstream_text is None:
        raise NotBlueGreenReady(
            f"{h}: {nginxcmd.UPSTREAM_FILE} does not exist: the proxy is not set up. Run"
            f" `fab site --version VERSION` first.", host=h)
    try:
        servers = nginxcmd.parse_upstream_servers(state.upstream_text)
    except ValueError as exc:
        servers, why = [], str(exc)
    else:
        why = "lists " + (", ".join(nginxcmd.format_server(a, p) for a, p in servers) or
                          "no server")
    ports = state.ports
    if len(servers) != 1 or servers[0][0] != LOOPBACK or servers[0][1] not in ports:
        wanted = " or ".join(instance_bind(p) for p in ports)
        raise NotBlueGreenReady(
            f"{h}: {nginxcmd.UPSTREAM_FILE} {why}; a blue/green deploy needs exactly one"
            f" server, {wanted} (app.bluegreen_ports). If no rollout is running, `fab"
            f" proxy.setup --reset-upstreams` restores the default, then re-run.", host=h)
    port = servers[0][1]
    instance = state.units[instance_unit(port)]
    plain = state.units[PLAIN_UNIT]
    if instance.active:
        return Live(port, instance.name, version_of_link(state.links[port]), state.ready[port])
    if port == state.bind_port and plain.active:
        return Live(port, PLAIN_UNIT, state.releases.current, state.ready[port])
    return Live(port, None, None, state.ready[port])
