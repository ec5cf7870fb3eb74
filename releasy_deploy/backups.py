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
Dumps taken by hand (``fab db.backup``) and the safety dump ``fab db.restore`` takes of the
data it is about to replace name the release running at the time instead::

    ENV_20261126T081500Z_manual_at-1.0.0_m2.dump
    ENV_20261126T081500Z_pre-restore_at-1.0.0_m2.dump   ("at-none": no single release ran)

For a rollback they mean the same as a pre-deploy dump's ``from`` (that release ran against
that level), so they are restore points too. After each new dump the oldest ones of the
same purpose (pre-deploy / manual / pre-restore) beyond ``database.backups_keep`` are
removed: a deploy never deletes a dump taken by hand. Files of other environments or other
names are never touched.

Restoring (PostgreSQL) replaces the ``public`` schema in ONE transaction: the dump is
first converted to SQL (``pg_restore --file``) next to a prelude that drops and recreates
the schema, then fed to ``psql --single-transaction`` with ON_ERROR_STOP: either the whole
dump is in, or the database is exactly as before. Tables created after the dump (by newer
migrations) disappear with the schema, which ``pg_restore --clean`` alone would leave behind.
The database itself is not dropped: the deploy lock's session lives in it. Restoring needs
every Releasy instance stopped; that is the caller's job (see `restore`).
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from . import restores, schema
from .commands import app as appcmd
from .commands import nginx as nginxcmd
from .commands import restore as restorecmd
from .commands import systemd
from .errors import BadInput, CommandTimeoutError, DeployError, UnreachableError, first_line
from .executor import tail
from .facts import Fact, read_fact, read_facts
from .inventory import VERSION_RE, Inventory, check_version
from .lock import deploy_lock
from .pipeline import Pipeline
from .tiers import app as app_tier
from .tiers import maintenance_page
from .tiers import proxy as proxy_tier

__all__ = [
    "BACKUP_DIR", "Backup", "backup_name", "parse_backup_name", "parse_listing",
    "backups_to_prune", "choose_restore_point", "dump_argv", "restore_argv",
    "list_backups", "create", "restore", "BackupListing", "backup_host",
    "PRE_DEPLOY", "MANUAL", "PRE_RESTORE", "snapshot_name", "take_snapshot", "find_backup",
    "download_target", "download", "format_size", "listing_rows", "restore_level_problem",
]

BACKUP_DIR = "/var/backups/releasy"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
EXTENSIONS = {"postgres": "dump", "sqlite": "sqlite3"}
NO_RELEASE = "none"
DUMP_TIMEOUT_S = 3600.0

#: why a dump was taken: before a rollout, by hand, before a restore replaced the data.
PRE_DEPLOY, MANUAL, PRE_RESTORE = "pre-deploy", "manual", "pre-restore"
SNAPSHOT_PURPOSES = (MANUAL, PRE_RESTORE)

_VERSION = VERSION_RE.pattern
_NAME_RE = re.compile(
    rf"(?P<env>[a-z][a-z0-9-]{{0,31}})_(?P<ts>\d{{8}}T\d{{6}}Z)"
    rf"_(?:from-(?P<from>{NO_RELEASE}|{_VERSION})_to-(?P<to>{_VERSION})"
    rf"|(?P<purpose>{MANUAL}|{PRE_RESTORE})_at-(?P<at>{NO_RELEASE}|{_VERSION}))"
    rf"_m(?P<level>\d+)\.(?P<ext>dump|sqlite3)")


@dataclass(frozen=True)
class Backup:
    name: str
    environment: str
    taken_at: datetime
    #: pre-deploy: the release running before the rollout; manual / pre-restore: the
    #: release running when taken. None: nothing (or not one single release) ran.
    from_version: str | None
    to_version: str | None  # pre-deploy: the release being deployed; else None
    level: int
    kind: str  # postgres | sqlite
    size: int | None = None
    purpose: str = PRE_DEPLOY  # PRE_DEPLOY | MANUAL | PRE_RESTORE

    @property
    def path(self) -> str:
        return f"{BACKUP_DIR}/{self.name}"

    @property
    def when(self) -> str:
        return self.taken_at.strftime("%Y-%m-%d %H:%M:%S UTC")

    @property
    def origin(self) -> str:
        """What the dump is, in a few words: ``pre-deploy 1.0.0 -> 1.1.0``, ``manual (1.0.0
        running)``."""
        if self.purpose == PRE_DEPLOY:
            return f"pre-deploy {self.from_version or 'nothing'} -> {self.to_version}"
        running = f"{self.from_version} running" if self.from_version else "no single release"
        return f"{self.purpose} ({running})"

    def describe(self) -> str:
        size = f", {self.size} bytes" if self.size is not None else ""
        if self.purpose != PRE_DEPLOY:
            return (f"{self.path} ({self.origin}, taken {self.when}, migration level"
                    f" {self.level}{size})")
        return (f"{self.path} (taken {self.when} before {self.from_version or 'nothing'} ->"
                f" {self.to_version}, migration level {self.level}{size})")


# ------------------------------------------------------------------------------ pure
def backup_name(environment: str, taken_at: datetime, from_version: str | None,
                to_version: str, level: int, kind: str) -> str:
    if from_version is not None:
        check_version(from_version)
    check_version(to_version)
    return _dump_name(environment, taken_at,
                      f"from-{from_version or NO_RELEASE}_to-{to_version}", level, kind)


def snapshot_name(environment: str, taken_at: datetime, running: str | None, level: int,
                  kind: str, purpose: str = MANUAL) -> str:
    """The name of a dump taken by hand (MANUAL) or before a restore (PRE_RESTORE);
    ``running``: the release the app hosts ran (None: none, or not one single release)."""
    if purpose not in SNAPSHOT_PURPOSES:
        raise ValueError(f"unknown dump purpose {purpose!r}")
    if running is not None:
        check_version(running)
    return _dump_name(environment, taken_at, f"{purpose}_at-{running or NO_RELEASE}", level,
                      kind)


def _dump_name(environment: str, taken_at: datetime, what: str, level: int, kind: str) -> str:
    """ENV_TIMESTAMP_WHAT_mLEVEL.EXT, checked by parsing it back."""
    if kind not in EXTENSIONS:
        raise ValueError(f"unknown database kind {kind!r}")
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"invalid migration level {level!r}")
    stamp = taken_at.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)
    name = f"{environment}_{stamp}_{what}_m{level}.{EXTENSIONS[kind]}"
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
    if m["purpose"]:
        running = None if m["at"] == NO_RELEASE else m["at"]
        return Backup(name, m["env"], taken, running, None, int(m["level"]), kind, size,
                      m["purpose"])
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
                     protect: Iterable[str] = (), *, purpose: str = PRE_DEPLOY) -> list[Backup]:
    """The oldest of this environment's dumps of ``purpose`` beyond the newest ``keep``;
    never one named in ``protect`` (e.g. the dump a rollback is about to restore), never
    one of another purpose (a deploy does not delete dumps taken by hand)."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    protected = set(protect)
    mine = [b for b in _ours(backups, environment, None) if b.purpose == purpose]
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


@dataclass(frozen=True)
class BackupListing(Fact):
    """Every dump in BACKUP_DIR (`Backup`), oldest first."""

    def shell(self) -> str:
        return LISTING_PROBE

    def parse(self, out: str, code: int) -> list[Backup]:
        return parse_listing(out, code)


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

# $1 dump file, $2 database. The prelude and the whole dump as SQL go to ONE transaction.
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


def dump_argv(kind: str, target: str, name: str, prune: Sequence[str] = (), *,
              user: str | None = None) -> list[str]:
    """Dump ``target`` (database name / SQLite file) to BACKUP_DIR/NAME, then remove the
    ``prune`` names. Run as root; SQLite work runs as ``user`` (the service account)."""
    for n in (name, *prune):
        _check_name(n)
    if kind == "sqlite":
        return ["sh", "-c", _SQLITE_DUMP_SCRIPT, "releasy-backup", BACKUP_DIR, name, target,
                _service_user(user), *prune]
    return ["sh", "-c", _PG_DUMP_SCRIPT, "releasy-backup", BACKUP_DIR, name, target, *prune]


def restore_argv(kind: str, target: str, name: str, *, user: str | None = None) -> list[str]:
    _check_name(name)
    if kind == "sqlite":
        return ["sh", "-c", _SQLITE_RESTORE_SCRIPT, "releasy-restore", f"{BACKUP_DIR}/{name}",
                target, _service_user(user)]
    return restorecmd.restore_argv(f"{BACKUP_DIR}/{name}", target)


def _service_user(user: str | None) -> str:
    if not user or not re.fullmatch(r"[a-z_][a-z0-9_-]*", user):
        raise ValueError(f"SQLite backups run as the service account; got {user!r}")
    return user


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
    return read_fact(conn, BackupListing(), sudo=True)


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
    return _dump(session, backup, existing, protect, failed=(
        "backing up the database before the rollout failed",
        f"Nothing was deployed. Check free space in {BACKUP_DIR} and that the database"
        f" answers, then re-run (database.backup_before_deploy: false in the inventory skips"
        f" this step)."))


def take_snapshot(session, *, running: str | None, level: int, purpose: str = MANUAL,
                  existing: Sequence[Backup] | None = None, now: datetime | None = None,
                  protect: Iterable[str] = ()) -> Backup:
    """A dump taken by hand (``fab db.backup``) or before a restore (PRE_RESTORE), one
    round trip; prunes the oldest dumps of the same purpose beyond ``backups_keep``.
    ``running``: the release the app hosts run (in the name). Dry-run: only reported."""
    inv = session.inventory
    kind = inv.database.kind
    taken = now or datetime.now(timezone.utc)
    name = snapshot_name(inv.environment, taken, running, level, kind, purpose)
    backup = parse_backup_name(name)
    assert backup is not None
    what = "saving the current database before the restore" if purpose == PRE_RESTORE \
        else "backing up the database"
    return _dump(session, backup, existing, protect, failed=(
        f"{what} failed",
        f"Nothing was changed. Check free space in {BACKUP_DIR} (`df -h {BACKUP_DIR}` on"
        f" the host) and that the database answers (`fab db.setup` checks it), then re-run."))


def _dump(session, backup: Backup, existing: Sequence[Backup] | None,
          protect: Iterable[str], *, failed: tuple[str, str]) -> Backup:
    inv = session.inventory
    kind, level = backup.kind, backup.level
    if existing is None:
        existing = list_backups(session)
    prune = [b.name for b in backups_to_prune([*existing, backup], inv.database.backups_keep,
                                              inv.environment, protect,
                                              purpose=backup.purpose)]
    conn = session.executor.conn(backup_host(inv))
    tool = "pg_dump" if kind == "postgres" else "sqlite3 .backup"
    if conn.dry_run:
        conn.reporter.would(conn.name, f"create backup {backup.path} ({tool}, migration level"
                                       f" {level})")
        for old in prune:
            conn.reporter.would(conn.name, f"remove old backup {BACKUP_DIR}/{old} (keeping"
                                           f" {inv.database.backups_keep})")
        return backup
    res = conn.run(dump_argv(kind, _target(inv), backup.name, prune,
                             user=inv.app.service_user), sudo=True, check=False,
                   timeout=DUMP_TIMEOUT_S)
    if not res.ok:
        said = tail(conn.mask(res.stderr.strip() or res.stdout.strip())) or "(no output)"
        what, hint = failed
        raise DeployError(
            f"{conn.name}: {what} (exit code {res.exit_code}):\n"
            + "\n".join(f"    {line}" for line in said.splitlines()) + f"\n  {hint}",
            host=conn.name)
    marks = _markers(res.stdout)
    size = int(marks["size"][0]) if marks.get("size", [""])[0].isdigit() else None
    backup = replace(backup, size=size)
    conn.reporter.changed(conn.name, f"backup {backup.path} ({tool}, {size} bytes,"
                                     f" migration level {level})")
    for old in marks.get("pruned", []):
        conn.reporter.changed(conn.name, f"old backup {BACKUP_DIR}/{old} removed (keeping"
                                         f" {inv.database.backups_keep})")
    return backup


def restore(session, backup: Backup) -> None:
    """Replace the application database's content with ``backup`` (one round trip).

    Every Releasy instance must be stopped first: the schema is dropped and recreated. On
    PostgreSQL this happens in one transaction. When it does not finish (a failure, the
    timeout, Ctrl-C or SIGTERM), the restore is ended on the host (its processes and its
    database session) and the outcome of its transaction is read from the database:
    `RestoreFailed` says whether it was applied (``applied``), checked, not assumed.
    """
    inv = session.inventory
    if backup.kind != inv.database.kind:
        raise DeployError(f"{backup.name} is a {backup.kind} dump, but the database is"
                          f" {inv.database.kind}")
    conn = session.executor.conn(backup_host(inv))
    if conn.dry_run:
        conn.reporter.would(conn.name, f"restore the database from {backup.path}")
        return
    argv = restore_argv(backup.kind, _target(inv), backup.name, user=inv.app.service_user)
    try:
        res = conn.run(argv, sudo=True, check=False, timeout=DUMP_TIMEOUT_S)
    except (KeyboardInterrupt, CommandTimeoutError, UnreachableError) as exc:
        what = f"restoring {backup.path} stopped: {first_line(exc, conn.name)}"
        raise restores.stopped(conn, backup.kind, _target(inv), backup.path, what,
                                  exc) from None
    if not res.ok:
        said = tail(conn.mask(res.stderr.strip() or res.stdout.strip())) or "(no output)"
        what = (f"restoring {backup.path} failed (exit code {res.exit_code}):\n"
                + "\n".join(f"    {line}" for line in said.splitlines()))
        raise restores.stopped(conn, backup.kind, _target(inv), backup.path, what, None)
    conn.reporter.changed(conn.name, f"database {inv.database.name} restored from"
                                     f" {backup.path} (migration level {backup.level})")


# ====================================================================== day-2 tasks
# `fab db.backup / db.backups / db.restore`: pure helpers first, then the tasks' bodies.
RUNNING_STATES = systemd.RUNNING_STATES
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_size(size: int | None) -> str:
    """``812 B``, ``12.3 KiB``, ``1.5 GiB``; ``?`` when unknown."""
    if size is None:
        return "?"
    value = float(size)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def listing_rows(backups: Sequence[Backup]) -> list[str]:
    """The `fab db.backups` table: a header, then one row per dump, oldest first."""
    header = ("NAME", "SIZE", "TAKEN (UTC)", "LEVEL", "KIND")
    rows = [(b.name, format_size(b.size), b.taken_at.strftime("%Y-%m-%d %H:%M:%S"),
             str(b.level), b.origin) for b in backups]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip()
            for r in [header, *rows]]


def find_backup(backups: Sequence[Backup], name: str, *, environment: str, kind: str,
                host: str) -> Backup:
    """The dump called ``name`` in the listing; BadInput (nothing changed) otherwise."""

    if "/" in name:
        raise BadInput(f"--file takes a dump's name, not a path: {name!r} (the dumps live in"
                       f" {BACKUP_DIR} on {host}; `fab db.backups` lists them)")
    if parse_backup_name(name) is None:
        raise BadInput(f"--file {name!r} is not a dump name (like {environment}_20260101T"
                       f"120000Z_manual_at-1.0.0_m2.{EXTENSIONS.get(kind, 'dump')}); `fab"
                       f" db.backups` lists them")
    found = next((b for b in backups if b.name == name), None)
    if found is None:
        newest = ", ".join(b.name for b in backups[-3:]) or "none"
        raise BadInput(f"no dump named {name} in {BACKUP_DIR} on {host} (newest there:"
                       f" {newest}); `fab db.backups` lists them all")
    if found.kind != kind:
        raise BadInput(f"{name} is a {found.kind} dump, but this environment's database is"
                       f" {kind}: it cannot be restored here")
    if found.environment != environment:
        raise BadInput(f"{name} belongs to environment {found.environment}, not {environment}:"
                       f" refusing to restore another environment's data")
    return found


def restore_level_problem(backup: Backup, db_level: int | None,
                          running: Mapping[str, tuple[str | None, int | None]]) -> str | None:
    """Why restoring ``backup`` would leave Releasy unable to start, or None.

    ``running``: app host -> (its current release, the migration level recorded for that
    release). A release knows at least the level the database is at now (it runs on it)
    and the level recorded for it; a dump at a higher level holds migrations it does not
    know, and sqlx refuses to start on those (VersionMissing). A LOWER level is fine: the
    release applies the missing migrations itself when it starts.
    """
    blocked: dict[str, list[str]] = {}
    knows_of: dict[str, int] = {}
    for host, (version, recorded) in running.items():
        if version is None:
            continue
        known = max((x for x in (db_level, recorded) if x is not None), default=None)
        if known is not None and backup.level > known:
            blocked.setdefault(version, []).append(host)
            knows_of[version] = known
    if not blocked:
        return None
    parts = [f"{v} (on {', '.join(hosts)}) knows migrations up to {knows_of[v]}"
             for v, hosts in blocked.items()]
    return (f"{backup.name} is at migration level {backup.level}, but " + "; ".join(parts)
            + f": Releasy would refuse to start on it (the database would hold migrations the"
              f" binary does not know). Deploy a release that knows migration {backup.level}"
              f" first (`fab deploy.rolling --version V`), or pick a dump at level"
              f" {max(knows_of.values())} or lower (`fab db.backups`). Nothing was changed")


def download_target(path: str | os.PathLike, name: str | None = None) -> Path:
    """Where ``--download PATH`` writes: PATH itself, or PATH/NAME when PATH is a
    directory. Checked before anything runs (BadInput): the directory must exist, and an
    existing file is never overwritten. ``name`` None: only validate."""

    target = Path(path).expanduser()
    if target.is_dir():
        if name is None:
            return target
        target = target / name
    if target.exists() or target.is_symlink():
        raise BadInput(f"--download {target}: the file exists; choose another path or a"
                       f" directory (the dump's own name is used there)")
    if not target.parent.is_dir():
        raise BadInput(f"--download {target}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise BadInput(f"--download {target}: cannot write to {target.parent}")
    return target


def download(session, backup: Backup, dest: str | os.PathLike) -> tuple[Path, str]:
    """Copy ``backup`` to the operator's machine (0600), streamed over the executor, and
    verify it against the host's sha256 of the dump. Returns (path, sha256). Two round
    trips: the checksum, then the bytes."""
    target = download_target(dest, backup.name)
    conn = session.executor.conn(backup_host(session.inventory))
    res = conn.run(["sha256sum", "--", backup.path], sudo=True, mutates=False)
    expected = res.stdout.split()[0] if res.stdout.split() else ""
    data = conn.read_file(backup.path, sudo=True)
    if data is None:
        raise DeployError(f"{conn.name}: {backup.path} disappeared before it could be"
                          f" downloaded; `fab db.backups` lists what is there", host=conn.name)
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise DeployError(
            f"{conn.name}: the download of {backup.path} does not match the host's copy"
            f" (sha256 {got[:16]}... here, {expected[:16] or '?'}... there; {len(data)} bytes"
            f" received). Nothing was written; re-run `fab db.backup --download` or copy it"
            f" with scp.", host=conn.name)
    # Created 0600 and exclusively: a dump holds all of the application's data.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    conn.reporter.changed(conn.name, f"downloaded {backup.name} to {target} ({len(data)}"
                                     f" bytes, sha256 {got} verified)")
    return target, got


# ------------------------------------------------------------------------------ state
@dataclass(frozen=True)
class AppUnits:
    """One app host as a restore sees it."""

    host: str
    current: str | None
    units: Mapping[str, str]  # releasy.service (+ blue/green instances) -> ActiveState
    levels: Mapping[str, int]  # release -> recorded migration level

    @property
    def running(self) -> list[str]:
        return [u for u, state in self.units.items() if state in RUNNING_STATES]


@dataclass(frozen=True)
class DbState:
    backups: list[Backup]
    level: int | None
    apps: dict[str, AppUnits]
    upstreams: dict[str, list[tuple[str, int]] | None]  # proxy -> its servers (None: unread)

    @property
    def running_release(self) -> str | None:
        """The one release every app host points at, or None."""
        currents = {a.current for a in self.apps.values()}
        return currents.pop() if len(currents) == 1 else None


def units_on_hosts(running: Mapping[str, Sequence[str]]) -> str:
    """``releasy.service on app1, app2`` (hosts grouped by what runs on them)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for host, units in running.items():
        if units:
            groups.setdefault(tuple(units), []).append(host)
    if not groups:
        return "nothing (no Releasy unit is running)"
    return "; ".join(f"{', '.join(units)} on {', '.join(hosts)}"
                     for units, hosts in groups.items())


def app_units(inv: Inventory) -> list[str]:
    """The Releasy units that may run on an app host (blue/green only on a single host)."""
    units = [app_tier.SERVICE_UNIT]
    if inv.is_single_host:
        units += [appcmd.instance_unit(p) for p in inv.app.bluegreen_ports]
    return units


def unit_bind(inv: Inventory, host, unit: str) -> str:
    """Where ``unit`` listens on ``host`` (a blue/green instance: its own loopback port)."""
    for port in inv.app.bluegreen_ports if inv.is_single_host else ():
        if unit == appcmd.instance_unit(port):
            return appcmd.instance_bind(port)
    return appcmd.bind_address(inv, host)


def gather_state(session, *, with_apps: bool = True, with_rotation: bool = False) -> DbState:
    """ONE facts round trip per host, all in parallel (read-only: also in dry-run): the
    dumps and migration level on the db host, what runs on each app host, the proxies'
    upstream lists."""
    inv = session.inventory
    db = backup_host(inv)
    upstream_fact = proxy_tier.ProxyText(proxy_tier.UPSTREAM_FILE)
    wanted: dict[str, list[Fact]] = {db.name: [BackupListing(), schema.level_fact(inv)]}
    if with_apps:
        for h in inv.hosts_in("app"):
            wanted.setdefault(h.name, []).extend(
                [app_tier.ReleasyReleases(), schema.RecordedLevels(),
                 *(app_tier.ReleasyUnit(u) for u in app_units(inv))])
    if with_rotation and not inv.is_single_host:
        for h in inv.hosts_in("proxy"):
            wanted.setdefault(h.name, []).append(upstream_fact)
    found = session.executor.each([inv.host(n) for n in wanted],
                                  lambda c: read_facts(c, wanted[c.name], sudo=True))
    apps = {}
    if with_apps:
        for h in inv.hosts_in("app"):
            f = found[h.name]
            apps[h.name] = AppUnits(
                h.name, f[app_tier.ReleasyReleases()].current,
                {u: f[app_tier.ReleasyUnit(u)].get("ActiveState", "unknown")
                 for u in app_units(inv)},
                f[schema.RecordedLevels()])
    upstreams: dict[str, list[tuple[str, int]] | None] = {}
    for name, names in wanted.items():
        if upstream_fact in names:
            text = found[name][upstream_fact]
            try:
                upstreams[name] = nginxcmd.parse_upstream_servers(text) if text else None
            except ValueError:
                upstreams[name] = None
    return DbState(found[db.name][BackupListing()], found[db.name][schema.level_fact(inv)],
                   apps, upstreams)


# ------------------------------------------------------------------------------ the tasks
def backup_task(session, *, download_to: str | None = None) -> Backup:
    """``fab db.backup``: a dump now (pg_dump -Fc as postgres / SQLite's online backup),
    named after the release running; optionally copied here and verified."""
    if download_to is not None:
        download_target(download_to)  # a bad path fails before anything runs
    st = gather_state(session)
    inv = session.inventory
    db = backup_host(inv).name
    if st.level is None:
        raise DeployError(f"{db}: cannot read the database's migration level: is the database"
                          f" set up and running? (`fab db.setup`, or `fab site` for SQLite)",
                          host=db)
    backup = take_snapshot(session, running=st.running_release, level=st.level,
                           existing=st.backups)
    if session.dry_run:
        if download_to is not None:
            session.reporter.would(db, f"download it to {download_target(download_to)}")
        return backup
    session.reporter.info(db, f"{backup.name}  {format_size(backup.size)}  taken"
                              f" {backup.when}  {backup.origin}")
    if download_to is not None:
        download(session, backup, download_to)
    return backup


def list_task(session) -> list[Backup]:
    """``fab db.backups``: every dump on the db host, oldest first (one round trip)."""
    return gather_state(session, with_apps=False).backups


def restore_task(session, name: str, *, yes: bool = False, wait: float = 0) -> Backup:
    """``fab db.restore --file NAME``: under the deploy lock, with confirmation; every
    Releasy unit that runs is stopped (downtime: no instance can keep serving while its
    tables are replaced), the current data is saved to a pre-restore dump, NAME is
    restored (PostgreSQL: one transaction), the units start again and must answer /ready.
    The proxies' rotation is not touched (nothing is drained: everything is stopped)."""
    inv = session.inventory
    db = backup_host(inv).name
    if "/" in name or parse_backup_name(name) is None:
        find_backup([], name, environment=inv.environment, kind=inv.database.kind, host=db)
    pipe = Pipeline("db.restore", session.reporter)
    with deploy_lock(session, version=None, wait=wait) as lock:
        with pipe.stage("preflight", what="lock, the dump, what runs on the app hosts"):
            st = gather_state(session, with_rotation=True)
            dump = find_backup(st.backups, name, environment=inv.environment,
                               kind=inv.database.kind, host=db)
            problem = restore_level_problem(dump, st.level, {
                a.host: (a.current, a.levels.get(a.current) if a.current else None)
                for a in st.apps.values()})
            if problem:
                raise BadInput(problem)
        running = {h: a.running for h, a in st.apps.items()}
        stopped_before = [h for h, units in running.items() if not units]
        plan = (f"stop {units_on_hosts(running)}, save the current database (migration level"
                f" {st.level}) to a new pre-restore dump, restore {dump.name} (level"
                f" {dump.level}), start the same units again and wait for /ready")
        session.reporter.info(pipe.name, f"plan: {plan}")
        if session.dry_run:
            take_snapshot(session, running=st.running_release, level=st.level or 0,
                          purpose=PRE_RESTORE, existing=st.backups, protect=[dump.name])
            for h, units in running.items():
                if units:
                    session.reporter.would(h, f"stop {', '.join(units)}, start again after"
                                              f" the restore, wait for /ready")
            restore(session, dump)
            return dump
        with session.reporter.paused():
            session.confirm(f"Restore {inv.environment}'s database on {db} from {dump.name} (taken"
                    f" {dump.when}, {dump.origin})? Every write made since then is LOST, and"
                    f" Releasy is DOWN until it is done: {plan}.", yes=yes)
        with pipe.stage("backup", db, "save the current database first"):
            safety = take_snapshot(session, running=st.running_release, level=st.level or 0,
                                   purpose=PRE_RESTORE, existing=st.backups,
                                   protect=[dump.name])
        lock.ensure_held()

        def stop(c) -> None:
            c.run(systemd.systemctl("stop", *running[c.name]), sudo=True)
            c.reporter.changed(c.name, f"stopped {', '.join(running[c.name])} (database"
                                       f" restore)")

        def start(c) -> None:
            host = inv.host(c.name)
            for unit in running[c.name]:
                app_tier.restart_service(c, unit)
                bind = unit_bind(inv, host, unit)
                waited = app_tier.wait_ready(c, bind, inv.app.ready_timeout, unit=unit)
                c.reporter.info(c.name, f"{unit} ready at http://{bind}/ready after"
                                        f" {waited:.1f} s")

        busy = [h for h, units in running.items() if units]
        # Clients get a 503 maintenance page (Retry-After) meanwhile, never a raw 502.
        was_on = maintenance_page.switch_for_downtime(session, True)
        try:
            with pipe.stage("restore", db, f"stop Releasy, restore {dump.name}"):
                if busy:
                    session.executor.each(busy, stop)
                restore(session, dump)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - restart, then raise
            raise restores.task_stopped(session, pipe, db=db, dump=dump, safety=safety,
                                        busy=busy, start=start, was_on=was_on,
                                        exc=exc) from None
        try:
            with pipe.stage("start", what="start Releasy again, wait for /ready"):
                if busy:
                    session.executor.each(busy, start)
        except DeployError as exc:
            raise DeployError(
                f"the database WAS restored from {dump.name}, but Releasy did not come back"
                f" on every app host:\n{exc}\n  The data as it was before the restore is in"
                f" {safety.path} on {db} (`fab db.restore --file {safety.name}` goes back to"
                f" it). The maintenance page stays on until `fab proxy.maintenance --off`.") from None
        maintenance_page.switch_for_downtime(session, False, was_on=was_on)
        for h in stopped_before:
            session.reporter.info(h, "no Releasy unit was running here before the restore:"
                                     " left stopped")
        _report_rotation(session, st)
        session.reporter.info(db, f"restored {dump.name}; the data from before is in"
                                  f" {safety.name}")
        return dump


def _report_rotation(session, st: DbState) -> None:
    """The proxies' upstream lists were never touched: say where each app host stands."""
    inv = session.inventory
    if inv.is_single_host or not st.upstreams:
        return
    for h in inv.hosts_in("app"):
        server = nginxcmd.check_servers([(h.private_address, inv.app.bind_port)])[0]
        missing = [p for p, servers in st.upstreams.items() if not servers or server not in servers]
        if missing:
            session.reporter.info(h.name, f"not in rotation on {', '.join(missing)} (as before"
                                          f" the restore): `fab app.undrain --host {h.name}`"
                                          f" puts it back")
        else:
            session.reporter.info(h.name, f"in rotation on {', '.join(st.upstreams)}")
