"""The whole inventory in one task."""
from invoke import task

from releasy_deploy import site as site_ops
from releasy_deploy.cli import operator_task, session


@task(help={"version": "release to install on app hosts (default: keep what each runs)",
            "dry_run": "show what would change, with diffs; change nothing",
            "rotate-secret": "replace this secret's value kept on the app hosts (repeatable;"
                             " e.g. api_key_pepper: every API key stops working)"},
      iterable=["rotate_secret"])
@operator_task
def site(c, version=None, dry_run=False, rotate_secret=None):
    """Provision everything: db -> app -> proxy -> firewall; a second run changes nothing."""
    with session(dry_run=dry_run) as s:
        site_ops.run(s, version, rotate_secret or ())
