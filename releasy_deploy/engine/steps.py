"""The pure parts the runner uses, also used by the flows: how nginx names an app host,
the /version probe, which journal lines belong to an attempt, what a prune removes and how
much disk staging needs."""
from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Iterable
from pathlib import Path

from ..commands import app as appcmd
from ..commands import nginx as nginxcmd
from ..commands import systemd
from ..inventory import Host, Inventory

__all__ = ["JOURNAL_LINES", "DISK_MARGIN_BYTES", "server_of", "recent_journal_argv",
           "version_probe_argv", "parse_version_probe", "releases_to_prune", "disk_needed",
           "unpacked_size"]

JOURNAL_LINES = 12
DISK_MARGIN_BYTES = 16 * 1024 * 1024


def server_of(inv: Inventory, host: Host) -> tuple[str, int]:
    """The (address, port) nginx's upstream lists for an app host."""
    return nginxcmd.check_servers([(host.private_address, inv.app.bind_port)])[0]


def recent_journal_argv(unit: str, seconds: float, lines: int = JOURNAL_LINES) -> list[str]:
    """The unit's last journal lines of the past ``seconds`` only (whole seconds, rounded
    up): what an earlier attempt logged must not be read as this one's failure."""
    return [*systemd.journal_argv(unit, lines), "--since", f"-{max(1, math.ceil(seconds))}s"]


def version_probe_argv(bind: str) -> list[str]:
    """curl on the app host: the body of GET /version, then an ``@status CODE`` line."""
    return ["curl", "-sS", "--max-time", "5", "-w", "\n@status %{http_code}\n",
            f"http://{bind}/version"]


def parse_version_probe(stdout: str) -> tuple[int | None, str | None]:
    """(HTTP status, the ``version`` of a JSON body) from `version_probe_argv`'s output."""
    body, sep, status = stdout.rstrip("\n").rpartition("\n@status ")
    if not sep:
        return None, None
    code = int(status) if status.strip().isdigit() else None
    try:
        data = json.loads(body) if body.strip() else None
    except ValueError:
        data = None
    version = data.get("version") if isinstance(data, dict) else None
    return code, version if isinstance(version, str) else None


def releases_to_prune(installed: Iterable[str], keep: int,
                      protect: Iterable[str | None] = ()) -> list[str]:
    """Oldest releases beyond ``keep`` (by version order), never a protected one (the
    current, the previous, one a blue/green instance runs). Protected ones count towards
    ``keep``; if they alone exceed it, nothing else is kept."""
    protected = {p for p in protect if p}
    ordered = sorted(set(installed), key=appcmd.version_key)
    kept = set(protected)
    for v in reversed(ordered):
        if len(kept) >= keep:
            break
        kept.add(v)
    return [v for v in ordered if v not in kept]


def disk_needed(tarball_bytes: int, unpacked_bytes: int) -> int:
    """Free bytes a host needs under /opt/releasy to stage a release (the uploaded
    tarball and the unpacked binary coexist for a moment)."""
    return tarball_bytes + unpacked_bytes + DISK_MARGIN_BYTES


def unpacked_size(path: Path) -> int:
    with tarfile.open(path, mode="r:gz") as tar:
        return sum(m.size for m in tar.getmembers())
