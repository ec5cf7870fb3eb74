"""Database dumps on the db host: taken before a rollout, restored by a rollback.

PostgreSQL: ``pg_dump --format=custom`` run as ``postgres`` into ``BACKUP_DIR``
(postgres:postgres 0700, files 0600: only root and postgres can read them). SQLite (single
host): SQLite's online backup (``sqlite3 DB ".backup FILE"``) into the same directory,
root-only. A dump is written under a temporary name and renamed when complete, so a listed
dump is always a whole one.

Names say what a dump is, so choosing one needs nothing but the directory listing::

    ENV_20261126T081500Z_from-1.0.0_to-1.1.0_m2.dump
    |   |                |          |        `- migration level (_sqlx_migrations max) at dump time
    |   |                |          `- the release being deployed
    |   |                `- the release running when it was taken ("none" on a first deploy)
    |   `- when (UTC, the operator's clock)
    `- the inventory's environment

``_`` cannot occur in an environment name or a version, so the fields split unambiguously.
After each new dump the oldest ones beyond ``database.backups_keep`` are removed (files of
other environments or other names are never touched).

Restoring (PostgreSQL) replaces the ``public`` schema in ONE transaction: the dump is
first converted to SQL (``pg_restore --file``) next to a prelude that drops and recreates
the schema, then fed to ``psql --single-transaction`` with ON_ERROR_STOP: either the whole
dump is in, or the database is exactly as before. Tables created after the dump (by newer
migrations) disappear with the schema, which ``pg_restore --clean`` alone would leave behind.
The database itself is not dropped: the deploy lock's session lives in it. Restoring needs
every Releasy instance stopped; that is the caller's job (see `restore`).
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from .commands import app as appcmd
from .errors import DeployError
from .executor import tail
from .inventory import VERSION_RE, Inventory, check_version
from .remote import Probe, facts, register_fact

__all__ = [
    "BACKUP_DIR", "Backup", "backup_name", "parse_backup_name", "parse_listing",
    "backups_to_prune", "choose_restore_point", "dump_argv", "restore_argv",
    "list_backups", "create", "restore", "LISTING_FACT", "backup_host",
]

BACKUP_DIR = "/var/backups/releasy"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
EXTENSIONS = {"postgres": "dump", "sqlite": "sqlite3"}
NO_RELEASE = "none"
DUMP_TIMEOUT_S = 3600.0

_VERSION = VERSION_RE.pattern
_NAME_RE = re.compile(
    rf"(?P<env>[a-z][a-z0-9-]{{0,31}})_(?P<ts>\d{{8}}T\d{{6}}Z)"
    rf"_from-(?P<from>{NO_RELEASE}|{_VERSION})_to-(?P<to>{_VERSION})"
    rf"_m(?P<level>\d+)\.(?P<ext>dump|sqlite3)")


@dataclass(frozen=True)
class Backup:
    name: str
    environment: str
    taken_at: datetime
    from_version: str | None
    to_version: str
    level: int
    kind: str  # postgres | sqlite
    size: int | None = None

    @property
    def path(self) -> str:
        return f"{BACKUP_DIR}/{self.name}"

    @property
    def when(self) -> str:
        return self.taken_at.strftime("%Y-%m-%d %H:%M:%S UTC")

    def describe(self) -> str:
        size = f", {self.size} bytes" if self.size is not None else ""
        return (f"{self.path} (taken {self.when} before {self.from_version or 'nothing'} ->"
                f" {self.to_version}, migration level {self.level}{size})")


# ------------------------------------------------------------------------------ pure
def backup_name(environment: str, taken_at: datetime, from_version: str | None,
                to_version: str, level: int, kind: str) -> str:
    if kind not in EXTENSIONS:
        raise ValueError(f"unknown database kind {kind!r}")
    if from_version is not None:
        check_version(from_version)
    check_version(to_version)
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"invalid migration level {level!r}")
    stamp = taken_at.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)
    name = (f"{environment}_{stamp}_from-{from_version or NO_RELEASE}_to-{to_version}"
            f"_m{level}.{EXTENSIONS[kind]}")
    if parse_backup_name(name) is None:  # e.g. an environment name the regex refuses
        raise ValueError(f"cannot build a backup name for environment {environment!r}")
    return name


def parse_backup_name(name: str, size: int | None = None) -> Backup | None:
    """The `Backup` a file name describes, or None for any other file."""
    m = _NAME_RE.fullmatch(name)
    if m is None:
        return None
    taken = datetime.strptime(m["ts"], TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)
    kind = "postgres" if m["ext"] == "dump" else "sqlite"
    source = None if m["from"] == NO_RELEASE else m["from"]
    return Backup(name, m["env"], taken, source, m["to"], int(m["level"]), kind, size)


def parse_listing(out: str, code: int = 0) -> list[Backup]:
    """``NAME SIZE`` lines (see LISTING_PROBE) -> backups, oldest first."""
    found = []
    for line in out.splitlines():
        name, _, size = line.rpartition(" ")
        b = parse_backup_name(name, int(size) if size.isdigit() else None)
        if b is not None:
            found.append(b)
    return sorted(found, key=lambda b: (b.taken_at, b.name))


def _ours(backups: Iterable[Backup], environment: str, kind: str | None) -> list[Backup]:
    return sorted((b for b in backups if b.environment == environment
                   and (kind is None or b.kind == kind)), key=lambda b: (b.taken_at, b.name))


def backups_to_prune(backups: Iterable[Backup], keep: int, environment: str,
                     protect: Iterable[str] = ()) -> list[Backup]:
    """The oldest of this environment's dumps beyond the newest ``keep``; never one named
    in ``protect`` (e.g. the dump a rollback is about to restore)."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    protected = set(protect)
    mine = _ours(backups, environment, None)
    old = mine[:-keep] if len(mine) > keep else []
    return [b for b in old if b.name not in protected]


def choose_restore_point(backups: Iterable[Backup], max_level: int, environment: str,
                         kind: str) -> Backup | None:
    """The newest dump a release running at ``max_level`` can start on: its level is not
    above ``max_level`` (the release migrates a lower one forward itself)."""
    fitting = [b for b in _ours(backups, environment, kind) if b.level <= max_level]
    return fitting[-1] if fitting else None


# ------------------------------------------------------------------------------ commands
LISTING_PROBE = f"""[ -d {shlex.quote(BACKUP_DIR)} ] || exit 0
find {shlex.quote(BACKUP_DIR)} -mindepth 1 -maxdepth 1 -type f -printf '%f %s\\n'"""
LISTING_FACT = "releasy_backups"
register_fact(LISTING_FACT)(lambda _: Probe(LISTING_PROBE, parse_listing))

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

_SQLITE_DUMP_SCRIPT = """set -eu
dir=$1 name=$2 db=$3; shift 3
umask 077
mkdir -p -- "$dir"
chown root:root "$dir"
chmod 0700 "$dir"
if [ -e "$dir/$name" ]; then echo "$dir/$name already exists" >&2; exit 3; fi
if ! [ -f "$db" ]; then echo "no SQLite database at $db" >&2; exit 4; fi
tmp="$dir/.$name.partial"
trap 'rm -f -- "$tmp"' EXIT
sqlite3 "$db" ".backup $tmp"
mv -f -- "$tmp" "$dir/$name"
trap - EXIT
echo "@size $(stat -c %s -- "$dir/$name")"
for old in "$@"; do rm -f -- "$dir/$old" && echo "@pruned $old"; done
"""

# $1 dump file, $2 database. The prelude and the whole dump as SQL go to ONE transaction.
_PG_RESTORE_SCRIPT = """set -eu
dump=$1 db=$2
cd /
if ! [ -f "$dump" ]; then echo "no such dump: $dump" >&2; exit 3; fi
sql=$(mktemp /tmp/releasy-restore.XXXXXXXX)
trap 'rm -f -- "$sql"' EXIT
cat > "$sql" <<'SQL'
DROP SCHEMA IF EXISTS public CASCADE;
CREATE SCHEMA public AUTHORIZATION pg_database_owner;
GRANT USAGE ON SCHEMA public TO PUBLIC;
COMMENT ON SCHEMA public IS 'standard public schema';
SQL
# The complete SQL first: a truncated stream must never reach psql (it would commit it).
runuser -u postgres -- pg_restore --file=- "$dump" >> "$sql"
runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 --single-transaction -d "$db" < "$sql"
"""

_SQLITE_RESTORE_SCRIPT = """set -eu
dump=$1 db=$2
if ! [ -f "$dump" ]; then echo "no such dump: $dump" >&2; exit 3; fi
sqlite3 "$db" ".restore $dump"
"""


def _target(inv: Inventory) -> str:
    """The database name (PostgreSQL) or file (SQLite) that is dumped."""
    if inv.database.kind == "sqlite":
        path = appcmd.sqlite_path(appcmd.SQLITE_URL)
        assert path is not None
        return path
    return inv.database.name


def _check_name(name: str) -> None:
    if parse_backup_name(name) is None:
        raise ValueError(f"not a backup name: {name!r}")


def dump_argv(kind: str, target: str, name: str, prune: Sequence[str] = ()) -> list[str]:
    """Dump ``target`` (database name / SQLite file) to BACKUP_DIR/NAME, then remove the
    ``prune`` names. Run as root."""
    for n in (name, *prune):
        _check_name(n)
    script = {"postgres": _PG_DUMP_SCRIPT, "sqlite": _SQLITE_DUMP_SCRIPT}[kind]
    return ["sh", "-c", script, "releasy-backup", BACKUP_DIR, name, target, *prune]


def restore_argv(kind: str, target: str, name: str) -> list[str]:
    _check_name(name)
    script = {"postgres": _PG_RESTORE_SCRIPT, "sqlite": _SQLITE_RESTORE_SCRIPT}[kind]
    return ["sh", "-c", script, "releasy-restore", f"{BACKUP_DIR}/{name}", target]


def _markers(stdout: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("@"):
            word, _, rest = line[1:].partition(" ")
            found.setdefault(word, []).append(rest)
    return found


# ------------------------------------------------------------------------------ acting
def backup_host(inv: Inventory):
    """Where dumps live: the db host (for SQLite, the single host)."""
    return inv.db_host


def list_backups(session) -> list[Backup]:
    """Every dump in BACKUP_DIR on the db host, oldest first (one round trip, read-only)."""
    conn = session.executor.conn(backup_host(session.inventory))
    return facts(conn, [LISTING_FACT], sudo=True)[LISTING_FACT]


def create(session, *, from_version: str | None, to_version: str, level: int,
           existing: Sequence[Backup] | None = None, now: datetime | None = None,
           protect: Iterable[str] = ()) -> Backup:
    """Dump the application database now (one round trip) and prune old dumps beyond
    ``database.backups_keep`` (never those named in ``protect``). ``existing``: the
    listing if already read (else read now). Dry-run: reports what it would do and
    returns the Backup it would have written."""
    inv = session.inventory
    kind = inv.database.kind
    taken = now or datetime.now(timezone.utc)
    name = backup_name(inv.environment, taken, from_version, to_version, level, kind)
    backup = Backup(name, inv.environment, taken.replace(microsecond=0), from_version,
                    to_version, level, kind)
    if existing is None:
        existing = list_backups(session)
    prune = [b.name for b in backups_to_prune([*existing, backup], inv.database.backups_keep,
                                              inv.environment, protect)]
    conn = session.executor.conn(backup_host(inv))
    tool = "pg_dump" if kind == "postgres" else "sqlite3 .backup"
    if conn.dry_run:
        conn.reporter.would(conn.name, f"create backup {backup.path} ({tool}, migration level"
                                       f" {level})")
        for old in prune:
            conn.reporter.would(conn.name, f"remove old backup {BACKUP_DIR}/{old} (keeping"
                                           f" {inv.database.backups_keep})")
        return backup
    res = conn.run(dump_argv(kind, _target(inv), name, prune), sudo=True, check=False,
                   timeout=DUMP_TIMEOUT_S)
    if not res.ok:
        said = tail(conn.mask(res.stderr.strip() or res.stdout.strip())) or "(no output)"
        raise DeployError(
            f"{conn.name}: backing up the database before the rollout failed (exit code"
            f" {res.exit_code}):\n" + "\n".join(f"    {line}" for line in said.splitlines())
            + f"\n  Nothing was deployed. Check free space in {BACKUP_DIR} and that the"
              f" database answers, then re-run (database.backup_before_deploy: false in the"
              f" inventory skips this step).", host=conn.name)
    marks = _markers(res.stdout)
    size = int(marks["size"][0]) if marks.get("size", [""])[0].isdigit() else None
    backup = Backup(name, backup.environment, backup.taken_at, from_version, to_version,
                    level, kind, size)
    conn.reporter.changed(conn.name, f"backup {backup.path} ({tool}, {size} bytes,"
                                     f" migration level {level})")
    for old in marks.get("pruned", []):
        conn.reporter.changed(conn.name, f"old backup {BACKUP_DIR}/{old} removed (keeping"
                                         f" {inv.database.backups_keep})")
    return backup


def restore(session, backup: Backup) -> None:
    """Replace the application database's content with ``backup`` (one round trip).

    Every Releasy instance must be stopped first: the schema is dropped and recreated. On
    PostgreSQL this happens in one transaction, so a failure leaves the database as it was.
    """
    inv = session.inventory
    if backup.kind != inv.database.kind:
        raise DeployError(f"{backup.name} is a {backup.kind} dump, but the database is"
                          f" {inv.database.kind}")
    conn = session.executor.conn(backup_host(inv))
    if conn.dry_run:
        conn.reporter.would(conn.name, f"restore the database from {backup.path}")
        return
    res = conn.run(restore_argv(backup.kind, _target(inv), backup.name), sudo=True,
                   check=False, timeout=DUMP_TIMEOUT_S)
    if not res.ok:
        said = tail(conn.mask(res.stderr.strip() or res.stdout.strip())) or "(no output)"
        unchanged = (" The restore ran in one transaction: the database is unchanged."
                     if backup.kind == "postgres" else "")
        raise DeployError(
            f"{conn.name}: restoring {backup.path} failed (exit code {res.exit_code}):\n"
            + "\n".join(f"    {line}" for line in said.splitlines()) + f"\n {unchanged}",
            host=conn.name)
    conn.reporter.changed(conn.name, f"database {inv.database.name} restored from"
                                     f" {backup.path} (migration level {backup.level})")
