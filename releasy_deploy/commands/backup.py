"""The dumps' remote scripts and names: where they live, what a dump's file name may be,
and the argv lists that dump, restore and list them (pure builders).

`backups` gives the names their meaning (`backups.Backup`); PostgreSQL's restore that can be
ended is `commands.restore`.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from ..inventory import VERSION_RE
from . import restore as restorecmd

__all__ = ["BACKUP_DIR", "NAME_RE", "NO_RELEASE", "PRE_DEPLOY", "MANUAL", "PRE_RESTORE",
           "EXTENSIONS", "LISTING_PROBE", "check_name", "dump_argv", "restore_argv",
           "markers"]

BACKUP_DIR = "/var/backups/releasy"
EXTENSIONS = {"postgres": "dump", "sqlite": "sqlite3"}
NO_RELEASE = "none"

#: why a dump was taken: before a rollout, by hand, before a restore replaced the data.
PRE_DEPLOY, MANUAL, PRE_RESTORE = "pre-deploy", "manual", "pre-restore"

_VERSION = VERSION_RE.pattern
#: ENV_TIMESTAMP_(from-X_to-Y | PURPOSE_at-X)_mLEVEL.EXT (see `backups`)
NAME_RE = re.compile(
    rf"(?P<env>[a-z][a-z0-9-]{{0,31}})_(?P<ts>\d{{8}}T\d{{6}}Z)"
    rf"_(?:from-(?P<from>{NO_RELEASE}|{_VERSION})_to-(?P<to>{_VERSION})"
    rf"|(?P<purpose>{MANUAL}|{PRE_RESTORE})_at-(?P<at>{NO_RELEASE}|{_VERSION}))"
    rf"_m(?P<level>\d+)\.(?P<ext>dump|sqlite3)")

#: ``NAME SIZE`` per file in BACKUP_DIR (nothing when it does not exist yet)
LISTING_PROBE = f"""[ -d {shlex.quote(BACKUP_DIR)} ] || exit 0
find {shlex.quote(BACKUP_DIR)} -mindepth 1 -maxdepth 1 -type f -printf '%f %s\\n'"""

# $1 dir, $2 name, $3 database; then names to prune. Prints "@size N" and "@pruned NAME".
_PG_DUMP_SCRIPT = """set -eu
dir=$1 name=$2 db=$3; shift 3
mkdir -p -- "$dir"
chown postgres:postgres "$dir"
chmod 0700 "$dir"
cd /
if [ -e "$dir/$name" ]; then echo "$dir/$name already exists" >&2; exit 3; fi
tmp="$dir/.$name.partial"
trap 'rm -f -- "$tmp"' EXIT
runuser -u postgres -- pg_dump --format=custom --no-password --file="$tmp" "$db"
chmod 0600 "$tmp"
mv -f -- "$tmp" "$dir/$name"
trap - EXIT
echo "@size $(stat -c %s -- "$dir/$name")"
for old in "$@"; do rm -f -- "$dir/$old" && echo "@pruned $old"; done
"""

# $1 dir, $2 name, $3 database file, $4 service account; then names to prune.
# The service account owns the database's directory (and may plant symlinks there), so it
# alone touches the database: sqlite3 runs as it, backs up into a private temp dir of its
# own, and root only takes the bytes from its stdout into root's 0700 backup dir.
_SQLITE_DUMP_SCRIPT = """set -eu
dir=$1 name=$2 db=$3 user=$4; shift 4
umask 077
cd /
mkdir -p -- "$dir"
chown root:root "$dir"
chmod 0700 "$dir"
if [ -e "$dir/$name" ]; then echo "$dir/$name already exists" >&2; exit 3; fi
as() { runuser -u "$user" -- "$@"; }
if ! as test -f "$db"; then echo "no SQLite database at $db" >&2; exit 4; fi
tmp="$dir/.$name.partial"
work=$(as mktemp -d /tmp/releasy-backup.XXXXXXXX)
trap 'rm -f -- "$tmp"; as rm -rf -- "$work"' EXIT
as sqlite3 "$db" ".backup $work/db"
as cat -- "$work/db" > "$tmp"
mv -f -- "$tmp" "$dir/$name"
echo "@size $(stat -c %s -- "$dir/$name")"
for old in "$@"; do rm -f -- "$dir/$old" && echo "@pruned $old"; done
"""

# $1 dump file, $2 database file, $3 service account. Root opens the dump (in its own
# 0700 dir) and hands the bytes over on stdin; sqlite3 runs as the service account, so the
# files it writes (the database, -wal, -shm) are its own and nothing is chowned: a symlink
# planted there can lead it only where the service account could write anyway.
_SQLITE_RESTORE_SCRIPT = """set -eu
dump=$1 db=$2 user=$3
cd /
if ! [ -f "$dump" ]; then echo "no such dump: $dump" >&2; exit 3; fi
runuser -u "$user" -- sh -c 'set -u
umask 077
work=$(mktemp -d /tmp/releasy-restore.XXXXXXXX) || exit 5
rc=0
cat > "$work/dump" && sqlite3 "$1" ".restore $work/dump" || rc=$?
rm -rf -- "$work"
exit "$rc"' releasy-restore "$db" < "$dump"
"""



def check_name(name: str) -> None:
    """ValueError unless ``name`` is a dump's file name (no path, nothing else)."""
    if NAME_RE.fullmatch(name) is None:
        raise ValueError(f"not a backup name: {name!r}")


def dump_argv(kind: str, target: str, name: str, prune: Sequence[str] = (), *,
              user: str | None = None) -> list[str]:
    """Dump ``target`` (database name / SQLite file) to BACKUP_DIR/NAME, then remove the
    ``prune`` names. Run as root; SQLite work runs as ``user`` (the service account)."""
    for n in (name, *prune):
        check_name(n)
    if kind == "sqlite":
        return ["sh", "-c", _SQLITE_DUMP_SCRIPT, "releasy-backup", BACKUP_DIR, name, target,
                _service_user(user), *prune]
    return ["sh", "-c", _PG_DUMP_SCRIPT, "releasy-backup", BACKUP_DIR, name, target, *prune]


def restore_argv(kind: str, target: str, name: str, *, user: str | None = None,
                 run: str | None = None) -> list[str]:
    """Restore BACKUP_DIR/NAME into ``target`` (PostgreSQL: `commands.restore`, under the
    run id ``run``)."""
    check_name(name)
    if kind == "sqlite":
        return ["sh", "-c", _SQLITE_RESTORE_SCRIPT, "releasy-restore", f"{BACKUP_DIR}/{name}",
                target, _service_user(user)]
    return restorecmd.restore_argv(f"{BACKUP_DIR}/{name}", target, run or "")


def _service_user(user: str | None) -> str:
    if not user or not re.fullmatch(r"[a-z_][a-z0-9_-]*", user):
        raise ValueError(f"SQLite backups run as the service account; got {user!r}")
    return user


def markers(stdout: str) -> dict[str, list[str]]:
    """The dump script's ``@size N`` / ``@pruned NAME`` lines: word -> values."""
    found: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("@"):
            word, _, rest = line[1:].partition(" ")
            found.setdefault(word, []).append(rest)
    return found
