"""Migration bookkeeping: which ``_sqlx_migrations`` level each release runs against.

Upstream's binary embeds its migrations and refuses to start against a database holding a
migration it does not know (sqlx "VersionMissing"). A rollback is therefore only safe when
the database is not ahead of the target release. We record, per release, the highest
successfully applied ``_sqlx_migrations.version`` it was running against, in a one-line
file next to the release on every app host (``/opt/releasy/releases/V/.schema-version``):

- after the first host of a rollout is ``/ready`` on V (its start ran the migrations), and
  again when the rollout finishes: V's level is the database's level then;
- the release a rollout starts FROM gets its level too, when every app host runs it, is
  ready and it has none recorded yet (a release installed by ``fab app.setup``).

The pre-deploy dumps (`releasy_deploy.backups`) carry the level in their names as well, so a
release whose file is missing can still be judged from the dump taken when leaving it.

Everything here is pure (probes, parsers, decisions) except `read_level`, one round trip.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .commands import app as appcmd
from .commands.pg_sql import psql_stdin_shell
from .commands.shell_read import read_first_word
from .errors import BadInput, DeployError
from .facts import Fact, read_fact
from .inventory import VERSION_RE, Host, Inventory, check_version

__all__ = [
    "SCHEMA_FILE", "schema_path", "SchemaLevel", "level_fact", "level_host", "parse_level",
    "read_level", "RecordedLevels", "parse_recorded", "record_script_argv", "known_level",
    "postgres_level_shell", "sqlite_level_shell", "older_than_database", "refuse_if_behind",
    "levels_to_record",
]

SCHEMA_FILE = ".schema-version"
# Only successful rows count: sqlx marks a failed non-transactional migration success=false.
LEVEL_SQL = "SELECT coalesce(max(version), 0) FROM public._sqlx_migrations WHERE success"
TABLE_SQL = "SELECT to_regclass('public._sqlx_migrations') IS NOT NULL"
# One psql run: the level when the table exists, else 0 (psql's \gset and \if, psql >= 10).
LEVEL_SCRIPT = (f"{TABLE_SQL} AS releasy_has_migrations \\gset\n"
                "\\if :releasy_has_migrations\n"
                f"{LEVEL_SQL};\n"
                "\\else\n"
                "SELECT 0;\n"
                "\\endif")
SQLITE_LEVEL_SQL = "SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success"
SQLITE_TABLE_SQL = ("SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                    " AND name = '_sqlx_migrations'")


def schema_path(version: str) -> str:
    return f"{appcmd.RELEASES_DIR}/{check_version(version)}/{SCHEMA_FILE}"


# ------------------------------------------------------------------------------ the database
def postgres_level_shell(database: str) -> str:
    """Prints the level (0 without a migrations table) as the postgres superuser: one psql
    call (the major's own binary, not Debian's Perl wrapper), the SQL on its stdin."""
    return psql_stdin_shell(database, LEVEL_SCRIPT)


def sqlite_level_shell(path: str, user: str) -> str:
    """Prints the level of a SQLite database file (0 when absent or without the table).

    sqlite3 runs as the service account ``user``: even read-only it opens ``-shm``/``-wal``
    read-write, and those names sit in the service's own directory (symlinks to anything)."""
    q = shlex.quote(path)

    def sqlite(sql: str) -> str:
        return shlex.join(["runuser", "-u", user, "--", "sqlite3", "-readonly", path, sql])
    return (f"[ -f {q} ] || {{ echo 0; exit 0; }}\n"
            f"t=$({sqlite(SQLITE_TABLE_SQL)}) || exit 4\n"
            f"if [ \"$t\" = 1 ]; then {sqlite(SQLITE_LEVEL_SQL)}; else echo 0; fi")


def parse_level(out: str, code: int) -> int | None:
    text = out.strip()
    if code != 0 or not re.fullmatch(r"\d+", text):
        return None
    return int(text)


@dataclass(frozen=True)
class SchemaLevel(Fact):
    """The database's migration level (None: unreadable). ``kind`` "postgres": ``where``
    is the database name; "sqlite": the database file."""

    kind: str
    where: str
    user: str = ""  # sqlite: the service account, which alone opens the file

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in ("postgres", "sqlite"):
            raise ValueError(f"unknown database kind {self.kind!r}")

    def shell(self) -> str:
        if self.kind == "postgres":
            return postgres_level_shell(self.where)
        if not re.fullmatch(r"[a-z_][a-z0-9_-]*", self.user):
            raise ValueError(f"SchemaLevel(sqlite) needs the service account, got {self.user!r}")
        return f"cd / && {sqlite_level_shell(self.where, self.user)}"

    def parse(self, out: str, code: int) -> int | None:
        return parse_level(out, code)


def level_fact(inv: Inventory) -> SchemaLevel:
    """The fact reading the database's migration level on `level_host`."""
    if inv.database.kind == "sqlite":
        return SchemaLevel("sqlite", appcmd.sqlite_path(appcmd.SQLITE_URL),
                           inv.app.service_user)
    return SchemaLevel("postgres", inv.database.name)


def level_host(inv: Inventory) -> Host:
    """Where the level is read: the db host (for SQLite, the one host carrying every tier)."""
    return inv.db_host


def read_level(session) -> int:
    """The database's migration level now (one round trip, read-only: also in dry-run)."""
    inv = session.inventory
    conn = session.executor.conn(level_host(inv))
    level = read_fact(conn, level_fact(inv), sudo=True)
    if level is None:
        raise DeployError(
            f"{conn.name}: cannot read the migration level of database {inv.database.name}"
            f" (_sqlx_migrations). Is the database up? `fab db.setup` checks it.",
            host=conn.name)
    return level


# ------------------------------------------------------------------------------ the app hosts
RECORDED_PROBE = f"""cd {shlex.quote(appcmd.RELEASES_DIR)} 2>/dev/null || exit 0
for f in */{SCHEMA_FILE}; do
  [ -f "$f" ] || continue
  {read_first_word("level", '"$f"')}
  printf '%s %s\\n' "${{f%%/*}}" "$level"
done"""


def parse_recorded(out: str, code: int = 0) -> dict[str, int]:
    """``V LEVEL`` lines -> {version: level}; malformed lines are ignored."""
    levels: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and VERSION_RE.fullmatch(parts[0]) and parts[1].isdigit():
            levels[parts[0]] = int(parts[1])
    return levels


@dataclass(frozen=True)
class RecordedLevels(Fact):
    """{release: migration level} recorded in the releases' ``.schema-version`` files."""

    def shell(self) -> str:
        return RECORDED_PROBE

    def parse(self, out: str, code: int) -> dict[str, int]:
        return parse_recorded(out, code)

# $1 releases dir, then pairs VERSION LEVEL. A release dir that is not there is skipped
# (not staged on this host); the file is replaced atomically.
_RECORD_SCRIPT = """set -eu
dir=$1; shift
while [ $# -ge 2 ]; do
  if [ -d "$dir/$1" ]; then
    printf '%s\\n' "$2" > "$dir/$1/.schema-version.new"
    chmod 0644 "$dir/$1/.schema-version.new"
    mv -f "$dir/$1/.schema-version.new" "$dir/$1/.schema-version"
  fi
  shift 2
done"""


def record_script_argv(levels: Mapping[str, int]) -> list[str]:
    """argv writing ``.schema-version`` for each {version: level} (run as root)."""
    args: list[str] = []
    for version, level in levels.items():
        check_version(version)
        if isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise ValueError(f"invalid migration level {level!r} for {version}")
        args += [version, str(level)]
    if not args:
        raise ValueError("no levels to record")
    return ["sh", "-c", _RECORD_SCRIPT, "releasy-schema", appcmd.RELEASES_DIR, *args]


# ------------------------------------------------------------------------------ decisions
@dataclass(frozen=True)
class LevelSource:
    level: int | None
    source: str  # where it came from, for messages


def known_level(version: str, recorded: Iterable[Mapping[str, int]],
                backups: Sequence = ()) -> LevelSource:
    """The migration level ``version`` ran against, from the hosts' records (the highest
    if they disagree), else from a dump taken when a rollout left that version."""
    found = [r[version] for r in recorded if version in r]
    if found:
        return LevelSource(max(found), f"{appcmd.RELEASES_DIR}/{version}/{SCHEMA_FILE}")
    leaving = [b for b in backups if getattr(b, "from_version", None) == version]
    if leaving:
        newest = max(leaving, key=lambda b: (b.taken_at, b.name))
        return LevelSource(newest.level, f"the dump {newest.name}")
    return LevelSource(None, "no record")


def older_than_database(version: str, recorded: Iterable[Mapping[str, int]], backups: Sequence,
                        db_level: int | None) -> str | None:
    """Why ``version`` cannot be rolled out on a database at ``db_level`` (pure), or None.

    Upstream's binary refuses a database holding migrations it does not know (sqlx
    VersionMissing): a release whose recorded level (or the level of the dump taken when
    leaving it) is below the database's would be switched to and fail to start. Unknown
    levels are not refused (nothing says the release is behind)."""
    if db_level is None:
        return None
    known = known_level(version, recorded, backups)
    if known.level is None or known.level >= db_level:
        return None
    return (f"{version} ran against migration level {known.level} ({known.source}), but the"
            f" database is at level {db_level}: its binary would refuse to start (sqlx"
            f" VersionMissing). Nothing was changed. Going back across migrations needs the"
            f" database restored from a dump taken before them: `fab deploy.rollback --to"
            f" {version} --restore-db` (it says which dump, and that writes made since are"
            f" lost).")


def refuse_if_behind(version: str, recorded: Iterable[Mapping[str, int]], backups: Sequence,
                     db_level: int | None) -> None:
    """BadInput (exit 2) when `older_than_database` refuses ``version``: called in the
    preflight of every task that switches releases, before anything is changed."""
    why = older_than_database(version, recorded, backups, db_level)
    if why is not None:
        raise BadInput(f"refusing to roll out {version}. {why}")


def levels_to_record(running: Mapping[str, str | None],
                     recorded: Mapping[str, Mapping[str, int]]) -> dict[str, str]:
    """Hosts whose running release has no level recorded: host -> release (pure).

    ``running``: host -> the release it runs and serves (ready) now; ``recorded``: host ->
    the levels its ``.schema-version`` files hold. A release that is running and ready knows
    the database's current level (it would have refused to start otherwise), so that level
    is what gets recorded for it."""
    return {h: v for h, v in running.items()
            if v is not None and v not in recorded.get(h, {})}
