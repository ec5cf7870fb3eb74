"""The app tier's facts: what it reads on an app host (packages, account, directories,
managed files, releases, unit state, readiness, kept secrets), in ONE batched round trip per
host (`fab site` prefetches it), and the typed `HostFacts` setup compares against."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..commands import app as cmd
from ..commands import kept_secrets as kept
from ..commands import systemd
from ..commands.nginx import UPSTREAM_FILE
from .. import schema
from ..facts import (SYSTEMD_SHOW, Batch, Fact, FileSha256, FileStat, OsRelease,
                     PackageVersion)
from ..inventory import Inventory
from ..packages import APP_PACKAGES
from . import db as db_tier

__all__ = [
    "SERVICE_UNIT", "bind_address", "PACKAGES", "ReleasyAccount", "ReleasyReleases",
    "ReleasyUnit", "ReleasyReady", "HttpGets", "KeptSecrets", "HostFacts", "state_facts",
    "fact_names",
    "live_instance",
]

SERVICE_UNIT = cmd.SERVICE
bind_address = cmd.bind_address

PACKAGES = APP_PACKAGES


@dataclass(frozen=True)
class ReleasyAccount(Fact):
    """The service account ``name`` (`commands.app.Account`)."""

    name: str

    def shell(self) -> str:
        return cmd.account_probe(self.name)

    def parse(self, out: str, code: int) -> cmd.Account:
        return cmd.parse_account(out, self.name)


@dataclass(frozen=True)
class ReleasyReleases(Fact):
    """The installed releases and where ``current`` points (`commands.app.ReleaseState`)."""

    def shell(self) -> str:
        return cmd.RELEASES_PROBE

    def parse(self, out: str, code: int) -> cmd.ReleaseState:
        return cmd.parse_releases(out)


@dataclass(frozen=True)
class ReleasyUnit(Fact):
    """``systemctl show`` of a Releasy unit, as {property: value}."""

    unit: str
    batch = SYSTEMD_SHOW
    properties = systemd.SHOW_PROPERTIES

    def __post_init__(self) -> None:
        super().__post_init__()
        systemd.check_unit(self.unit)

    def parse(self, out: str, code: int) -> dict[str, str]:
        return systemd.parse_show(out)


@dataclass(frozen=True)
class HttpGets(Batch):
    """The HTTP probes of one ``origin`` (``http://BIND``) in ONE curl, a transfer each
    (``--next``): one curl start on the host instead of one per probe.

    The readiness transfers come first and print only their ``ready EXITCODE`` line; at
    most one other transfer (`fab status`'s /version) prints a body, last, so its output
    is the rest, as if it had run alone."""

    origin: str

    def shell(self, facts: Sequence[Fact]) -> str:
        ready = [f for f in facts if isinstance(f, ReleasyReady)]
        bodied = [f for f in facts if not isinstance(f, ReleasyReady)]
        if len(bodied) > 1:
            raise ValueError(f"one HTTP probe with a body per curl, not {len(bodied)}")
        return "curl " + " --next ".join(
            shlex.join(f.transfer()) for f in [*ready, *bodied])  # type: ignore[attr-defined]

    def split(self, facts: Sequence[Fact], out: str, code: int) -> list[tuple[str, int]]:
        n = sum(isinstance(f, ReleasyReady) for f in facts)
        parts = out.split("\n", n)
        lines, rest = (parts[:n], parts[n]) if len(parts) > n else (parts, "")
        # A line missing or not curl's (no curl: exit 127, nothing printed) is not ready.
        codes = iter(cmd.parse_ready_line(line, code) for line in
                     [*lines, *[""] * (n - len(lines))])
        return [("", next(codes)) if isinstance(f, ReleasyReady) else (rest, code)
                for f in facts]


@dataclass(frozen=True)
class ReleasyReady(Fact):
    """GET ``url`` (a /ready URL) answered 2xx from the host itself."""

    url: str

    @property
    def batch(self) -> HttpGets:  # type: ignore[override]
        return HttpGets(self.url.rpartition("/")[0] or self.url)

    def transfer(self) -> list[str]:
        """curl's arguments for this probe's transfer (`commands.app.ready_transfer`)."""
        return cmd.ready_transfer(self.url)

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass(frozen=True)
class KeptSecrets(Fact):
    """The secrets the host keeps (`commands.kept_secrets.KeptState`): the kept file, and
    the secret lines of releasy.env (hosts set up before the file existed)."""

    def shell(self) -> str:
        return kept.PROBE

    def parse(self, out: str, code: int) -> kept.KeptState:
        return kept.parse_probe(out)


@dataclass(frozen=True)
class HostFacts:
    """What one batched read found on an app host."""

    missing_packages: tuple[str, ...]
    account: cmd.Account
    stats: dict[str, dict[str, Any] | None]  # path -> file_stat fact
    sums: dict[str, str | None]  # path -> sha256 of a regular file
    releases: cmd.ReleaseState
    unit: dict[str, str]  # systemctl show of releasy.service
    ready: bool
    instances: dict[int, dict[str, str]]  # blue/green port -> systemctl show (single host)
    instances_ready: dict[int, bool]
    kept: kept.KeptState | None = None  # the host's kept secrets, when read in this batch
    levels: Mapping[str, int] = field(default_factory=dict)  # release -> recorded level


_MANAGED_FILES = (cmd.ENV_FILE, f"{cmd.UNIT_DIR}/{cmd.SERVICE}",
                  f"{cmd.UNIT_DIR}/{cmd.TEMPLATE_UNIT}")


def state_facts(inv: Inventory, host: Any) -> list[Fact]:
    """What the app tier looks at on one app host, the kept secrets included (one round
    trip; `fab site` prefetches it)."""
    db_file = cmd.sqlite_path(db_tier.SQLITE_URL) if inv.database.kind == "sqlite" else None
    return [OsRelease(), *fact_names(inv, bind_address(inv, host), db_file), KeptSecrets()]


def fact_names(inv: Inventory, bind: str, db_file: str | None) -> list[Fact]:
    """The facts of one app host listening on ``bind`` (``db_file``: its SQLite file)."""
    user = inv.app.service_user
    names: list[Fact] = [PackageVersion(p) for p in PACKAGES]
    names.append(ReleasyAccount(user))
    names += [FileStat(d.path) for d in cmd.directories(user, user)]
    for path in _MANAGED_FILES:
        names += [FileStat(path), FileSha256(path)]
    if db_file:
        names.append(FileStat(db_file))
    names += [ReleasyReleases(), ReleasyUnit(SERVICE_UNIT), ReleasyReady(cmd.ready_url(bind)),
              schema.RecordedLevels()]
    if inv.is_single_host:
        # Whether the proxy routes to Releasy yet: only then does a restart cost requests.
        names.append(FileStat(UPSTREAM_FILE))
        # Blue/green instances (fab deploy.bluegreen) may have taken over from releasy.service.
        for port in inv.app.bluegreen_ports:
            names += [ReleasyUnit(cmd.instance_unit(port)),
                      ReleasyReady(cmd.ready_url(cmd.instance_bind(port)))]
    return names


def live_instance(inv: Inventory, f: "HostFacts") -> int | None:
    """The port of the blue/green instance serving instead of releasy.service, if any.

    After the first `fab deploy.bluegreen`, releasy.service is disabled and releasy@PORT
    runs; app.setup must then leave the service alone rather than start a second copy."""
    if f.unit.get("UnitFileState") == "enabled":
        return None
    for port in inv.app.bluegreen_ports:
        props = f.instances.get(port, {})
        if props.get("UnitFileState") == "enabled" or props.get("ActiveState") == "active":
            return port
    return None
