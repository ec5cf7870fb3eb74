"""``fab db.psql``: an interactive database shell on the db host, as the app's own account."""
from __future__ import annotations

import os
import sys

from .commands import app as appcmd
from .commands.dbshell import PGPASS_SCRIPT, pgpass_line, psql_argv, sqlite_shell_argv
from .interactive import run_interactive
from .inventory import POSTGRES_PORT
from .lock import database_credentials
from .session import Session
from .tiers import db as db_tier


def db_shell(session: Session) -> int:
    """``fab db.psql``: psql as the app role on the db host (SQLite: sqlite3 on the
    database file as the service account), on a pty when this is a terminal."""
    inv = session.inventory
    conn = session.executor.conn(inv.db_host)
    session.reporter.end_live()  # the terminal belongs to the program from here on
    pty = os.isatty(sys.stdin.fileno())
    if inv.database.kind == "sqlite":
        path = appcmd.sqlite_path(appcmd.SQLITE_URL)
        assert path is not None
        session.reporter.info(conn.name, f"sqlite3 {path} as {inv.app.service_user}"
                                         f" (.quit or Ctrl-D to leave)")
        argv = conn.command_argv(sqlite_shell_argv(path, inv.app.service_user), sudo=True)
        return run_interactive(conn, argv, pty=pty)
    creds = database_credentials(db_tier.database_url(session))  # masked on reading
    if session.dry_run:
        session.reporter.would(conn.name, f"run psql as {creds.user} on {creds.dbname}")
        return 0
    made = conn.run(["sh", "-c", PGPASS_SCRIPT], mutates=False, stdin=pgpass_line(
        "127.0.0.1", POSTGRES_PORT, creds.dbname, creds.user, creds.password).encode())
    pgpass = made.stdout.strip()
    if not pgpass.startswith("/"):
        raise ValueError(f"{conn.name}: unexpected mktemp output {pgpass!r}")
    session.reporter.info(conn.name, f"psql as {creds.user} on {creds.dbname} (\\q or Ctrl-D"
                                     f" to leave)")
    try:
        return run_interactive(conn, psql_argv(pgpass, host="127.0.0.1", port=POSTGRES_PORT,
                                               database=creds.dbname, user=creds.user),
                               pty=pty)
    finally:
        # The script removes it too; this covers a session that never started psql.
        conn.run(["rm", "-f", "--", pgpass], check=False, mutates=False)
