"""The inventory's model: the frozen dataclasses ``hosts.yaml`` is parsed into, and the
vocabulary (tiers, ports, accepted names and versions) they are made of."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..hook_schema import Hooks
from .problems import InventoryError, Problem
from .sums import _parse_sidecar, _parse_sums, _read_text

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
DEFAULT_DATABASE_MAX_CONNECTIONS = 5  # app.database_max_connections: upstream's pool default


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
