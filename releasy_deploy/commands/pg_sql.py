"""PostgreSQL's SQL side as data: quoting, the role's SCRAM-SHA-256 verifier, the SQL
statements, psql's argv, and the query reading the server's state (with its parser).
Pure functions only; `releasy_deploy.tiers.db` runs them.

SQL never travels in argv: it is fed to ``psql`` on stdin, so passwords and verifiers stay
out of process lists. The role's password is set as a SCRAM-SHA-256 verifier computed here
(as psql's ``\\password`` does), so the plain password never reaches the server either.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets as _random
import shlex
import stringprep
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping

SCRAM_ITERATIONS = 4096  # 15's fixed default; 16+ default scram_iterations to it as well
SCRAM_SALT_BYTES = 16

# Settings this tool manages; changing a postmaster-context one needs a restart.
POSTMASTER_SETTINGS = ("listen_addresses", "port")
RELOADABLE_SETTINGS = ("password_encryption",)
MANAGED_SETTINGS = POSTMASTER_SETTINGS + RELOADABLE_SETTINGS
# Read, not managed: how many connections the app's pools can have (`pool_shortfall`).
CONNECTION_SETTINGS = ("max_connections", "superuser_reserved_connections",
                       "reserved_connections")

# The application role: may log in, nothing more.
ROLE_ATTRIBUTES: Mapping[str, bool] = {
    "LOGIN": True, "SUPERUSER": False, "CREATEDB": False, "CREATEROLE": False,
    "REPLICATION": False, "BYPASSRLS": False,
}
_ROLE_COLUMNS = {"LOGIN": "rolcanlogin", "SUPERUSER": "rolsuper", "CREATEDB": "rolcreatedb",
                 "CREATEROLE": "rolcreaterole", "REPLICATION": "rolreplication",
                 "BYPASSRLS": "rolbypassrls"}

_RESERVED_DATABASES = ("postgres", "template0", "template1")


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


# --------------------------------------------------------------------------- the server's state

# Probe output lines start with a tag; "|" separates fields and the free-form field is last.
_SQL_DELIMITER = "RELEASY_SQL_END"


def server_state_sql(database: str, user: str) -> str:
    role_cols = ", ".join(f"{col}::int" for col in _ROLE_COLUMNS.values())
    names = ", ".join(quote_literal(n) for n in MANAGED_SETTINGS)
    limits = ", ".join(quote_literal(n) for n in CONNECTION_SETTINGS)
    return "\n".join([
        f"SELECT 'role', {role_cols}, coalesce(rolpassword, '') FROM pg_authid "
        f"WHERE rolname = {quote_literal(user)};",
        f"SELECT 'database', pg_get_userbyid(datdba) FROM pg_database "
        f"WHERE datname = {quote_literal(database)};",
        f"SELECT 'setting', name, setting FROM pg_settings WHERE name IN ({names});",
        "SELECT 'conf_loaded', extract(epoch FROM pg_conf_load_time());",
        f"SELECT 'limit', name, setting FROM pg_settings WHERE name IN ({limits});",
    ])


# Where Debian's postgresql-client-NN packages put each major's own binaries (root's).
PG_LIB_DIR = "/usr/lib/postgresql"


def pg_client_shell(tool: str, lib_dir: str = PG_LIB_DIR) -> str:
    """Shell setting ``$pg_client`` to the newest installed major's own ``tool`` (psql,
    pg_isready), else /usr/bin's. The probes run these on every look at the db host, and
    Debian's /usr/bin ones are pg_wrapper, a Perl script that costs ~45 ms of CPU per call
    to pick a version; any supported major's client talks to any supported server. The
    majors are compared as numbers (no 9.6 after 15)."""
    if not re.fullmatch(r"[a-z_]+", tool):
        raise ValueError(f"not a client tool name: {tool!r}")
    base = shlex.quote(lib_dir)
    return (f"pg_client=/usr/bin/{tool}; n=0; for d in {base}/*/bin; do v=${{d%/bin}};"
            f' v=${{v##*/}}; v=${{v%%.*}}; case $v in ""|*[!0-9]*) continue;; esac;'
            f' [ -x "$d/{tool}" ] && [ "$v" -gt "$n" ] && {{ n=$v; pg_client=$d/{tool}; }};'
            f" done")


def psql_stdin_shell(database: str, sql: str) -> str:
    """Shell running ``sql`` on ``database`` as the postgres superuser with the newest
    installed major's own psql (`pg_client_shell`), the SQL in a here-document on its
    stdin (never in argv); fails (non-zero) when the server does not answer or a statement
    fails."""
    if _SQL_DELIMITER in sql:
        raise ValueError("SQL contains the here-document delimiter")
    words = psql_argv(database)
    at = words.index("psql")
    psql = f'{shlex.join(words[:at])} "$pg_client" {shlex.join(words[at + 1:])}'
    return (f"{pg_client_shell('psql')}; cd / && {psql} <<'{_SQL_DELIMITER}'\n"
            f"{sql}\n{_SQL_DELIMITER}")


def server_state_shell(database: str, user: str) -> str:
    """Shell snippet printing the server's state; fails (non-zero) when it does not answer."""
    return psql_stdin_shell("postgres", server_state_sql(database, user))


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
    # CONNECTION_SETTINGS the server has (reserved_connections only from PostgreSQL 16)
    limits: Mapping[str, int] = field(default_factory=dict)


def parse_server_state(out: str, code: int) -> ServerState | None:
    """None when the server did not answer (not installed, stopped, starting)."""
    if code != 0:
        return None
    role = None
    owner = None
    settings: dict[str, str] = {}
    limits: dict[str, int] = {}
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
        elif tag == "limit":
            name, _, value = rest.partition("|")
            limits[name] = int(value)
    if loaded is None:
        raise ValueError("the server state is incomplete (no pg_conf_load_time)")
    return ServerState(role, owner, settings, loaded, limits)


# --------------------------------------------------------------------------- decisions


def connections_left_for_roles(limits: Mapping[str, int]) -> int | None:
    """How many connections the server accepts from roles that are not superusers
    (max_connections less the slots reserved for superusers and, from PostgreSQL 16,
    pg_use_reserved_connections); None when max_connections was not read."""
    if "max_connections" not in limits:
        return None
    return (limits["max_connections"] - limits.get("superuser_reserved_connections", 0)
            - limits.get("reserved_connections", 0))


def pool_shortfall(limits: Mapping[str, int], app_instances: int, pool: int) -> str | None:
    """Why ``app_instances`` Releasy processes, each with a pool of up to ``pool``
    connections, may be refused connections by this server (a request then waits for a
    connection or fails), or None when they all fit."""
    room = connections_left_for_roles(limits)
    wanted = app_instances * pool
    if room is None or wanted <= room:
        return None
    return (f"the app's connection pools may open {wanted} connections ({app_instances} x"
            f" app.database_max_connections {pool}), but PostgreSQL accepts {room} from"
            f" non-superusers (max_connections {limits['max_connections']} less the reserved"
            f" slots): under load requests would wait or fail. Lower"
            f" app.database_max_connections, or raise max_connections in a conf.d file of"
            f" your own (it takes a PostgreSQL restart, which is downtime)")


def role_attribute_drift(attributes: Mapping[str, bool]) -> list[str]:
    return [k if want else f"NO{k}" for k, want in ROLE_ATTRIBUTES.items()
            if attributes.get(k) != want]
