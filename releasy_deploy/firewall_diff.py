"""The firewall plan against what ufw has (pure): the difference on one host (`HostDiff`)
and the ufw commands that close it, in a lockout-safe order.

`apply` converges to exactly the plan: it adds what is missing, removes stale rules that
carry our comment (`commands.ufw.MANAGED_TAG`), and leaves rules someone added by hand in
place, reporting them as "unexpected" (removed only with ``--prune-unmanaged``). `plan`
and `status` mark them the same way; `audit` flags the ports they open.

IPv6: ufw filters IPv6 only with ``IPV6=yes`` in /etc/default/ufw; the plan wants it on
(`diff_host` turns it on), so a host's IPv6 addresses get the same default policies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .commands.ufw import (
    ENABLE_ARGV,
    IPV6_ON_ARGV,
    RELOAD_ARGV,
    LiveRule,
    Rule,
    add_argv,
    default_argv,
    delete_argv,
)
from .commands.ufw_state import UfwDefaults
from .firewall import host_plan
from .inventory import Host, Inventory

__all__ = [
    "WANTED_DEFAULTS", "RESTRICTED_DEFAULTS", "HostDiff", "additions_only", "wanted_defaults",
    "diff_host", "ufw_commands", "summary_diff",
]

# What `ufw default` takes, by the policy names /etc/default/ufw stores.
WANTED_DEFAULTS = (("incoming", "deny"), ("outgoing", "allow"))
RESTRICTED_DEFAULTS = (("incoming", "deny"), ("outgoing", "deny"))


@dataclass(frozen=True)
class HostDiff:
    """What `apply` does on one host to reach its plan."""

    host: str
    planned: tuple[Rule, ...]
    add: tuple[Rule, ...] = ()  # planned, not there
    recomment: tuple[Rule, ...] = ()  # there, but not with our comment: re-added with it
    satisfied: tuple[Rule, ...] = ()
    remove: tuple[LiveRule, ...] = ()  # stale managed rules (+ unmanaged ones when pruning)
    unexpected: tuple[LiveRule, ...] = ()  # unmanaged, not planned, kept
    defaults: tuple[tuple[str, str | None, str], ...] = ()  # (direction, now, wanted)
    enable: bool = False
    ipv6: bool = False  # IPV6=no in /etc/default/ufw: turn IPv6 filtering on
    reload: bool = False  # ufw is active and must reload to load its IPv6 chains
    opening_only: bool = False  # `additions_only`: the rest is left for a full apply

    @property
    def changes(self) -> bool:
        return bool(self.add or self.recomment or self.remove or self.defaults or self.enable
                    or self.ipv6)


def additions_only(diff: HostDiff) -> HostDiff:
    """The part of ``diff`` that only opens: the planned rules a running ufw lacks. Nothing
    when ufw is not on yet (it filters nothing) or must turn IPv6 filtering on first.
    Removals, comments, default policies and enabling are left out. Pure."""
    add = () if diff.enable or diff.ipv6 else diff.add
    return HostDiff(diff.host, diff.planned, add=add, opening_only=True)


def wanted_defaults(restrict: bool) -> tuple[tuple[str, str], ...]:
    """The default policies: deny incoming; outgoing deny only with egress.restrict."""
    return RESTRICTED_DEFAULTS if restrict else WANTED_DEFAULTS


def diff_host(host: str, planned: Sequence[Rule], live: Sequence[LiveRule], *, active: bool,
              defaults: UfwDefaults | None, prune_unmanaged: bool = False,
              policies: Sequence[tuple[str, str]] = WANTED_DEFAULTS) -> HostDiff:
    """Compare the plan with the live rules (``ufw show added``) and ufw's state.

    ``policies``: the default policies (`wanted_defaults`). IPv6 filtering off (IPV6=no)
    is a change too: ufw then kept only the IPv4 half of every rule, so turning it on
    re-adds every planned rule (ufw adds the missing IPv6 half, skips the rest)."""
    wanted = {r.key: r for r in planned}
    seen: dict[tuple, LiveRule] = {}
    remove: list[LiveRule] = []
    unexpected: list[LiveRule] = []
    for rule in live:
        key = rule.key
        if key is not None and key in wanted and key not in seen:
            seen[key] = rule
        elif rule.managed or prune_unmanaged:
            remove.append(rule)
        else:
            unexpected.append(rule)
    add, recomment, satisfied = [], [], []
    for rule in planned:
        have = seen.get(rule.key)
        if have is None:
            add.append(rule)
        elif have.comment != rule.comment:
            recomment.append(rule)
        else:
            satisfied.append(rule)
    policy_changes = []
    for direction, want in policies:
        now = getattr(defaults, direction) if defaults is not None else None
        if now != want:
            policy_changes.append((direction, now, want))
    ipv6_off = defaults is not None and not defaults.ipv6
    if ipv6_off:
        add, recomment, satisfied = list(planned), [], []
    return HostDiff(host, tuple(planned), tuple(add), tuple(recomment), tuple(satisfied),
                    tuple(remove), tuple(unexpected), tuple(policy_changes), not active,
                    ipv6_off, ipv6_off and active)

def ufw_commands(diff: HostDiff) -> list[list[str]]:
    """The ufw commands that turn the live state into the plan, in a lockout-safe order:
    IPv6 filtering on (and loaded), allow rules, deletions, default policies, enabling
    last."""
    cmds = [list(IPV6_ON_ARGV)] if diff.ipv6 else []
    if diff.reload:
        # A running ufw without its IPv6 chains cannot add IPv6 rules: load them first.
        cmds.append(list(RELOAD_ARGV))
    cmds += [add_argv(r) for r in (*diff.add, *diff.recomment)]
    cmds += [delete_argv(r) for r in diff.remove]
    cmds += [default_argv(direction, want) for direction, _, want in diff.defaults]
    if diff.enable:
        cmds.append(list(ENABLE_ARGV))
    return cmds


def summary_diff(inv: Inventory, host: Host, live: Sequence[LiveRule], *, active: bool,
                 defaults: UfwDefaults | None) -> HostDiff:
    """The diff `fab status` shows without probing DNS: ingress against the plan; with
    egress.restrict, our own outgoing rules count as planned (their addresses depend on
    the host's resolvers, which `firewall.status` reads)."""
    planned = host_plan(inv, host)
    if inv.egress.restrict:
        keys = {r.key for r in planned}
        for rule in live:
            if rule.managed and rule.direction == "out" and rule.key is not None \
                    and rule.key not in keys and rule.comment is not None:
                _, port, proto, _, dest = rule.key
                planned.append(Rule(port, proto, None, rule.comment.split(": ", 1)[-1],
                                    "out", dest))
    return diff_host(host.name, planned, live, active=active, defaults=defaults,
                     policies=wanted_defaults(inv.egress.restrict))
