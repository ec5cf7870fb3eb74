"""firewall tier tasks: ufw on every host, rules derived from the topology.

Rules that carry the ``releasy`` comment are ours: apply adds and removes them to match the
plan. Rules someone added by hand are reported as "unexpected" and kept, unless
``--prune-unmanaged``. apply refuses a host whose view of our SSH connection is outside
admin_cidrs, and arms an automatic revert on every host it changes until a brand-new SSH
connection gets through. With ``egress.restrict`` outgoing traffic is denied except the
flows derived from the topology (see `fab firewall.plan`)."""
from invoke import Exit, task

from releasy_deploy.cli import READ_ONLY, operator_task, session
from releasy_deploy.lazy import lazy_module

site_ops = lazy_module("releasy_deploy.site")
fw = lazy_module("releasy_deploy.tiers.firewall")
fw_views = lazy_module("releasy_deploy.tiers.firewall_views")
fw_audit = lazy_module("releasy_deploy.tiers.firewall_audit")


@task
@operator_task(dry=READ_ONLY)
def plan(c):
    """Show per host the firewall rules apply would add and remove (changes nothing)."""
    with session(dry_run=True, need_secrets=False) as s:
        try:
            fw_views.plan(s)
        finally:
            s.reporter.summary()


@task(help={
    "dry-run": "show what would change and change nothing",
    "revert-after": "seconds before a host restores its previous firewall unless a new SSH "
                    "connection confirmed the change (default 60)",
    "prune-unmanaged": "also remove rules that are not ours (no 'releasy' comment)",
    "wait": "seconds to wait for the deploy lock if another task holds it (default 0: fail at"
    " once with exit code 3)",
    "limit": "apply only on these hosts (H[,H...], fab's -H means the same); the rules"
             " still derive from the whole inventory",
})
@operator_task(hosts="limit", dry="dry_run")
def apply(c, dry_run=False, revert_after=60, prune_unmanaged=False, wait=0, limit=None):
    """Converge every host's ufw firewall to the plan, with lockout protection (under the
    deploy lock)."""
    with session(dry_run=dry_run, need_secrets=False, action="firewall.apply", audited=True,
                 args={"prune_unmanaged": prune_unmanaged, "limit": limit}) as s:
        s.limit_to(limit)
        try:
            with site_ops.change_lock(s, wait=float(wait)):
                fw.apply(s, revert_after=int(revert_after), prune_unmanaged=prune_unmanaged)
        finally:
            s.reporter.summary()


@task
@operator_task(dry=READ_ONLY)
def status(c):
    """Show per host ufw's state and rules, marked planned / unexpected / missing."""
    with session(need_secrets=False) as s:
        try:
            fw_views.status(s)
        finally:
            s.reporter.summary()


@task(help={"netns": "probe from this network namespace (the lab: labN-outside) instead "
                     "of from here, the machine running the task",
            "listener": "ADDR:PORT of a TCP listener outside: every host connects to it and "
                        "the result is checked against the egress plan"})
@operator_task(dry=READ_ONLY)
def audit(c, netns=None, listener=None):
    """Probe every host's ports (IPv4 and IPv6) from outside, and optionally egress to a
    listener, and compare with the plan (exit 1 on any difference)."""
    with session(need_secrets=False) as s:
        try:
            ok = fw_audit.audit(s, netns, listener)
        finally:
            s.reporter.summary()
    if not ok:
        raise Exit("firewall audit: reachability differs from the plan (see ERROR lines)",
                   code=1)
