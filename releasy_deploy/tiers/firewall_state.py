"""The firewall's view of a host: its facts (ufw's rules, status and defaults, the address
the host sees for our SSH connection, listening TCP ports, a pending revert, its resolvers
and what the names the egress plan needs resolve to, its global IPv6 addresses, the earlier
version's state directory, apt's proxy drop-in), all read in ONE round trip (`read_state`),
and the full plan of one host from them (`host_rules`).

`plan`, `apply`, `status` and `audit` all start from `read_state`, in parallel across hosts;
`fab site` prefetches the same facts (`state_facts`). Each host's outgoing rules come from
`releasy_deploy.firewall_egress.egress_rules`, fed with what the host itself reports in
that round trip.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..commands import apt_proxy, netprobe, ufw, ufw_state
from ..commands import firewall_revert as revert
from ..commands.systemd import parse_show
from ..commands.ufw import Address, LiveRule, Rule
from ..commands.ufw_state import UfwDefaults, UfwStatus
from ..errors import DeployError
from ..executor import HostConnection
from ..facts import SYSTEMD_SHOW, Fact, OsRelease, PackageVersion, read_facts
from ..firewall import host_plan
from ..firewall_egress import EgressError, HostNet, egress_rules, names_to_resolve
from ..hostos import check_release
from ..inventory import Host, Inventory
from ..packages import FIREWALL_PACKAGES

__all__ = [
    "SshClient", "UfwConf", "UfwUserRules", "UfwDefaultsFile", "TcpListeners",
    "RevertPending", "Resolvers", "Resolve", "Ipv6Addresses", "OldStateDir", "AptProxyConf",
    "HostState", "state_facts", "read_state", "host_rules",
]


@dataclass(frozen=True)
class SshClient(Fact):
    """(our address as the host sees it, its port), from $SSH_CONNECTION; None if unknown."""

    def shell(self) -> str:
        return netprobe.SSH_CLIENT_PROBE

    def parse(self, out: str, code: int) -> tuple[Address, int] | None:
        return netprobe.parse_ssh_connection(out.strip()) if code == 0 else None


# ufw's own files, not the `ufw` command (`commands.ufw_state`). ufw not installed: None.
@dataclass(frozen=True)
class UfwConf(Fact):
    """Enabled or not, logging and default policies (`ufw_state.UfwStatus`, no rows), from
    ufw.conf and /etc/default/ufw; None when ufw is not installed."""

    def shell(self) -> str:
        return ufw_state.CONF_PROBE

    def parse(self, out: str, code: int) -> UfwStatus | None:
        return ufw_state.parse_conf_probe(out, code)


@dataclass(frozen=True)
class UfwUserRules(Fact):
    """The rules added to ufw (`ufw.LiveRule`s, as ``ufw show added`` lists them), from
    user.rules and, when ufw filters IPv6, user6.rules; None when ufw is not installed."""

    def shell(self) -> str:
        return ufw.RULES_PROBE

    def parse(self, out: str, code: int) -> list[LiveRule] | None:
        return ufw.parse_user_rules(out) if code == 0 else None


@dataclass(frozen=True)
class UfwDefaultsFile(Fact):
    """The default policies in /etc/default/ufw (`ufw_state.UfwDefaults`), or None."""

    def shell(self) -> str:
        return ufw_state.DEFAULTS_PROBE

    def parse(self, out: str, code: int) -> UfwDefaults | None:
        return ufw_state.parse_defaults(out) if code == 0 else None


@dataclass(frozen=True)
class TcpListeners(Fact):
    """(address, port) of every listening TCP socket."""

    def shell(self) -> str:
        return netprobe.LISTENERS_PROBE

    def parse(self, out: str, code: int) -> list[tuple[str, int]]:
        return netprobe.parse_listeners(out) if code == 0 else []


@dataclass(frozen=True)
class RevertPending(Fact):
    """The lockout-revert timer is armed."""

    batch = SYSTEMD_SHOW
    unit = revert.REVERT_TIMER
    properties = ("ActiveState",)

    def parse(self, out: str, code: int) -> bool:
        return parse_show(out).get("ActiveState") in ("active", "activating")


@dataclass(frozen=True)
class Resolvers(Fact):
    """The DNS resolvers the host uses (resolv.conf, and systemd-resolved's upstreams when
    resolv.conf points at its stub)."""

    def shell(self) -> str:
        return netprobe.RESOLVERS_PROBE

    def parse(self, out: str, code: int) -> list:
        return netprobe.parse_resolvers(out)


@dataclass(frozen=True)
class Resolve(Fact):
    """The addresses ``name`` resolves to on the host (empty when it does not)."""

    name: str

    def shell(self) -> str:
        return netprobe.resolve_shell(self.name)

    def parse(self, out: str, code: int) -> tuple:
        return netprobe.parse_getent_hosts(out) if code == 0 else ()


@dataclass(frozen=True)
class Ipv6Addresses(Fact):
    """The host's global IPv6 addresses."""

    def shell(self) -> str:
        return netprobe.IPV6_PROBE

    def parse(self, out: str, code: int) -> list:
        return netprobe.parse_ipv6_addresses(out)


@dataclass(frozen=True)
class OldStateDir(Fact):
    """The earlier version's state directory: "root" when it is a real directory root owns
    (ours to remove), "foreign" for anything else there (never touched), None when absent."""

    def shell(self) -> str:
        return revert.OLD_STATE_PROBE

    def parse(self, out: str, code: int) -> str | None:
        return out.strip() or None


@dataclass(frozen=True)
class AptProxyConf(Fact):
    """apt's proxy drop-in as we wrote it, or None."""

    def shell(self) -> str:
        return apt_proxy.APT_PROXY_PROBE

    def parse(self, out: str, code: int) -> str | None:
        return out if code == 0 else None


@dataclass(frozen=True)
class HostState:
    """What one probe round trip saw on a host."""

    ssh_client: tuple[Address, int] | None  # (our address as the host sees it, its port)
    installed: bool
    status: UfwStatus | None
    rules: tuple[LiveRule, ...]
    defaults: UfwDefaults | None
    listeners: tuple[tuple[str, int], ...] = ()
    revert_pending: bool = False
    net: HostNet = HostNet()
    ipv6: tuple[ipaddress.IPv6Address, ...] = ()  # global IPv6 addresses
    old_state: str | None = None  # see the fw_old_state probe
    apt_proxy_conf: str | None = None

    @property
    def active(self) -> bool:
        return self.status is not None and self.status.active


_PROBES = (OsRelease(), SshClient(), PackageVersion(FIREWALL_PACKAGES[0]), UfwConf(),
           UfwUserRules(), UfwDefaultsFile(), TcpListeners(), RevertPending(), Resolvers(), Ipv6Addresses(),
           OldStateDir(), AptProxyConf())


def state_facts(inv: Inventory, host: Host) -> list[Fact]:
    """What `apply` looks at on one host (one round trip; `fab site` prefetches it)."""
    return [*_PROBES, *(Resolve(n) for n in names_to_resolve(inv, host))]


def read_state(c: HostConnection, resolve: tuple[str, ...] | list[str] = (), *,
               reuse: bool = False) -> HostState:
    """Everything the firewall tasks need from a host, in one round trip (read-only);
    ``resolve``: DNS names to resolve on the host (`names_to_resolve`). ``reuse``: what
    `fab site` prefetched will do (`facts.read_facts`)."""
    seen = read_facts(c, (*_PROBES, *(Resolve(n) for n in resolve)), sudo=True, reuse=reuse)
    check_release(c.name, seen[OsRelease()])  # before anything is changed on it
    installed = seen[PackageVersion(FIREWALL_PACKAGES[0])] is not None
    status, added = seen[UfwConf()], seen[UfwUserRules()]
    if installed and (status is None or added is None):
        raise DeployError(
            f"{c.name}: ufw is installed but {ufw_state.UFW_CONF} or {ufw.UFW_RULES} cannot "
            f"be read; run `sudo ufw status verbose` on {c.name} to see why, fix it and re-run",
            host=c.name)
    net = HostNet(tuple(seen[Resolvers()]), {n: seen[Resolve(n)] for n in resolve})
    return HostState(seen[SshClient()], installed, status, tuple(added or ()),
                     seen[UfwDefaultsFile()], tuple(seen[TcpListeners()]),
                     seen[RevertPending()], net, tuple(seen[Ipv6Addresses()]),
                     seen[OldStateDir()], seen[AptProxyConf()])


def host_rules(inv: Inventory, host: Host, state: HostState) -> list[Rule]:
    """The full plan of one host: ingress (topology) + egress (topology + what the host
    reported). Raises DeployError naming the host when an egress name does not resolve."""
    try:
        egress = egress_rules(inv, host, state.net)
    except EgressError as exc:
        raise DeployError(str(exc), host=exc.host) from None
    return host_plan(inv, host) + egress
