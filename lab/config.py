"""Everything the lab needs to know in one place: names, addresses, paths, packages."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from releasy_deploy.packages import ALL_PACKAGES

REPO_ROOT = Path(__file__).resolve().parent.parent

# Built once per machine and shared by every checkout; override for experiments.
CACHE_DIR = Path(os.environ.get("LAB_CACHE_DIR", "/var/cache/releasy-lab"))

SUITE = "bookworm"

# Packages baked into every host's base image. python3 + python3-psycopg only serve the
# Releasy stand-in (a Python script); real app hosts run upstream's static binary.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-psycopg",
    "iproute2", "procps", "netcat-openbsd", "curl", "ca-certificates", "sudo",
    "util-linux", "less",
)

# The offline apt repository: everything our tier tasks install, and nothing else. The
# list lives with the tier code so the two cannot drift apart.
REPO_PACKAGES = ALL_PACKAGES

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


@dataclass(frozen=True)
class HostSpec:
    name: str
    last_octet: int
    tiers: tuple[str, ...]
    ssh_user: str = "root"


def topology_hosts(topology: str, apps: int) -> tuple[HostSpec, ...]:
    """The hosts of a lab topology. One app host is reached as a sudo user, not root,
    so both paths of the executor are exercised on every run."""
    if topology == "single":
        return (HostSpec("solo", 10, ("proxy", "app", "db")),)
    if topology != "split":
        raise SystemExit(f"unknown topology {topology!r}: use split or single")
    if not 1 <= apps <= 40:
        raise SystemExit(f"--apps must be between 1 and 40, got {apps}")
    hosts = [HostSpec("proxy1", 10, ("proxy",))]
    for i in range(1, apps + 1):
        hosts.append(HostSpec(f"app{i}", 20 + i, ("app",), "deploy" if i == 2 else "root"))
    hosts.append(HostSpec("db1", 100, ("db",)))
    return tuple(hosts)
