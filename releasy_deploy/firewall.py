"""The firewall, pure part: which ufw rules each host should have, what ufw says it has, and
the difference between the two. No SSH here; `releasy_deploy.tiers.firewall` acts on hosts.

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
plus 80/443 and nothing else.

Outgoing traffic: allowed by default. With ``egress.restrict`` the default becomes deny
outgoing (dropped: a blocked connection times out) and `egress_rules` derives the flows
each host needs from the same topology: the proxy to each app host's bind port, the app
tier to the database, the artifact storage endpoint and the JWKS URL host, every host to
its own DNS resolvers, NTP and the apt proxy, plus the operator's ``egress.allow``
entries. Names are resolved on the host at apply time (`HostNet`). Replies to incoming
connections (our SSH session included) pass ufw's built-in ESTABLISHED rule, and
loopback is always accepted, whatever the policy.

IPv6: ufw filters IPv6 only with ``IPV6=yes`` in /etc/default/ufw; the plan wants it on
(`diff_host` turns it on), so a host's IPv6 addresses get the same default policies.
Rules for an IPv4 network are IPv4-only; "anywhere" rules cover both families.

Which rules are ours: every rule we add carries a ufw comment starting with ``releasy``
(`MANAGED_TAG`). `apply` converges to exactly the plan: it adds what is missing, removes
stale rules that carry our comment, and leaves rules someone added by hand in place,
reporting them as "unexpected" (removed only with ``--prune-unmanaged``). `plan` and
`status` mark them the same way; `audit` flags the ports they open.

ufw output is read with ``LANG=C``. The rule list comes from ``ufw show added``: it works
whether ufw is active or not, prints one line per rule in ufw's own command syntax (so
``ufw delete <the same words>`` removes exactly that rule), and folds the IPv6 twin of an
"Anywhere" rule into the IPv4 line. ``ufw status verbose``/``numbered`` list those twins
separately as "(v6)" rows; `parse_status` folds them back into one row with both families.
"""
from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field
from typing import Iterable, Sequence
from urllib.parse import urlsplit

from .inventory import POSTGRES_PORT, Host, Inventory

__all__ = [
    "MANAGED_TAG", "HTTP_PORTS", "POSTGRES_PORT", "Network", "Rule", "LiveRule",
    "StatusRow", "UfwStatus", "UfwDefaults", "HostDiff", "plan_rules", "ssh_rules", "ssh_sources",
    "parse_show_added", "parse_added_line", "parse_status", "parse_user_rules",
    "parse_ufw_conf", "tuple_command", "parse_defaults",
    "parse_listeners", "parse_ssh_connection", "diff_host", "add_argv", "delete_argv",
    "default_argv", "ENABLE_ARGV", "ufw_commands", "additions_only", "reachable_by_plan",
    "audit_ports",
    "format_source", "HostNet", "EgressError", "egress_rules", "names_to_resolve",
    "wanted_defaults", "parse_resolvers", "parse_getent_hosts", "parse_ipv6_addresses",
    "url_endpoint", "egress_allowed", "summary_diff",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MANAGED_TAG = "releasy"
HTTP_PORTS = (80, 443)
DNS_PORT = 53
NTP_PORT = 123
# What `ufw default` takes, by the policy names /etc/default/ufw stores.
WANTED_DEFAULTS = (("incoming", "deny"), ("outgoing", "allow"))
RESTRICTED_DEFAULTS = (("incoming", "deny"), ("outgoing", "deny"))
_POLICY_NAMES = {"DROP": "deny", "ACCEPT": "allow", "REJECT": "reject"}
_ACTIONS = ("allow", "deny", "reject", "limit")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Rule:
    """One planned allow rule. Incoming (``direction="in"``): TCP/UDP ``port`` from
    ``source`` (None: anywhere). Outgoing (``"out"``): TCP/UDP ``port`` to ``dest``
    (None: anywhere)."""

    port: int
    proto: str
    source: Network | None
    reason: str  # why it exists, e.g. "ssh from admin network"
    direction: str = "in"
    dest: Network | None = None

    @property
    def comment(self) -> str:
        """The ufw comment that marks the rule as ours."""
        return f"{MANAGED_TAG}: {self.reason}"

    @property
    def key(self) -> tuple:
        """What makes two rules the same rule for ufw (the comment does not)."""
        return (self.direction, self.port, self.proto, self.source, self.dest)

    def describe(self) -> str:
        if self.direction == "out":
            return f"allow out {self.port}/{self.proto} to {format_source(self.dest)}"
        return f"allow {self.port}/{self.proto} from {format_source(self.source)}"

    def __str__(self) -> str:
        return f"{self.describe()}  # {self.comment}"


def format_source(source: Network | None) -> str:
    if source is None:
        return "anywhere"
    if source.prefixlen == source.max_prefixlen:
        return str(source.network_address)
    return str(source)


def _host_network(address: str, host: str, what: str) -> Network:
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
    return (_host_network(jump.private_address, jump.name, "SSH through it"),)


def ssh_rules(host: Host, admin_cidrs: Iterable[Network]) -> list[Rule]:
    jump = getattr(host, "jump", None)
    why = f"ssh from jump host {jump.name}" if jump is not None else "ssh from admin network"
    return [Rule(host.ssh_port, "tcp", cidr, why) for cidr in ssh_sources(host, admin_cidrs)]


def plan_rules(inv: Inventory) -> dict[str, list[Rule]]:
    """Host name -> the rules that host should have, in a stable order (inventory order)."""
    proxies = inv.hosts_in("proxy")
    apps = inv.hosts_in("app")
    plan: dict[str, list[Rule]] = {}
    for host in inv.hosts:
        rules = ssh_rules(host, inv.admin_cidrs)
        if host.has("proxy"):
            rules += [Rule(80, "tcp", None, "http"), Rule(443, "tcp", None, "https")]
        if host.has("app"):
            for proxy in proxies:
                if proxy.name != host.name:  # same host: loopback, always accepted
                    source = _host_network(proxy.private_address, proxy.name, "the app tier")
                    rules.append(Rule(inv.app.bind_port, "tcp", source,
                                      f"app from {proxy.name}"))
        if host.has("db") and inv.database.kind == "postgres":
            for app in apps:
                if app.name != host.name:
                    source = _host_network(app.private_address, app.name, "the db tier")
                    rules.append(Rule(POSTGRES_PORT, "tcp", source,
                                      f"postgres from {app.name}"))
        unique: dict[tuple, Rule] = {}
        for rule in rules:
            unique.setdefault(rule.key, rule)  # overlapping inputs: first reason wins
        plan[host.name] = list(unique.values())
    return plan


# --------------------------------------------------------------------------- egress


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


def _literal(name: str) -> Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def names_to_resolve(inv: Inventory, host: Host) -> list[str]:
    """DNS names the egress plan of ``host`` needs resolved on the host (none without
    egress.restrict; none for endpoints an egress.allow entry pins)."""
    if not inv.egress.restrict:
        return []
    names = [name for pin, _, name, _ in _endpoints(inv, host)
             if _literal(name) is None and not _pinned(inv, host, pin)]
    return list(dict.fromkeys(names))


def _acme_rules(inv: Inventory, host: Host) -> list[Rule]:
    """``tls.mode: acme`` with several proxies: a proxy's port 80 relays an HTTP-01
    challenge it does not have to the other proxies (one hop; the CA may reach any of
    them), so each proxy reaches the others' port 80. The CA itself is an endpoint
    (`_endpoints`: resolved on the host or pinned)."""
    if not host.has("proxy") or inv.tls.mode != "acme":
        return []
    return [Rule(80, "tcp", None, f"proxy -> {peer.name}:80: ACME challenge relay", "out",
                 _host_network(peer.private_address, peer.name, "the ACME challenge relay"))
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
                to(_host_network(app.private_address, app.name, "the proxy's egress"),
                   inv.app.bind_port, "tcp", f"proxy -> {app.name}:{inv.app.bind_port}: upstream")
        rules += _acme_rules(inv, host)
    if host.has("app") and inv.database.kind == "postgres":
        db = inv.db_host
        if db.name != host.name:
            to(_host_network(db.private_address, db.name, "the app's egress"), POSTGRES_PORT,
               "tcp", f"app -> {db.name}:{POSTGRES_PORT}: the database")
    for pin, what, name, port in _endpoints(inv, host):
        if _pinned(inv, host, pin):
            continue  # the egress.allow entry below is the rule
        who = "app" if pin in ("artifact_storage", "operator_jwt") else host.name
        literal = _literal(name)
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


def parse_resolvers(text: str) -> tuple[Address, ...]:
    """The resolvers a host uses: ``nameserver`` lines of /etc/resolv.conf, then, after a
    line ``@resolved``, those of systemd-resolved's upstream file. A loopback resolver
    (resolved's stub, a local cache) is reached over loopback, always allowed; when it is
    there, the upstream file names where that stub forwards to."""
    main, _, upstream = text.partition("\n@resolved\n")

    def servers(part: str) -> list[Address]:
        found = []
        for line in part.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                ip = _literal(words[1].split("%", 1)[0])
                if ip is not None:
                    found.append(ip)
        return found

    mine = servers(main)
    if any(ip.is_loopback for ip in mine):
        mine += servers(upstream)
    return tuple(dict.fromkeys(ip for ip in mine if not ip.is_loopback))


def parse_getent_hosts(text: str) -> tuple[Address, ...]:
    """``getent ahosts NAME`` -> its unique addresses, in order."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if words:
            ip = _literal(words[0])
            if ip is not None:
                found.append(ip)
    return tuple(dict.fromkeys(found))


def parse_ipv6_addresses(text: str) -> tuple[ipaddress.IPv6Address, ...]:
    """``ip -6 -o addr show scope global`` -> the host's global IPv6 addresses."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if "inet6" in words:
            value = words[words.index("inet6") + 1].split("/", 1)[0]
            ip = _literal(value)
            if isinstance(ip, ipaddress.IPv6Address):
                found.append(ip)
    return tuple(dict.fromkeys(found))


# --------------------------------------------------------------------------- ufw output


@dataclass(frozen=True)
class LiveRule:
    """One rule as ``ufw show added`` prints it.

    ``words`` are the words after ``ufw``; ``ufw delete *words`` removes exactly this rule.
    Fields are None when the rule does not restrict them (any port, any protocol...).
    ``parsed`` is False for a line this parser does not understand: such a rule is never
    taken for a planned one, and is shown as written.
    """

    words: tuple[str, ...]
    action: str | None = None  # allow | deny | reject | limit
    direction: str = "in"  # in | out | route
    interface: str | None = None
    log: str | None = None  # log | log-all
    source: Network | None = None
    source_port: str | None = None
    destination: Network | None = None
    port: str | None = None  # "22", "60000:61000", "80,443"
    proto: str | None = None  # tcp | udp | ...
    app: str | None = None
    source_app: str | None = None
    comment: str | None = None
    parsed: bool = True

    @property
    def managed(self) -> bool:
        return self.comment is not None and self.comment.startswith(MANAGED_TAG)

    @property
    def key(self) -> tuple | None:
        """The `Rule.key` this rule is equivalent to, or None if no planned rule can be."""
        if not (self.parsed and self.action == "allow" and self.direction in ("in", "out")
                and self.interface is None and self.log is None
                and self.source_port is None and self.app is None and self.source_app is None
                and self.proto is not None and self.port is not None and self.port.isdigit()):
            return None
        if self.direction == "in" and self.destination is not None:
            return None
        if self.direction == "out" and self.source is not None:
            return None
        return (self.direction, int(self.port), self.proto, self.source, self.destination)

    def tcp_ports(self) -> list[int]:
        """Destination ports this rule concerns for TCP (ranges: their two ends)."""
        if not self.parsed or self.direction != "in" or self.port is None:
            return []
        if self.proto not in (None, "tcp"):
            return []
        ports: list[int] = []
        for part in self.port.split(","):
            ports += [int(p) for p in part.split(":") if p.isdigit()]
        return ports

    def describe(self) -> str:
        return shlex.join(("ufw", *self.words))

    def __str__(self) -> str:
        return self.describe()


_PORT_SPEC = re.compile(r"(\d+(?:[:,]\d+)*)(?:/([a-z0-9]+))?\Z")


def _network(value: str) -> Network | None:
    if value == "any":
        return None
    return ipaddress.ip_network(value, strict=False)


def parse_added_line(line: str) -> LiveRule | None:
    """One line of ``ufw show added``; None for lines that are not rules."""
    line = line.strip()
    if not line.startswith("ufw "):
        return None
    try:
        words = shlex.split(line)[1:]
    except ValueError:
        return LiveRule(tuple(line.split()[1:]), parsed=False)
    try:
        return _parse_rule_words(words)
    except (ValueError, IndexError):
        return LiveRule(tuple(words), parsed=False)


def _parse_rule_words(words: list[str]) -> LiveRule:
    fields: dict[str, object] = {}
    rest = list(words)
    comment = None
    if "comment" in rest:
        i = rest.index("comment")
        if i != len(rest) - 2:
            raise ValueError("comment is not the last word")
        comment = rest[i + 1]
        rest = rest[:i]
    if rest and rest[0] == "route":
        fields["direction"] = "route"
        rest = rest[1:]
    if not rest or rest[0] not in _ACTIONS:
        raise ValueError("no action")
    fields["action"] = rest.pop(0)
    if rest and rest[0] in ("in", "out"):
        if fields.get("direction") != "route":
            fields["direction"] = rest[0]
        rest.pop(0)
        if rest and rest[0] == "on":
            rest.pop(0)
            fields["interface"] = rest.pop(0)
    if rest and rest[0] in ("log", "log-all"):
        fields["log"] = rest.pop(0)
    if not rest:
        raise ValueError("no rule body")
    if rest[0] in ("from", "to", "proto"):
        while rest:
            word = rest.pop(0)
            if word == "from":
                fields["source"] = _network(rest.pop(0))
                side = "source"
            elif word == "to":
                fields["destination"] = _network(rest.pop(0))
                side = "destination"
            elif word == "proto":
                fields["proto"] = rest.pop(0)
                continue
            else:
                raise ValueError(f"unexpected word {word!r}")
            if rest and rest[0] == "port":
                rest.pop(0)
                fields["source_port" if side == "source" else "port"] = rest.pop(0)
            elif rest and rest[0] == "app":
                rest.pop(0)
                fields["source_app" if side == "source" else "app"] = rest.pop(0)
    else:
        if len(rest) != 1:
            raise ValueError("simple syntax takes one word")
        m = _PORT_SPEC.match(rest[0])
        if m:
            fields["port"], fields["proto"] = m.group(1), m.group(2)
        else:
            fields["app"] = rest[0]  # an application profile, e.g. OpenSSH
    return LiveRule(tuple(words), comment=comment, **fields)  # type: ignore[arg-type]


def parse_show_added(text: str) -> list[LiveRule]:
    """Every rule of ``LANG=C ufw show added`` (no rules: "(None)" -> [])."""
    rules = []
    for line in text.splitlines():
        rule = parse_added_line(line)
        if rule is not None:
            rules.append(rule)
    return rules


_ANYWHERE = ("0.0.0.0/0", "::/0")


def tuple_command(line: str) -> str | None:
    """One ``### tuple ###`` line of ufw's user.rules / user6.rules (what ufw keeps of every
    added rule) as the words ``ufw show added`` prints for it, after ufw's own
    ``UFWCommandRule.get_command``; None for a line that is not a well-formed tuple."""
    line = line.strip()
    comment = ""
    if " comment=" in line:
        line, _, hexed = line.partition(" comment=")
        try:
            comment = bytes.fromhex(hexed.strip()).decode("utf-8", "replace")
        except ValueError:
            return None
    words = line.removeprefix("### tuple ###").split()
    if not 6 <= len(words) <= 9:
        return None
    action, proto, dport, dst, sport, src = words[:6]
    route = ":" in action
    action = action.split(":")[-1]
    action, _, logtype = action.partition("_")
    direction, iface_in, iface_out = "in", "", ""
    if len(words) in (7, 9):
        last = words[-1]
        direction = last.split("_")[0]
        for part in last.split("!"):
            if part.startswith("in_"):
                iface_in = part.partition("_")[2]
            elif part.startswith("out_"):
                iface_out = part.partition("_")[2]
    dapp = sapp = ""
    if len(words) >= 8:
        dapp = "" if words[6] == "-" else words[6].replace("%20", " ")
        sapp = "" if words[7] == "-" else words[7].replace("%20", " ")
    res = action
    if (dst in _ANYWHERE and src in _ANYWHERE and sport == "any" and not sapp
            and not iface_in and not iface_out and dport != "any"):
        if direction == "out":
            res += " out"
        if logtype:
            res += f" {logtype}"
        if dapp:
            res += f" '{dapp}'" if " " in dapp else f" {dapp}"
        else:
            res += f" {dport}" + (f"/{proto}" if proto != "any" else "")
    else:
        if iface_in:
            res += f" in on {iface_in}"
        if iface_out:
            res += f" out on {iface_out}"
        elif direction == "out":
            res += " out"
        if logtype:
            res += f" {logtype}"
        for word, loc, port, app in (("from", src, sport, sapp), ("to", dst, dport, dapp)):
            loc = "any" if loc in _ANYWHERE else loc
            if loc != "any" or port != "any" or app:
                res += f" {word} {loc}"
                if app:
                    res += f" app '{app}'" if " " in app else f" app {app}"
                elif port != "any":
                    res += f" port {port}"
        if " to " not in res and " from " not in res and not iface_in and not iface_out:
            res += " to any"
        if proto != "any" and not dapp and not sapp:
            res += f" proto {proto}"
    if comment:
        res += f" comment '{comment}'"
    return f"route {res}" if route else res


def parse_user_rules(text: str) -> list[LiveRule]:
    """The rules ufw keeps in /etc/ufw/user.rules then user6.rules (their ``### tuple ###``
    lines, in that order), the way ``ufw show added`` lists them: one per rule, the IPv6
    twin of an "anywhere" rule folded into the IPv4 one. Reading the files costs a ``cat``;
    ``ufw show added`` starts Python (a quarter of a second per host on a busy machine)."""
    rules, seen = [], set()
    for line in text.splitlines():
        if not line.startswith("### tuple ###"):
            continue
        command = tuple_command(line)
        if command is None or command in seen:
            continue
        seen.add(command)
        rule = parse_added_line(f"ufw {command}")
        if rule is not None:
            rules.append(rule)
    return rules


def parse_ufw_conf(conf: str, defaults: str) -> UfwStatus:
    """Whether ufw is enabled and its logging level, from /etc/ufw/ufw.conf (what ``ufw
    status`` reports), with the default policies of /etc/default/ufw."""
    values: dict[str, str] = {}
    for text in (conf, defaults):
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip().strip('"').strip("'")
    level = values.get("LOGLEVEL", "low").lower()
    logging = "off" if level == "off" else f"on ({level})"
    policies = {}
    for name, key in (("incoming", "DEFAULT_INPUT_POLICY"), ("outgoing", "DEFAULT_OUTPUT_POLICY"),
                      ("routed", "DEFAULT_FORWARD_POLICY")):
        if values.get(key):
            policies[name] = _POLICY_NAMES.get(values[key], values[key].lower())
    return UfwStatus(values.get("ENABLED", "no").lower() == "yes", logging, policies)


@dataclass(frozen=True)
class StatusRow:
    """One row of ``ufw status`` (verbose or numbered), IPv6 twins folded in."""

    to: str
    action: str  # e.g. "ALLOW IN", "DENY OUT", "ALLOW FWD"
    source: str  # "Anywhere", "10.0.0.5", "10.1.2.3 1000/udp"
    comment: str | None
    flags: tuple[str, ...]  # "out", "log"...
    families: frozenset[str]  # {"v4"}, {"v6"} or both
    number: int | None = None  # of the first row, for numbered output


@dataclass(frozen=True)
class UfwStatus:
    active: bool
    logging: str | None = None
    defaults: dict[str, str] = field(default_factory=dict)  # incoming/outgoing/routed
    rows: tuple[StatusRow, ...] = ()


_ROW = re.compile(
    r"^(?:\[\s*(?P<num>\d+)\]\s+)?(?P<to>\S.*?)\s+"
    r"(?P<action>(?:ALLOW|DENY|REJECT|LIMIT)(?: (?:IN|OUT|FWD))?)\s+"
    r"(?P<rest>\S.*?)\s*$")
_COMMENT = re.compile(r"\s+#\s(.*)$")
_FLAG = re.compile(r"\s+\((out|log|log-all)\)$")
_V6 = re.compile(r" \(v6\)|\(v6\)")


def parse_status(text: str) -> UfwStatus:
    """``LANG=C ufw status verbose`` or ``ufw status numbered``; inactive -> no rows."""
    active = False
    logging = None
    defaults: dict[str, str] = {}
    raw: list[tuple[int | None, str, str, str, str | None, tuple[str, ...], bool]] = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("Status:"):
            active = line.split(":", 1)[1].strip() == "active"
        elif line.startswith("Logging:"):
            logging = line.split(":", 1)[1].strip()
        elif line.startswith("Default:"):
            for part in line.split(":", 1)[1].split(","):
                m = re.match(r"\s*(\S+) \((\w+)\)", part)
                if m:
                    defaults[m.group(2)] = m.group(1)
        elif line.strip().startswith("--"):
            in_table = True
        elif in_table and line.strip():
            m = _ROW.match(line)
            if not m:
                continue
            rest, comment = m.group("rest"), None
            if (c := _COMMENT.search(rest)) is not None:
                rest, comment = rest[:c.start()], c.group(1).strip()
            flags: list[str] = []
            while (f := _FLAG.search(rest)) is not None:
                flags.insert(0, f.group(1))
                rest = rest[:f.start()]
            to, source = m.group("to").strip(), rest.strip()
            v6 = bool(_V6.search(to) or _V6.search(source))
            to, source = _V6.sub("", to).strip(), _V6.sub("", source).strip()
            num = int(m.group("num")) if m.group("num") else None
            raw.append((num, to, m.group("action"), source, comment, tuple(flags), v6))
    rows: list[StatusRow] = []
    index: dict[tuple, int] = {}
    for num, to, action, source, comment, flags, v6 in raw:
        ident = (to, action, source, comment, flags)
        if v6 and ident in index and rows[index[ident]].families == frozenset({"v4"}):
            # The IPv6 twin of an "Anywhere" rule: one rule, two families.
            row = rows[index[ident]]
            rows[index[ident]] = StatusRow(row.to, row.action, row.source, row.comment,
                                           row.flags, frozenset({"v4", "v6"}), row.number)
            continue
        family = _family_of(source, to) if not v6 else "v6"
        index.setdefault(ident, len(rows))
        rows.append(StatusRow(to, action, source, comment, flags, frozenset({family}), num))
    return UfwStatus(active, logging, defaults, tuple(rows))


def _family_of(source: str, to: str) -> str:
    """A row not marked (v6) is IPv4 unless an address in it is IPv6 (v6-only rules)."""
    for word in (source.split() + to.split()):
        try:
            if ipaddress.ip_network(word, strict=False).version == 6:
                return "v6"
        except ValueError:
            continue
    return "v4"


@dataclass(frozen=True)
class UfwDefaults:
    """/etc/default/ufw: what `ufw default` wrote, in `ufw default` words."""

    incoming: str | None
    outgoing: str | None
    ipv6: bool


def parse_defaults(text: str) -> UfwDefaults:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip().strip('"').strip("'")
    def policy(name: str) -> str | None:
        v = values.get(name)
        return _POLICY_NAMES.get(v, v.lower()) if v else None
    return UfwDefaults(policy("DEFAULT_INPUT_POLICY"), policy("DEFAULT_OUTPUT_POLICY"),
                       values.get("IPV6", "yes").lower() == "yes")


def parse_listeners(text: str) -> list[tuple[str, int]]:
    """``ss -ltnH`` -> [(local address, port)]; the address without brackets or %iface."""
    out = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        local = cols[3]
        addr, sep, port = local.rpartition(":")
        if not sep or not port.isdigit():
            continue
        addr = addr.strip("[]").split("%", 1)[0]
        out.append((addr, int(port)))
    return out


def parse_ssh_connection(value: str) -> tuple[Address, int] | None:
    """``$SSH_CONNECTION`` ("client_ip client_port server_ip server_port") ->
    (client address as the host sees it, server port); None if malformed."""
    parts = value.split()
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    try:
        addr = ipaddress.ip_address(parts[0].split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, int(parts[3])


# --------------------------------------------------------------------------- the diff


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


# --------------------------------------------------------------------------- commands


def add_argv(rule: Rule) -> list[str]:
    """``ufw allow`` for a planned rule; re-running it only updates the comment."""
    if rule.direction == "out":
        return ["ufw", "allow", "out", "proto", rule.proto, "to",
                "any" if rule.dest is None else str(rule.dest),
                "port", str(rule.port), "comment", rule.comment]
    return ["ufw", "allow", "proto", rule.proto, "from",
            "any" if rule.source is None else str(rule.source),
            "to", "any", "port", str(rule.port), "comment", rule.comment]


def delete_argv(rule: LiveRule) -> list[str]:
    # --force: no confirmation prompt. The words are ufw's own, comment included, so the
    # deletion matches exactly this rule. Route rules are deleted with `ufw route delete`.
    if rule.words[:1] == ("route",):
        return ["ufw", "--force", "route", "delete", *rule.words[1:]]
    return ["ufw", "--force", "delete", *rule.words]


def default_argv(direction: str, policy: str) -> list[str]:
    return ["ufw", "default", policy, direction]


ENABLE_ARGV = ["ufw", "--force", "enable"]
RELOAD_ARGV = ["ufw", "reload"]
# ufw reads IPV6 when it adds rules and loads them: set it before anything else.
IPV6_ON_ARGV = ["sed", "-i", "s/^IPV6=.*/IPV6=yes/", "/etc/default/ufw"]


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


# --------------------------------------------------------------------------- audit


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


def summary_diff(inv: Inventory, host: Host, live: Sequence[LiveRule], *, active: bool,
                 defaults: UfwDefaults | None) -> HostDiff:
    """The diff `fab status` shows without probing DNS: ingress against the plan; with
    egress.restrict, our own outgoing rules count as planned (their addresses depend on
    the host's resolvers, which `firewall.status` reads)."""
    planned = list(plan_rules(inv)[host.name])
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
