"""The proxy tier's facts: what it reads on a proxy host, in ONE round trip per host
(`fab site` prefetches them), and the typed state setup compares against."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from ..commands import nginx as cmd
from ..executor import HostConnection
from ..facts import (Fact, FileSha256, FileStat, LinkTarget, OsRelease, PackageVersion, ServiceActive,
                     ServiceEnabled, read_facts)
from ..hostos import check_release
from ..inventory import Inventory
from ..packages import PROXY_PACKAGES
from .proxy_render import tls_paths

__all__ = ["ProxyText", "ProxyPresent", "ProxyCert", "ProxyIpv6", "HostState", "state_facts",
           "read_state", "assume_installed"]


@dataclass(frozen=True)
class ProxyText(Fact):
    """The text of a regular file, or None when there is none."""

    path: str

    def shell(self) -> str:
        q = shlex.quote(self.path)
        return f"[ -f {q} ] || exit 3; cat -- {q}"

    def parse(self, out: str, code: int) -> str | None:
        return out if code == 0 else None


@dataclass(frozen=True)
class ProxyPresent(Fact):
    """Something is at ``path``: also true for a dangling symlink."""

    path: str

    def shell(self) -> str:
        q = shlex.quote(self.path)
        return f"[ -e {q} ] || [ -L {q} ]"

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass(frozen=True)
class ProxyCert(Fact):
    """The certificate at ``path`` (`commands.nginx.CertInfo`), or None."""

    path: str

    def shell(self) -> str:
        return cmd.cert_probe_shell(self.path)

    def parse(self, out: str, code: int) -> Any:
        return cmd.parse_cert_probe(out, code)


@dataclass(frozen=True)
class ProxyIpv6(Fact):
    """The host has IPv6 (nginx may listen on [::])."""

    def shell(self) -> str:
        return "[ -e /proc/net/if_inet6 ]"

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass
class HostState:
    """What `read_state` found on one proxy host."""

    packages: dict[str, str | None]
    stats: dict[str, dict[str, Any] | None]
    texts: dict[str, str | None]
    sha256: dict[str, str | None]
    cert: Any  # CertInfo | None
    site_link: str | None
    default_site: bool
    ipv6: bool
    active: bool
    enabled: bool

    @property
    def packages_installed(self) -> bool:
        return all(self.packages.values())


_TEXTS = (cmd.SITE_FILE, cmd.UPSTREAM_FILE, cmd.MAINTENANCE_PAGE)
_STATS = (cmd.CONF_DIR, cmd.TLS_DIR, cmd.SITE_FILE, cmd.UPSTREAM_FILE, cmd.MAINTENANCE_PAGE)


def state_facts(inv: Inventory) -> list[Fact]:
    """What the proxy tier looks at on a proxy host (one round trip; `fab site` prefetches
    it). Read with sudo: the key is root-only."""
    cert, key = tls_paths(inv)
    names: list[Fact] = [OsRelease(), *(PackageVersion(p) for p in PROXY_PACKAGES)]
    names += [FileStat(p) for p in (*_STATS, cert, key)]
    names += [ProxyText(p) for p in _TEXTS]
    names += [LinkTarget(cmd.SITE_LINK),
              ProxyPresent(cmd.DEFAULT_SITE), ProxyIpv6(), ServiceActive("nginx"),
              ServiceEnabled("nginx")]
    if inv.tls.mode == "files":
        names += [FileSha256(cert), FileSha256(key)]
    else:
        names.append(ProxyCert(cert))
    return names


def read_state(c: HostConnection, inv: Inventory) -> HostState:
    """The host's state (the prefetched facts when nothing changed since); refuses an
    unsupported release before anything is changed."""
    cert, key = tls_paths(inv)
    stat_paths = [*_STATS, cert, key]
    got = read_facts(c, state_facts(inv), sudo=True, reuse=True)
    check_release(c.name, got[OsRelease()])  # before anything is changed on it
    return HostState(
        packages={p: got[PackageVersion(p)] for p in PROXY_PACKAGES},
        stats={p: got[FileStat(p)] for p in stat_paths},
        texts={p: got[ProxyText(p)] for p in _TEXTS},
        sha256={p: got.get(FileSha256(p)) for p in (cert, key)},
        cert=got.get(ProxyCert(cert)),
        site_link=got[LinkTarget(cmd.SITE_LINK)],
        default_site=got[ProxyPresent(cmd.DEFAULT_SITE)],
        ipv6=got[ProxyIpv6()],
        active=got[ServiceActive("nginx")],
        enabled=got[ServiceEnabled("nginx")] == "enabled",
    )


def assume_installed(st: HostState) -> HostState:
    """Dry-run on a host without nginx: what installing Debian's package would leave."""
    st.packages = {p: "(to be installed)" for p in st.packages}
    st.default_site = True
    st.active = st.enabled = True
    return st
