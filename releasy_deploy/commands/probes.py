"""Read-only probe scripts of ``fab status`` (disk use of a directory, the release the
unit's main process runs, PostgreSQL answering and the database's size) and of the
rollout's preflight (the releases blue/green instance links use), as shell text for one
batched facts script, and the paths and limits they use. Pure builders; the parsers of
their output sit with the facts that read them (`releasy_deploy.status.probes`,
`releasy_deploy.rollout.preflight`).
"""
from __future__ import annotations

import shlex
from collections.abc import Sequence

from . import app as appcmd
from . import postgres as pgcmd

#: PostgreSQL's data directory on the db host (``fab status`` shows its disk use).
PG_DATA_DIR = "/var/lib/postgresql"
#: seconds each network probe (curl, pg_isready) may take: status must stay quick.
PROBE_TIMEOUT_S = 3

# Every directory asked, in one frame: a line "y" or "n" per path (it is a directory or not;
# after "y", du's "KB<TAB>PATH" line unless du failed), then "@df" and ONE df of the
# directories found. One du per path keeps the sizes apart (a single du counts a file hard
# linked into two of them once); no cut or awk: the parser reads the columns.
_DISK_HEAD = "set --"
_DISK_PATH = ('if [ -d {q} ]; then set -- "$@" {q}; echo y; du -sk -- {q} 2>/dev/null;'
              ' else echo n; fi')
_DISK_TAIL = """echo @df
[ "$#" -eq 0 ] || df -Pk -- "$@" 2>/dev/null"""


def disk_shell(paths: Sequence[str]) -> str:
    """For each directory of ``paths``: "y" and du's line, or "n" when it is not a directory;
    then "@df" and df's lines for those found (`split_disk_output` reads it)."""
    lines = [_DISK_HEAD, *(_DISK_PATH.format(q=shlex.quote(p)) for p in paths), _DISK_TAIL]
    return "\n".join(lines)


def split_disk_output(paths: Sequence[str], out: str) -> list[str | None]:
    """Per path of `disk_shell`: "KB PERCENT" ("?" for what could not be read), or None
    when it is not a directory. ValueError when the output does not fit the paths."""
    head, sep, df = out.partition("@df\n")
    if not sep:
        raise ValueError("the disk probe printed no @df line")
    lines = head.splitlines()
    found: list[tuple[int, str]] = []  # (index in paths, KB or "?")
    pos = 0
    for i, path in enumerate(paths):
        if pos >= len(lines) or lines[pos] not in ("y", "n"):
            raise ValueError(f"the disk probe printed nothing for {path}")
        pos += 1
        if lines[pos - 1] == "n":
            continue
        kb = "?"
        if pos < len(lines) and lines[pos] not in ("y", "n"):
            size, tab, where = lines[pos].partition("\t")
            if tab and where == path and size.isdigit():
                kb = size
            pos += 1
        found.append((i, kb))
    if pos != len(lines):
        raise ValueError(f"the disk probe printed what no path asked for: {lines[pos]!r}")
    # df: its header, then a line per directory found, in order; the fifth column is use%.
    # A line missing (df failed on one) leaves which is which unknown: "?" for all.
    rows = [r.split() for r in df.splitlines()[1:]]
    pcts = ([r[4].rstrip("%") if len(r) >= 6 else "?" for r in rows]
            if len(rows) == len(found) else ["?"] * len(found))
    result: list[str | None] = [None] * len(paths)
    for (i, kb), pct in zip(found, pcts):
        result[i] = f"{kb} {pct if pct.isdigit() else '?'}"
    return result


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
