"""Everything the lab needs to know in one place: names, addresses, paths, packages."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from releasy_deploy.packages import REPO_PACKAGES as _TIER_PACKAGES

REPO_ROOT = Path(__file__).resolve().parent.parent

# Built once per machine and shared by every checkout; override for experiments.
CACHE_DIR = Path(os.environ.get("LAB_CACHE_DIR", "/var/cache/releasy-lab"))

# Debian suites a lab host can run, and the default: bookworm stays the default because CI
# proves the whole suite on it; trixie (Debian 13) hosts come from --suite / --db-suite.
SUITES = ("bookworm", "trixie")
SUITE = "bookworm"


def check_suite(suite: str, flag: str = "--suite") -> str:
    if suite not in SUITES:
        raise SystemExit(f"{flag} must be one of {', '.join(SUITES)}, got {suite!r}")
    return suite

# Packages baked into every host's base image. python3 + python3-psycopg only serve the
# Releasy stand-in (a Python script); real app hosts run upstream's static binary.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-psycopg",
    "iproute2", "procps", "netcat-openbsd", "curl", "ca-certificates", "sudo",
    "util-linux", "less",
)

# The offline apt repository: everything our tier tasks install, and nothing else. The
# list lives with the tier code so the two cannot drift apart. It names PostgreSQL's
# metapackages, so each suite's repository holds that suite's default major (and hosts can
# read which major that is from the metapackage's dependency, as on a real Debian host).
REPO_PACKAGES = _TIER_PACKAGES

# Bump when the image recipe changes so cached images are rebuilt.
IMAGE_RECIPE_VERSION = "4"


@dataclass(frozen=True)
class LabIdentity:
    """Names and addresses of one lab instance.

    LAB_ID lets several labs coexist on one machine (e.g. parallel developers); the default
    lab uses the names documented in the README (lab-proxy1, lab-sw, 10.77.0.0/24).
    """

    lab_id: str

    @property
    def prefix(self) -> str:
        return f"lab{self.lab_id}"

    @property
    def subnet_octet(self) -> int:
        return int(self.lab_id) if self.lab_id else 0

    def netns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    @property
    def switch_ns(self) -> str:
        return self.netns("sw")

    @property
    def outside_ns(self) -> str:
        return self.netns("outside")

    def address(self, last_octet: int) -> str:
        return f"10.77.{self.subnet_octet}.{last_octet}"

    def private_address(self, last_octet: int) -> str:
        """An address on the lab's private network (``--bastion``): the operator machine and
        the outside namespace have no interface on it, hence no route to it."""
        return f"10.78.{self.subnet_octet}.{last_octet}"

    def address6(self, last_octet: int) -> str:
        """The IPv6 ULA twin of `address` (fd77:0:LABID::LAST, /64 on the same bridge), in
        the canonical text form tools print (fd77::10 for the default lab)."""
        return str(ipaddress.IPv6Address(f"fd77:0:{self.subnet_octet}::{last_octet}"))

    @property
    def operator_address(self) -> str:
        return self.address(1)

    @property
    def outside_address(self) -> str:
        return self.address(254)

    @property
    def outside_address6(self) -> str:
        return self.address6(254)

    @property
    def uplink_if(self) -> str:
        # Interface names are limited to 15 characters.
        return f"{self.prefix}-up"

    @property
    def state_dir(self) -> Path:
        return REPO_ROOT / (".lab" if not self.lab_id else f".lab-{self.lab_id}")

    @property
    def run_dir(self) -> Path:
        return CACHE_DIR / "run" / self.prefix

    @property
    def cgroup_name(self) -> str:
        return f"releasy-{self.prefix}"


def current_identity() -> LabIdentity:
    lab_id = os.environ.get("LAB_ID", "")
    if lab_id and not (lab_id.isdigit() and 1 <= int(lab_id) <= 200):
        raise SystemExit(f"LAB_ID must be a number 1..200, got {lab_id!r}")
    return LabIdentity(lab_id)


PUBLIC, PRIVATE = "public", "private"
BASTION = "bastion"


@dataclass(frozen=True)
class HostSpec:
    name: str
    last_octet: int
    tiers: tuple[str, ...]
    ssh_user: str = "root"
    networks: tuple[str, ...] = (PUBLIC,)  # eth0 on the first, eth1 on the second

    def ssh_address(self, ident: LabIdentity) -> str:
        """Where SSH (and everything else from the operator) reaches the host."""
        return ident.address(self.last_octet) if PUBLIC in self.networks \
            else ident.private_address(self.last_octet)

    def tier_address(self, ident: LabIdentity) -> str:
        """The address other hosts use (the inventory's private_address)."""
        return ident.private_address(self.last_octet) if PRIVATE in self.networks \
            else ident.address(self.last_octet)

    def addresses(self, ident: LabIdentity) -> list[tuple[str, str]]:
        """(network, address) per interface, eth0 first."""
        return [(n, ident.address(self.last_octet) if n == PUBLIC
                 else ident.private_address(self.last_octet)) for n in self.networks]


def topology_hosts(topology: str, apps: int, bastion: bool = False,
                   proxies: int = 1) -> tuple[HostSpec, ...]:
    """The hosts of a lab topology. One app host is reached as a sudo user, not root,
    so both paths of the executor are exercised on every run.

    ``bastion``: app and db hosts only on the private network, the proxy on both (public
    side for clients), plus a `bastion` host (user `jump`, no tier) on both."""
    if bastion:
        if topology != "split":
            raise SystemExit("--bastion needs the split topology")
        plain = topology_hosts(topology, apps, proxies=proxies)
        both = (PUBLIC, PRIVATE)
        hosts = [HostSpec(BASTION, 5, (), "jump", both)]
        for spec in plain:
            nets = both if "proxy" in spec.tiers else (PRIVATE,)
            hosts.append(HostSpec(spec.name, spec.last_octet, spec.tiers, spec.ssh_user, nets))
        return tuple(hosts)
    if topology == "single":
        return (HostSpec("solo", 10, ("proxy", "app", "db")),)
    if topology != "split":
        raise SystemExit(f"unknown topology {topology!r}: use split or single")
    if not 1 <= apps <= 40:
        raise SystemExit(f"--apps must be between 1 and 40, got {apps}")
    if not 1 <= proxies <= 9:
        raise SystemExit(f"--proxies must be between 1 and 9, got {proxies}")
    hosts = [HostSpec(f"proxy{i}", 9 + i, ("proxy",)) for i in range(1, proxies + 1)]
    for i in range(1, apps + 1):
        hosts.append(HostSpec(f"app{i}", 20 + i, ("app",), "deploy" if i == 2 else "root"))
    hosts.append(HostSpec("db1", 100, ("db",)))
    return tuple(hosts)
