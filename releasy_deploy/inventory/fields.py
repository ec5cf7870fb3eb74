"""The parser's plumbing: the keys each section allows, and how one mapping, section or
field is read and checked, every problem recorded under its file and YAML path."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from .. import inventory_files
from .problems import ROOT, Problem
from .values import _MISSING, Check, _Bad, _join, _kind, _meta_note, _show, did_you_mean

TOP_KEYS = ("environment", "admin_cidrs", "known_hosts", "ssh", "jump_hosts", "hosts", "tiers",
            "app", "database", "release", "tls", "secrets", "egress", "hooks")
EGRESS_KEYS = ("restrict", "allow", "apt_proxy")
EGRESS_ALLOW_KEYS = ("to", "port", "proto", "tiers", "pin")
SSH_KEYS = ("user", "port", "identity_file", "connect_timeout", "jump")
JUMP_KEYS = ("address", "private_address", "user", "port", "identity_file")
HOST_KEYS = ("address", "private_address", "ssh_user", "ssh_port", "jump")
APP_KEYS = ("bind_port", "bluegreen_ports", "service_user", "log_level", "public_base_url",
            "database_max_connections", "download_token_ttl_seconds", "releases_keep",
            "ready_timeout", "operator_jwt", "artifact_storage")
JWT_KEYS = ("jwks_url", "issuer", "audience", "resource", "jwks_ttl_seconds", "jwt_leeway_seconds")
STORAGE_KEYS = ("bucket", "region", "endpoint", "path_style", "presign_expires_seconds")
DB_KEYS = ("kind", "name", "user", "backups_keep", "backup_before_deploy", "postgres_version")
RELEASE_KEYS = ("source", "arch", "sha256", "sha256_file")
TLS_KEYS = ("mode", "server_name", "certificate", "key", "acme")
ACME_KEYS = ("email", "directory_url", "staging", "ca_bundle")
SECRETS_KEYS = ("file",)

_ENV_EXPECT = "a lowercase name: a letter, then up to 31 of a-z 0-9 '-' (e.g. production)"
_USER_EXPECT = "a Unix user name: ^[a-z_][a-z0-9_-]{0,31}$"
_HOST_EXPECT = "a host name: a lowercase letter, then up to 62 of a-z 0-9 '-'"
_DB_EXPECT = "a PostgreSQL identifier: ^[a-z_][a-z0-9_]{0,62}$"


class _Fields:
    def __init__(self, path: Path, check_files: bool, problems: list[Problem], *,
                 origins: inventory_files.Origins | None = None,
                 base_path: Path | None = None):
        self.path = path
        self.file = str(path)
        self.origins = origins or inventory_files.Origins(self.file)
        self.base_path = base_path
        self.base = path.absolute().parent
        self.check_files = check_files
        self.problems = problems
        self.bad_tiers: set[str] = set()  # already reported; no "no host in tier" noise

    # -- plumbing

    def error(self, ypath: str, message: str) -> None:
        self.problems.append(Problem(self.origins.file_of(ypath), ypath or ROOT, message))

    def mapping(self, value: Any, ypath: str, allowed: tuple[str, ...] | None) -> dict[str, Any] | None:
        """Check ``value`` is a mapping with string keys, all in ``allowed`` (if given)."""
        if not isinstance(value, dict):
            what = f"allowed keys: {', '.join(allowed)}" if allowed else "name: value pairs"
            self.error(ypath, f"must be a mapping ({what}); got {_kind(value)}")
            return None
        out: dict[str, Any] = {}
        for key, v in value.items():
            if not isinstance(key, str):
                self.error(_join(ypath, key), f"keys must be strings (quote it); got {_kind(key)}")
                continue
            if allowed is not None and key not in allowed:
                self.error(_join(ypath, key),
                           f"unknown key{did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}")
                continue
            out[key] = v
        return out

    def section(self, parent: dict[str, Any] | None, ypath: str, key: str,
                allowed: tuple[str, ...], *, required: bool = False) -> dict[str, Any] | None:
        """A nested mapping; a missing or empty optional section is an empty mapping."""
        if parent is None:
            return None
        p = _join(ypath, key)
        if key not in parent or (parent[key] is None and not required):
            if required:
                self.error(p, f"required section is missing (keys: {', '.join(allowed)})")
                return None
            return {}
        return self.mapping(parent[key], p, allowed)

    def field(self, m: dict[str, Any] | None, ypath: str, key: str, check: Check,
              default: Any = _MISSING, *, expect: str = "") -> Any:
        """Value of ``m[key]`` after ``check``; None (and a recorded problem) if invalid."""
        if m is None:
            return None
        p = _join(ypath, key)
        if key not in m:
            if default is _MISSING:
                self.error(p, f"required key is missing{'; expected ' + expect if expect else ''}")
                return None
            return default
        try:
            return check(m[key])
        except _Bad as e:
            self.error(p, str(e))
            return None

    def path_value(self, v: Any) -> Path:
        """A local path: ``~`` expanded, relative paths anchored at the inventory's directory."""
        if not isinstance(v, str) or not v.strip():
            raise _Bad(f"must be a file path; got {_kind(v)}")
        if any(ord(c) < 32 for c in v):
            raise _Bad(f"{_show(v)} contains control characters")
        p = Path(v).expanduser()
        return p if p.is_absolute() else self.base / p

    def existing_file(self, ypath: str, p: Path | None, hint: str = "") -> None:
        if p is None or not self.check_files:
            return
        if not p.exists():
            self.error(ypath, f"file not found: {p}{hint}")
        elif not p.is_file():
            self.error(ypath, f"not a regular file: {p}")

    @staticmethod
    def _network(v: Any, *, expect: str, not_network: str,
                 whole: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """A CIDR network (strict: no host bits, not 0/0); _Bad with the caller's words."""
        if not isinstance(v, str):
            raise _Bad(f"must be {expect}; got {_kind(v)}")
        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise _Bad(f"{_show(v)}{_meta_note(v)} is not {not_network}") from None
            raise _Bad(f"{v} has host bits set; did you mean {loose}?") from None
        if net.prefixlen == 0:
            raise _Bad(f"{v} {whole}")
        return net
