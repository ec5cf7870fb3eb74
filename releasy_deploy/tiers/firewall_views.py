"""What the firewall tasks say about a host: the changed / would / ok lines of a diff
(`report_diff`, shared with `apply`), and the read-only tasks `plan` (per host, the rules
apply would add and remove; with egress.restrict, the outgoing rules with their reasons)
and `status` (the live rules, each marked planned / unexpected / missing).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..commands.firewall_revert import OLD_STATE_DIR, REVERT_TIMER
from ..commands.ufw import Rule
from ..executor import HostConnection
from ..firewall_diff import HostDiff, diff_host, wanted_defaults
from ..firewall_egress import names_to_resolve
from ..inventory import Inventory
from ..packages import FIREWALL_PACKAGES
from ..session import Session
from .firewall_guard import FirewallRefused, check_ssh_source
from .firewall_state import HostState, host_rules, read_state

__all__ = ["policy_text", "report_diff", "HostPlan", "plan", "status"]


def policy_text(state: HostState) -> str:
    if not state.installed:
        return "ufw not installed"
    d = state.defaults
    incoming = d.incoming if d else "?"
    outgoing = d.outgoing if d else "?"
    active = "active" if state.active else "inactive"
    return f"ufw {active}, default {incoming} incoming / {outgoing} outgoing"


def report_diff(c: HostConnection, diff: HostDiff, state: HostState, *,
                 done: bool, prune_unmanaged: bool) -> None:
    """changed/would lines for each change, ok lines for what already matches."""
    r = c.reporter

    def change(done_text: str, would_text: str) -> None:
        if done:
            r.changed(c.name, done_text)
        else:
            r.would(c.name, would_text)

    for rule in diff.satisfied:
        r.unchanged(c.name, f"firewall rule {rule}")
    if diff.ipv6:
        change("ufw IPv6 filtering turned on (IPV6=yes in /etc/default/ufw), every rule "
               "re-added for IPv6", "turn on ufw IPv6 filtering (IPV6=yes) and re-add every rule")
    for rule in diff.add:
        change(f"firewall rule added: {rule}", f"add firewall rule: {rule}")
    for rule in diff.recomment:
        change(f"firewall rule comment set: {rule}", f"set firewall rule comment: {rule}")
    for rule in diff.remove:
        why = "ours, no longer planned" if rule.managed else "not ours, --prune-unmanaged"
        change(f"firewall rule removed ({why}): {rule}",
               f"remove firewall rule ({why}): {rule}")
    for direction, now, want in diff.defaults:
        text = f"ufw default {direction}: {now or 'unknown'} -> {want}"
        change(text, f"set {text}")
    if diff.enable:
        change("ufw enabled", "enable ufw")
    if not diff.defaults and not diff.enable and not diff.ipv6 and not diff.opening_only:
        r.unchanged(c.name, policy_text(state))
    for rule in diff.unexpected:
        hint = "" if prune_unmanaged else " (--prune-unmanaged removes it)"
        r.info(c.name, f"unexpected firewall rule, not ours, kept{hint}: {rule}")


# --------------------------------------------------------------------------- plan / status


@dataclass(frozen=True)
class HostPlan:
    state: HostState
    diff: HostDiff
    refused: str | None  # why apply would refuse this host
    rules: tuple[Rule, ...] = ()


def _host_plan(c: HostConnection, inv: Inventory) -> HostPlan:
    state = read_state(c, names_to_resolve(inv, c.host))
    rules = host_rules(inv, c.host, state)
    refused = None
    try:
        check_ssh_source(c.host, state, inv.admin_cidrs)
    except FirewallRefused as exc:
        refused = str(exc)
    diff = diff_host(c.name, rules, state.rules, active=state.active,
                     defaults=state.defaults,
                     policies=wanted_defaults(inv.egress.restrict))
    return HostPlan(state, diff, refused, tuple(rules))


def plan(session: Session) -> dict[str, HostPlan]:
    """Per host, the rules apply would add and remove against the live ufw state; with
    egress.restrict, the outgoing rules with their reasons."""
    inv = session.inventory

    def one(c: HostConnection) -> HostPlan:
        hp = _host_plan(c, inv)
        if not hp.state.installed:
            c.reporter.would(c.name, f"install {' '.join(FIREWALL_PACKAGES)}")
        if hp.state.old_state == "root":
            c.reporter.would(c.name, f"remove the earlier version's firewall state "
                                     f"{OLD_STATE_DIR}")
        if inv.egress.restrict:
            c.reporter.info(c.name, "egress: default deny outgoing; allowed:")
            for rule in hp.rules:
                if rule.direction == "out":
                    c.reporter.info(c.name, f"  {rule.describe()}   ({rule.reason})")
        else:
            c.reporter.info(c.name, "egress: not restricted (allow outgoing)")
        report_diff(c, hp.diff, hp.state, done=False, prune_unmanaged=False)
        if hp.refused:
            c.reporter.info(c.name, "WARNING: apply would refuse this host:\n" + hp.refused)
        if hp.state.revert_pending:
            c.reporter.info(c.name, f"WARNING: a firewall revert is pending ({REVERT_TIMER})")
        return hp

    return session.executor.each(inv.hosts, one)


def status(session: Session) -> dict[str, HostPlan]:
    """The live rules per host, each marked planned / unexpected / missing."""
    inv = session.inventory

    def one(c: HostConnection) -> HostPlan:
        hp = _host_plan(c, inv)
        st, diff, say = hp.state, hp.diff, c.reporter.info
        line = policy_text(st)
        if st.status is not None and st.status.active:
            d = st.status.defaults
            line += f", routed {d.get('routed', '?')}, logging {st.status.logging or '?'}"
        say(c.name, line)
        satisfied = {r.key for r in diff.satisfied}
        recomment = {r.key: r for r in diff.recomment}
        for live in st.rules:
            if live.key in satisfied:
                satisfied.discard(live.key)
                say(c.name, f"  planned     {live}")
            elif live.key in recomment:
                planned_rule = recomment.pop(live.key)
                say(c.name, f"  planned     {live}   (apply sets comment "
                            f"{planned_rule.comment!r})")
            elif live.managed:
                say(c.name, f"  unexpected  {live}   (ours, not planned: apply removes it)")
            else:
                say(c.name, f"  unexpected  {live}   (not ours: apply keeps it; "
                            f"--prune-unmanaged removes it)")
        for rule in diff.add:
            say(c.name, f"  missing     {rule}")
        for direction, now, want in diff.defaults:
            say(c.name, f"  policy      default {direction} is {now or 'unknown'}, "
                        f"planned {want}")
        if diff.ipv6:
            say(c.name, "  policy      IPv6 filtering is off (IPV6=no), planned on")
        if st.revert_pending:
            say(c.name, f"WARNING: a firewall revert is pending ({REVERT_TIMER})")
        return hp

    return session.executor.each(inv.hosts, one)
