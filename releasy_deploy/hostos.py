"""Which operating system a host runs, and whether this tool supports it. Pure.

The tool installs Debian packages and relies on Debian's layout (postgresql-common's
clusters, nginx's sites, ufw), so only the Debian releases it is tested on are accepted:
Debian 12 (bookworm) and Debian 13 (trixie), in any mix. Every tier reads the host's
``/etc/os-release`` (`facts.OsRelease`) in the facts round trip it makes first anyway, and
refuses an unsupported host before changing anything on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .errors import HostRefusedError

# VERSION_ID -> codename of the Debian releases this tool supports.
SUPPORTED_DEBIAN = {"12": "bookworm", "13": "trixie"}
# Their default PostgreSQL major: only what a dry-run predicts on a host whose apt lists are
# not loaded yet. Real runs read it from the host (the `postgresql` metapackage).
DEFAULT_PG_MAJOR = {"12": "15", "13": "17"}


class UnsupportedHostError(HostRefusedError):
    """The host's operating system or release cannot be managed (exit 2, nothing touched)."""


@dataclass(frozen=True)
class HostRelease:
    id: str  # "debian"
    version_id: str  # "13"
    codename: str  # "trixie"

    @property
    def label(self) -> str:
        """``Debian 13 (trixie)``, the way messages and `fab status` name it."""
        return f"{self.id.capitalize()} {self.version_id} ({self.codename})"

    @property
    def short(self) -> str:
        return f"{self.id.capitalize()} {self.version_id}"

    @property
    def default_pg_major(self) -> str:
        """The release's default PostgreSQL major as shipped (a prediction, see above)."""
        return DEFAULT_PG_MAJOR[self.version_id]


def describe(os_release: Mapping[str, str]) -> str:
    """What /etc/os-release says, for messages about hosts we do not support."""
    if not os_release:
        return "no readable /etc/os-release"
    pretty = os_release.get("PRETTY_NAME")
    if pretty:
        return pretty
    return " ".join(v for v in (os_release.get("ID"), os_release.get("VERSION_ID")) if v) or "?"


def parse_release(os_release: Mapping[str, str]) -> HostRelease | None:
    """The supported release ``os_release`` describes, or None."""
    if os_release.get("ID") != "debian":
        return None
    version = os_release.get("VERSION_ID", "")
    codename = SUPPORTED_DEBIAN.get(version)
    if codename is None:
        return None
    return HostRelease("debian", version, os_release.get("VERSION_CODENAME") or codename)


def supported_list() -> str:
    return ", ".join(f"Debian {v} ({c})" for v, c in SUPPORTED_DEBIAN.items())


def check_release(host: str, os_release: Mapping[str, str]) -> HostRelease:
    """The host's release; UnsupportedHostError naming the host and what it runs when this
    tool does not support it."""
    release = parse_release(os_release)
    if release is None:
        raise UnsupportedHostError(
            f"{host}: runs {describe(os_release)}, which this tool does not support "
            f"(supported: {supported_list()}). Nothing was changed on {host}: provision it "
            "with a supported release, or take it out of the inventory.", host=host)
    return release
