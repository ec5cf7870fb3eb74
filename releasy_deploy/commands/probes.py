"""Read-only probe scripts of ``fab status`` (disk use of a directory, the release the
unit's main process runs, PostgreSQL answering and the database's size) and of the
rollout's preflight (the releases blue/green instance links use), as shell text for one
batched facts script, and the paths and limits they use. Pure builders; the parsers of
their output sit with the facts that read them (`releasy_deploy.status.probes`,
`releasy_deploy.rollout.preflight`).
"""
from __future__ import annotations

import shlex

from . import app as appcmd
from . import postgres as pgcmd

#: PostgreSQL's data directory on the db host (``fab status`` shows its disk use).
PG_DATA_DIR = "/var/lib/postgresql"
#: seconds each network probe (curl, pg_isready) may take: status must stay quick.
PROBE_TIMEOUT_S = 3

# $PATH -> "KB PERCENT": du of the directory, use% of its file system; exit 3 if absent.
_DISK_SHELL = """[ -d {q} ] || exit 3
set -- $(du -sk -- {q} 2>/dev/null | cut -f1) $(df -Pk -- {q} | awk 'NR == 2 {{ print $5 }}')
echo "${{1:-?}} ${{2:-?}}\""""

# The executable of the unit's main process (its release dir for a compiled binary).
_EXE_SHELL = """pid=$(systemctl show --property=MainPID --value -- {q})
[ "${{pid:-0}}" -gt 0 ] || exit 3
readlink "/proc/$pid/exe\""""


def disk_shell(path: str) -> str:
    """Prints "KB PERCENT" for directory ``path``; exit 3 when it does not exist."""
    return _DISK_SHELL.format(q=shlex.quote(path))


def exe_shell(unit: str) -> str:
    """Prints the executable of ``unit``'s main process; exit 3 when it has none."""
    return _EXE_SHELL.format(q=shlex.quote(unit))


def pg_shell(database: str) -> str:
    """Prints "down", or "up SIZE" (bytes of the database; "up ?" when it cannot be read)."""
    ready = pgcmd.pg_ready_shell(pgcmd.SOCKET_DIR, timeout=PROBE_TIMEOUT_S)
    size = shlex.join([*pgcmd.psql_argv(database), "-c",
                       "SELECT pg_database_size(current_database())"])
    # cd /: runuser keeps root's cwd, which postgres may not enter.
    return (f"cd / || exit 4\n{ready} || {{ echo down; exit 0; }}\n"
            f"s=$({size} 2>/dev/null) && echo \"up $s\" || echo 'up ?'")


# The targets of the blue/green instance links (``instances/PORT -> releases/V``).
INSTANCES_PROBE = f"""for l in {appcmd.INSTANCES_DIR}/*; do
  [ -L "$l" ] && readlink -- "$l"
done
exit 0"""
