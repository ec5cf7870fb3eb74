"""db tier tasks: PostgreSQL 15 for Releasy on the inventory's db host."""
from invoke import task

from releasy_deploy.cli import operator_task, session
from releasy_deploy.tiers import db as db_tier


@task(help={"dry_run": "only report what would change; touch nothing"})
@operator_task
def setup(c, dry_run=False):
    """Install and configure PostgreSQL 15: role, database, password, pg_hba, listen."""
    with session(dry_run=dry_run) as s:
        try:
            db_tier.setup(s)
        finally:
            s.reporter.summary()
