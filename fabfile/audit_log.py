"""`fab audit`: the environment's audit trail, read back from the hosts (read-only)."""
import json as jsonlib
import sys

from invoke import Exit, task

from releasy_deploy.cli import EXIT_BAD_INPUT, EXIT_UNREACHABLE, operator_task, session
from releasy_deploy.lazy import lazy_module

audit_ops = lazy_module("releasy_deploy.audit")

DEFAULT_LAST = 20


@task(help={"last": f"how many records (default {DEFAULT_LAST})",
            "host": "read only this host's log (default: every host's, merged)",
            "json": "print one JSON list instead of the table (newest first)"})
@operator_task
def audit(c, last=DEFAULT_LAST, host=None, json=False):
    """Who changed what, when, from where, and how it ended: the environment's records
    merged across hosts, newest first.

    Read-only (no lock, nothing written): one `tail` per host, in parallel. A record that
    every host holds is shown once (`hosts` lists where it was found). Hosts that cannot be
    read are named on stderr; exit 4 when none could be. Exit 2 for a bad flag."""
    try:
        last = int(last)
    except ValueError:
        last = -1
    if not 1 <= last <= 100000:
        raise Exit("error: --last must be a whole number from 1 to 100000", code=EXIT_BAD_INPUT)
    with session(need_secrets=False) as s:
        inv = s.inventory
        names = [h.name for h in inv.hosts]
        if host is not None and host not in names:
            raise Exit(f"error: --host {host}: no such host in {inv.path} (hosts:"
                       f" {', '.join(names)})", code=EXIT_BAD_INPUT)
        targets = [host] if host else names
        by_host, problems = audit_ops.read_all(s.executor, targets, last)
        records = audit_ops.merge(by_host, inv.environment, last)
    for name, why in problems.items():
        print(f"warning: {name}: audit log not read: {why}", file=sys.stderr)
    if problems and len(problems) == len(targets):
        raise Exit("error: no host's audit log could be read", code=EXIT_UNREACHABLE)
    if json:
        print(jsonlib.dumps(records, indent=1, sort_keys=True))
        return
    if not records:
        print(f"no audit records of {inv.environment} on {', '.join(targets)}")
        return
    for line in audit_ops.render(records):
        print(line)
