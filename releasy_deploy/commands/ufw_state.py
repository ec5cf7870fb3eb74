"""ufw's state apart from its rules: enabled or not, logging, the default policies and
whether it filters IPv6. The files that hold them, the shells that read them, and the
parsers of those files and of ``ufw status`` (pure).

ufw's own files are read, not the `ufw` command: each ``ufw status`` starts Python (~0.25 s
per host on a busy machine), while the shell prints these small files with its builtins
(`shell_read`). ``ufw status verbose``/``numbered`` list the IPv6 twin of an "Anywhere" rule
as a separate "(v6)" row; `parse_status` folds it back into one row with both families.
Output is read with ``LANG=C``.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .shell_read import print_text

__all__ = [
    "UFW_CONF", "UFW_DEFAULTS", "CONF_PROBE", "DEFAULTS_PROBE", "StatusRow", "UfwStatus",
    "UfwDefaults", "parse_ufw_conf", "parse_conf_probe", "parse_status", "parse_defaults",
]

UFW_CONF, UFW_DEFAULTS = "/etc/ufw/ufw.conf", "/etc/default/ufw"
# Enabled, logging and the default policies; ufw not installed: exit 3.
CONF_PROBE = (f"[ -f {UFW_CONF} ] || exit 3; {print_text(UFW_CONF)} && echo @defaults &&"
              f" {print_text(UFW_DEFAULTS)}")
DEFAULTS_PROBE = print_text(UFW_DEFAULTS)
# What `ufw default` takes, by the policy names /etc/default/ufw stores.
_POLICY_NAMES = {"DROP": "deny", "ACCEPT": "allow", "REJECT": "reject"}


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


def parse_conf_probe(out: str, code: int) -> UfwStatus | None:
    """What `CONF_PROBE` printed; None when ufw is not installed."""
    if code != 0:
        return None
    conf, _, defaults = out.partition("@defaults\n")
    return parse_ufw_conf(conf, defaults)


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
