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
every Releasy instance stopped; that is the caller's job (`restore_flow`). The scripts and
the names' pattern are built in `commands/backup.py`.
"""
from __future__ import annotations

import secrets as _random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from . import restores
from .commands import app as appcmd
from .commands import backup as backupcmd
from .commands.backup import (BACKUP_DIR, EXTENSIONS, MANUAL, NO_RELEASE, PRE_DEPLOY,
                              PRE_RESTORE)
from .errors import BadInput, CommandTimeoutError, DeployError, UnreachableError, first_line
from .executor import tail
from .facts import Fact, read_fact
from .inventory import Inventory, check_version

__all__ = [
    "BACKUP_DIR", "Backup", "backup_name", "parse_backup_name", "parse_listing",
    "backups_to_prune", "choose_restore_point", "list_backups", "create", "restore",
    "BackupListing", "backup_host", "PRE_DEPLOY", "MANUAL", "PRE_RESTORE", "snapshot_name",
    "take_snapshot", "find_backup", "format_size", "listing_rows",
]

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
DUMP_TIMEOUT_S = 3600.0
SNAPSHOT_PURPOSES = (MANUAL, PRE_RESTORE)


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
    m = backupcmd.NAME_RE.fullmatch(name)
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




@dataclass(frozen=True)
class BackupListing(Fact):
    """Every dump in BACKUP_DIR (`Backup`), oldest first."""

    def shell(self) -> str:
        return backupcmd.LISTING_PROBE

    def parse(self, out: str, code: int) -> list[Backup]:
        return parse_listing(out, code)




def _target(inv: Inventory) -> str:
    """The database name (PostgreSQL) or file (SQLite) that is dumped."""
    if inv.database.kind == "sqlite":
        path = appcmd.sqlite_path(appcmd.SQLITE_URL)
        assert path is not None
        return path
    return inv.database.name



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
    res = conn.run(backupcmd.dump_argv(kind, _target(inv), backup.name, prune,
                                       user=inv.app.service_user), sudo=True, check=False,
                   timeout=DUMP_TIMEOUT_S)
    if not res.ok:
        said = tail(conn.mask(res.stderr.strip() or res.stdout.strip())) or "(no output)"
        what, hint = failed
        raise DeployError(
            f"{conn.name}: {what} (exit code {res.exit_code}):\n"
            + "\n".join(f"    {line}" for line in said.splitlines()) + f"\n  {hint}",
            host=conn.name)
    marks = backupcmd.markers(res.stdout)
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
    # This restore's own id: what became of it is read from its transaction only, never
    # from one an earlier restore left behind.
    run = _random.token_hex(8)
    argv = backupcmd.restore_argv(backup.kind, _target(inv), backup.name,
                                  user=inv.app.service_user, run=run)
    try:
        res = conn.run(argv, sudo=True, check=False, timeout=DUMP_TIMEOUT_S)
    except (KeyboardInterrupt, CommandTimeoutError, UnreachableError) as exc:
        what = f"restoring {backup.path} stopped: {first_line(exc, conn.name)}"
        raise restores.stopped(conn, backup.kind, _target(inv), backup.path, what,
                               exc, run) from None
    if not res.ok:
        said = tail(conn.mask(res.stderr.strip() or res.stdout.strip())) or "(no output)"
        what = (f"restoring {backup.path} failed (exit code {res.exit_code}):\n"
                + "\n".join(f"    {line}" for line in said.splitlines()))
        raise restores.stopped(conn, backup.kind, _target(inv), backup.path, what, None, run)
    conn.reporter.changed(conn.name, f"database {inv.database.name} restored from"
                                     f" {backup.path} (migration level {backup.level})")




# ====================================================================== listing
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


