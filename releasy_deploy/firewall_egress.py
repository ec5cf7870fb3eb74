"""The firewall plan, egress (pure): which outgoing flows each host may open under
``egress.restrict``, and whether a connection is one of them.

Outgoing traffic: allowed by default. With ``egress.restrict`` the default becomes deny
outgoing (dropped: a blocked connection times out) and `egress_rules` derives the flows
each host needs from the same topology as the ingress plan (`releasy_deploy.firewall`):
the proxy to each app host's bind port, the app tier to the database, the artifact storage
endpoint and the JWKS URL host, every host to its own DNS resolvers, NTP and the apt proxy,
plus the operator's ``egress.allow`` entries. Names are resolved on the host at apply time
(`HostNet`). Replies to incoming connections (our SSH session included) pass ufw's built-in
ESTABLISHED rule, and loopback is always accepted, whatever the policy.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import urlsplit

from .commands.netprobe import ip_literal
from .commands.ufw import Address, Network, Rule
from .firewall import host_network
from .inventory import POSTGRES_PORT, Host, Inventory

__all__ = [
    "DNS_PORT", "NTP_PORT", "EgressError", "HostNet", "url_endpoint", "names_to_resolve",
    "egress_rules", "egress_allowed",
]

DNS_PORT = 53
NTP_PORT = 123


class EgressError(ValueError):
    """An egress flow cannot be planned on a host (a name that does not resolve)."""

    def __init__(self, message: str, host: str):
        super().__init__(message)
        self.host = host


@dataclass(frozen=True)
class HostNet:
    """What the egress plan needs from the host itself, read at apply time: the DNS
    resolvers it uses and what the names it must reach resolve to there."""

    resolvers: tuple[Address, ...] = ()
    resolved: dict[str, tuple[Address, ...]] = field(default_factory=dict)


def url_endpoint(url: str) -> tuple[str, int]:
    """(host, port) a URL connects to; the default port of its scheme."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.hostname or "").lower(), port


def _endpoints(inv: Inventory, host: Host) -> list[tuple[str, str, str, int]]:
    """(pin name, what, host name or IP, port) of the endpoints this host must reach that
    the operator configured by URL."""
    out = []
    if host.has("app"):
        if inv.app.artifact_storage is not None:
            out.append(("artifact_storage", "artifact storage",
                        *url_endpoint(inv.app.artifact_storage.endpoint)))
        if inv.app.operator_jwt is not None:
            out.append(("operator_jwt", "JWKS URL", *url_endpoint(inv.app.operator_jwt.jwks_url)))
    acme = getattr(inv.tls, "acme", None)
    if host.has("proxy") and inv.tls.mode == "acme" and acme is not None:
        name, port = url_endpoint(acme.directory_url)
        # certbot talks to the directory's own port (and the URLs it lists, same host); 80
        # and 443 too: a CA's other URLs (chain, OCSP) are plain http or default https.
        for p in sorted({80, 443, port}):
            out.append(("acme_directory", "ACME directory", name, p))
    egress = inv.egress
    if egress.apt_proxy is not None:
        out.append(("apt_proxy", "apt proxy", *url_endpoint(egress.apt_proxy)))
    return out


def _pinned(inv: Inventory, host: Host, what: str) -> bool:
    return any(a.pin == what and any(host.has(t) for t in a.tiers) for a in inv.egress.allow)


def names_to_resolve(inv: Inventory, host: Host) -> list[str]:
    """DNS names the egress plan of ``host`` needs resolved on the host (none without
    egress.restrict; none for endpoints an egress.allow entry pins)."""
    if not inv.egress.restrict:
        return []
    names = [name for pin, _, name, _ in _endpoints(inv, host)
             if ip_literal(name) is None and not _pinned(inv, host, pin)]
    return list(dict.fromkeys(names))


def _acme_rules(inv: Inventory, host: Host) -> list[Rule]:
    """``tls.mode: acme`` with several proxies: a proxy's port 80 relays an HTTP-01
    challenge it does not have to the other proxies (one hop; the CA may reach any of
    them), so each proxy reaches the others' port 80. The CA itself is an endpoint
    (`_endpoints`: resolved on the host or pinned)."""
    if not host.has("proxy") or inv.tls.mode != "acme":
        return []
    return [Rule(80, "tcp", None, f"proxy -> {peer.name}:80: ACME challenge relay", "out",
                 host_network(peer.private_address, peer.name, "the ACME challenge relay"))
            for peer in inv.hosts_in("proxy") if peer.name != host.name]


def egress_rules(inv: Inventory, host: Host, net: HostNet) -> list[Rule]:
    """The outgoing flows ``host`` may open under egress.restrict, each with its reason;
    [] when egress is not restricted (default allow outgoing)."""
    if not inv.egress.restrict:
        return []
    rules: list[Rule] = []

    def to(address: Address | Network, port: int, proto: str, reason: str) -> None:
        rules.append(Rule(port, proto, None, reason, "out", ipaddress.ip_network(address)))

    if host.has("proxy"):
        for app in inv.hosts_in("app"):
            if app.name != host.name:  # same host: loopback, always accepted
                to(host_network(app.private_address, app.name, "the proxy's egress"),
                   inv.app.bind_port, "tcp", f"proxy -> {app.name}:{inv.app.bind_port}: upstream")
        rules += _acme_rules(inv, host)
    if host.has("app") and inv.database.kind == "postgres":
        db = inv.db_host
        if db.name != host.name:
            to(host_network(db.private_address, db.name, "the app's egress"), POSTGRES_PORT,
               "tcp", f"app -> {db.name}:{POSTGRES_PORT}: the database")
    for pin, what, name, port in _endpoints(inv, host):
        if _pinned(inv, host, pin):
            continue  # the egress.allow entry below is the rule
        who = "app" if pin in ("artifact_storage", "operator_jwt") else host.name
        literal = ip_literal(name)
        if literal is not None:
            to(literal, port, "tcp", f"{who} -> {name}:{port}: {what}")
            continue
        addresses = net.resolved.get(name, ())
        if not addresses:
            raise EgressError(
                f"{host.name}: egress.restrict needs the addresses of {name} ({what}), but it "
                f"does not resolve on {host.name}; fix its DNS, or pin the addresses with an "
                f"egress.allow entry (to: CIDR, port: {port}, pin: {pin})", host.name)
        for address in addresses:
            to(address, port, "tcp", f"{who} -> {name}:{port}: {what} ({address})")
    for resolver in net.resolvers:
        for proto in ("udp", "tcp"):
            to(resolver, DNS_PORT, proto, f"dns -> {resolver}: resolver of this host")
    rules.append(Rule(NTP_PORT, "udp", None, "ntp: time sync", "out"))
    for i, extra in enumerate(inv.egress.allow):
        if any(host.has(t) for t in extra.tiers):
            why = f"egress.allow[{i}]" + (f": {extra.pin}" if extra.pin else "")
            rules.append(Rule(extra.port, extra.proto, None, why, "out", extra.to))
    unique: dict[tuple, Rule] = {}
    for rule in rules:
        unique.setdefault(rule.key, rule)
    return list(unique.values())


def egress_allowed(rules: Iterable[Rule], address: Address, port: int, proto: str = "tcp",
                   *, restrict: bool) -> bool:
    """Whether a host with these planned rules may open a connection to address:port."""
    if not restrict:
        return True
    return any(r.direction == "out" and r.port == port and r.proto == proto
               and (r.dest is None or (r.dest.version == address.version and address in r.dest))
               for r in rules)
