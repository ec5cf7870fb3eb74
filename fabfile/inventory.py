"""Inspect the inventory and the hosts it names."""
from invoke import task

from releasy_deploy.cli import READ_ONLY, operator_task, session
from releasy_deploy.lazy import lazy_module

inventory = lazy_module("releasy_deploy.inventory")
facts = lazy_module("releasy_deploy.facts")


@task
@operator_task(dry=READ_ONLY)
def check(c):
    """Validate the inventory and secrets without connecting to any host."""
    with session() as s:
        inv = s.inventory
        print(f"{inv.path}: ok ({inv.topology} topology, environment {inv.environment})")
        for tier in inventory.TIERS:
            names = ", ".join(h.name for h in inv.hosts_in(tier)) or "-"
            print(f"  {tier:<6} {names}")
        for jump in inv.jump_hosts:
            behind = ", ".join(h.name for h in inv.hosts if h.jump == jump)
            print(f"  jump   {jump.name} ({jump.ssh_user}@{jump.address}:{jump.ssh_port}) for"
                  f" {behind}")
        print(f"  secrets set: {', '.join(s.secrets.names) or 'none'}")


@task
@operator_task(dry=READ_ONLY)
def ping(c):
    """Connect to every host (verified host keys, sudo) and show OS, arch and login user."""
    with session(need_secrets=False) as s:
        def probe(conn):
            os_release, arch = facts.OsRelease(), facts.Arch()
            found = facts.read_facts(conn, [os_release, arch], sudo=True)
            return found[os_release].get("PRETTY_NAME", "?"), found[arch]
        results = s.executor.each(s.inventory.hosts, probe)
        for host in s.inventory.hosts:
            os_name, arch = results[host.name]
            via = f"  (via {host.jump.name})" if host.jump is not None else ""
            print(f"{host.name:<12} {host.ssh_user + '@' + host.address:<28} {arch:<8}"
                  f" {os_name}{via}")


