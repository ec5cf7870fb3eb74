"""What ``fab status`` reads on each host, as typed facts for ONE batched round trip: its
own probes (`StatusDisk`, `StatusExe`, `StatusVersion`, `StatusPg`, with the parsers of
their output) and `fact_names`, every fact a host's tiers need (the tiers', blue/green's
and the firewall's facts included)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .. import bluegreen
from ..commands import nginx as nginxcmd
from ..commands import app as appcmd
from ..commands import postgres as pgcmd
from ..commands import probes
from ..engine.runner import parse_version_probe, version_probe_argv
from ..facts import (SYSTEMD_SHOW, Batch, Fact, FileStat, OsRelease, PackageVersion,
                     ServiceActive)
from ..fleet import FleetFile
from ..inventory import VERSION_RE, Host, Inventory
from ..packages import FIREWALL_PACKAGES
from ..tiers import proxy_state
from ..tiers import proxy_render
from ..tiers import app_facts
from ..tiers.acme import CertInfo
from ..tiers.db import PgInstallation
from ..tiers.firewall_state import UfwConf, UfwDefaultsFile, UfwUserRules

UNIT = app_facts.SERVICE_UNIT


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
    """(up, database size in bytes) from `commands.probes.pg_shell`; None when the probe itself failed
    (PostgreSQL not installed)."""
    words = out.split()
    if code != 0 or not words or words[0] not in ("up", "down"):
        return None
    if words[0] == "down":
        return (False, None)
    size = words[1] if len(words) > 1 else ""
    return (True, int(size) if size.isdigit() else None)


class _DiskBatch(Batch):
    """Every `StatusDisk` of a script in one frame: a du per directory, one df for all."""

    def shell(self, facts: Sequence[Fact]) -> str:
        return probes.disk_shell([f.path for f in facts])  # type: ignore[attr-defined]

    def split(self, facts: Sequence[Fact], out: str, code: int) -> list[tuple[str, int]]:
        parts = probes.split_disk_output([f.path for f in facts], out)  # type: ignore[attr-defined]
        return [(p, 0) if p is not None else ("", 3) for p in parts]


@dataclass(frozen=True)
class StatusDisk(Fact):
    """(bytes used by the directory ``path``, use% of its file system), or None."""

    path: str
    batch = _DiskBatch()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path.startswith("/") or "\n" in self.path:
            raise ValueError(f"StatusDisk needs an absolute path on one line, not {self.path!r}")

    def parse(self, out: str, code: int) -> tuple[int | None, int | None] | None:
        return parse_disk(out, code)


@dataclass(frozen=True)
class StatusExe(Fact):
    """The release the unit's main process runs, from its executable, or None; read by the
    host's one ``systemctl show`` (`facts.SYSTEMD_SHOW`)."""

    unit: str
    batch = SYSTEMD_SHOW
    properties = ("MainPID",)
    main_exe = True

    def parse(self, out: str, code: int) -> str | None:
        return parse_exe_release(out, code)


@dataclass(frozen=True)
class StatusVersion(Fact):
    """The ``version`` GET /version on ``bind`` answers, or None; read by the same curl as
    the host's readiness (`app_facts.HttpGets`)."""

    bind: str

    @property
    def batch(self) -> app_facts.HttpGets:  # type: ignore[override]
        return app_facts.HttpGets(appcmd.http_origin(self.bind))

    def transfer(self) -> list[str]:
        """curl's arguments for this probe's transfer (`version_probe_argv`, without curl)."""
        return version_probe_argv(self.bind)[1:]

    def parse(self, out: str, code: int) -> str | None:
        return parse_version_probe(out)[1]


@dataclass(frozen=True)
class StatusPg(Fact):
    """(up, size of ``database`` in bytes), or None when the probe itself failed."""

    database: str

    def shell(self) -> str:
        return probes.pg_shell(self.database)

    def parse(self, out: str, code: int) -> tuple[bool, int | None] | None:
        return parse_pg(out, code)



def app_units(inv: Inventory, host: Host) -> dict[str, str]:
    """unit -> bind address of every unit that may be the live Releasy on ``host``."""
    units = {UNIT: app_facts.bind_address(inv, host)}
    if inv.topology == "single":
        for port in inv.app.bluegreen_ports:
            units[bluegreen.instance_unit(port)] = bluegreen.instance_bind(port)
    return units


def disk_paths(inv: Inventory, host: Host) -> list[tuple[str, str]]:
    paths = []
    if host.has("app"):
        paths += [("releasy", appcmd.RELEASY_ROOT), ("data", appcmd.DATA_DIR)]
    if host.has("db") and inv.database.kind == "postgres":
        paths.append(("pgdata", probes.PG_DATA_DIR))
    return paths


FIREWALL_FACTS = (PackageVersion(FIREWALL_PACKAGES[0]), UfwConf(), UfwUserRules(),
                  UfwDefaultsFile())


def fact_names(inv: Inventory, host: Host) -> list[Fact]:
    """Every fact ``fab status`` reads on ``host``: ONE facts round trip."""
    names: list[Fact] = [OsRelease(), *FIREWALL_FACTS]
    names += [StatusDisk(path) for _, path in disk_paths(inv, host)]
    if host.has("app"):
        names.append(app_facts.ReleasyReleases())
        for unit, bind in app_units(inv, host).items():
            names += [app_facts.ReleasyUnit(unit), app_facts.ReleasyReady(appcmd.ready_url(bind)),
                      StatusVersion(bind), StatusExe(unit)]
        if inv.topology == "single":
            names += bluegreen.fact_names(inv)
    if host.has("proxy"):
        names += [proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE), ServiceActive("nginx"),
                  CertInfo(proxy_render.tls_paths(inv)[0])]
    if host.has("db"):
        names.append(FleetFile())
        if inv.database.kind == "postgres":
            names += [StatusPg(inv.database.name), PgInstallation()]
        else:
            names.append(FileStat(pgcmd.SQLITE_PATH))
    return list(dict.fromkeys(names))

