"""`fab status`: the whole inventory in one table (or one JSON document)."""
from invoke import Exit, task

from releasy_deploy.cli import EXIT_FAILED, READ_ONLY, operator_task, session
from releasy_deploy.lazy import lazy_module

status_ops = lazy_module("releasy_deploy.status")
status_text = lazy_module("releasy_deploy.status.render")


@task(help={"json": "print one JSON document instead of the table (for scripts and"
                    " monitoring); same exit codes",
            "host": "show (and judge) only these hosts (H[,H...], fab's -H means the same)"})
@operator_task(hosts="host", dry=READ_ONLY)
def status(c, json=False, host=None):
    """Every host: release, service, /ready, rotation, firewall, disk, database; the lock.

    Read-only: one round trip per host, all hosts in parallel (plus the lock query on the
    db host). Exit codes: 0 everything healthy; 1 something is unhealthy, listed under the
    table ("problems" in the JSON): a host unreachable (its row says so), a service down or
    not ready, a host out of rotation, the firewall inactive or not as planned, PostgreSQL
    down, a file system 90% full...; 2 bad inventory.
    """
    with session(need_secrets=False) as s:
        s.executor.connect_ahead(s.inventory.hosts)  # every host is read: connect meanwhile
        report = status_ops.status(s, only=host)
    if json:
        print(status_text.to_json_text(report), flush=True)
    else:
        print(status_text.render_table(report), flush=True)
    if not report.healthy:
        raise Exit(code=EXIT_FAILED)
