"""`fab run --tier TIER [--host H[,H]] -- COMMAND...`: an ad-hoc command on every host of a
tier (or on the named hosts: `fab -H app1,db1 run -- COMMAND...`).

This is the one task that runs shell text written by the operator: the words after ``--``
are joined with spaces (as ``ssh HOST COMMAND...`` does) and run as ``sh -c COMMAND`` on
each host, as root (through ``sudo -n`` when the SSH user is not root). Quote the whole
command to keep it one piece: ``fab run --tier app -- 'df -h / && uptime'``.

Fabric itself would run each task once per ``-H`` host, and the words after ``--`` on the
``-H`` hosts with its own SSH settings. `ReleasyExecutor` (``fabric.yaml`` at the
repository root makes it fab's executor) runs every task ONCE, leaving the ``-H`` list in
the configuration for the task to use as a filter on the inventory's hosts (or to refuse,
see `releasy_deploy.cli.operator_task`), and hands the words after ``--`` to this task
(as its ``command``), so they run through our executor, on inventory hosts only. (``fab -H
H -- COMMAND`` with no task at all is Fabric's alone: it does not even load this project.)
"""
from fabric import executor as _fabric_executor
from invoke import Call, Exit, task

from releasy_deploy.cli import CORE_HOSTS_KEY, EXIT_BAD_INPUT, operator_task, session
from releasy_deploy.lazy import lazy_module

maintenance = lazy_module("releasy_deploy.maintenance")
inventory = lazy_module("releasy_deploy.inventory")
app_secrets = lazy_module("releasy_deploy.tiers.app_secrets")


@task(help={"tier": "proxy, app or db: every host of that tier",
            "host": "only these hosts (H[,H...]; fab's -H means the same); without --tier:"
                    " these hosts whatever their tiers",
            "command": "the command, instead of giving it after `--`"})
@operator_task(hosts="host")
def run(c, tier=None, host=None, command=None):
    """Run a shell command on every host of a tier: fab run --tier app -- 'COMMAND'.

    In parallel, as root, output prefixed by host, then a summary (exit code and duration
    per host). Runs through `sh -c` on each host: the only task that runs shell text
    written by the operator. Exit codes: 0 it succeeded everywhere, 1 it failed on a host
    (4 when the failing hosts were all unreachable), 2 bad input.
    """
    with session() as s:
        if tier in inventory.TIERS or tier is None:
            # `cat /etc/releasy/releasy.env` must not print the secrets that live only on
            # the hosts (the database password, a kept pepper) in clear either.
            app_secrets.mask_host_secrets(s, maintenance.adhoc_hosts(s.inventory, tier, host))
        maintenance.run_adhoc(s, tier, command or "", host=host)


class ReleasyExecutor(_fabric_executor.Executor):
    """Fabric's executor, except that: every task runs once (-H is left for the task, see
    the module docstring), and the text after ``--`` becomes `run`'s command."""

    def normalize_hosts(self, hosts):
        # Fabric never connects anywhere on its own: no per-host copies of a task.
        return []

    def expand_calls(self, calls, apply_hosts=True):
        core = self.core[0].args if self.core is not None else None
        hosts = core.hosts.value if core is not None else None
        if apply_hosts and hosts:
            self.config[CORE_HOSTS_KEY] = hosts
        remainder = getattr(self.core, "remainder", "") if self.core is not None else ""
        if apply_hosts and remainder:
            # Invoke deep-copies the tasks of the `ns` collection; their body is still ours.
            calls = [c if isinstance(c, Call) else Call(task=c) for c in calls]
            ours = [call for call in calls if getattr(call.task, "body", None) is run.body]
            if not ours and not hosts:
                raise Exit(f"`-- {remainder}`: only `fab run --tier TIER -- COMMAND...` takes a"
                           f" command after `--` (or `fab -H HOST[,HOST] -- COMMAND...`)",
                           code=EXIT_BAD_INPUT)
            if not ours:  # `fab -H app1,db1 TASK -- COMMAND`: our `run` on those hosts too
                ours = [Call(self.collection["run"], kwargs={}, called_as="run")]
                calls += ours
            for call in ours:
                if call.kwargs.get("command"):
                    raise Exit("give the command once: after `--` or with --command",
                               code=EXIT_BAD_INPUT)
                call.kwargs["command"] = remainder
            self.core.remainder = ""
        return super().expand_calls(calls, apply_hosts=apply_hosts)
