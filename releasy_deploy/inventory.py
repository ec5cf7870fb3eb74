"""The inventory: ``hosts.yaml`` parsed once into frozen dataclasses.

Everything an operator can get wrong is checked here, before any SSH connection is made.
Problems are collected rather than raised one at a time, so a single run lists every
mistake as ``FILE: YAML.PATH: message`` lines. Any string that later ends up in a shell
command, a config file or a path on a remote host must pass a strict regex here; free-text
values (URLs, JWT issuer/audience) are checked against a set of characters that can never
be legitimate in them.

The commented example ``hosts.yaml`` at the repository root documents every key.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import yaml

from . import inventory_files
from .hook_schema import Hooks, parse_hooks

__all__ = [
    "TIERS", "ENV_VAR", "DEFAULT_INVENTORY", "InventoryError", "Problem", "Host",
    "SshSettings", "JumpHost", "OperatorJwt", "ArtifactStorage", "AppSettings", "DatabaseSettings",
    "ReleaseSource", "AcmeSettings", "TlsSettings", "Inventory", "inventory_path", "load_inventory",
    "parse_inventory", "load_yaml_file", "UNREADABLE", "check_version", "did_you_mean",
    "VERSION_RE", "EgressAllow", "EgressSettings", "EGRESS_PINS", "Hooks",
]

TIERS = ("proxy", "app", "db")
ENV_VAR = "RELEASY_INVENTORY"
DEFAULT_INVENTORY = "hosts.yaml"

# Used with re.fullmatch only: "$" would also accept a trailing newline.
ENVIRONMENT_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
HOST_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
DB_IDENT_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
VERSION_RE = re.compile(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
DNS_NAME_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

ARCHES = ("x86_64", "arm64")
LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
DB_KINDS = ("postgres", "sqlite")
TLS_MODES = ("self-signed", "files", "acme")
LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
POSTGRES_PORT = 5432

# Characters that are never legitimate in the free-text values we accept (URLs, JWT
# issuer/audience): quoting, expansion and redirection characters, plus whitespace.
_UNSAFE_CHARS = frozenset(" \t\r\n\v\f\"'`$\\<>{}|^;")
_SHELL_META = frozenset(" \t\r\n;&|<>()$`\\\"'*?[]{}~!#%")

ROOT = "(top level)"
FILE = "(file)"


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file; ``path`` is the YAML path (or a file location)."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class InventoryError(Exception):
    """Every problem found in an inventory (or secrets file), one per line."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems: list[Problem] = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class JumpHost:
    """An SSH jump host (bastion): the hosts behind it are reached through one SSH
    connection to it, multiplexed (``direct-tcpip`` channels)."""

    name: str
    address: str  # where SSH connects
    private_address: str  # the source address the hosts behind it see for our SSH
    ssh_user: str
    ssh_port: int
    identity_file: Path | None  # None: ssh.identity_file (or ssh defaults)
    managed: bool = False  # True: also an inventory host (then its connection is shared)


@dataclass(frozen=True)
class Host:
    name: str
    address: str  # where SSH connects (IP literal or DNS name)
    private_address: str  # tier-to-tier traffic: upstreams, pg_hba, firewall rules
    ssh_user: str
    ssh_port: int
    tiers: tuple[str, ...]  # in TIERS order
    jump: JumpHost | None = None  # None: SSH connects directly

    @property
    def is_root(self) -> bool:
        return self.ssh_user == "root"

    def has(self, tier: str) -> bool:
        return tier in self.tiers


@dataclass(frozen=True)
class SshSettings:
    identity_file: Path | None
    connect_timeout: float


@dataclass(frozen=True)
class OperatorJwt:
    jwks_url: str
    issuer: str
    audience: str
    resource: str | None
    jwks_ttl_seconds: int
    jwt_leeway_seconds: int


@dataclass(frozen=True)
class ArtifactStorage:
    bucket: str
    region: str
    endpoint: str
    path_style: bool
    presign_expires_seconds: int


@dataclass(frozen=True)
class AppSettings:
    bind_port: int
    bluegreen_ports: tuple[int, int]
    service_user: str
    log_level: str
    public_base_url: str | None
    database_max_connections: int
    download_token_ttl_seconds: int
    releases_keep: int
    ready_timeout: int
    operator_jwt: OperatorJwt | None
    artifact_storage: ArtifactStorage | None


@dataclass(frozen=True)
class DatabaseSettings:
    kind: str  # "postgres" | "sqlite"
    name: str
    user: str
    backups_keep: int
    backup_before_deploy: bool
    # The PostgreSQL major to install on a fresh db host (e.g. "17"); None: the host
    # release's default. A host already running a cluster keeps its own major.
    postgres_version: str | None = None


def check_version(version: str) -> str:
    """Refuse a release version that could smuggle anything into a path or a command."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ValueError(
            f"invalid release version {version!r}: expected X.Y.Z with an optional "
            "-prerelease or +build suffix (e.g. 1.2.3, 1.2.3-rc.1)"
        )
    return version


@dataclass(frozen=True)
class ReleaseSource:
    source: str  # as written in the inventory
    is_url: bool
    directory: Path | None  # resolved local directory when not a URL
    arch: str
    sha256: Mapping[str, str] = field(hash=False)  # version -> hex, read-only
    sha256_file: Path | None

    def tarball_name(self, version: str) -> str:
        """The canonical file name; downloads are stored under it whatever the URL says."""
        return f"releasy-server-{check_version(version)}-linux-{self.arch}.tar.gz"

    def location(self, version: str) -> str:
        """The URL to download, or the local file path, for ``version``."""
        check_version(version)
        if self.is_url:
            return self.source.replace("{version}", version).replace("{arch}", self.arch)
        assert self.directory is not None
        return str(self.directory / self.tarball_name(version))

    def expected_sha256(self, version: str) -> str | None:
        """The pinned checksum for ``version``, or None if nothing pins it.

        Precedence: the inventory's ``release.sha256`` map, then ``release.sha256_file``,
        then (local directory sources only) a ``<tarball>.sha256`` sidecar file. Files are
        read now, not at load time, so sums added after loading are seen. Raises
        InventoryError if a file that is consulted is malformed or unreadable.
        """
        name = self.tarball_name(version)
        if version in self.sha256:
            return self.sha256[version]
        if self.sha256_file is not None:
            sums, problems = _parse_sums(_read_text(self.sha256_file))
            if problems:
                raise InventoryError(
                    Problem(str(self.sha256_file), where, msg) for where, msg in problems)
            if name in sums:
                return sums[name]
        if not self.is_url and self.directory is not None:
            sidecar = self.directory / (name + ".sha256")
            if sidecar.is_file():
                return _parse_sidecar(sidecar, name)
        return None


@dataclass(frozen=True)
class AcmeSettings:
    email: str
    directory_url: str  # Let's Encrypt production unless told otherwise (or staging)
    ca_bundle: Path | None  # PEM CA(s) the ACME server's own HTTPS certificate chains to


@dataclass(frozen=True)
class TlsSettings:
    mode: str  # "self-signed" | "files" | "acme"
    server_name: str
    certificate: Path | None
    key: Path | None
    acme: AcmeSettings | None = None  # with mode: acme


EGRESS_PINS = ("artifact_storage", "operator_jwt", "apt_proxy", "acme_directory")


@dataclass(frozen=True)
class EgressAllow:
    """One operator-given outgoing flow: hosts of ``tiers`` may reach ``to``:``port``."""

    to: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int
    proto: str  # tcp | udp
    tiers: tuple[str, ...]
    pin: str | None  # an endpoint (EGRESS_PINS) this entry replaces name resolution for


@dataclass(frozen=True)
class EgressSettings:
    """``egress:``. Off by default: outgoing traffic is allowed (today's behaviour)."""

    restrict: bool = False
    allow: tuple[EgressAllow, ...] = ()
    apt_proxy: str | None = None  # http://HOST:PORT/, used by apt on every host


@dataclass(frozen=True)
class Inventory:
    path: Path  # absolute path of the inventory file
    environment: str
    admin_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    known_hosts: Path
    ssh: SshSettings
    hosts: tuple[Host, ...]  # file order
    app: AppSettings
    database: DatabaseSettings
    release: ReleaseSource
    tls: TlsSettings
    secrets_file: Path
    jump_hosts: tuple[JumpHost, ...] = ()  # every jump host some host uses, file order
    egress: EgressSettings = EgressSettings()
    hooks: Hooks = Hooks()
    #: the shared settings file merged under ``path`` (RELEASY_ENV), if any
    base_path: Path | None = None

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host named {name!r} in {self.path}")

    def hosts_in(self, tier: str) -> tuple[Host, ...]:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; tiers are {', '.join(TIERS)}")
        return tuple(h for h in self.hosts if tier in h.tiers)

    @property
    def db_host(self) -> Host:
        """The database host (validation guarantees exactly one)."""
        return self.hosts_in("db")[0]

    @property
    def is_single_host(self) -> bool:
        return len(self.hosts) == 1

    @property
    def topology(self) -> str:
        """``"single"`` when there is exactly one host, else ``"split"``."""
        return "single" if self.is_single_host else "split"


# --------------------------------------------------------------------------- entry points


def inventory_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Which inventory to use: ``explicit`` > ``$RELEASY_INVENTORY`` > ``./hosts.yaml``."""
    for candidate in (explicit, os.environ.get(ENV_VAR)):
        if candidate is not None and str(candidate) != "":
            return Path(candidate).expanduser()
    return Path(DEFAULT_INVENTORY)


def load_inventory(path: str | os.PathLike[str] | None = None, *,
                   check_files: bool = True) -> Inventory:
    """Read, parse and validate the inventory; raise InventoryError listing every problem.

    ``check_files=False`` skips the checks that need files next to the inventory
    (known_hosts, TLS certificate/key, identity file, local release directory,
    sha256_file): useful to validate an inventory away from the operator's machine.
    """
    problems: list[Problem] = []
    try:
        selection = inventory_files.select() if path is None else None
    except ValueError as exc:
        raise InventoryError([Problem(inventory_files.ENV_SELECT_VAR, FILE, str(exc))]) from None
    if selection is not None:
        return _load_environment(selection, check_files, problems)
    p = inventory_path(path)
    data = load_yaml_file(p, problems)
    if data is UNREADABLE:
        raise InventoryError(problems)
    return _Parser(p, check_files, problems).run(data)


def _load_environment(sel: inventory_files.Selection, check_files: bool,
                      problems: list[Problem]) -> Inventory:
    """RELEASY_ENV: the environment's file merged over the shared one, every value
    remembering its file (see `inventory_files`)."""
    env = load_yaml_file(sel.path, problems)
    base = load_yaml_file(sel.base, problems) if sel.base is not None else None
    if env is UNREADABLE or base is UNREADABLE:
        raise InventoryError(problems)
    problems += [Problem(*found) for found in inventory_files.environment_problems(sel, base, env)]
    origins = inventory_files.Origins(str(sel.path))
    merged = inventory_files.merge(base, env, str(sel.base), str(sel.path), origins)
    if merged is not None and not isinstance(merged, dict):
        problems.append(Problem(str(sel.path), ROOT, "must be a mapping of inventory keys"))
        raise InventoryError(problems)
    merged = inventory_files.defaults_for(sel, merged or {}, origins)
    return _Parser(sel.path, check_files, problems, origins=origins,
                   base_path=sel.base).run(merged)


def parse_inventory(data: Any, path: str | os.PathLike[str], *,
                    check_files: bool = True) -> Inventory:
    """Validate already-loaded YAML data; ``path`` names the file and anchors relative paths."""
    return _Parser(Path(path), check_files, []).run(data)


# --------------------------------------------------------------------------- YAML loading

UNREADABLE = object()


def load_yaml_file(path: Path, problems: list[Problem], *, quote_errors: bool = True) -> Any:
    """Load one YAML document, recording problems instead of raising.

    Returns ``UNREADABLE`` when nothing usable could be read. Duplicate mapping keys are
    reported (YAML itself would silently keep the last one). With ``quote_errors=False``
    syntax errors carry only their position, never a snippet of the file (secrets).
    """
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(Problem(file, FILE, (
            f"no such file (looked for {path.absolute()}); pass the inventory path, set "
            f"{ENV_VAR}=PATH, or start from the example hosts.yaml in the repository")))
        return UNREADABLE
    except UnicodeDecodeError as e:
        problems.append(Problem(file, FILE, f"not UTF-8 text (byte {e.start})"))
        return UNREADABLE
    except OSError as e:
        problems.append(Problem(file, FILE, f"cannot read: {e.strerror or e}"))
        return UNREADABLE

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _report_duplicate_keys(node, "", file, problems, set())
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else FILE
        what = e.problem or "invalid YAML"
        if quote_errors and e.context:
            what = f"{what} ({e.context})"
        problems.append(Problem(file, where, f"YAML syntax error: {what}"))
        return UNREADABLE
    except yaml.YAMLError as e:
        problems.append(Problem(file, FILE, f"YAML error: {e if quote_errors else type(e).__name__}"))
        return UNREADABLE
    finally:
        loader.dispose()


def _report_duplicate_keys(node: yaml.Node, ypath: str, file: str,
                           problems: list[Problem], seen: set[int]) -> None:
    if id(node) in seen:  # aliases share nodes; also guards recursive documents
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                _report_duplicate_keys(value, ypath, file, problems, seen)
                continue
            if key.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" overrides are intended
                _report_duplicate_keys(value, ypath, file, problems, seen)
                continue
            child = _join(ypath, key.value)
            line = key.start_mark.line + 1
            ident = (key.tag, key.value)
            if ident in first:
                problems.append(Problem(file, child, (
                    f"duplicate key (first on line {first[ident]}, again on line {line}); "
                    "YAML would silently keep only the last one")))
            else:
                first[ident] = line
            _report_duplicate_keys(value, child, file, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _report_duplicate_keys(item, f"{ypath}[{i}]", file, problems, seen)


def _join(ypath: str, key: Any) -> str:
    """Extend a YAML path: dotted for plain keys, bracketed/quoted for anything else."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return f"{ypath}.{key}" if ypath else key
    shown = json.dumps(key) if isinstance(key, str) else repr(key)
    return f"{ypath}[{shown}]"


# --------------------------------------------------------------------------- value checks


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


# --------------------------------------------------------------------------- sha256 files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise InventoryError([Problem(str(path), FILE, f"cannot read: {reason}")]) from None


def _parse_sums(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Parse ``sha256sum`` output: ``<hex>  <name>`` or ``<hex> *<name>`` per line.

    Names are matched by their basename so ``./dir/name`` entries work too.
    """
    sums: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9A-Fa-f]{64}) [ *]?(\S.*)", line)
        if not m:
            problems.append((f"line {n}", "expected '<64 hex digits>  <file name>' (sha256sum format)"))
            continue
        name = m.group(2).strip().lstrip("*").rsplit("/", 1)[-1]
        digest = m.group(1).lower()
        if sums.get(name, digest) != digest:
            problems.append((f"line {n}", f"{name} is listed twice with different sums"))
        sums[name] = digest
    return sums, problems


def _parse_sidecar(path: Path, tarball: str) -> str:
    fields = _read_text(path).split()
    if not fields or not re.fullmatch(r"[0-9A-Fa-f]{64}", fields[0]):
        raise InventoryError([Problem(str(path), "line 1", "expected a sha256 hex digest (64 hex digits)")])
    if len(fields) > 1 and fields[1].lstrip("*").rsplit("/", 1)[-1] != tarball:
        raise InventoryError([Problem(str(path), "line 1", f"names {fields[1]!r}, expected {tarball!r}")])
    return fields[0].lower()


# --------------------------------------------------------------------------- the parser

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


class _Parser:
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

    # -- the document

    def run(self, data: Any) -> Inventory:
        inv = self.document(data)
        if self.problems or inv is None:
            raise InventoryError(self.problems)
        return inv

    def document(self, data: Any) -> Inventory | None:
        if data is None:
            self.error(ROOT, "the inventory is empty; see the example hosts.yaml for the schema")
            return None
        top = self.mapping(data, "", TOP_KEYS)
        if top is None:
            return None
        environment = self.field(top, "", "environment", _regex(ENVIRONMENT_RE, _ENV_EXPECT),
                                 expect=_ENV_EXPECT)
        admin_cidrs = self.admin_cidrs(top)
        ssh, ssh_user, ssh_port = self.ssh(top)
        jump_specs = self.jump_hosts(top, ssh_user, ssh_port, ssh)
        hosts = self.hosts(top, ssh_user, ssh_port)
        tiers = self.tiers(top, hosts)
        app = self.app(top)
        database = self.database(top)
        release = self.release(top)
        tls = self.tls(top)
        sec = self.section(top, "", "secrets", SECRETS_KEYS)
        secrets_file = self.field(sec, "secrets", "file", self.path_value,
                                  self.base / "secrets.yaml")
        egress = self.egress(top, app, tls)
        hooks = parse_hooks(top.get("hooks"), self.error)

        host_objs = self.build_hosts(hosts or {}, tiers)
        host_objs = self.resolve_jumps(top, host_objs, hosts or {}, jump_specs, ssh)
        jumps_used = tuple(dict.fromkeys(h.jump for h in host_objs if h.jump is not None))
        known_hosts = self.field(top, "", "known_hosts", self.path_value,
                                 expect="a file path (relative to the inventory's directory)")
        self.existing_file("known_hosts", known_hosts, self.keyscan_hint(known_hosts, host_objs))
        if hosts is not None:
            self.cross_checks(host_objs, tiers, app, database)

        if self.problems:
            return None
        return Inventory(
            path=self.path.absolute(), environment=environment, admin_cidrs=admin_cidrs,
            known_hosts=known_hosts, ssh=ssh, hosts=host_objs, app=app, database=database,
            release=release, tls=tls, secrets_file=secrets_file, jump_hosts=jumps_used,
            egress=egress, hooks=hooks, base_path=self.base_path and self.base_path.absolute())

    def egress(self, top: dict[str, Any], app: AppSettings | None,
               tls: TlsSettings | None) -> EgressSettings:
        e = self.section(top, "", "egress", EGRESS_KEYS)
        if e is None:
            return EgressSettings()
        restrict = self.field(e, "egress", "restrict", _bool, False)
        apt_proxy = self.field(e, "egress", "apt_proxy", _url, None)
        if apt_proxy is not None and urlsplit(apt_proxy).scheme != "http":
            self.error("egress.apt_proxy", f"{_show(apt_proxy)}: apt talks to a proxy over "
                                           "plain http (http://HOST:PORT); https sources "
                                           "still work through it (CONNECT)")
        raw = e.get("allow")
        allow: list[EgressAllow] = []
        if raw is not None and not isinstance(raw, list):
            self.error("egress.allow", f"must be a list of {{to, port, proto, tiers}} "
                                       f"entries; got {_kind(raw)}")
            raw = None
        for i, item in enumerate(raw or []):
            entry = self.egress_allow(item, f"egress.allow[{i}]", app, apt_proxy, tls)
            if entry is not None:
                if entry in allow:
                    self.error(f"egress.allow[{i}]", "is listed twice")
                allow.append(entry)
        return EgressSettings(bool(restrict), tuple(allow), apt_proxy)

    def egress_allow(self, item: Any, p: str, app: AppSettings | None,
                     apt_proxy: str | None, tls: TlsSettings | None) -> EgressAllow | None:
        m = self.mapping(item, p, EGRESS_ALLOW_KEYS)
        if m is None:
            return None
        before = len(self.problems)
        to = self.field(m, p, "to", self._egress_network,
                        expect="a network in CIDR form like 203.0.113.0/24 (or one address)")
        port = self.field(m, p, "port", _int(1, 65535), expect="a port number 1..65535")
        proto = self.field(m, p, "proto", _choice(("tcp", "udp")), "tcp")
        tiers = self.field(m, p, "tiers", self._tier_list, TIERS)
        pin = self.field(m, p, "pin", _choice(EGRESS_PINS), None)
        if pin is not None and tiers is not None:
            configured = {"artifact_storage": app is not None and app.artifact_storage,
                          "operator_jwt": app is not None and app.operator_jwt,
                          "apt_proxy": apt_proxy,
                          "acme_directory": tls is not None and tls.mode == "acme"}[pin]
            if not configured:
                where = {"apt_proxy": "egress.apt_proxy",
                         "acme_directory": "tls.mode: acme"}.get(pin, f"app.{pin}")
                self.error(f"{p}.pin", f"pins {pin}, but {where} is not configured")
            elif pin == "acme_directory" and "proxy" not in tiers:
                self.error(f"{p}.tiers", f"pins {pin}, which the proxy tier reaches: "
                                         "list proxy in tiers")
            elif pin not in ("apt_proxy", "acme_directory") and "app" not in tiers:
                self.error(f"{p}.tiers", f"pins {pin}, which the app tier reaches: "
                                         "list app in tiers")
        if len(self.problems) != before:
            return None
        return EgressAllow(to, port, proto, tiers, pin)

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

    @classmethod
    def _egress_network(cls, v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        expect = "a network in CIDR form like 203.0.113.0/24 or 2001:db8::/32 (or one address)"
        return cls._network(v, expect=expect, not_network=expect,
                            whole="is the whole internet, which defeats egress.restrict; "
                                  "name the networks")

    @staticmethod
    def _tier_list(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list) or not v:
            raise _Bad(f"must be a non-empty list of tiers ({', '.join(TIERS)}); "
                       f"got {_kind(v)}")
        out = []
        for t in v:
            if t not in TIERS:
                raise _Bad(f"unknown tier {_show(t)}{did_you_mean(t, TIERS)}; tiers are "
                           f"{', '.join(TIERS)}")
            if t not in out:
                out.append(t)
        return tuple(t for t in TIERS if t in out)

    def admin_cidrs(self, top: dict[str, Any]) -> tuple[Any, ...]:
        expect = "a non-empty list of networks SSH is allowed from, e.g. [203.0.113.0/24]"
        if "admin_cidrs" not in top:
            self.error("admin_cidrs", f"required key is missing; expected {expect}")
            return ()
        raw = top["admin_cidrs"]
        if not isinstance(raw, list) or not raw:
            self.error("admin_cidrs", f"must be {expect}; got {_kind(raw)}")
            return ()
        nets: list[Any] = []
        for i, v in enumerate(raw):
            p = f"admin_cidrs[{i}]"
            try:
                net = self._network(
                    v, expect="a network in CIDR form like 203.0.113.0/24",
                    not_network="a network in CIDR form like 203.0.113.0/24 or 2001:db8::/32",
                    whole="would allow SSH from the whole internet; list the operators'"
                          " networks instead")
            except _Bad as exc:
                self.error(p, str(exc))
                continue
            if net in nets:
                self.error(p, f"{v} is listed twice")
            else:
                nets.append(net)
        return tuple(nets)

    def jump_hosts(self, top: dict[str, Any], user: str | None, port: int | None,
                   ssh: SshSettings) -> dict[str, JumpHost]:
        """``jump_hosts:``: bastions that are not inventory hosts (name -> JumpHost)."""
        if top.get("jump_hosts") is None:
            return {}
        raw = self.mapping(top["jump_hosts"], "jump_hosts", None) or {}
        out: dict[str, JumpHost] = {}
        for name, spec in raw.items():
            p = _join("jump_hosts", name)
            if not HOST_NAME_RE.fullmatch(name):
                self.error(p, f"invalid jump host name {_show(name)}{_meta_note(name)}; "
                              f"must be {_HOST_EXPECT}")
                continue
            m = self.mapping(spec if spec is not None else {}, p, JUMP_KEYS)
            if m is None:
                continue
            address = self.field(m, p, "address", _address,
                                 expect="the IP address or DNS name SSH connects to")
            private = self.field(m, p, "private_address", lambda v: str(_ip(v)), None)
            if private is None and address is not None and "private_address" not in m:
                if _is_ip(address):
                    private = address
                else:
                    self.error(f"{p}.private_address", (
                        f"required when address is a DNS name ({address}): the hosts behind "
                        "it allow SSH from this address only, so it must be an IP literal"))
            identity = self.field(m, p, "identity_file", self.path_value, ssh.identity_file)
            if "identity_file" in m:
                self.existing_file(f"{p}.identity_file", identity)
            if address is None:
                continue
            out[name] = JumpHost(
                name=name, address=address, private_address=private,
                ssh_user=self.field(m, p, "user", _regex(USER_RE, _USER_EXPECT), user),
                ssh_port=self.field(m, p, "port", _int(1, 65535), port),
                identity_file=identity)
        return out

    def resolve_jumps(self, top: dict[str, Any], hosts: tuple[Host, ...],
                      raw: dict[str, dict[str, Any]], specs: dict[str, JumpHost],
                      ssh: SshSettings | None) -> tuple[Host, ...]:
        """Give every host its jump host: its own ``jump:``, else ``ssh.jump``. A jump host
        that is an inventory host is reached directly itself (no chains)."""
        s = top.get("ssh") if isinstance(top.get("ssh"), dict) else {}
        default = None
        if "jump" in s:
            try:
                default = _jump_ref(s["jump"])
            except _Bad:
                default = None  # reported by ssh()
        by_name = {h.name: h for h in hosts}
        for name in specs:
            if name in by_name:
                self.error(_join("jump_hosts", name), (
                    f"{name!r} is also an inventory host; an inventory host can be a jump "
                    "host as it is (ssh.jump / jump: NAME), remove it from jump_hosts"))

        def lookup(ref: str, ypath: str) -> JumpHost | None:
            if ref in specs:
                return specs[ref]
            if ref in by_name:
                h = by_name[ref]
                private = h.private_address
                if private is None or not _is_ip(private):
                    self.error(ypath, f"jump host {ref!r} needs an IP literal private_address: "
                                      "the hosts behind it allow SSH from that address only")
                    return None
                return JumpHost(name=h.name, address=h.address, private_address=private,
                                ssh_user=h.ssh_user, ssh_port=h.ssh_port,
                                identity_file=ssh.identity_file if ssh else None, managed=True)
            known = sorted({*specs, *by_name})
            self.error(ypath, f"unknown jump host {_show(ref)}{did_you_mean(ref, known)}; "
                              "name an inventory host or an entry of jump_hosts")
            return None

        default_jump = lookup(default, "ssh.jump") if default else None
        used_as_jump = set()
        result = []
        for h in hosts:
            own = raw.get(h.name, {}).get("jump")
            given = own is not None
            if given:
                jump = None if own is False else lookup(own, f"hosts.{h.name}.jump")
            else:
                jump = default_jump
            if jump is not None and jump.name == h.name:
                if given:
                    self.error(f"hosts.{h.name}.jump", "a host cannot be its own jump host")
                jump = None  # the jump host itself: direct
            if jump is not None:
                used_as_jump.add(jump.name)
            result.append(Host(name=h.name, address=h.address, private_address=h.private_address,
                               ssh_user=h.ssh_user, ssh_port=h.ssh_port, tiers=h.tiers,
                               jump=jump))
        for h in result:
            if h.name in used_as_jump and h.jump is not None:
                self.error(f"hosts.{h.name}.jump", (
                    f"{h.name} is a jump host for other hosts, so it must be reached directly "
                    "(chained jump hosts are not supported): set `jump: false` here"))
        return tuple(result)

    def ssh(self, top: dict[str, Any]) -> tuple[SshSettings, str | None, int | None]:
        s = self.section(top, "", "ssh", SSH_KEYS)
        user = self.field(s, "ssh", "user", _regex(USER_RE, _USER_EXPECT), "root")
        port = self.field(s, "ssh", "port", _int(1, 65535), 22)
        identity = self.field(s, "ssh", "identity_file", self.path_value, None)
        self.existing_file("ssh.identity_file", identity)
        timeout = self.field(s, "ssh", "connect_timeout", _seconds(600), 10.0)
        self.field(s, "ssh", "jump", _jump_ref, None)  # resolved in resolve_jumps
        return SshSettings(identity_file=identity, connect_timeout=timeout), user, port

    def hosts(self, top: dict[str, Any], user: str | None,
              port: int | None) -> dict[str, dict[str, Any]] | None:
        """name -> validated fields (None where invalid), in file order; None when the
        section is missing or not a mapping (then tier references cannot be checked)."""
        if "hosts" not in top:
            self.error("hosts", "required key is missing; expected a mapping of host name -> "
                                "{address: ...}")
            return None
        raw = self.mapping(top["hosts"], "hosts", None)
        if raw is None:
            return None
        if not raw:
            self.error("hosts", "must define at least one host")
        out: dict[str, dict[str, Any]] = {}
        for name, spec in raw.items():
            p = _join("hosts", name)
            if not HOST_NAME_RE.fullmatch(name):
                self.error(p, f"invalid host name {_show(name)}{_meta_note(name)}; "
                              f"must be {_HOST_EXPECT}")
            if spec is None:
                self.error(p, "host has no settings; at least `address:` is required")
                out[name] = {"address": None}
                continue
            m = self.mapping(spec, p, HOST_KEYS)
            address = self.field(m, p, "address", _address,
                                 expect="the IP address or DNS name SSH connects to")
            private_given = m is not None and "private_address" in m
            private = self.field(m, p, "private_address", lambda v: str(_ip(v)), None)
            out[name] = {
                "address": address,
                "private_address": private,
                "private_given": private_given,
                "ssh_user": self.field(m, p, "ssh_user", _regex(USER_RE, _USER_EXPECT), user),
                "ssh_port": self.field(m, p, "ssh_port", _int(1, 65535), port),
                "jump": self.field(m, p, "jump", _jump_ref, None),
            }
        return out

    def tiers(self, top: dict[str, Any],
              hosts: dict[str, dict[str, Any]] | None) -> dict[str, list[str]] | None:
        """tier -> listed host names; None when the section is missing or not a mapping."""
        expect = "a mapping of tier -> list of host names, tiers: proxy, app, db"
        if "tiers" not in top:
            self.error("tiers", f"required key is missing; expected {expect}")
            return None
        m = self.mapping(top["tiers"], "tiers", TIERS)
        if m is None:
            return None
        out: dict[str, list[str]] = {}
        for tier in TIERS:
            p = f"tiers.{tier}"
            if tier not in m or m[tier] is None:
                continue  # reported by cross_checks, which knows what is missing and why
            names = m[tier]
            if not isinstance(names, list):
                hint = f" (write [{names}])" if isinstance(names, str) else ""
                self.error(p, f"must be a list of host names{hint}; got {_kind(names)}")
                self.bad_tiers.add(tier)
                continue
            listed: list[str] = []
            for i, name in enumerate(names):
                ip = f"{p}[{i}]"
                if not isinstance(name, str):
                    self.error(ip, f"must be a host name; got {_kind(name)}")
                elif hosts is None:
                    listed.append(name)  # no hosts section: already reported
                elif name not in hosts:
                    defined = ", ".join(hosts) or "none"
                    self.error(ip, f"host {_show(name)} is not defined under hosts"
                                   f"{did_you_mean(name, hosts)}; defined hosts: {defined}")
                elif name in listed:
                    self.error(ip, f"host {name!r} is listed twice in this tier")
                else:
                    listed.append(name)
            out[tier] = listed
        return out

    def build_hosts(self, hosts: dict[str, dict[str, Any]],
                    tiers: dict[str, list[str]] | None) -> tuple[Host, ...]:
        result = []
        for name, h in hosts.items():
            host_tiers = tuple(t for t in TIERS if name in (tiers or {}).get(t, ()))
            if not host_tiers and tiers is not None and not self.bad_tiers:
                self.error(_join("hosts", name), "host is not in any tier; add it under tiers "
                                                 "(proxy, app, db) or remove it")
            private = h.get("private_address") or h.get("address")
            result.append(Host(name=name, address=h.get("address"), private_address=private,
                               ssh_user=h.get("ssh_user"), ssh_port=h.get("ssh_port"),
                               tiers=host_tiers))
        self.address_checks(hosts, result)
        return tuple(result)

    def address_checks(self, raw: dict[str, dict[str, Any]], hosts: list[Host]) -> None:
        multi = len(hosts) > 1
        seen_ssh: dict[tuple[str, int], str] = {}
        seen_private: dict[str, str] = {}
        for h in hosts:
            p = _join("hosts", h.name)
            if h.address is None:
                continue
            # Same address on another SSH port is allowed (port-forwarded labs); the
            # private addresses below must still differ.
            endpoint = (h.address, h.ssh_port)
            dup_endpoint = endpoint in seen_ssh
            if dup_endpoint:
                self.error(f"{p}.address", (
                    f"{h.address} (port {h.ssh_port}) is also the address of host "
                    f"{seen_ssh[endpoint]!r}; one machine carrying several tiers is one host "
                    "entry listed in several tiers"))
            seen_ssh.setdefault(endpoint, h.name)
            given = raw[h.name].get("private_given", False)
            if multi and not given and not _is_ip(h.address):
                self.error(f"{p}.private_address", (
                    f"required when address is a DNS name ({h.address}) and there are several "
                    "hosts: tier-to-tier rules (firewall, pg_hba, upstreams) need an IP literal"))
                continue
            if h.private_address is None or not _is_ip(h.private_address):
                continue
            where = f"{p}.private_address" if given else f"{p}.address"
            if multi and ipaddress.ip_address(h.private_address).is_loopback:
                self.error(where, (
                    f"{h.private_address} is a loopback address, which other hosts cannot "
                    "reach; set private_address to an address the other hosts can reach"))
            elif h.private_address in seen_private and not (dup_endpoint and not given):
                self.error(where, (
                    f"private address {h.private_address} is also used by host "
                    f"{seen_private[h.private_address]!r}; each host needs its own"
                    + ("" if given else " (set private_address)")))
            seen_private.setdefault(h.private_address, h.name)

    def cross_checks(self, hosts: tuple[Host, ...], tiers: dict[str, list[str]] | None,
                     app: AppSettings | None, database: DatabaseSettings | None) -> None:
        if tiers is None:
            return  # the missing/invalid section was already reported
        proxies = [h for h in hosts if "proxy" in h.tiers]
        apps = [h for h in hosts if "app" in h.tiers]
        dbs = [h for h in hosts if "db" in h.tiers]
        if not proxies and "proxy" not in self.bad_tiers:
            self.error("tiers.proxy", "no proxy host: list at least one host (the proxy "
                                      "terminates TLS and is the only public entry point)")
        if not apps and "app" not in self.bad_tiers:
            self.error("tiers.app", "no app host: list at least one host to run Releasy")
        if not dbs and "db" not in self.bad_tiers:
            self.error("tiers.db", "no database host: list exactly one host (for sqlite, the app host)")
        elif len(dbs) > 1:
            self.error("tiers.db", f"only one database host is supported; got "
                                      f"{', '.join(h.name for h in dbs)}")
        if database is None or database.kind is None:
            return
        if database.kind == "sqlite" and apps and dbs:
            if len(apps) > 1:
                self.error("database.kind", (
                    f"sqlite needs a single app host, but tiers.app lists {len(apps)} "
                    f"({', '.join(h.name for h in apps)}); use kind: postgres"))
            elif apps[0].name != dbs[0].name:
                self.error("database.kind", (
                    f"sqlite needs the app and db tiers on the same host, but app is "
                    f"{apps[0].name!r} and db is {dbs[0].name!r}; use kind: postgres or "
                    "list one host in both tiers"))
        if (database.kind == "postgres" and app is not None and app.bluegreen_ports
                and None not in app.bluegreen_ports and POSTGRES_PORT in app.bluegreen_ports
                and any("db" in h.tiers for h in apps)):
            self.error("app.bluegreen_ports", f"port {POSTGRES_PORT} is PostgreSQL's, which "
                                              "runs on the same host as the app")

    def keyscan_hint(self, known_hosts: Path | None, hosts: tuple[Host, ...]) -> str:
        by_port: dict[int, list[str]] = {}
        for h in hosts:
            if h.address is not None and h.ssh_port is not None:
                by_port.setdefault(h.ssh_port, []).append(h.address)
        if not by_port or known_hosts is None:
            return ("; create it with `ssh-keyscan -t ed25519 HOST... > known_hosts` and "
                    "verify the fingerprints (ssh-keygen -lf known_hosts) out of band")
        cmds = " && ".join(
            f"ssh-keyscan -t ed25519 -p {port} {' '.join(addrs)} >> {known_hosts}"
            for port, addrs in by_port.items())
        return (f"; create it with `{cmds}`, then check every fingerprint "
                f"(`ssh-keygen -lf {known_hosts}`) against the hosts' consoles before trusting it")

    def app(self, top: dict[str, Any]) -> AppSettings | None:
        a = self.section(top, "", "app", APP_KEYS)
        if a is None:
            return None
        bind_given = "bind_port" in a
        bind = self.field(a, "app", "bind_port", _int(1024, 65535), 8080)
        bluegreen = self.bluegreen(a, bind, bind_given)
        if "bluegreen_ports" in a and not bind_given and bluegreen:
            bind = bluegreen[0]  # an explicit pair with no bind_port: blue is the first one
        service_user = self.field(a, "app", "service_user", _regex(USER_RE, _USER_EXPECT), "releasy")
        if service_user == "root":
            self.error("app.service_user", "Releasy must not run as root; use an unprivileged "
                                           "user such as releasy")
        return AppSettings(
            bind_port=bind,
            bluegreen_ports=bluegreen,
            service_user=service_user,
            log_level=self.field(a, "app", "log_level", _choice(LOG_LEVELS), "info"),
            public_base_url=self.field(a, "app", "public_base_url", _url, None),
            database_max_connections=self.field(a, "app", "database_max_connections",
                                                 _int(1, 1000), 5),
            download_token_ttl_seconds=self.field(a, "app", "download_token_ttl_seconds",
                                                  _int(1, 4294967295), 600),
            releases_keep=self.field(a, "app", "releases_keep", _int(2, 100), 5),
            ready_timeout=self.field(a, "app", "ready_timeout", _int(1, 3600), 60),
            operator_jwt=self.operator_jwt(a),
            artifact_storage=self.artifact_storage(a),
        )

    def bluegreen(self, a: dict[str, Any], bind: int | None, bind_given: bool) -> tuple[int, int] | None:
        p = "app.bluegreen_ports"
        if "bluegreen_ports" not in a:
            if bind is None:
                return None
            if bind + 1 > 65535:
                self.error("app.bind_port", f"{bind} leaves no room for the second blue/green "
                                            "port; set app.bluegreen_ports explicitly")
                return None
            return (bind, bind + 1)
        raw = a["bluegreen_ports"]
        if not isinstance(raw, list) or len(raw) != 2:
            self.error(p, f"must be a list of two distinct ports, e.g. [8080, 8081]; got {_kind(raw)}"
                          + (f" with {len(raw)} items" if isinstance(raw, list) else ""))
            return None
        ports = []
        for i, v in enumerate(raw):
            try:
                ports.append(_int(1024, 65535)(v))
            except _Bad as e:
                self.error(f"{p}[{i}]", str(e))
        if len(ports) != 2:
            return None
        if ports[0] == ports[1]:
            self.error(f"{p}[1]", f"the two ports must differ; both are {ports[0]}")
            return None
        if bind_given and bind is not None and bind not in ports:
            self.error("app.bind_port", f"{bind} is not one of app.bluegreen_ports "
                                        f"{ports}; bind_port is the first instance's port")
        return (ports[0], ports[1])

    def operator_jwt(self, a: dict[str, Any]) -> OperatorJwt | None:
        if "operator_jwt" not in a or a["operator_jwt"] is None:
            return None
        p = "app.operator_jwt"
        j = self.section(a, "app", "operator_jwt", JWT_KEYS)
        if j is None:
            return None
        expect = "jwks_url, issuer and audience, which are required together"
        return OperatorJwt(
            jwks_url=self.field(j, p, "jwks_url", _url, expect=expect),
            issuer=self.field(j, p, "issuer", _text, expect=expect),
            audience=self.field(j, p, "audience", _text, expect=expect),
            resource=self.field(j, p, "resource", _text, None),
            jwks_ttl_seconds=self.field(j, p, "jwks_ttl_seconds", _int(1, 86400 * 7), 300),
            jwt_leeway_seconds=self.field(j, p, "jwt_leeway_seconds", _int(0, 3600), 0),
        )

    def artifact_storage(self, a: dict[str, Any]) -> ArtifactStorage | None:
        if "artifact_storage" not in a or a["artifact_storage"] is None:
            return None
        p = "app.artifact_storage"
        s = self.section(a, "app", "artifact_storage", STORAGE_KEYS)
        if s is None:
            return None
        expect = "bucket, region and endpoint, which are required together"
        return ArtifactStorage(
            bucket=self.field(s, p, "bucket", _regex(BUCKET_RE, "an S3 bucket name: 3-63 of "
                              "a-z 0-9 '.' '-', starting and ending with a letter or digit"),
                              expect=expect),
            region=self.field(s, p, "region", _regex(REGION_RE, "a region like eu-central-1"),
                              expect=expect),
            endpoint=self.field(s, p, "endpoint", _url, expect=expect),
            path_style=self.field(s, p, "path_style", _bool, False),
            presign_expires_seconds=self.field(s, p, "presign_expires_seconds",
                                               _int(1, 604800), 900),
        )

    def database(self, top: dict[str, Any]) -> DatabaseSettings | None:
        d = self.section(top, "", "database", DB_KEYS)
        if d is None:
            return None
        return DatabaseSettings(
            kind=self.field(d, "database", "kind", _choice(DB_KINDS), "postgres"),
            name=self.field(d, "database", "name", _regex(DB_IDENT_RE, _DB_EXPECT), "releasy"),
            user=self.field(d, "database", "user", _regex(DB_IDENT_RE, _DB_EXPECT), "releasy"),
            backups_keep=self.field(d, "database", "backups_keep", _int(1, 1000), 5),
            backup_before_deploy=self.field(d, "database", "backup_before_deploy", _bool, True),
            postgres_version=self.field(d, "database", "postgres_version", _pg_major, None),
        )

    def release(self, top: dict[str, Any]) -> ReleaseSource | None:
        r = self.section(top, "", "release", RELEASE_KEYS, required=True)
        if r is None:
            return None
        arch = self.field(r, "release", "arch",
                          _choice(ARCHES, {"amd64": "x86_64", "aarch64": "arm64", "x64": "x86_64"}),
                          "x86_64")
        source = self.field(r, "release", "source", _source_text, expect=(
            "an http(s) URL template containing {version} (optionally {arch}), or a local "
            "directory holding releasy-server-{version}-linux-{arch}.tar.gz files"))
        is_url = isinstance(source, str) and "://" in source
        directory = None
        if isinstance(source, str):
            if is_url:
                self.release_url(source)
            else:
                directory = self.release_dir(source)
        sha256 = self.release_sha256(r)
        sha256_file = self.field(r, "release", "sha256_file", self.path_value, None)
        if sha256_file is not None:
            self.existing_file("release.sha256_file", sha256_file)
            if self.check_files and sha256_file.is_file():
                try:
                    _, bad = _parse_sums(_read_text(sha256_file))
                except InventoryError as e:
                    self.problems.extend(e.problems)
                else:
                    self.problems.extend(Problem(str(sha256_file), w, m) for w, m in bad)
        if is_url and not r.get("sha256") and "sha256_file" not in r:
            self.error("release.sha256", (
                "a URL source needs pinned checksums: add release.sha256 (version: sha256) "
                "or release.sha256_file; downloads are never trusted unverified"))
        return ReleaseSource(source=source, is_url=is_url, directory=directory, arch=arch,
                             sha256=MappingProxyType(dict(sha256)), sha256_file=sha256_file)

    def release_url(self, source: str) -> None:
        p = "release.source"
        placeholders = set(re.findall(r"\{[^{}]*\}", source))
        unknown = placeholders - {"{version}", "{arch}"}
        if unknown:
            self.error(p, f"unknown placeholder(s) {', '.join(sorted(unknown))}; only {{version}} "
                          "and {arch} are substituted")
            return
        if "{version}" not in placeholders:
            self.error(p, "the URL must contain {version}, e.g. "
                          ".../download/v{version}/releasy-server-linux-{arch}.tar.gz")
            return
        try:
            _url(source.replace("{version}", "1.0.0").replace("{arch}", "x86_64"))
        except _Bad as e:
            self.error(p, str(e).replace("'1.0.0'", "{version}"))

    def release_dir(self, source: str) -> Path | None:
        p = "release.source"
        if "{" in source or "}" in source:
            self.error(p, "a local directory source takes no placeholders: it names the "
                          "directory holding releasy-server-{version}-linux-{arch}.tar.gz files")
            return None
        try:
            directory = self.path_value(source)
        except _Bad as e:
            self.error(p, str(e))
            return None
        if self.check_files and not directory.is_dir():
            self.error(p, f"not a URL (http:// or https://) and not an existing directory: {directory}")
        return directory

    def release_sha256(self, r: dict[str, Any]) -> dict[str, str]:
        if "sha256" not in r or r["sha256"] is None:
            return {}
        m = self.mapping(r["sha256"], "release.sha256", None)
        out: dict[str, str] = {}
        for version, digest in (m or {}).items():
            p = _join("release.sha256", version)
            if not VERSION_RE.fullmatch(version):
                self.error(p, f"invalid version {_show(version)}; expected X.Y.Z with an optional "
                              "-prerelease/+build suffix, quoted (e.g. \"1.2.3\")")
                continue
            if not isinstance(digest, str):
                self.error(p, f"must be a sha256 digest (64 lowercase hex digits); got {_kind(digest)}")
            elif not SHA256_RE.fullmatch(digest):
                note = " (use lowercase)" if SHA256_RE.fullmatch(digest.lower()) else ""
                self.error(p, f"must be a sha256 digest: 64 lowercase hex digits{note}; got "
                              f"{len(digest)} characters")
            else:
                out[version] = digest
        return out

    def tls(self, top: dict[str, Any]) -> TlsSettings | None:
        t = self.section(top, "", "tls", TLS_KEYS, required=True)
        if t is None:
            return None
        mode = self.field(t, "tls", "mode", _choice(TLS_MODES),
                          expect="self-signed, files or acme")
        server_name = self.field(t, "tls", "server_name", _dns_name,
                                 expect="the public DNS name clients use, e.g. releasy.example.com")
        cert = key = None
        if mode == "files":
            cert = self.field(t, "tls", "certificate", self.path_value,
                              expect="the PEM certificate (chain) file, required with mode: files")
            key = self.field(t, "tls", "key", self.path_value,
                             expect="the PEM private key file, required with mode: files")
            self.existing_file("tls.certificate", cert)
            self.existing_file("tls.key", key)
            if self.check_files and key is not None and key.is_file():
                mode_bits = stat.S_IMODE(key.stat().st_mode)
                if mode_bits & 0o077:
                    self.error("tls.key", f"{key} is accessible by group/others (mode "
                                          f"{mode_bits:04o}); run `chmod 600 {key}`")
        elif mode in ("self-signed", "acme"):
            for k in ("certificate", "key"):
                if k in t:
                    self.error(f"tls.{k}", f"only used with mode: files (mode is {mode})")
        acme = None
        if mode == "acme":
            acme = self.acme(t)
        elif t is not None and "acme" in t:
            self.error("tls.acme", f"only used with mode: acme (mode is {mode})")
        return TlsSettings(mode=mode, server_name=server_name, certificate=cert, key=key,
                           acme=acme)

    def acme(self, t: dict[str, Any]) -> AcmeSettings | None:
        a = self.section(t, "tls", "acme", ACME_KEYS, required=True)
        if a is None:
            return None
        email = self.field(a, "tls.acme", "email", _regex(EMAIL_RE, "an e-mail address"),
                           expect="the e-mail address the CA sends expiry notices to")
        staging = self.field(a, "tls.acme", "staging", _bool, False)
        url = self.field(a, "tls.acme", "directory_url", _url, None)
        if url is not None and not url.startswith("https://"):
            self.error("tls.acme.directory_url", "must be an https:// URL (ACME needs TLS)")
        if url is not None and staging:
            self.error("tls.acme.staging", "staging selects Let's Encrypt's staging "
                                           "directory: leave it out with directory_url")
        ca_bundle = self.field(a, "tls.acme", "ca_bundle", self.path_value, None)
        self.existing_file("tls.acme.ca_bundle", ca_bundle)
        if email is None:
            return None
        return AcmeSettings(email=email, directory_url=url or (
            LETSENCRYPT_STAGING if staging else LETSENCRYPT), ca_bundle=ca_bundle)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
