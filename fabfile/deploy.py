"""Rollouts and the deploy lock."""
from invoke import task

from releasy_deploy.cli import operator_task, session
from releasy_deploy.lock import holder_info


@task
@operator_task
def lock(c):
    """Show who holds the deploy lock of this environment, or 'free'."""
    with session() as s:
        holder = holder_info(s)
        env = s.inventory.environment
        if holder is None:
            print(f"deploy lock of {env}: free")
        else:
            print(f"deploy lock of {env}: held by {holder.describe()} ({holder.where})")
