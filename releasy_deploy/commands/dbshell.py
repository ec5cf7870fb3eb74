"""What `fab db.psql` runs on the db host: psql as the app role with its password in a
temporary pgpass file (never on a command line), or sqlite3 as the service account. Pure."""
from __future__ import annotations


def pgpass_line(host: str, port: int, database: str, user: str, password: str) -> str:
    """One ``.pgpass`` line; ``:`` and ``\\`` in a field are escaped as libpq expects."""
    def esc(value: str) -> str:
        if "\n" in value or "\r" in value:
            raise ValueError("a .pgpass field cannot contain a line break")
        return value.replace("\\", "\\\\").replace(":", "\\:")
    return ":".join(esc(str(v)) for v in (host, port, database, user, password)) + "\n"


# $1: the temporary pgpass file (removed when psql ends, also on a hang-up); the rest:
# psql's arguments. INT is ignored by this shell only: psql installs its own handler (Ctrl-C
# cancels the running query), and the shell must survive it to remove the file.
PSQL_SCRIPT = """f=$1; shift
trap 'rm -f -- "$f"' EXIT
trap 'exit 129' HUP
trap 'exit 143' TERM
trap '' INT
PGPASSFILE=$f psql "$@"
"""
# Creates the pgpass file as the SSH user, 0600 from the start (libpq ignores a pgpass
# file others can read), from stdin, and prints its path.
PGPASS_SCRIPT = """umask 077
f=$(mktemp "${TMPDIR:-/tmp}/releasy-pgpass.XXXXXXXX")
cat > "$f"
echo "$f"
"""


def psql_argv(pgpass_path: str, *, host: str, port: int, database: str, user: str) -> list[str]:
    """psql over TCP to the local server as the app role; the password comes from the
    pgpass file (whose path is not secret), never from the command line."""
    conninfo = f"host={host} port={int(port)} dbname={_conn_value(database)}" \
               f" user={_conn_value(user)} application_name=releasy-db.psql"
    return ["sh", "-c", PSQL_SCRIPT, "releasy-psql", pgpass_path, conninfo]


def _conn_value(value: str) -> str:
    """A libpq conninfo value, quoted when needed."""
    if value and all(c.isalnum() or c in "_-." for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sqlite_shell_argv(path: str, service_user: str) -> list[str]:
    """sqlite3 on the app's database file as the service account (files it creates, like
    the WAL, stay the service's own). Run with sudo."""
    return ["runuser", "-u", service_user, "--", "sqlite3", path]

