"""`firewall.audit`: what really gets through, against the plan.

`audit` checks reachability against the plan from a vantage point: a network namespace
(``--netns``; the lab's "outside") or, without it, "from here" (the machine running the
task), on each host's SSH address and on its global IPv6 addresses. The vantage address
each host sees is the namespace's source address, or, from here, the address the host sees
for our SSH connection (right behind NAT too). Given ``--listener ADDR:PORT`` it also
connects from every host to that listener and checks the egress plan: reached where the
plan allows it, dropped (a timeout, not a refusal) where it does not. The applied outgoing
policy and rules are compared with the plan too (what probes from outside cannot see).
"""
from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess

from ..commands.netprobe import PROBE_TIMEOUT, listener_probe_script, probe_argv
from ..commands.ufw import Address, LiveRule, Rule
from ..errors import BadInput, DeployError
from ..firewall import audit_ports, reachable_by_plan
from ..firewall_diff import diff_host, wanted_defaults
from ..firewall_egress import egress_allowed, names_to_resolve
from ..inventory import Host
from ..session import Session
from .firewall_state import HostState, host_rules, read_state

__all__ = ["audit", "probe_reachability", "parse_listener"]

_NETNS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def probe_reachability(targets: list[tuple[str, int]], netns: str | None = None, *,
                       timeout: float = PROBE_TIMEOUT) -> tuple[dict[str, str | None],
                                                                 dict[tuple[str, int], str]]:
    """-> (address -> our source address toward it, (address, port) -> state)."""
    if netns is not None and not _NETNS_RE.fullmatch(netns):
        raise BadInput(f"--netns {netns!r} is not a network namespace name")
    request = {"targets": [list(t) for t in targets], "timeout": timeout}
    try:
        proc = subprocess.run(probe_argv(request, netns), capture_output=True, text=True,
                              timeout=timeout * 4 + 30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeployError(f"audit: the reachability probe failed to run: {exc}") from None
    if proc.returncode != 0:
        where = f"in network namespace {netns}" if netns else "here"
        hint = (" (does the namespace exist? `ip netns list`; it needs root)"
                if netns else "")
        raise DeployError(f"audit: the reachability probe failed {where}{hint}: "
                          f"{proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout)
    results = {(a, int(p)): st for a, p, st in data["results"]}
    return data["sources"], results


def _resolve(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        raise DeployError(f"audit: cannot resolve {address}: {exc}") from None


def _explain(state: HostState, port: int, vantage: Address, planned_keys: set) -> str:
    """Which live rules not in the plan may open ``port`` (for the audit's messages)."""
    if not state.active:
        return "ufw is not active" if state.installed else "ufw is not installed"

    def may_open(rule: LiveRule) -> bool:
        if not rule.parsed:
            return True
        if rule.key in planned_keys or rule.direction != "in" or rule.action == "deny":
            return False
        if rule.source is not None and not (rule.source.version == vantage.version
                                            and vantage in rule.source):
            return False
        return (port in rule.tcp_ports() or rule.app is not None
                or (rule.port is None and rule.proto in (None, "tcp")))

    suspects = [rule for rule in state.rules if may_open(rule)]
    if not suspects:
        return "no ufw rule outside the plan explains it (something bypassing ufw?)"
    return "live rule(s) not in the plan: " + "; ".join(str(x) for x in suspects)


def parse_listener(value: str) -> tuple[Address, int]:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` -> (address, port); BadInput otherwise."""
    addr, sep, port = value.rpartition(":")
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise BadInput(f"--listener {value!r}: expected ADDRESS:PORT (an IP literal, "
                       f"[v6]:PORT for IPv6)") from None
    return ip, int(port)


def _audit_egress(session: Session, states: dict[str, HostState],
                  listener: tuple[Address, int]) -> bool:
    """From every host, connect to the listener; compare with the egress plan."""
    inv = session.inventory
    address, port = listener
    argv = listener_probe_script(str(address), port)
    seen = session.executor.each(
        inv.hosts, lambda c: c.run(argv, check=False, mutates=False).stdout.strip())
    ok = True
    for host in inv.hosts:
        rules = host_rules(inv, host, states[host.name])
        expected = egress_allowed(rules, address, port, restrict=inv.egress.restrict)
        got = seen[host.name]
        where = f"{address}:{port}/tcp"
        if got.startswith("error"):
            ok = False
            session.reporter.error(host.name, f"egress probe to {where}: {got}")
        elif expected and got != "open":
            ok = False
            session.reporter.error(host.name, f"egress to {where} is {got} but the plan "
                                              f"allows it (is the listener up?)")
        elif not expected and got != "filtered":
            ok = False
            session.reporter.error(host.name, f"egress to {where} is {got} (the connection "
                                              f"left the host) but the plan denies it")
        else:
            session.reporter.info(host.name, f"egress to {where}: {got}, as planned")
    return ok


def _audit_applied_egress(session: Session, host: Host, st: HostState,
                          planned: list[Rule]) -> bool:
    """The applied outgoing policy and rules against the plan (what probes from outside
    cannot see)."""
    inv, r = session.inventory, session.reporter
    diff = diff_host(host.name, planned, st.rules, active=st.active, defaults=st.defaults,
                     policies=wanted_defaults(inv.egress.restrict))
    problems = [f"outgoing rule missing: {rule}" for rule in (*diff.add, *diff.recomment)
                if rule.direction == "out"]
    problems += [f"outgoing rule not in the plan: {rule}" for rule in diff.remove
                 if rule.direction == "out"]
    problems += [f"default outgoing is {now or 'unknown'}, the plan says {want}"
                 for direction, now, want in diff.defaults if direction == "outgoing"]
    for text in problems:
        r.error(host.name, f"egress: {text} (run `fab firewall.apply`)")
    if not problems:
        out = sum(1 for rule in diff.satisfied if rule.direction == "out")
        r.info(host.name, "egress as planned: " + (f"default deny outgoing, {out} allow rule(s)"
                                                    if inv.egress.restrict
                                                    else "not restricted"))
    return not problems


def audit(session: Session, netns: str | None, listener: str | None = None) -> bool:
    """Check reachability of every relevant port of every host (its SSH address and its
    global IPv6 addresses) against the plan from the vantage point (``netns``, or here);
    with ``listener`` (ADDR:PORT), also egress from every host to it. Report every
    difference; True when none."""
    inv = session.inventory
    target = parse_listener(listener) if listener else None
    states = session.executor.each(
        inv.hosts, lambda c: read_state(c, names_to_resolve(inv, c.host)))
    rules = {h.name: host_rules(inv, h, states[h.name]) for h in inv.hosts}
    ingress = {name: [r for r in rs if r.direction == "in"] for name, rs in rules.items()}
    targets: list[tuple[str, int]] = []
    addresses: dict[str, list[str]] = {}
    for host in inv.hosts:
        st = states[host.name]
        addresses[host.name] = list(dict.fromkeys(
            [_resolve(host.address), *(str(a) for a in st.ipv6)]))
        for port in audit_ports(ingress, st.rules, st.listeners):
            targets += [(a, port) for a in addresses[host.name]]
    targets = list(dict.fromkeys(targets))
    sources, results = probe_reachability(targets, netns)
    where = f"netns {netns}" if netns else "here"
    r = session.reporter
    ok = True
    for host in inv.hosts:
        st = states[host.name]
        planned_keys = {rule.key for rule in ingress[host.name]}
        for i, addr in enumerate(addresses[host.name]):
            if i == 0 and netns is None and st.ssh_client is not None:
                vantage = st.ssh_client[0]  # what the host really sees, NAT included
            else:
                src = sources.get(addr)
                if src is None:
                    r.error(host.name, f"no route from {where} to {addr}: cannot audit")
                    ok = False
                    continue
                vantage = ipaddress.ip_address(src.split("%", 1)[0])
            reachable, filtered = [], []
            for (a, port), observed in results.items():
                if a != addr:
                    continue
                expected = reachable_by_plan(ingress[host.name], port, vantage)
                got = observed in ("open", "closed")
                (reachable if got else filtered).append(str(port))
                if observed.startswith("error"):
                    r.error(host.name, f"{addr} port {port}/tcp: probe error from {vantage}: "
                                       f"{observed}")
                    ok = False
                elif got and not expected:
                    ok = False
                    r.error(host.name, f"port {port}/tcp is {observed} on {addr} from "
                                       f"{vantage} ({where}) but the plan keeps it filtered: "
                                       f"{_explain(st, port, vantage, planned_keys)}")
                elif expected and not got:
                    ok = False
                    r.error(host.name, f"port {port}/tcp is filtered on {addr} from {vantage} "
                                       f"({where}) but the plan allows it (run `fab "
                                       f"firewall.status`)")
            r.info(host.name, f"audit of {addr} from {vantage} ({where}): reachable "
                              f"{', '.join(reachable) or 'none'}; filtered "
                              f"{', '.join(filtered) or 'none'}")
        if st.installed:
            ok = _audit_applied_egress(session, host, st, rules[host.name]) and ok
        if not st.active:
            r.info(host.name, "ufw is not active" if st.installed else "ufw is not installed")
        elif st.defaults is not None and not st.defaults.ipv6:
            ok = False
            r.error(host.name, "ufw's IPv6 support is off (IPV6=no in /etc/default/ufw): the "
                               "plan is not applied to IPv6 (ufw 0.36 then drops all IPv6 "
                               "but loopback); run `fab firewall.apply`")
    if target is not None:
        ok = _audit_egress(session, states, target) and ok
    return ok
