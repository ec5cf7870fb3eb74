"""proxy tier tasks: nginx terminating TLS in front of the app hosts."""
from invoke import task

from releasy_deploy.cli import operator_task, session
from releasy_deploy.lazy import lazy_module

site_ops = lazy_module("releasy_deploy.site")
proxy = lazy_module("releasy_deploy.tiers.proxy")


@task(help={"dry-run": "show what would change (with diffs) and touch nothing",
            "reset-upstreams": "point nginx at every app host again (the inventory's default"
                               " rotation), replacing the servers the last rollout left",
            "wait": "seconds to wait for the deploy lock if another task holds it (default 0: fail at"
                    " once with exit code 3)",})
@operator_task
def setup(c, dry_run=False, reset_upstreams=False, wait=0):
    """Install nginx with TLS and the Releasy site on the proxy hosts (nginx -t before reload).

    Under the deploy lock, so the live rotation it keeps is read while no rollout moves it."""
    with session(dry_run=dry_run) as s:
        try:
            with site_ops.change_lock(s, wait=float(wait)):
                proxy.setup(s, reset_upstreams=reset_upstreams)
        finally:
            s.reporter.summary()
