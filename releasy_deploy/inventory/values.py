"""Checks of single inventory values: each takes a YAML value and returns it validated
(or canonical), or raises `_Bad` saying what is allowed. Anything that later reaches a
shell, a config file or a remote path passes one of these."""
from __future__ import annotations

import difflib
import ipaddress
import json
import re
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from .model import DNS_NAME_RE, HOST_NAME_RE

# Characters that are never legitimate in the free-text values we accept (URLs, JWT
# issuer/audience): quoting, expansion and redirection characters, plus whitespace.
_UNSAFE_CHARS = frozenset(" \t\r\n\v\f\"'`$\\<>{}|^;")
_SHELL_META = frozenset(" \t\r\n;&|<>()$`\\\"'*?[]{}~!#%")


def _join(ypath: str, key: Any) -> str:
    """Extend a YAML path: dotted for plain keys, bracketed/quoted for anything else."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return f"{ypath}.{key}" if ypath else key
    shown = json.dumps(key) if isinstance(key, str) else repr(key)
    return f"{ypath}[{shown}]"


class _Bad(Exception):
    """A value failed its check; the message says what is allowed."""


Check = Callable[[Any], Any]
_MISSING = object()


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:56] + "...'"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a YAML {type(value).__name__} ({value}); quote it to make it a string"


def _meta_note(value: str) -> str:
    found = sorted({c for c in value if c in _SHELL_META or ord(c) < 32 or ord(c) == 127})
    if not found:
        return ""
    return f" (contains shell metacharacters/whitespace: {' '.join(repr(c) for c in found)})"


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _regex(rx: re.Pattern[str], expect: str) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise _Bad(f"must be {expect}; got {_kind(v)}")
        if not rx.fullmatch(v):
            raise _Bad(f"invalid value {_show(v)}{_meta_note(v)}; must be {expect}")
        return v
    return check


def _int(lo: int, hi: int | None = None) -> Check:
    rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            hint = " (remove the quotes)" if isinstance(v, str) and v.strip().isdigit() else ""
            raise _Bad(f"must be an integer {rng}; got {_kind(v)}{hint}")
        if v < lo or (hi is not None and v > hi):
            raise _Bad(f"{v} is out of range; must be an integer {rng}")
        return v
    return check


def _pg_major(v: Any) -> str:
    """A PostgreSQL major version such as 17 (10 and later have one-number majors)."""
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 10 <= v <= 99:
        raise _Bad(f"must be a PostgreSQL major version such as 15 or 17; got {_kind(v)}")
    return str(v)


def _seconds(hi: float) -> Check:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(f"must be a number of seconds (0 < n <= {hi:g}); got {_kind(v)}")
        if not 0 < v <= hi:
            raise _Bad(f"{v} is out of range; must be a number of seconds, 0 < n <= {hi:g}")
        return float(v)
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false; got {_kind(v)}")
    return v


def _choice(options: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> Check:
    def check(v: Any) -> str:
        if isinstance(v, str) and v in options:
            return v
        hint = ""
        if aliases and isinstance(v, str) and v in aliases:
            hint = f" (did you mean {aliases[v]!r}?)"
        else:
            hint = did_you_mean(v, options)
        raise _Bad(f"got {_kind(v)}{hint}; must be one of: {', '.join(options)}")
    return check


def _unsafe(value: str, *, ascii_only: bool) -> str:
    bad = sorted({c for c in value
                  if c in _UNSAFE_CHARS or ord(c) < 32 or ord(c) == 127
                  or (ascii_only and ord(c) > 126)})
    return " ".join(repr(c) for c in bad)


def _url(v: Any) -> str:
    expect = "an http:// or https:// URL with a host"
    if not isinstance(v, str) or not v:
        raise _Bad(f"must be {expect}; got {_kind(v)}")
    bad = _unsafe(v, ascii_only=True)
    if bad:
        raise _Bad(f"{_show(v)} contains characters not allowed here ({bad}); must be {expect}")
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise _Bad(f"{_show(v)} is not a valid URL ({e}); must be {expect}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Bad(f"{_show(v)} is not {expect}")
    if parts.username is not None or parts.password is not None:
        raise _Bad("must not contain credentials (user:password@); secrets never go in the inventory")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad(f"must be a non-empty string; got {_kind(v)}")
    bad = _unsafe(v, ascii_only=False)
    if bad:
        raise _Bad(f"{_show(v)} contains characters not allowed here ({bad})")
    if len(v) > 2048:
        raise _Bad("is longer than 2048 characters")
    return v


def _source_text(v: Any) -> str:
    """Only the type here: URL and directory sources are checked by the parser."""
    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"must be a URL template or a directory path; got {_kind(v)}")
    return v


def _dns_name(v: Any) -> str:
    expect = "a DNS name like releasy.example.com (letters, digits, '-', '.')"
    if not isinstance(v, str):
        raise _Bad(f"must be {expect}; got {_kind(v)}")
    if (not DNS_NAME_RE.fullmatch(v) or len(v) > 253 or v.rsplit(".", 1)[-1].isdigit()):
        raise _Bad(f"invalid value {_show(v)}{_meta_note(v)}; must be {expect}")
    return v.lower()


def _jump_ref(v: Any) -> str | bool:
    """A jump host name, or ``false`` (per host: connect directly)."""
    if v is False:
        return False
    if not isinstance(v, str) or not HOST_NAME_RE.fullmatch(v):
        raise _Bad(f"must be the name of a jump host (an inventory host or an entry of "
                   f"jump_hosts), or false for a direct connection; got {_show(v)}")
    return v


def _ip(v: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A usable unicast IP literal, or _Bad."""
    if not isinstance(v, str):
        raise _Bad(f"must be an IP address literal; got {_kind(v)}")
    if "%" in v:
        raise _Bad(f"{_show(v)}: IPv6 zone ids (%iface) are not supported")
    try:
        ip = ipaddress.ip_address(v)
    except ValueError:
        raise _Bad(f"{_show(v)}{_meta_note(v)} is not an IPv4/IPv6 address literal") from None
    if ip.is_unspecified or ip.is_multicast:
        raise _Bad(f"{v} is not a unicast host address")
    return ip


def _address(v: Any) -> str:
    """An IP literal (canonical form) or a DNS host name (lowercased)."""
    if isinstance(v, str):
        try:
            return str(_ip(v))
        except _Bad as e:
            if v.replace(".", "").isdigit() or ":" in v or "%" in v:
                raise  # meant to be an IP: say what is wrong with it
            if not DNS_NAME_RE.fullmatch(v) or len(v) > 253:
                raise _Bad(f"invalid value {_show(v)}{_meta_note(v)}; must be an IPv4/IPv6 "
                           "address or a DNS host name (letters, digits, '-', '.')") from e
            if v.rsplit(".", 1)[-1].isdigit():
                raise _Bad(f"{_show(v)} is not a valid IP address nor a host name") from e
            return v.lower()
    raise _Bad(f"must be an IP address or DNS host name; got {_kind(v)}")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
