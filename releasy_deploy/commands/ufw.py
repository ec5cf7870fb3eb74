"""ufw's rules in ufw's own words (pure): the rule we add (`Rule`) and the ``ufw`` argv that
add, delete and set policies, the rule ufw lists (`LiveRule`) and the parsers of
``ufw show added`` and of the files ufw keeps its rules in.

Which rules are ours: every rule we add carries a ufw comment starting with ``releasy``
(`MANAGED_TAG`); rules without it were added by hand.

The rule list comes from ``ufw show added`` (or ufw's user.rules / user6.rules, which it
prints from): it works whether ufw is active or not, prints one line per rule in ufw's own
command syntax (so ``ufw delete <the same words>`` removes exactly that rule), and folds the
IPv6 twin of an "Anywhere" rule into the IPv4 line. Output is read with ``LANG=C``.
"""
from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass

from .shell_read import has_line_starting
from .ufw_state import UFW_DEFAULTS

__all__ = [
    "Network", "Address", "MANAGED_TAG", "Rule", "LiveRule", "format_source",
    "UFW_RULES", "UFW_RULES6", "RULES_PROBE", "parse_show_added", "parse_added_line",
    "tuple_command", "parse_user_rules", "add_argv", "delete_argv", "default_argv",
    "ENABLE_ARGV", "RELOAD_ARGV", "IPV6_ON_ARGV",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MANAGED_TAG = "releasy"
_ACTIONS = ("allow", "deny", "reject", "limit")

UFW_RULES, UFW_RULES6 = "/etc/ufw/user.rules", "/etc/ufw/user6.rules"
# The rules added to ufw: user.rules, and user6.rules when ufw filters IPv6 (one `cat`:
# these files grow with the fleet); ufw not installed: exit 3.
_IPV6_OFF = has_line_starting(UFW_DEFAULTS, "IPV6=no", ignore_case=True)
RULES_PROBE = (f"[ -f {UFW_RULES} ] || exit 3\n"
               f"if {_IPV6_OFF}; then cat -- {UFW_RULES}\n"
               f"else cat -- {UFW_RULES} {UFW_RULES6}; fi")


# --------------------------------------------------------------------------- planned rules


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
IPV6_ON_ARGV = ["sed", "-i", "s/^IPV6=.*/IPV6=yes/", UFW_DEFAULTS]
