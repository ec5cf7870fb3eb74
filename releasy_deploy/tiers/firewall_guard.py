"""Lockout protection for a firewall change, two layers:

1. Before touching a host (even installing ufw), `apply` checks the address and port the
   host sees for our own SSH connection (``$SSH_CONNECTION``, read on the host): if the
   address is not inside ``admin_cidrs`` or the port is not the host's ``ssh_port``, the
   plan would shut us out, so it refuses and changes nothing on that host
   (`check_ssh_source`). A revert still pending refuses too (`check_no_revert_pending`).
2. Before changing ufw, `run_armed` saves the current rule files and arms a transient
   systemd timer (``releasy-firewall-revert.timer``) that restores them after
   ``revert_after`` seconds, then changes the rules. `confirm_fresh` opens a brand-new SSH
   connection (a second Executor: same host-key checks, a new TCP connection that must pass
   the new rules) and disarms the timer over that connection. If the new connection fails,
   the timer stays armed and the host reverts itself.
"""
from __future__ import annotations

import secrets as _random
import time

from ..commands.firewall_revert import (
    REVERT_SCRIPT,
    REVERT_SOURCE,
    REVERT_TIMER,
    apply_script,
    disarm_script,
    revert_now_argv,
)
from ..errors import (BadInput, CommandTimeoutError, ConnectionDropped, DeployError,
                      UnreachableError, first_line)
from ..executor import Executor, HostConnection, tail
from ..firewall import ssh_sources
from ..inventory import Host
from ..remote import put_file
from .firewall_state import HostState

__all__ = [
    "FirewallRefused", "FirewallLockout", "MIN_REVERT_AFTER", "MAX_REVERT_AFTER",
    "check_revert_after", "check_ssh_source", "check_no_revert_pending", "run_armed",
    "confirm_fresh",
]

MIN_REVERT_AFTER = 5
MAX_REVERT_AFTER = 3600


class FirewallRefused(DeployError):
    """apply refused to touch a host (it would lock us out, or a revert is pending)."""


class FirewallLockout(DeployError):
    """The rules were changed but a new SSH connection failed: the host reverts itself."""


def check_revert_after(revert_after: int) -> int:
    if not isinstance(revert_after, int) or not \
            MIN_REVERT_AFTER <= revert_after <= MAX_REVERT_AFTER:
        raise BadInput(f"--revert-after must be {MIN_REVERT_AFTER}..{MAX_REVERT_AFTER} "
                       f"seconds, got {revert_after!r}")
    return revert_after


# --------------------------------------------------------------------------- lockout layer 1


def check_ssh_source(host: Host, state: HostState, admin_cidrs) -> None:
    """Refuse (FirewallRefused) when the plan would not let our own SSH connection in.
    Behind a jump host the plan allows SSH from the jump host's private address only, so
    that is what our connection must be seen coming from."""
    jump = getattr(host, "jump", None)
    allowed = ssh_sources(host, admin_cidrs)
    cidrs = ", ".join(str(n) for n in allowed)
    what = (f"jump host {jump.name}'s private_address ({jump.private_address})"
            if jump is not None
            else f"admin_cidrs ({cidrs})")
    nothing = f"Nothing was changed on {host.name}."
    if state.ssh_client is None:
        raise FirewallRefused(
            f"{host.name}: refusing to change the firewall: cannot tell which address the "
            f"host sees for our SSH connection ($SSH_CONNECTION is not set in the login "
            f"session), so it cannot check that {what} keep it open. "
            f"{nothing}", host=host.name)
    address, port = state.ssh_client
    if not any(address.version == n.version and address in n for n in allowed):
        fix = (f"  Set private_address of jump host {jump.name} to {address} (the address "
               f"{host.name} sees it connect from)." if jump is not None else
               f"  Add the network of {address} to admin_cidrs in the inventory, or run from "
               f"an admin network.")
        raise FirewallRefused(
            f"{host.name}: refusing to change the firewall: the host sees our SSH connection "
            f"coming from {address}, which is not inside {what}; the plan "
            f"allows SSH only from there, so applying it would lock this machine out.\n"
            f"{fix} {nothing}", host=host.name)
    if port != host.ssh_port:
        raise FirewallRefused(
            f"{host.name}: refusing to change the firewall: our SSH connection arrives on "
            f"port {port} on the host, but the inventory's ssh_port for {host.name} is "
            f"{host.ssh_port} (a port forward?); the plan allows SSH only on "
            f"{host.ssh_port}, so applying it would lock this machine out.\n"
            f"  Make ssh_port the port sshd listens on, as the host sees it. {nothing}",
            host=host.name)


def check_no_revert_pending(host: Host, state: HostState) -> None:
    """Refuse (FirewallRefused) while a revert armed earlier is still pending."""
    if state.revert_pending:
        raise FirewallRefused(
            f"{host.name}: a firewall revert is pending ({REVERT_TIMER}, armed by an "
            f"apply whose new-connection check failed or was interrupted). Wait for it to "
            f"restore the previous rules (`systemctl list-timers {REVERT_TIMER}` on the "
            f"host), fix the cause and re-run; to keep the current rules instead, run "
            f"`systemctl stop {REVERT_TIMER}` there. Nothing was changed.",
            host=host.name)


# --------------------------------------------------------------------------- lockout layer 2


def run_armed(c: HostConnection, commands: list[list[str]], revert_after: int
              ) -> tuple[str, float]:
    """Save ufw's files, arm the revert timer and run ``commands`` in one script; returns
    (the revert token, when the timer was armed). A failure before the timer was armed
    changed nothing (DeployError saying so); a failing ufw command puts the previous
    firewall back at once (DeployError); a lost connection leaves it to the timer
    (FirewallLockout)."""
    host = c.host
    put_file(c, REVERT_SCRIPT, REVERT_SOURCE.read_bytes(), mode=0o755)
    token = _random.token_hex(8)
    script = apply_script(commands, token=token, revert_after=revert_after)
    armed_at = time.time()
    try:
        res = c.run_script(script, sudo=True, check=False,
                           label="firewall: save, arm revert, apply ufw rules")
        if res.ok:
            return token, armed_at
        armed = "@armed" in res.stdout.splitlines()
        text = c.mask(res.stderr or res.stdout)
    except UnreachableError as exc:
        raise FirewallLockout(
            f"{host.name}: lost the SSH connection while changing the firewall "
            f"({first_line(exc)}). If the revert timer was armed, {host.name} "
            f"restores its previous firewall by itself within {revert_after} s. Check the "
            f"host, then re-run.", host=host.name) from None
    except CommandTimeoutError as exc:
        armed, text = True, exc.stderr_tail  # no exit status: how far it got is unknown
    said = "\n".join(f"    {line}" for line in tail(text, 6).splitlines())
    if not armed:
        # The script stops before its first ufw command until the timer is armed.
        raise DeployError(
            f"{host.name}: changing the firewall failed before any ufw command ran (while "
            f"saving ufw's files or arming the revert timer {REVERT_TIMER}); nothing was "
            f"changed. It said:\n{said}\n  Fix the cause on {host.name} and re-run.",
            host=host.name)
    # The change failed half-way: put the previous firewall back now.
    try:
        c.run(revert_now_argv(token), sudo=True)
        restored = "the previous firewall was restored"
    except DeployError:
        restored = (f"restoring the previous firewall failed too; the revert timer "
                    f"({REVERT_TIMER}) restores it within {revert_after} s")
    raise DeployError(
        f"{host.name}: changing the firewall failed; {restored}. ufw said:\n{said}\n"
        f"  Fix the cause on {host.name} (`sudo ufw show added`) and re-run.",
        host=host.name)


def _disarm(fresh: Executor, host: Host, token: str, *, again: bool = True):
    """The disarm script over a brand-new connection. When that connection got in and was
    then lost (`ConnectionDropped`), once more over another new one: the host let us in, so
    that is no lockout, and the script is idempotent. A refused or timed-out connect fails at
    once."""
    conn = fresh.conn(host)
    try:
        return conn.run_script(disarm_script(token), sudo=True, label="disarm firewall revert")
    except ConnectionDropped:
        if not again:
            raise
    finally:
        conn.close()
    return _disarm(fresh, host, token, again=False)


def confirm_fresh(fresh: Executor, host: Host, token: str, revert_after: int,
                  armed_at: float) -> None:
    """Disarm the revert timer over a brand-new SSH connection, or leave it armed."""
    by = time.strftime("%H:%M:%S", time.localtime(armed_at + revert_after))
    try:
        res = _disarm(fresh, host, token)
    except DeployError as exc:  # unreachable, host key, sudo, the script itself
        first = first_line(exc)
        raise FirewallLockout(
            f"{host.name}: after the firewall change a NEW SSH connection to "
            f"{host.ssh_user}@{host.address}:{host.ssh_port} failed ({first}).\n"
            f"  New connections may be locked out. The revert timer "
            f"({REVERT_TIMER}) stays armed: {host.name} restores its previous firewall by "
            f"itself {revert_after} s after the change (by about {by}).\n"
            f"  Check admin_cidrs and the host's SSH port, then re-run `fab firewall.apply`.",
            host=host.name) from None
    if "@fired" in res.stdout:
        raise FirewallLockout(
            f"{host.name}: the revert timer fired before the new SSH connection confirmed the "
            f"change ({revert_after} s was not enough): {host.name} restored its previous "
            f"firewall. Re-run with a larger --revert-after.", host=host.name)
    if "@disarmed" not in res.stdout:
        raise DeployError(f"{host.name}: unexpected answer while disarming the revert timer; "
                          f"check `systemctl status {REVERT_TIMER}` on the host",
                          host=host.name)
