"""proxy tier tasks: nginx terminating TLS in front of the app hosts, and its maintenance
page."""
from invoke import task

from releasy_deploy.cli import BadInput, operator_task, session
from releasy_deploy.lazy import lazy_module

site_ops = lazy_module("releasy_deploy.site")
proxy_setup = lazy_module("releasy_deploy.tiers.proxy_setup")
maintenance_page = lazy_module("releasy_deploy.tiers.maintenance_page")


@task(help={"dry-run": "show what would change (with diffs) and touch nothing",
            "reset-upstreams": "point nginx at every app host again (the inventory's default"
                               " rotation), replacing the servers the last rollout left",
            "wait": "seconds to wait for the deploy lock if another task holds it (default 0: fail at"
                    " once with exit code 3)",
            "limit": "converge only these proxy hosts (H[,H...], fab's -H means the same)"})
@operator_task(hosts="limit", dry="dry_run")
def setup(c, dry_run=False, reset_upstreams=False, wait=0, limit=None):
    """Install nginx with TLS and the Releasy site on the proxy hosts (nginx -t before reload).

    Under the deploy lock, so the live rotation it keeps is read while no rollout moves it."""
    with session(dry_run=dry_run, action="proxy.setup", audited=True,
                 args={"reset_upstreams": reset_upstreams, "limit": limit}) as s:
        s.limit_to(limit)
        try:
            with site_ops.change_lock(s, wait=float(wait)):
                proxy_setup.setup(s, reset_upstreams=reset_upstreams)
        finally:
            s.reporter.summary()


@task(help={"on": "show the maintenance page (503 with Retry-After) on every proxy",
            "off": "serve Releasy again on every proxy",
            "dry-run": "say what would change; change nothing (the lock is not taken)",
            "wait": "seconds to wait for the deploy lock if another task holds it (default 0:"
                    " fail at once with exit code 3)"})
@operator_task
def maintenance(c, on=False, off=False, dry_run=False, wait=0):
    """Switch the maintenance page on or off by hand, on every proxy (idempotent).

    While on, nginx answers every HTTPS request with 503, Retry-After and the page from
    files/nginx/maintenance.html.j2 (installed by `fab proxy.setup`); the app hosts are not
    touched. Under the deploy lock. Exit 2 without exactly one of --on/--off."""
    if on == off:
        raise BadInput("say --on or --off (exactly one)")
    with session(dry_run=dry_run, need_secrets=False, action="proxy.maintenance",
                 audited=True, args={"on": on, "off": off}) as s:
        try:
            with site_ops.change_lock(s, wait=float(wait)):
                maintenance_page.switch(s, on)
        finally:
            s.reporter.summary()
