"""db tier tasks: PostgreSQL 15 for Releasy on the inventory's db host, and its day-2 tasks
(dumps, restore, an interactive psql). With ``database.kind: sqlite`` the same tasks use
SQLite's online backup of the database file on the single host.

Exit codes: 0 ok, 1 a step failed (the message says where and what to do), 2 bad input or
refused (nothing changed; also: a confirmation was needed but stdin is not a terminal and
--yes was not given), 3 another deploy holds the lock, 4 a host is unreachable."""
from contextlib import contextmanager

from invoke import Exit, task

from releasy_deploy.cli import READ_ONLY, BadInput, operator_task, session
from releasy_deploy.errors import DeployError, ParallelError
from releasy_deploy.lazy import lazy_module

backups = lazy_module("releasy_deploy.backups")
db_tasks = lazy_module("releasy_deploy.db_tasks")
restore_flow = lazy_module("releasy_deploy.restore_flow")
dbshell = lazy_module("releasy_deploy.dbshell")
lock_ops = lazy_module("releasy_deploy.lock")
site_ops = lazy_module("releasy_deploy.site")
db_tier = lazy_module("releasy_deploy.tiers.db")


@contextmanager
def _summarized(s):
    """The per-host summary at the end, when the task got as far as touching a host; a
    failure raised on one host (not through the parallel executor, which says so itself)
    is marked on that host first."""
    try:
        yield
    except DeployError as exc:
        if exc.host and not isinstance(exc, (ParallelError, BadInput, lock_ops.LockBusy)):
            first = (str(exc).splitlines() or [""])[0].removeprefix(f"{exc.host}: ")
            s.reporter.error(exc.host, first + (" (details below)" if "\n" in str(exc) else ""))
        raise
    finally:
        if any(t.changed or t.unchanged or t.would or t.errors
               for t in s.reporter.tally().values()):
            s.reporter.summary()


@task(help={"dry_run": "only report what would change; touch nothing",
            "limit": "converge only these hosts (H[,H...], fab's -H means the same): the db"
                     " host, or nothing to do",
            "yes": "agree to a PostgreSQL restart (downtime) without being asked"})
@operator_task(hosts="limit", dry="dry_run")
def setup(c, dry_run=False, limit=None, yes=False):
    """Install and configure PostgreSQL 15: role, database, password, pg_hba, listen.

    Refused (exit 3) while another task holds the deploy lock, which lives in this
    database."""
    with session(dry_run=dry_run, action="db.setup", audited=True) as s:
        try:
            s.limit_to(limit)
            if not s.dry_run:
                site_ops.refuse_if_locked(s)
            db_tier.setup(s, yes=yes)
        finally:
            s.reporter.summary()


@task(help={"download": "also copy the dump to this file or directory on this machine"
                        " (created 0600, never overwritten; checked against the host's"
                        " sha256)",
            "dry-run": "show what would be done; change nothing"})
@operator_task(dry="dry_run")
def backup(c, download=None, dry_run=False):
    """Dump the database now (pg_dump -Fc; SQLite: online backup) into /var/backups/releasy.

    The dump is named after the release running, listed with size and time, and optionally
    copied to this machine. Keeps the newest database.backups_keep manual dumps; the
    pre-deploy ones are counted apart."""
    with session(dry_run=dry_run) as s:
        with _summarized(s):
            db_tasks.backup_task(s, download_to=download)


@task(name="backups")
@operator_task(dry=READ_ONLY)
def list_backups(c):
    """List the dumps on the db host: name, size, time, migration level and kind.

    Kind: pre-deploy FROM -> TO (taken by a rollout), manual (fab db.backup) or pre-restore
    (the data fab db.restore replaced)."""
    with session(need_secrets=False) as s:
        found = db_tasks.list_task(s)
        host = backups.backup_host(s.inventory).name
        if not found:
            print(f"no dumps in {backups.BACKUP_DIR} on {host} (`fab db.backup` takes one)")
            return
        for line in backups.listing_rows(found):
            print(line)
        total = sum(b.size or 0 for b in found)
        print(f"{len(found)} dumps in {backups.BACKUP_DIR} on {host},"
              f" {backups.format_size(total)} in all")


@task(help={"file": "the dump to restore: its name as `fab db.backups` lists it (required)",
            "yes": "do not ask for confirmation (required when stdin is not a terminal)",
            "dry-run": "read the state and show what would happen; change nothing (the lock"
                       " is not taken)",
            "wait": "seconds to wait for the deploy lock if another deploy holds it (default"
                    " 0: fail at once with exit code 3)"})
@operator_task(dry="dry_run")
def restore(c, file, yes=False, dry_run=False, wait=0):
    """Restore a dump (DOWNTIME: Releasy is stopped meanwhile), under the deploy lock.

    Stops every running Releasy unit, saves the current data to a pre-restore dump,
    restores FILE (PostgreSQL: in one transaction), starts the units again and waits for
    /ready. Asks first unless --yes."""
    with session(dry_run=dry_run, action="db.restore", audited=True, hooked=True,
                 args={"file": file}) as s:
        with _summarized(s):
            restore_flow.restore_task(s, file, yes=yes, wait=float(wait))


@task
@operator_task
def psql(c):
    """An interactive psql on the db host as the app role (SQLite: sqlite3 on its file).

    The password goes in a temporary 0600 file on the host, never on a command line. On a
    terminal you get a real one (line editing, Ctrl-C cancels a query); piped SQL works
    too: `echo 'SELECT 1;' | fab db.psql`."""
    with session() as s:
        code = dbshell.db_shell(s)
    if code:
        raise Exit(code=code)
