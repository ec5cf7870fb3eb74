"""The whole inventory in one task."""
from invoke import task

from releasy_deploy.cli import operator_task, session
from releasy_deploy.lazy import lazy_module

site_ops = lazy_module("releasy_deploy.site")


@task(help={"version": "release to install on app hosts (default: keep what each runs); on"
                       " an environment that serves it is rolled out host by host",
            "dry_run": "show what would change, with diffs; change nothing",
            "wait": "seconds to wait for the deploy lock if another task holds it (default 0:"
                    " fail at once with exit code 3)",
            "yes": "agree to a PostgreSQL restart (downtime) without being asked",
            "rotate-secret": "replace this secret's value kept on the app hosts (repeatable;"
                             " e.g. api_key_pepper: every API key stops working)",
            "limit": "converge only these hosts (H[,H...], fab's -H means the same), in the"
                     " usual tier order; plans still derive from the whole inventory"},
      iterable=["rotate_secret"])
@operator_task(hosts="limit", dry="dry_run")
def site(c, version=None, dry_run=False, wait=0, rotate_secret=None, limit=None, yes=False):
    """Provision everything: db -> app -> proxy -> firewall; a second run changes nothing."""
    with session(dry_run=dry_run, action="site", audited=True,
                 args={"version": version, "rotate_secret": rotate_secret,
                       "limit": limit}) as s:
        s.limit_to(limit)
        # Every target is read first: connect while the flow loads.
        s.executor.connect_ahead(s.targets(s.inventory.hosts))
        site_ops.run(s, version, wait=float(wait), rotate=rotate_secret or (), yes=yes)
