"""The status report as text: the table of ``fab status`` (one row per host, then the
fleet line, the lock line and the verdict with the problems) and the indented JSON
document of ``fab status --json``."""
from __future__ import annotations

import json

from ..inventory import TIERS
from .model import HostStatus, StatusReport


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


def to_json_text(report: StatusReport) -> str:
    """``fab status --json``: the document, indented, one key order."""
    return json.dumps(report.to_json(), indent=2)
