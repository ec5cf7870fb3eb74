"""The firewall, pure part: which ufw rules each host should have, what ufw says it has, and
the difference between the two. No SSH here; `releasy_deploy.tiers.firewall` acts on hosts.

Rules are derived from the topology, never written per host:

- every host: default deny incoming, allow outgoing; SSH (the host's ``ssh_port``) only from
  the inventory's ``admin_cidrs``;
- proxy hosts: 80 and 443 from anywhere;
- app hosts: ``app.bind_port`` only from the proxy hosts' private addresses (in the split
  topology the proxy reaches app hosts on the bind port only; blue/green is single-host
  only, where instances bind 127.0.0.1 and need no rule);
- the db host: 5432 only from the app hosts' private addresses (PostgreSQL only).

Traffic between tiers on the same host goes over loopback, which ufw always accepts, so a
host never gets a rule for its own private address: a single host ends up with SSH (admin)
plus 80/443 and nothing else. Outgoing traffic is not restricted (restricting the app
tier's egress to the database, JWKS URL and object storage is possible later; not built).

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
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from .inventory import Host, Inventory

__all__ = [
    "MANAGED_TAG", "HTTP_PORTS", "POSTGRES_PORT", "Network", "Rule", "LiveRule",
    "StatusRow", "UfwStatus", "UfwDefaults", "HostDiff", "plan_rules", "ssh_rules", "ssh_sources",
    "parse_show_added", "parse_added_line", "parse_status", "parse_defaults",
    "parse_listeners", "parse_ssh_connection", "diff_host", "add_argv", "delete_argv",
    "default_argv", "ENABLE_ARGV", "ufw_commands", "reachable_by_plan", "audit_ports",
    "format_source",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MANAGED_TAG = "releasy"
HTTP_PORTS = (80, 443)
POSTGRES_PORT = 5432
# What `ufw default` takes, by the policy names /etc/default/ufw stores.
WANTED_DEFAULTS = (("incoming", "deny"), ("outgoing", "allow"))
_POLICY_NAMES = {"DROP": "deny", "ACCEPT": "allow", "REJECT": "reject"}
_ACTIONS = ("allow", "deny", "reject", "limit")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Rule:
    """One planned "allow in" rule: TCP/UDP ``port`` from ``source`` (None: anywhere)."""

    port: int
    proto: str
    source: Network | None
    reason: str  # why it exists, e.g. "ssh from admin network"

    @property
    def comment(self) -> str:
        """The ufw comment that marks the rule as ours."""
        return f"{MANAGED_TAG}: {self.reason}"

    @property
    def key(self) -> tuple[int, str, Network | None]:
        """What makes two rules the same rule for ufw (the comment does not)."""
        return (self.port, self.proto, self.source)

    def describe(self) -> str:
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
    def key(self) -> tuple[int, str, Network | None] | None:
        """The `Rule.key` this rule is equivalent to, or None if no planned rule can be."""
        if not (self.parsed and self.action == "allow" and self.direction == "in"
                and self.interface is None and self.log is None and self.destination is None
                and self.source_port is None and self.app is None and self.source_app is None
                and self.proto is not None and self.port is not None and self.port.isdigit()):
            return None
        return (int(self.port), self.proto, self.source)

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

    @property
    def changes(self) -> bool:
        return bool(self.add or self.recomment or self.remove or self.defaults or self.enable)


def diff_host(host: str, planned: Sequence[Rule], live: Sequence[LiveRule], *, active: bool,
              defaults: UfwDefaults | None, prune_unmanaged: bool = False) -> HostDiff:
    """Compare the plan with the live rules (``ufw show added``) and ufw's state."""
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
    for direction, want in WANTED_DEFAULTS:
        now = getattr(defaults, direction) if defaults is not None else None
        if now != want:
            policy_changes.append((direction, now, want))
    return HostDiff(host, tuple(planned), tuple(add), tuple(recomment), tuple(satisfied),
                    tuple(remove), tuple(unexpected), tuple(policy_changes), not active)


# --------------------------------------------------------------------------- commands


def add_argv(rule: Rule) -> list[str]:
    """``ufw allow`` for a planned rule; re-running it only updates the comment."""
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


def ufw_commands(diff: HostDiff) -> list[list[str]]:
    """The ufw commands that turn the live state into the plan, in a lockout-safe order:
    allow rules first, then deletions, then default policies, enabling last."""
    cmds = [add_argv(r) for r in (*diff.add, *diff.recomment)]
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
