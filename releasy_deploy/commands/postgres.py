"""PostgreSQL for Releasy as data: config files, SQL, argv lists, probes and the decisions
taken from what the probes saw. Pure functions only; `releasy_deploy.tiers.db` runs them.

SQL never travels in argv: it is fed to ``psql`` on stdin, so passwords and verifiers stay
out of process lists. The role's password is set as a SCRAM-SHA-256 verifier computed here
(as psql's ``\\password`` does), so the plain password never reaches the server either.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets as _random
import shlex
import stringprep
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping, Sequence
from urllib.parse import quote

from ..errors import HostRefusedError
from ..inventory import POSTGRES_PORT, Inventory
from ..packages import db_packages
from ..templates import render_template

CLUSTER = "main"
SOCKET_DIR = "/var/run/postgresql"
# The files we manage, relative to a cluster's configuration directory.
DROPIN_REL = "conf.d/releasy.conf"
HBA_REL = "pg_hba.conf"
MANAGED_RELS = (DROPIN_REL, HBA_REL)

SECRETS_DIR = "/etc/releasy"
PASSWORD_FILE = f"{SECRETS_DIR}/database-password"
SQLITE_PATH = "/var/lib/releasy/releasy.db"
SQLITE_URL = f"sqlite://{SQLITE_PATH}"

HBA_TEMPLATE = "postgresql/pg_hba.conf.j2"
DROPIN_TEMPLATE = "postgresql/releasy.conf.j2"

SCRAM_ITERATIONS = 4096  # 15's fixed default; 16+ default scram_iterations to it as well
SCRAM_SALT_BYTES = 16

# What Debian's freshly created cluster runs with (dry-run predicts from these).
DEBIAN_DEFAULTS: Mapping[str, str] = {
    "listen_addresses": "localhost", "port": str(POSTGRES_PORT),
    "password_encryption": "scram-sha-256",
}
# Settings this tool manages; changing a postmaster-context one needs a restart.
POSTMASTER_SETTINGS = ("listen_addresses", "port")
RELOADABLE_SETTINGS = ("password_encryption",)
MANAGED_SETTINGS = POSTMASTER_SETTINGS + RELOADABLE_SETTINGS

# The application role: may log in, nothing more.
ROLE_ATTRIBUTES: Mapping[str, bool] = {
    "LOGIN": True, "SUPERUSER": False, "CREATEDB": False, "CREATEROLE": False,
    "REPLICATION": False, "BYPASSRLS": False,
}
_ROLE_COLUMNS = {"LOGIN": "rolcanlogin", "SUPERUSER": "rolsuper", "CREATEDB": "rolcreatedb",
                 "CREATEROLE": "rolcreaterole", "REPLICATION": "rolreplication",
                 "BYPASSRLS": "rolbypassrls"}

_RESERVED_DATABASES = ("postgres", "template0", "template1")


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Where Debian's postgresql-common puts cluster ``major``/main: the paths, service and
    log file follow the PostgreSQL major the host runs (15 on Debian 12, 17 on Debian 13)."""

    major: str

    def __post_init__(self) -> None:
        db_packages(self.major)  # validates the major: it ends up in paths and argv

    @property
    def conf_dir(self) -> str:
        return f"/etc/postgresql/{self.major}/{CLUSTER}"

    @property
    def main_conf(self) -> str:
        return f"{self.conf_dir}/postgresql.conf"

    @property
    def hba_path(self) -> str:
        return f"{self.conf_dir}/{HBA_REL}"

    @property
    def dropin_path(self) -> str:
        return f"{self.conf_dir}/{DROPIN_REL}"

    @property
    def service(self) -> str:
        return f"postgresql@{self.major}-{CLUSTER}"

    @property
    def log_file(self) -> str:
        return f"/var/log/postgresql/postgresql-{self.major}-{CLUSTER}.log"

    @property
    def packages(self) -> tuple[str, str]:
        return db_packages(self.major)

    @property
    def cluster(self) -> str:
        return f"{self.major}/{CLUSTER}"


# --------------------------------------------------------------------------- names, quoting


def check_names(database: str, user: str) -> None:
    """Refuse names that would make the app an administrator or clobber a system database."""
    if user == "postgres" or user.startswith("pg_"):
        raise ValueError(
            f"database.user {user!r} is reserved by PostgreSQL (the superuser, or the pg_ "
            "prefix of built-in roles); pick another name, e.g. releasy")
    if database in _RESERVED_DATABASES:
        raise ValueError(
            f"database.name {database!r} is one of PostgreSQL's own databases "
            f"({', '.join(_RESERVED_DATABASES)}); pick another name, e.g. releasy")


def _no_nul(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL byte, which PostgreSQL cannot store")
    return value


def quote_ident(name: str) -> str:
    """A double-quoted SQL identifier (always quoted: keywords and case survive)."""
    _no_nul(name, "identifier")
    if not name:
        raise ValueError("an SQL identifier cannot be empty")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """An SQL string literal, like PostgreSQL's own quote_literal()."""
    _no_nul(value, "literal")
    if "\\" in value:
        # E'' keeps the value intact whatever standard_conforming_strings says.
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_conf(value: str) -> str:
    """A postgresql.conf string value."""
    _no_nul(value, "setting")
    if "\n" in value or "\r" in value:
        raise ValueError("a postgresql.conf value cannot span lines")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_hba_name(name: str) -> str:
    """A database or user name in pg_hba.conf, double-quoted so that names such as ``all``
    or ``replication`` mean that database/role, not the keyword."""
    _no_nul(name, "pg_hba name")
    if not name or any(c in name for c in '",#') or any(c.isspace() for c in name):
        raise ValueError(f"{name!r} cannot be written in pg_hba.conf (quotes, commas, '#' "
                         "and whitespace are not representable)")
    return f'"{name}"'


# --------------------------------------------------------------------------- config files


def _network(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{ip}/{ip.max_prefixlen}"


def listen_addresses(inv: Inventory) -> str:
    """Loopback, plus the db host's private address when other hosts must reach it."""
    if inv.is_single_host:
        return "localhost"
    return f"localhost,{ipaddress.ip_address(inv.db_host.private_address)}"


def desired_settings(inv: Inventory) -> dict[str, str]:
    """The managed settings as pg_settings reports them once applied."""
    return {"listen_addresses": listen_addresses(inv), "port": str(POSTGRES_PORT),
            "password_encryption": "scram-sha-256"}


@dataclass(frozen=True)
class HbaRule:
    database: str  # already quoted for pg_hba
    user: str
    address: str  # CIDR, one host
    comment: str


def hba_rules(inv: Inventory) -> list[HbaRule]:
    """One ``host`` line per client address: loopback, plus the app hosts in split.

    Loopback is always admitted: on a single host it is Releasy itself; in split it is the
    deploy lock's session, which arrives through an SSH tunnel ending on the db host (so
    5432 never has to be reachable from the operator's machine)."""
    db, user = quote_hba_name(inv.database.name), quote_hba_name(inv.database.user)
    who = "Releasy on this host" if inv.is_single_host else "deploy lock via SSH tunnel"
    loopback = [HbaRule(db, user, "127.0.0.1/32", f"{who} (IPv4 loopback)"),
                HbaRule(db, user, "::1/128", f"{who} (IPv6 loopback)")]
    if inv.is_single_host:
        return loopback
    # The inventory guarantees every host its own private address: one line per app host.
    return loopback + [HbaRule(db, user, _network(h.private_address), f"app host {h.name}")
                       for h in inv.hosts_in("app")]


def render_pg_hba(inv: Inventory) -> str:
    return render_template(HBA_TEMPLATE, {
        "environment": inv.environment, "topology": inv.topology, "rules": hba_rules(inv)})


def render_dropin(inv: Inventory) -> str:
    wanted = desired_settings(inv)
    return render_template(DROPIN_TEMPLATE, {
        "listen_addresses": quote_conf(wanted["listen_addresses"]),
        "port": int(wanted["port"]),
        "password_encryption": quote_conf(wanted["password_encryption"]),
    })


@dataclass(frozen=True)
class ManagedFile:
    path: str
    content: bytes
    owner: str
    group: str
    mode: int


def config_files(inv: Inventory, layout: Layout) -> list[ManagedFile]:
    """The files this tool owns, with the owner/mode Debian gives their neighbours."""
    return [
        ManagedFile(layout.dropin_path, render_dropin(inv).encode(), "postgres", "postgres",
                    0o644),
        ManagedFile(layout.hba_path, render_pg_hba(inv).encode(), "postgres", "postgres",
                    0o640),
    ]


# --------------------------------------------------------------------------- database URL


def database_host(inv: Inventory) -> str:
    """Where the app connects: loopback on a single host, else the db's private address."""
    if inv.is_single_host:
        return "127.0.0.1"
    return str(ipaddress.ip_address(inv.db_host.private_address))


def postgres_url(inv: Inventory, password: str) -> str:
    host = database_host(inv)
    if ipaddress.ip_address(host).version == 6:
        host = f"[{host}]"
    db = inv.database
    return (f"postgres://{quote(db.user, safe='')}:{quote(password, safe='')}"
            f"@{host}:{POSTGRES_PORT}/{quote(db.name, safe='')}")


# --------------------------------------------------------------------------- SCRAM-SHA-256


def saslprep(password: str) -> str:
    """The password as PostgreSQL feeds it to SCRAM (RFC 4013 SASLprep, pg_saslprep's rules):
    ASCII passes unchanged; if preparation fails the password is used as it is."""
    if password.isascii():
        return password
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch
                     for ch in password if not stringprep.in_table_b1(ch))
    if not mapped:
        return password
    prepared = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_a1, stringprep.in_table_c12, stringprep.in_table_c21_c22,
                  stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
                  stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
                  stringprep.in_table_c9)
    if any(check(ch) for ch in prepared for check in prohibited):
        return password
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            return password
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            return password
    return prepared


def _scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return stored_key, server_key


def scram_verifier(password: str, *, salt: bytes | None = None,
                   iterations: int = SCRAM_ITERATIONS) -> str:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (RFC 5802/7677), the form
    PostgreSQL stores in pg_authid.rolpassword and accepts in ``PASSWORD '...'``."""
    salt = _random.token_bytes(SCRAM_SALT_BYTES) if salt is None else salt
    stored_key, server_key = _scram_keys(password, salt, iterations)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def scram_matches(password: str, verifier: str | None) -> bool:
    """True when ``verifier`` is a SCRAM-SHA-256 verifier of ``password``. Anything else
    (NULL, an md5 hash, a malformed string) is False: the password must be (re)set."""
    if not verifier or not verifier.startswith("SCRAM-SHA-256$"):
        return False
    try:
        _, params, keys = verifier.split("$")
        iterations_text, salt_b64 = params.split(":")
        stored_b64, server_b64 = keys.split(":")
        iterations = int(iterations_text)
        salt = base64.b64decode(salt_b64, validate=True)
        stored = base64.b64decode(stored_b64, validate=True)
        server = base64.b64decode(server_b64, validate=True)
    except ValueError:
        return False
    if not 1 <= iterations <= 10_000_000:
        return False
    want_stored, want_server = _scram_keys(password, salt, iterations)
    return hmac.compare_digest(stored, want_stored) and hmac.compare_digest(server, want_server)


# --------------------------------------------------------------------------- SQL


def role_clause(attributes: Mapping[str, bool] = ROLE_ATTRIBUTES) -> str:
    return " ".join(k if v else f"NO{k}" for k, v in attributes.items())


def create_role_sql(user: str, verifier: str) -> str:
    return f"CREATE ROLE {quote_ident(user)} WITH {role_clause()} PASSWORD {quote_literal(verifier)};"


def alter_role_sql(user: str, *, attributes: bool = False, verifier: str | None = None) -> str:
    parts = [role_clause()] if attributes else []
    if verifier is not None:
        parts.append(f"PASSWORD {quote_literal(verifier)}")
    if not parts:
        raise ValueError("nothing to alter")
    return f"ALTER ROLE {quote_ident(user)} WITH {' '.join(parts)};"


def create_database_sql(name: str, owner: str) -> str:
    # template0 + UTF8: independent of whatever was added to template1.
    return (f"CREATE DATABASE {quote_ident(name)} WITH OWNER {quote_ident(owner)} "
            f"TEMPLATE template0 ENCODING 'UTF8';")


def alter_database_owner_sql(name: str, owner: str) -> str:
    return f"ALTER DATABASE {quote_ident(name)} OWNER TO {quote_ident(owner)};"


def psql_argv(database: str | None = None) -> list[str]:
    """psql as the postgres superuser over the local socket (peer auth), SQL on stdin.
    Needs root (run with sudo=True)."""
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-A", "-t", "-q",
            "-v", "ON_ERROR_STOP=1"]
    if database is not None:
        argv += ["-d", _no_nul(database, "database")]
    return argv


def service_argv(action: str, layout: Layout) -> list[str]:
    if action not in ("start", "restart", "reload"):
        raise ValueError(f"unknown service action {action!r}")
    return ["systemctl", action, layout.service]


# --------------------------------------------------------------------------- probes

# Probe output lines start with a tag; "|" separates fields and the free-form field is last.
_SQL_DELIMITER = "RELEASY_SQL_END"


def server_state_sql(database: str, user: str) -> str:
    role_cols = ", ".join(f"{col}::int" for col in _ROLE_COLUMNS.values())
    names = ", ".join(quote_literal(n) for n in MANAGED_SETTINGS)
    return "\n".join([
        f"SELECT 'role', {role_cols}, coalesce(rolpassword, '') FROM pg_authid "
        f"WHERE rolname = {quote_literal(user)};",
        f"SELECT 'database', pg_get_userbyid(datdba) FROM pg_database "
        f"WHERE datname = {quote_literal(database)};",
        f"SELECT 'setting', name, setting FROM pg_settings WHERE name IN ({names});",
        "SELECT 'conf_loaded', extract(epoch FROM pg_conf_load_time());",
    ])


def server_state_shell(database: str, user: str) -> str:
    """Shell snippet printing the server's state; fails (non-zero) when it does not answer."""
    sql = server_state_sql(database, user)
    if _SQL_DELIMITER in sql:
        raise ValueError("SQL contains the here-document delimiter")
    return (f"cd / && {shlex.join(psql_argv('postgres'))} <<'{_SQL_DELIMITER}'\n"
            f"{sql}\n{_SQL_DELIMITER}")


@dataclass(frozen=True)
class RoleState:
    attributes: Mapping[str, bool]
    verifier: str = field(repr=False)  # never shown: offline guessing material


@dataclass(frozen=True)
class ServerState:
    role: RoleState | None
    database_owner: str | None  # None: the database does not exist
    settings: Mapping[str, str]
    conf_loaded_at: float


def parse_server_state(out: str, code: int) -> ServerState | None:
    """None when the server did not answer (not installed, stopped, starting)."""
    if code != 0:
        return None
    role = None
    owner = None
    settings: dict[str, str] = {}
    loaded = None
    for line in out.splitlines():
        tag, _, rest = line.partition("|")
        if tag == "role":
            fields = rest.split("|", len(_ROLE_COLUMNS))
            if len(fields) != len(_ROLE_COLUMNS) + 1:
                raise ValueError("malformed role line")
            attrs = {k: v == "1" for k, v in zip(_ROLE_COLUMNS, fields)}
            role = RoleState(attrs, fields[-1])
        elif tag == "database":
            owner = rest
        elif tag == "setting":
            name, _, value = rest.partition("|")
            settings[name] = value
        elif tag == "conf_loaded":
            loaded = float(rest)
    if loaded is None:
        raise ValueError("the server state is incomplete (no pg_conf_load_time)")
    return ServerState(role, owner, settings, loaded)


@dataclass(frozen=True)
class FileState:
    sha256: str
    owner: str
    group: str
    mode: int
    mtime: float


def file_state_shell(path: str) -> str:
    """``SHA256 OWNER GROUP MODE MTIME`` of a regular file; exit 3 when absent."""
    p = shlex.quote(path)
    return (f"[ -f {p} ] || exit 3; set -e; sum=$(sha256sum < {p}); "
            f"echo \"${{sum%% *}} $(stat -L -c '%U %G %a %.9Y' -- {p})\"")


def parse_file_state(out: str, code: int) -> FileState | None:
    if code != 0:
        return None
    sha, owner, group, mode, mtime = out.split()
    return FileState(sha, owner, group, int(mode, 8), float(mtime))


@dataclass(frozen=True)
class SecretFile:
    owner: str
    group: str
    mode: int
    content: str = field(repr=False)


def secret_file_shell(path: str) -> str:
    """First line ``OWNER GROUP MODE``, then the content; exit 3 when absent."""
    p = shlex.quote(path)
    return f"[ -f {p} ] || exit 3; stat -L -c '%U %G %a' -- {p} && cat -- {p}"


def parse_secret_file(out: str, code: int) -> SecretFile | None:
    if code != 0:
        return None
    head, _, content = out.partition("\n")
    owner, group, mode = head.split()
    return SecretFile(owner, group, int(mode, 8), content)


def pg_ready_shell(host: str, timeout: int = 30) -> str:
    return shlex.join(["pg_isready", "-q", "-t", str(timeout), "-h", host,
                       "-p", str(POSTGRES_PORT)])


def ready_hosts(inv: Inventory) -> list[str]:
    """Where the server must answer at the end: its socket and every listen address."""
    hosts = [SOCKET_DIR, "127.0.0.1"]
    if not inv.is_single_host:
        hosts.append(database_host(inv))
    return hosts


# --------------------------------------------------------------------------- decisions


def service_action(running: Mapping[str, str], wanted: Mapping[str, str], *,
                   files_changed: bool, config_stale: bool) -> str | None:
    """``"restart"`` when a postmaster-context setting differs from what runs, ``"reload"``
    when only reloadable things changed (or a file is newer than the last load), else None."""
    if any(running.get(k) != wanted[k] for k in POSTMASTER_SETTINGS):
        return "restart"
    if files_changed or config_stale or any(
            running.get(k) != wanted[k] for k in RELOADABLE_SETTINGS):
        return "reload"
    return None


def setting_changes(running: Mapping[str, str], wanted: Mapping[str, str],
                    names: Sequence[str] = MANAGED_SETTINGS) -> list[str]:
    """Human-readable ``name 'old' -> 'new'`` for the settings that differ."""
    return [f"{n} {running.get(n)!r} -> {wanted[n]!r}" for n in names
            if running.get(n) != wanted[n]]


def role_attribute_drift(attributes: Mapping[str, bool]) -> list[str]:
    return [k if want else f"NO{k}" for k, want in ROLE_ATTRIBUTES.items()
            if attributes.get(k) != want]


# --------------------------------------------------------------------------- the host's major

_MAJOR_RE = re.compile(r"[1-9][0-9]?")
_CLUSTER_RE = re.compile(r"[A-Za-z0-9_.-]+")
_SERVER_PKG_RE = re.compile(r"postgresql-([1-9][0-9]?)")
_DEPENDS_RE = re.compile(r"(?:^|[\s,|])postgresql-([1-9][0-9]?)(?:$|[\s,(|])")

# One probe, so the major costs no round trip of its own: the clusters that exist (and, for
# each main cluster, the state of the files we manage in it), the PostgreSQL packages
# dpkg has installed, and, only on a host without any cluster, what apt offers: the
# `postgresql` metapackage's dependency (the release's default major) and every
# postgresql-N server package. apt is not asked when a cluster exists: it then has no say.
PG_HOST_SHELL = r"""found=
for f in /etc/postgresql/*/*/postgresql.conf; do
  [ -f "$f" ] || continue
  found=1; d=${f%/postgresql.conf}; c=${d##*/}; v=${d%/*}; v=${v##*/}
  printf 'cluster|%s|%s\n' "$v" "$c"
  [ "$c" = main ] || continue
  for rel in REL_LIST; do
    p="$d/$rel"
    [ -f "$p" ] || continue
    sum=$(sha256sum < "$p") || continue
    printf 'file|%s|%s|%s %s\n' "$v" "$rel" "${sum%% *}" "$(stat -L -c '%U %G %a %.9Y' -- "$p")"
  done
done
dpkg-query -W -f='${db:Status-Abbrev}|${Package}\n' 'postgresql-[0-9]*' \
  'postgresql-client-[0-9]*' 2>/dev/null | sed -n 's/^ii *|/installed|/p'
[ -z "$found" ] || exit 0
ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || exit 0
echo lists
apt-cache show --no-all-versions postgresql 2>/dev/null | sed -n 's/^Depends: */default|/p'
apt-cache search --names-only '^postgresql-[0-9]+$' 2>/dev/null | sed 's/ .*//; s/^/offered|/'
""".replace("REL_LIST", " ".join(shlex.quote(r) for r in MANAGED_RELS))


@dataclass(frozen=True)
class PgHost:
    """What the db host has and offers of PostgreSQL (one probe, parsed)."""

    clusters: tuple[tuple[str, str], ...] = ()  # (major, cluster name), sorted
    installed: frozenset[str] = frozenset()  # PostgreSQL packages dpkg has installed
    lists: bool = False  # apt's package lists exist (asked only without a cluster)
    default: str | None = None  # the release's default major (the metapackage's dependency)
    offered: tuple[str, ...] = ()  # majors apt can install
    files: Mapping[tuple[str, str], FileState] = field(default_factory=dict)  # (major, rel)

    @property
    def cluster_majors(self) -> list[str]:
        return sorted({m for m, _ in self.clusters}, key=int)

    @property
    def server_majors(self) -> list[str]:
        return sorted({m.group(1) for p in self.installed
                       if (m := _SERVER_PKG_RE.fullmatch(p))}, key=int)


def parse_pg_host(out: str, code: int) -> PgHost:
    clusters: set[tuple[str, str]] = set()
    installed: set[str] = set()
    files: dict[tuple[str, str], FileState] = {}
    lists = False
    default = None
    offered: set[str] = set()
    for line in out.splitlines():
        tag, _, rest = line.partition("|")
        if tag == "cluster":
            major, _, name = rest.partition("|")
            if _MAJOR_RE.fullmatch(major) and _CLUSTER_RE.fullmatch(name):
                clusters.add((major, name))
        elif tag == "file":
            major, rel, st = (rest.split("|", 2) + ["", ""])[:3]
            if _MAJOR_RE.fullmatch(major) and rel in MANAGED_RELS:
                parsed = parse_file_state(st, 0) if len(st.split()) == 5 else None
                if parsed is not None:
                    files[(major, rel)] = parsed
        elif tag == "installed":
            installed.add(rest.strip())
        elif tag == "lists":
            lists = True
        elif tag == "default":
            found = _DEPENDS_RE.search(rest)
            default = found.group(1) if found else default
        elif tag == "offered":
            found = _SERVER_PKG_RE.fullmatch(rest.strip())
            if found:
                offered.add(found.group(1))
    return PgHost(tuple(sorted(clusters, key=lambda c: (int(c[0]), c[1]))),
                  frozenset(installed), lists, default, tuple(sorted(offered, key=int)), files)


class PgMajorRefused(HostRefusedError):
    """The inventory's pin or the host's clusters rule every major out (exit 2)."""


def select_major(host: str, release: str, pg: PgHost, pin: str | None) -> str | None:
    """The PostgreSQL major ``host`` (running ``release``, e.g. "Debian 13 (trixie)") uses:

    1. the major of the cluster(s) that exist: never a second major beside a cluster;
    2. else the major of an installed server package (its cluster was removed);
    3. else the inventory's pin (database.postgres_version), when apt offers it;
    4. else the release's default: the `postgresql` metapackage's dependency.

    None when apt's package lists are not loaded yet (a fresh host): the caller refreshes
    them and asks again. Refusals name the host, its release and the versions involved."""
    pin_text = f"database.postgres_version pins {pin}"
    existing = pg.cluster_majors
    if existing:
        names = ", ".join(f"{m}/{n}" for m, n in pg.clusters)
        if pin is not None and pin not in existing:
            raise PgMajorRefused(
                f"{host}: runs PostgreSQL {' and '.join(existing)} on {release} (cluster "
                f"{names}), but {pin_text}. This tool never installs a second major beside "
                f"an existing cluster: set database.postgres_version to {existing[-1]} or "
                f"remove it (a major upgrade is pg_upgradecluster's job, done by hand).",
                host=host)
        if pin is not None:
            return pin
        if len(existing) > 1:
            raise PgMajorRefused(
                f"{host}: has clusters of several PostgreSQL majors on {release} ({names}): set "
                "database.postgres_version to the one Releasy's database lives in.", host=host)
        return existing[0]
    servers = pg.server_majors
    if servers:
        if pin is not None and pin not in servers:
            raise PgMajorRefused(
                f"{host}: has postgresql-{' postgresql-'.join(servers)} installed on {release} "
                f"(without a cluster), but {pin_text}: set database.postgres_version to "
                f"{servers[-1]}, or remove that package first.", host=host)
        return pin or servers[-1]
    if not pg.lists:
        return None
    if pin is not None:
        if pin not in pg.offered:
            offer = (f"PostgreSQL {', '.join(pg.offered)}" if pg.offered
                     else "no PostgreSQL server package")
            raise PgMajorRefused(
                f"{host}: {pin_text}, but {release} here offers {offer} (its apt sources). "
                f"Nothing was installed. Remove the pin (the release's default is "
                f"{pg.default or 'unknown'}), pin an offered major, or add an apt source "
                f"that carries postgresql-{pin}.", host=host)
        return pin
    if pg.default is None:
        raise PgMajorRefused(
            f"{host}: apt offers no `postgresql` package on {release}, so the release's default "
            "PostgreSQL major is unknown. Check the host's apt sources (apt-cache policy "
            "postgresql), or set database.postgres_version.", host=host)
    return pg.default
