"""The firewall plan, ingress (pure): which incoming ufw rules each host should have, and
what that plan lets in. Egress is `releasy_deploy.firewall_egress`, the comparison with
what ufw has `releasy_deploy.firewall_diff`, ufw's own words `releasy_deploy.commands.ufw`;
`releasy_deploy.tiers.firewall` acts on hosts.

Rules are derived from the topology, never written per host:

- every host: default deny incoming; SSH (the host's ``ssh_port``) only from the
  inventory's ``admin_cidrs``;
- proxy hosts: 80 and 443 from anywhere;
- app hosts: ``app.bind_port`` only from the proxy hosts' private addresses (in the split
  topology the proxy reaches app hosts on the bind port only; blue/green is single-host
  only, where instances bind 127.0.0.1 and need no rule);
- the db host: 5432 only from the app hosts' private addresses (PostgreSQL only).

Traffic between tiers on the same host goes over loopback, which ufw always accepts, so a
host never gets a rule for its own private address: a single host ends up with SSH (admin)
plus 80/443 and nothing else. Rules for an IPv4 network are IPv4-only; "anywhere" rules
cover both families.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

from .commands.ufw import Address, LiveRule, Network, Rule
from .inventory import POSTGRES_PORT, Host, Inventory

__all__ = [
    "HTTP_PORTS", "host_network", "ssh_sources", "ssh_rules", "plan_rules", "host_plan",
    "reachable_by_plan", "audit_ports",
]

HTTP_PORTS = (80, 443)


def host_network(address: str, host: str, what: str) -> Network:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(
            f"{host}: private_address {address!r} is not an IP literal; firewall rules for "
            f"{what} need one (set hosts.{host}.private_address in the inventory)") from None
    return ipaddress.ip_network(ip)


def ssh_sources(host: Host, admin_cidrs: Iterable[Network]) -> tuple[Network, ...]:
    """Where SSH to ``host`` may come from: ``admin_cidrs``, or for a host behind a jump host
    only the jump host's private address (our SSH arrives from there, and nothing else may)."""
    jump = getattr(host, "jump", None)
    if jump is None:
        return tuple(admin_cidrs)
    return (host_network(jump.private_address, jump.name, "SSH through it"),)


def ssh_rules(host: Host, admin_cidrs: Iterable[Network]) -> list[Rule]:
    jump = getattr(host, "jump", None)
    why = f"ssh from jump host {jump.name}" if jump is not None else "ssh from admin network"
    return [Rule(host.ssh_port, "tcp", cidr, why) for cidr in ssh_sources(host, admin_cidrs)]


def plan_rules(inv: Inventory) -> dict[str, list[Rule]]:
    """Host name -> the rules that host should have, in a stable order (inventory order)."""
    return {host.name: host_plan(inv, host) for host in inv.hosts}


def host_plan(inv: Inventory, host: Host) -> list[Rule]:
    """The rules ``host`` should have (its entry of `plan_rules`), without planning the
    other hosts: a per-host caller over a fleet stays linear in its size."""
    rules = ssh_rules(host, inv.admin_cidrs)
    if host.has("proxy"):
        rules += [Rule(80, "tcp", None, "http"), Rule(443, "tcp", None, "https")]
    if host.has("app"):
        for proxy in inv.hosts_in("proxy"):
            if proxy.name != host.name:  # same host: loopback, always accepted
                source = host_network(proxy.private_address, proxy.name, "the app tier")
                rules.append(Rule(inv.app.bind_port, "tcp", source, f"app from {proxy.name}"))
    if host.has("db") and inv.database.kind == "postgres":
        for app in inv.hosts_in("app"):
            if app.name != host.name:
                source = host_network(app.private_address, app.name, "the db tier")
                rules.append(Rule(POSTGRES_PORT, "tcp", source, f"postgres from {app.name}"))
    unique: dict[tuple, Rule] = {}
    for rule in rules:
        unique.setdefault(rule.key, rule)  # overlapping inputs: first reason wins
    return list(unique.values())


# --------------------------------------------------------------------------- what it lets in


def reachable_by_plan(rules: Iterable[Rule], port: int, vantage: Address) -> bool:
    """Whether the plan lets ``vantage`` reach TCP ``port`` of the host with these rules."""
    for rule in rules:
        if rule.port != port or rule.proto != "tcp":
            continue
        if rule.source is None or (rule.source.version == vantage.version
                                   and vantage in rule.source):
            return True
    return False


def audit_ports(plan: dict[str, list[Rule]], live: Sequence[LiveRule],
                listeners: Sequence[tuple[str, int]]) -> list[int]:
    """The TCP ports to check on one host: every port in any host's plan, every port in
    the host's live rules, and every port the host listens on."""
    ports = {r.port for rules in plan.values() for r in rules if r.proto == "tcp"}
    for rule in live:
        ports.update(rule.tcp_ports())
    ports.update(port for _, port in listeners)
    return sorted(p for p in ports if 0 < p < 65536)
