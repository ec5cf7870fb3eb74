"""A PostgreSQL restore that can be ended, and whose outcome is read from the database.

The restore runs ``psql --single-transaction`` on the db host. Closing our SSH channel does
not end it (no terminal, no signal): a cancelled restore would go on, and commit, while we
said otherwise. So the restore script

- runs in its own session (``setsid``) and writes its process group to a state file, so
  `stop_argv` can end the whole tree (pg_restore, runuser, psql) with one ``kill``;
- names its database session (``application_name`` ``releasy-restore``), so `stop_argv`
  can terminate the backend, which aborts the transaction unless it already committed;
- writes the transaction's id (``txid_current()``) as its first statement, under this
  run's id, so `stop_argv` (given the same run id) can ask PostgreSQL what became of it
  (``txid_status``: committed, aborted, in progress): the message says what happened,
  checked, not assumed. A restore that failed before its transaction began finds no id of
  its own ("not started"), never the committed one an earlier restore left.

The state directory is root's (the process group, which root kills); psql, as postgres,
writes the id into ``tx/`` inside it, which root reads only as postgres.

Pure builders (argv lists; every value an argv word, never spliced into the script).
"""
from __future__ import annotations

import re

__all__ = ["APP_NAME", "state_dir", "restore_argv", "stop_argv", "parse_outcome", "check_run",
           "COMMITTED", "ABORTED", "NOT_STARTED", "UNKNOWN"]

APP_NAME = "releasy-restore"
COMMITTED, ABORTED, NOT_STARTED, UNKNOWN = "committed", "aborted", "not started", "unknown"
STOP_WAIT_TENTHS = 300  # how long `stop_argv` waits for the backend to go (30 s)

_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RUN_ID = re.compile(r"[0-9a-f]{16}\Z")


def check_run(run: str) -> str:
    """A restore's run id: 16 hex digits (``secrets.token_hex(8)``)."""
    if not isinstance(run, str) or not _RUN_ID.match(run):
        raise ValueError(f"invalid restore run id {run!r}")
    return run


def state_dir(database: str) -> str:
    """Where a restore of ``database`` keeps its process group and transaction id (root
    creates it, postgres owns it: psql writes the id)."""
    if not _DB_NAME.match(database):
        raise ValueError(f"invalid database name {database!r}")
    return f"/run/releasy-restore-{database}"


# $1 dump, $2 database, $3 state dir, $4 run id. Exit 3: no such dump.
_RESTORE_SCRIPT = """set -eu
dump=$1 db=$2 state=$3 run=$4
cd /
if ! [ -f "$dump" ]; then echo "no such dump: $dump" >&2; exit 3; fi
# Root's directory (an earlier version made it postgres's: taken back); postgres writes
# only into tx/, made afresh for each restore.
mkdir -p -- "$state"
chown root:root "$state"
chmod 0711 "$state"
rm -rf -- "$state/tx" "$state/xid"
mkdir -m 0700 -- "$state/tx"
chown postgres: "$state/tx"
sql=$(mktemp /tmp/releasy-restore.XXXXXXXX)
trap 'rm -f -- "$sql" "$state/pgid"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP
echo "$$" > "$state/pgid"
# First statement: the transaction's id, under this run's id (read by the stop script).
printf '\\\\o %s\\nSELECT txid_current();\\n\\\\o\\n' "$state/tx/xid-$run" > "$sql"
cat >> "$sql" <<'SQL'
DROP SCHEMA IF EXISTS public CASCADE;
CREATE SCHEMA public AUTHORIZATION pg_database_owner;
GRANT USAGE ON SCHEMA public TO PUBLIC;
COMMENT ON SCHEMA public IS 'standard public schema';
SQL
# The complete SQL first: a truncated stream must never reach psql (it would commit it).
runuser -u postgres -- pg_restore --file=- "$dump" >> "$sql"
runuser -u postgres -- env PGAPPNAME=releasy-restore psql -X -q -t -A -v ON_ERROR_STOP=1 \\
  --single-transaction -d "$db" < "$sql"
"""

# $1 database, $2 state dir, $3 tenths of a second to wait for the backend, $4 run id.
# Ends the restore's process group, terminates its backend, waits until it is gone, then
# prints "@outcome committed|aborted|in progress|not started|unknown".
_STOP_SCRIPT = """set -u
db=$1 state=$2 tenths=$3 run=$4
cd /
q() { runuser -u postgres -- psql -X -A -t -q -d "$db" -c "$1"; }
if [ -f "$state/pgid" ] && [ "$(stat -c %u -- "$state")" = 0 ]; then
  pg=$(tr -dc 0-9 < "$state/pgid")
  [ -n "$pg" ] && kill -TERM -- "-$pg" 2>/dev/null
fi
mine="application_name = 'releasy-restore' AND datname = current_database()"
q "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE $mine" >/dev/null
i=0
while [ "$i" -lt "$tenths" ]; do
  n=$(q "SELECT count(*) FROM pg_stat_activity WHERE $mine") || n=
  [ "$n" = 0 ] && break
  sleep 0.1
  i=$((i + 1))
done
# Only this run's id, read as postgres (its directory is postgres's).
x=$(runuser -u postgres -- cat -- "$state/tx/xid-$run" 2>/dev/null | tr -dc 0-9)
if [ -z "$x" ]; then echo "@outcome not started"; exit 0; fi
s=$(q "SELECT txid_status($x)") || s=
echo "@outcome ${s:-unknown}"
"""


def restore_argv(dump_path: str, database: str, run: str) -> list[str]:
    """Restore ``dump_path`` (a ``pg_dump -Fc`` file) into ``database`` in one transaction,
    in a session of its own (run as root); ``run`` names this restore for `stop_argv`."""
    return ["setsid", "-w", "sh", "-c", _RESTORE_SCRIPT, APP_NAME, dump_path, database,
            state_dir(database), check_run(run)]


def stop_argv(database: str, run: str, wait_tenths: int = STOP_WAIT_TENTHS) -> list[str]:
    """End the restore ``run`` of ``database`` that is (maybe) still running and print what
    became of its transaction (`parse_outcome`); run as root, also after a restore that
    ended."""
    if not isinstance(wait_tenths, int) or wait_tenths < 0:
        raise ValueError(f"invalid wait {wait_tenths!r}")
    return ["sh", "-c", _STOP_SCRIPT, "releasy-restore-stop", database, state_dir(database),
            str(wait_tenths), check_run(run)]


def parse_outcome(stdout: str) -> str:
    """COMMITTED, ABORTED, NOT_STARTED, or UNKNOWN (in progress, unreadable) from
    `stop_argv`'s output."""
    for line in stdout.splitlines():
        if line.startswith("@outcome "):
            said = line.removeprefix("@outcome ").strip()
            if said in (COMMITTED, ABORTED, NOT_STARTED):
                return said
    return UNKNOWN
