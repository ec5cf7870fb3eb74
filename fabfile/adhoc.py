"""`fab run --tier TIER [--host H] -- COMMAND...`: an ad-hoc command on every host of a tier.

This is the one task that runs shell text written by the operator: the words after ``--``
are joined with spaces (as ``ssh HOST COMMAND...`` does) and run as ``sh -c COMMAND`` on
each host, as root (through ``sudo -n`` when the SSH user is not root). Quote the whole
command to keep it one piece: ``fab run --tier app -- 'df -h / && uptime'``.

Fabric itself would take the words after ``--`` as a command to run on ``-H`` hosts, and
refuses them without ``-H``. `RemainderExecutor` hands them to this task instead (as its
``command``); ``fabric.yaml`` at the repository root makes it fab's executor.
"""
from fabric import executor as _fabric_executor
from invoke import Exit, task

from releasy_deploy.cli import EXIT_BAD_INPUT, operator_task, session
from releasy_deploy.lazy import lazy_module

maintenance = lazy_module("releasy_deploy.maintenance")
inventory = lazy_module("releasy_deploy.inventory")
tier_app = lazy_module("releasy_deploy.tiers.app")


@task(help={"tier": "proxy, app or db: every host of that tier (required)",
            "host": "only this host of the tier",
            "command": "the command, instead of giving it after `--`"})
@operator_task
def run(c, tier, host=None, command=None):
    """Run a shell command on every host of a tier: fab run --tier app -- 'COMMAND'.

    In parallel, as root, output prefixed by host, then a summary (exit code and duration
    per host). Runs through `sh -c` on each host: the only task that runs shell text
    written by the operator. Exit codes: 0 it succeeded everywhere, 1 it failed on a host
    (4 when the failing hosts were all unreachable), 2 bad input.
    """
    with session() as s:
        if tier in inventory.TIERS:
            # `cat /etc/releasy/releasy.env` must not print the secrets that live only on
            # the hosts (the database password, a kept pepper) in clear either.
            tier_app.mask_host_secrets(s, [h for h in s.inventory.hosts_in(tier)
                                           if host in (None, h.name)])
        maintenance.run_adhoc(s, tier, command or "", host=host)


class RemainderExecutor(_fabric_executor.Executor):
    """Fabric's executor, except that the text after ``--`` becomes `run`'s command."""

    def expand_calls(self, calls, apply_hosts=True):
        remainder = getattr(self.core, "remainder", "") if self.core is not None else ""
        if apply_hosts and remainder:
            # Invoke deep-copies the tasks of the `ns` collection; their body is still ours.
            ours = [call for call in calls if getattr(call.task, "body", None) is run.body]
            if ours:
                for call in ours:
                    if call.kwargs.get("command"):
                        raise Exit("give the command once: after `--` or with --command",
                                   code=EXIT_BAD_INPUT)
                    call.kwargs["command"] = remainder
                self.core.remainder = ""
            elif not self.core[0].args.hosts.value:
                raise Exit(f"`-- {remainder}`: only `fab run --tier TIER -- COMMAND...` takes"
                           f" a command after `--`", code=EXIT_BAD_INPUT)
        return super().expand_calls(calls, apply_hosts=apply_hosts)
