"""App tier: Releasy itself on the app hosts: setup, and the day-2 tasks (restart, logs,
drain, undrain)."""
from invoke import task

from releasy_deploy.cli import JSON_LOG_ENV, READ_ONLY, operator_task, session, use_json_log
from releasy_deploy.commands.systemd import DEFAULT_LOG_LINES
from releasy_deploy.lazy import lazy_module

maintenance = lazy_module("releasy_deploy.maintenance")
site_ops = lazy_module("releasy_deploy.site")
app_secrets = lazy_module("releasy_deploy.tiers.app_secrets")


@task(help={"version": "release to install and run, e.g. 1.2.3 (default: keep each host's"
                       " current release)",
            "dry-run": "show what would change (with diffs) without changing anything",
            "wait": "seconds to wait for the deploy lock if another task holds it (default 0: fail at"
                    " once with exit code 3)",
            "rotate-secret": "replace this secret's value kept on the app hosts (repeatable;"
                             " e.g. api_key_pepper: every API key stops working)",
            "limit": "converge only these app hosts (H[,H...], fab's -H means the same)"},
      iterable=["rotate_secret"])
@operator_task(hosts="limit", dry="dry_run")
def setup(c, version=None, dry_run=False, wait=0, rotate_secret=None, limit=None):
    """Install Releasy on the app hosts (user, release, env file, systemd units) and start it.

    Under the deploy lock. On an environment that serves, hosts whose settings or release
    change are restarted one at a time, drained first (no failed request)."""
    with session(dry_run=dry_run, action="app.setup", audited=True,
                 args={"version": version, "rotate_secret": rotate_secret,
                       "limit": limit}) as s:
        s.limit_to(limit)
        try:
            site_ops.check_artifact(s, version)
            site_ops.refuse_behind_database(s, version)
            with site_ops.change_lock(s, version=version, wait=float(wait)) as lock:
                site_ops.setup_app(s, version, lock, rotate=rotate_secret or ())
        finally:
            if s.reporter.tally():  # no summary when nothing was contacted (bad input)
                s.reporter.summary()


_SUMMARY_HELP = {
    "dry-run": "read every host's state and show what would happen; change nothing (the lock"
               " is not taken)",
    "wait": "seconds to wait for the deploy lock if another deploy holds it (default 0: fail"
            " at once with exit code 3)",
}


def _summary(s):
    if any(h.name in s.reporter.tally() for h in s.inventory.hosts):  # not for bad input
        s.reporter.summary()


@task(help={"host": "restart only these app hosts (H[,H...], fab's -H means the same;"
                    " default: every app host)",
            "batch": "app hosts restarted at a time (default 1; one host always stays in"
                     " rotation)",
            "yes": "do not ask for confirmation (required when stdin is not a terminal)",
            "ready-timeout": "seconds a restarted host has to answer /ready (default:"
                             " app.ready_timeout of the inventory)",
            "json-log": f"also append one JSON object per event to this file (same as"
                        f" {JSON_LOG_ENV})",
            **_SUMMARY_HELP})
@operator_task(hosts="host", dry="dry_run")
def restart(c, host=None, batch=1, yes=False, dry_run=False, wait=0, ready_timeout=None,
            json_log=None):
    """Rolling restart of Releasy: per batch drain, restart, wait for /ready, re-add.

    The same steps as a rolling deploy (no request fails), under the deploy lock. A host
    drained by hand is restarted in place and stays drained. Exit codes: 0 ok, 1 a host did
    not come back (the message says where everything stands), 2 bad input or refused (it
    would leave no host serving), 3 lock busy, 4 unreachable.
    """
    use_json_log(json_log)
    with session(dry_run=dry_run, action="app.restart", hooked=True,
                 hosts=[host] if host else ()) as s:
        try:
            maintenance.restart(s, host=host, batch=batch, yes=yes, wait=float(wait),
                                ready_timeout=ready_timeout)
        finally:
            _summary(s)


@task(help={"host": "only these app hosts (H[,H...], fab's -H means the same; default:"
                    " every app host)",
            "lines": f"journal lines per host (default {DEFAULT_LOG_LINES})",
            "follow": "then keep streaming new lines from every host until Ctrl-C"})
@operator_task(hosts="host", dry=READ_ONLY)
def logs(c, host=None, lines=DEFAULT_LOG_LINES, follow=False):
    """Releasy's journal on the app hosts, every line prefixed by its host."""
    with session() as s:
        # Journal lines can quote the environment (a crash dump, a debug log): hide the
        # secrets that live only on the hosts too.
        app_secrets.mask_host_secrets(s, maintenance.app_hosts(s.inventory, host))
        maintenance.logs(s, host=host, lines=lines, follow=follow)


@task(help={"host": "the app host to take out of rotation (required; or fab's -H)",
            **_SUMMARY_HELP})
@operator_task(hosts="host", dry="dry_run")
def drain(c, host=None, dry_run=False, wait=0):
    """Take an app host out of every proxy's rotation by hand (maintenance on it).

    Returns once the requests it was serving have finished. It stays out (fab proxy.setup
    keeps the live list) until `fab app.undrain`. Refuses to drain the last host in
    rotation (exit 2). Under the deploy lock (exit 3 when busy). An unreachable host is
    taken out all the same (it is not needed): nothing can be waited for, and it says so.
    """
    with session(dry_run=dry_run) as s:
        try:
            maintenance.drain(s, host, wait=float(wait))
        finally:
            _summary(s)


@task(help={"host": "the app host to put back into rotation (required; or fab's -H)",
            **_SUMMARY_HELP})
@operator_task(hosts="host", dry="dry_run")
def undrain(c, host=None, dry_run=False, wait=0):
    """Put an app host back into every proxy's rotation, once it answers /ready.

    Refused (exit 2) while the host is behind the fleet (another release than the hosts in
    rotation, or one older than the database's migrations): the message names the rolling
    deploy that brings it up to date."""
    with session(dry_run=dry_run) as s:
        try:
            maintenance.undrain(s, host, wait=float(wait))
        finally:
            _summary(s)
