"""`firewall.apply`: every host's ufw converged to its plan (`releasy_deploy.firewall`, and
`releasy_deploy.firewall_egress` with ``egress.restrict``), hosts in parallel, each change
lockout-protected (`firewall_guard`); and `open_ahead`, the opening part `fab site` runs
before its app tier.

A host is read in ONE round trip (`firewall_state.read_state`). A host that already matches
the plan costs exactly that round trip and runs no ufw command that changes anything. A
host that differs gets one script (save, arm the revert timer, the ufw commands), then a
brand-new SSH connection confirms the change and disarms the timer, and a second read
checks that ufw reached the plan. Along the way `apply` keeps apt's proxy drop-in in step
with ``egress.apt_proxy`` and removes the earlier version's state directory
(`commands.firewall_revert`). The plan and status views are `firewall_views`, the audit
`firewall_audit`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..commands import apt_proxy
from ..commands.firewall_revert import OLD_STATE_DIR, STATE_DIR, remove_old_state_argv
from ..commands.ufw import Rule
from ..errors import BadInput, DeployError
from ..executor import Executor, HostConnection
from ..facts import Fact
from ..firewall_diff import (
    WANTED_DEFAULTS,
    HostDiff,
    additions_only,
    diff_host,
    ufw_commands,
    wanted_defaults,
)
from ..firewall_egress import names_to_resolve
from ..inventory import Host, Inventory
from ..packages import FIREWALL_PACKAGES
from ..remote import Change, ensure_packages, put_file, report
from ..session import Session
from .firewall_guard import (
    check_no_revert_pending,
    check_revert_after,
    check_ssh_source,
    confirm_fresh,
    run_armed,
)
from .firewall_state import HostState, UfwConf, host_rules, read_state
from .firewall_views import report_diff

__all__ = ["apply", "open_ahead", "converge", "split_by_seen"]

RulesFor = Callable[[HostState], list[Rule]]


def converge(c: HostConnection, rules: list[Rule] | RulesFor, *, admin_cidrs,
             fresh: Executor | None, revert_after: int = 60, prune_unmanaged: bool = False,
             policies=WANTED_DEFAULTS, resolve: tuple[str, ...] = (),
             add_only: bool = False) -> HostDiff:
    """Make one host's ufw exactly ``rules`` (lockout-protected); returns what differed.

    ``rules``: the list, or a function of the host's probed state (egress depends on it).
    ``policies``: the default policies (`wanted_defaults`); ``resolve``: names the rules
    function needs resolved on the host. ``fresh`` opens the brand-new connection that
    confirms the change (None only in dry-run). ``add_only``: only the planned rules a
    running ufw lacks (`additions_only`; `open_ahead`), nothing reported otherwise. The
    building block of `apply`.
    """
    host = c.host
    state = read_state(c, resolve, reuse=True)
    if add_only:
        diff = additions_only(diff_host(
            host.name, rules(state) if callable(rules) else list(rules), state.rules,
            active=state.active, defaults=state.defaults, policies=policies))
        if not diff.changes or state.revert_pending or c.dry_run:
            return diff  # `apply` at the end reports, or refuses a pending revert
        c.reporter.info(c.name, "firewall on: opening what the tiers need before they run"
                                " (the rest of the firewall comes last)")
        return _change(c, diff, state, fresh=fresh, revert_after=revert_after,
                       prune_unmanaged=prune_unmanaged, resolve=resolve, policies=policies)
    check_ssh_source(host, state, admin_cidrs)
    check_no_revert_pending(host, state)
    planned = rules(state) if callable(rules) else list(rules)
    _migrate_old_state(c, state)
    if not state.installed:
        ensure_packages(c, FIREWALL_PACKAGES)
        if not c.dry_run:
            state = read_state(c, resolve)
    else:
        c.reporter.unchanged(c.name, f"packages {' '.join(FIREWALL_PACKAGES)}")
    diff = diff_host(host.name, planned, state.rules, active=state.active,
                     defaults=state.defaults, prune_unmanaged=prune_unmanaged,
                     policies=policies)
    if not diff.changes or c.dry_run:
        report_diff(c, diff, state, done=False, prune_unmanaged=prune_unmanaged)
        return diff
    return _change(c, diff, state, fresh=fresh, revert_after=revert_after,
                   prune_unmanaged=prune_unmanaged, resolve=resolve, policies=policies)


def _change(c: HostConnection, diff: HostDiff, state: HostState, *, fresh: Executor | None,
            revert_after: int, prune_unmanaged: bool, resolve: tuple[str, ...],
            policies=WANTED_DEFAULTS) -> HostDiff:
    """Apply ``diff`` under the revert timer, confirm it over a brand-new connection, then
    check ufw reached it."""
    host = c.host
    assert fresh is not None, "converge needs a fresh Executor outside dry-run"
    token, armed_at = run_armed(c, ufw_commands(diff), revert_after)
    report_diff(c, diff, state, done=True, prune_unmanaged=prune_unmanaged)
    confirm_fresh(fresh, host, token, revert_after, armed_at)
    c.reporter.info(c.name, "a new SSH connection got through: revert timer disarmed")
    after = read_state(c, resolve)
    left = diff_host(host.name, diff.planned, after.rules, active=after.active,
                     defaults=after.defaults, prune_unmanaged=prune_unmanaged,
                     policies=policies)
    if diff.opening_only:
        left = additions_only(left)
    if left.changes:
        raise DeployError(
            f"{host.name}: ufw did not converge to the plan (still to do: "
            f"{'; '.join(' '.join(a) for a in ufw_commands(left))}); run `sudo ufw show "
            f"added` on {host.name} and report this", host=host.name)
    return diff


def _migrate_old_state(c: HostConnection, state: HostState) -> None:
    """The earlier version's state directory under /var/lib/releasy goes (see
    `commands.firewall_revert`); nothing in it is needed: every change saves afresh."""
    if state.old_state == "root":
        change = Change(True, f"removed the earlier version's firewall state {OLD_STATE_DIR} "
                              f"(now kept in {STATE_DIR})")
        if not c.dry_run:
            c.run(remove_old_state_argv(), sudo=True)
        report(c, change)
    elif state.old_state == "foreign":
        c.reporter.info(c.name, f"{OLD_STATE_DIR} is not ours (not a root-owned directory): "
                                f"left alone, never read")


def _ensure_apt_proxy(c: HostConnection, inv: Inventory, state: HostState) -> None:
    """egress.apt_proxy's apt drop-in present exactly when configured."""
    want = apt_proxy.apt_proxy_conf(inv.egress.apt_proxy)
    have = state.apt_proxy_conf
    if want is None:
        if have is not None:
            if not c.dry_run:
                c.run(apt_proxy.remove_argv(), sudo=True)
            report(c, Change(True, f"file {apt_proxy.APT_PROXY_CONF} removed "
                                   f"(no egress.apt_proxy)"))
    elif have is None or have.encode() != want:
        put_file(c, apt_proxy.APT_PROXY_CONF, want, mode=0o644)


def apply(session: Session, *, revert_after: int = 60, prune_unmanaged: bool = False,
          hosts: Sequence[Host] | None = None) -> None:
    """Converge every host's firewall (those of ``session.limit``; only ``hosts`` when
    given) to the plan, hosts in parallel (dry-run: report only)."""
    check_revert_after(revert_after)
    inv = session.inventory
    if revert_after <= inv.ssh.connect_timeout:
        # Otherwise the host could revert before a failing new connection even times out.
        raise BadInput(f"--revert-after ({revert_after} s) must be longer than "
                       f"ssh.connect_timeout ({inv.ssh.connect_timeout:g} s)")
    # --limit: only those hosts change; every host's rules still derive from the whole
    # inventory (the topology), as without it.
    _converge_all(session, session.targets(inv.hosts) if hosts is None else hosts,
                  revert_after=revert_after, prune_unmanaged=prune_unmanaged)


def split_by_seen(session: Session, seen: Mapping[str, Mapping[Fact, Any]]
                  ) -> tuple[list[Host], list[Host]]:
    """The targets as (firewall on, firewall off) by what `prepare.prefetch_all` read
    (``seen``): off means ufw absent or inactive, nothing enforced yet."""
    on: list[Host] = []
    off: list[Host] = []
    for h in session.targets(session.inventory.hosts):
        ufw = seen[h.name].get(UfwConf())
        (on if ufw is not None and ufw.active else off).append(h)
    return on, off


def open_ahead(session: Session, seen: Mapping[str, Mapping[Fact, Any]]) -> None:
    """`fab site` before its app tier: every host whose firewall was on (``seen``: what
    `prepare.prefetch_all` read) gets the planned allow rules it lacks (a new app host's
    PostgreSQL rule on the db host, a new proxy's rule on the app hosts), so the tiers can
    reach each other before `apply` runs last. Only opening: removals, policies and
    enabling stay with `apply`. No round trip where nothing changed since the prefetch;
    a dry run does nothing."""
    hosts, _ = split_by_seen(session, seen)
    if hosts and not session.dry_run:
        _converge_all(session, hosts, revert_after=60, add_only=True)


def _converge_all(session: Session, hosts: Sequence[Host], *, revert_after: int,
                  prune_unmanaged: bool = False, add_only: bool = False) -> None:
    inv = session.inventory
    wanted = wanted_defaults(inv.egress.restrict)
    fresh = None
    if not session.dry_run:
        # Its own connections: each proves that a brand-new SSH session gets through.
        fresh = Executor(inv, reporter=session.reporter, secrets=session.secrets)

    def one(c: HostConnection) -> HostDiff:
        def rules_for(state: HostState) -> list[Rule]:
            # Called by converge once the host passed the lockout checks; apt's proxy
            # drop-in is kept in step here because it needs the same probed state.
            rules = host_rules(inv, c.host, state)
            if not add_only:
                _ensure_apt_proxy(c, inv, state)
            return rules
        return converge(c, rules_for, admin_cidrs=inv.admin_cidrs, fresh=fresh,
                        revert_after=revert_after, prune_unmanaged=prune_unmanaged,
                        policies=wanted, resolve=tuple(names_to_resolve(inv, c.host)),
                        add_only=add_only)

    try:
        session.executor.each(hosts, one)
    finally:
        if fresh is not None:
            fresh.close()
