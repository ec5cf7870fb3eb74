"""App tier: Releasy itself on the app hosts."""
from invoke import task

from releasy_deploy.cli import operator_task, session
from releasy_deploy.tiers import app


@task(help={"version": "release to install and run, e.g. 1.2.3 (default: keep each host's"
                       " current release)",
            "dry-run": "show what would change (with diffs) without changing anything"})
@operator_task
def setup(c, version=None, dry_run=False):
    """Install Releasy on the app hosts (user, release, env file, systemd units) and start it."""
    with session(dry_run=dry_run) as s:
        try:
            app.setup(s, version)
        finally:
            if s.reporter.tally():  # no summary when nothing was contacted (bad input)
                s.reporter.summary()
