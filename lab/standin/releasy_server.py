#!/usr/bin/python3
"""releasy-server STAND-IN: a test fixture that behaves like upstream's `releasy-server`.

Upstream's Rust server cannot be built in the lab, so `lab/standin/build.py` bakes a version
and a list of migrations into this file and packs it like upstream's release tarball (a
single executable `releasy-server` at the top level). It runs with the host's
`/usr/bin/python3` (Debian 12: Python 3.11, stdlib + python3-psycopg 3.1 for PostgreSQL).
It is one self-contained file on purpose: it imports nothing from the deploy project.

Faithful to upstream (what a deploy tool can observe):
  * configuration from the same RELEASY_* variables, with the same defaults and the same
    fatal messages (`missing required env var: NAME`, `invalid RELEASY_BIND_ADDR: ...`,
    `database connect failed: ...`, `database migration failed: ...`, `bind failed: ...`),
    printed like a Rust `main` returning `Err(String)`: `Error: "..."`, exit status 1;
  * start-up order: config -> database connect -> migrations -> bind. The port is open only
    once migrations are done;
  * sqlx's migrator: table `_sqlx_migrations`, one transaction per migration, SHA-384
    checksums, refusal on unknown applied versions ("VersionMissing"), on modified ones
    ("VersionMismatch") and on dirty rows; on PostgreSQL the blocking session-level
    `pg_advisory_lock(0x3d32ad9e * crc32(current_database()))`, no timeout; none on SQLite;
  * sqlx-style URLs (`postgres://`, `postgresql://`, `sqlite:`; SQLite files are NOT created
    unless `?mode=rwc`), a pool of at most RELEASY_DATABASE_MAX_CONNECTIONS connections;
  * `GET /health` and `GET /ready` (200 `{"status":"ok"}` when `SELECT 1` works, else 503),
    `GET /live` (always 200);
  * no draining: SIGTERM/SIGINT make it exit at once; in-flight requests may be cut.
  * secrets (admin key, pepper, artifact secret key, the database password) never logged.

Stand-in only (upstream has none of this):
  * download links built from RELEASY_PUBLIC_BASE_URL (default `http://127.0.0.1:8080`, as
    upstream): `GET /api/download-link` -> {"url": BASE + "/api/downloads/NAME"}, and that
    path answers 200 (upstream's real download API needs API keys and artifacts);
  * `GET /version` -> {"version", "host", "pid", ...}; `GET /` and `GET /api/...` -> small
    JSON; `POST /echo` and `POST /api/...` -> echoes the body length (for load generators);
    an `X-Standin-Version` response header;
  * bookkeeping tables `standin_start_log` (one row per process start) and
    `standin_migration_log` (one row per migration this process applied, written in the
    migration's own transaction) so tests can prove who migrated what, once, and when;
  * build-time knobs: a broken last migration, a never-ready build (binds, but /health and
    /ready answer 503 forever), and a sleep inside each migration it applies;
  * SIGTERM exits with status 0 (upstream is killed by the signal; systemd treats both as a
    clean stop).
"""

# --- standin build parameters: begin (replaced by lab/standin/build.py) ---
VERSION = "0.0.0-dev"
MIGRATIONS = [
    (1, "create standin m1",
     "CREATE TABLE standin_m1 (\n    id BIGINT PRIMARY KEY,\n    label TEXT NOT NULL\n);\n"
     "INSERT INTO standin_m1 (id, label) VALUES (1, 'migration 1');\n"),
]
BROKEN_MIGRATION = False
NEVER_READY = False
MIGRATION_SECONDS = 0.0
# --- standin build parameters: end ---

import contextlib
import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOSTNAME = socket.gethostname()
PID = os.getpid()
SERVICE = "releasy-standin"
LOG_TARGET = "releasy_server"

# sqlx's defaults
DEFAULT_BIND_ADDR = "0.0.0.0:8080"
# Stand-in routes for a download link (upstream's real API needs auth and artifacts).
DOWNLOAD_LINK_PATH = "/api/download-link"
DOWNLOADS_PREFIX = "/api/downloads/"
# Upstream's default: download links then point at the app host's own loopback.
DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8080"
POOL_ACQUIRE_TIMEOUT = 30.0        # sqlx PoolOptions::acquire_timeout default
SQLITE_BUSY_TIMEOUT = 5.0          # sqlx SqliteConnectOptions::busy_timeout default
PG_CONNECT_TIMEOUT = 10            # per attempt (libpq connect_timeout)
HEALTH_ACQUIRE_TIMEOUT = 5.0       # how long a health check waits for a pooled connection
MAX_BODY = 64 * 1024 * 1024
IDLE_KEEPALIVE_TIMEOUT = 600       # seconds an idle keep-alive connection is kept

SECRET_VARS = ("RELEASY_ADMIN_API_KEY", "RELEASY_API_KEY_PEPPER", "RELEASY_ARTIFACT_SECRET_KEY")


class Fatal(Exception):
    """A start-up error: printed as `Error: "<message>"`, exit status 1."""


class MigrateError(Exception):
    pass


def migration_lock_key(database_name: str) -> int:
    """sqlx's PostgreSQL migration lock key for a database (a signed 64-bit integer)."""
    key = 0x3D32AD9E * zlib.crc32(database_name.encode("utf-8"))
    if not -(2 ** 63) <= key < 2 ** 63:
        raise ValueError(f"lock key {key} does not fit a bigint")
    return key


def migration_checksum(sql: str) -> bytes:
    return hashlib.sha384(sql.encode("utf-8")).digest()


def rust_debug_str(text: str) -> str:
    """Format a string like Rust's `{:?}` for `String` (what `main` prints for `Err`)."""
    out = ['"']
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u{%x}" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# --------------------------------------------------------------------------- logging

LEVELS = {"off": 0, "error": 1, "warn": 2, "info": 3, "debug": 4, "trace": 5}
LEVEL_LABEL = {1: "ERROR", 2: "WARN", 3: "INFO", 4: "DEBUG", 5: "TRACE"}


class Redactor:
    """Replaces secret values (and the database password) wherever they would be printed."""

    def __init__(self):
        self._secrets = []

    def add(self, value):
        if value and len(value) >= 3 and value not in self._secrets:
            self._secrets.append(value)
            quoted = urllib.parse.quote(value, safe="")
            if quoted != value:
                self._secrets.append(quoted)
            self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


REDACT = Redactor()


def parse_log_filter(rust_log, releasy_log_level) -> int:
    """Verbosity for our target from RUST_LOG (if it parses) or RELEASY_LOG_LEVEL."""
    for spec in (rust_log, releasy_log_level):
        if spec is None or not spec.strip():
            continue
        level = _parse_directives(spec)
        if level is not None:
            return level
    return LEVELS["info"]


def _parse_directives(spec: str):
    best = None
    any_valid = False
    for directive in spec.split(","):
        directive = directive.strip()
        if not directive:
            continue
        target, sep, level = directive.partition("=")
        if not sep:
            if directive.lower() in LEVELS:      # a bare level applies to every target
                any_valid = True
                value = LEVELS[directive.lower()]
                best = value if best is None else max(best, value)
                continue
            target, level = directive, "trace"   # a bare target enables everything for it
        level = level.strip().lower()
        if level not in LEVELS:
            continue
        any_valid = True
        target = target.strip().split("[", 1)[0]
        if LOG_TARGET.startswith(target) or target.startswith(LOG_TARGET):
            best = LEVELS[level] if best is None else max(best, LEVELS[level])
    if not any_valid:
        return None
    return best if best is not None else LEVELS["off"]


class Log:
    level = LEVELS["info"]
    _lock = threading.Lock()

    @classmethod
    def emit(cls, level: int, message: str) -> None:
        if level > cls.level:
            return
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        message = re.sub(r"\s*[\r\n]+\s*", " ", REDACT(message)).strip()   # one line per event
        line = f"{now} {LEVEL_LABEL[level]:>5} {LOG_TARGET}: {message}\n"
        with cls._lock:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    @classmethod
    def error(cls, message):
        cls.emit(1, message)

    @classmethod
    def warn(cls, message):
        cls.emit(2, message)

    @classmethod
    def info(cls, message):
        cls.emit(3, message)

    @classmethod
    def debug(cls, message):
        cls.emit(4, message)


# --------------------------------------------------------------------------- settings

class Settings:
    pass


def _optional(env, key):
    value = env.get(key)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _parse_u32(env, key, default):
    raw = env.get(key)
    if raw is None:
        return default
    if not re.fullmatch(r"\+?[0-9]+", raw) or int(raw) > 0xFFFFFFFF:
        raise Fatal(f"{key} must be an integer")
    return int(raw)


def _parse_bool(env, key, default):
    raw = env.get(key)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise Fatal(f"{key} must be a boolean")


def _is_http_url_with_host(value: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(value)
        return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def load_settings(env) -> Settings:
    s = Settings()
    s.bind_addr = env.get("RELEASY_BIND_ADDR", DEFAULT_BIND_ADDR)
    s.log_level = env.get("RELEASY_LOG_LEVEL", "info")
    if "RELEASY_DATABASE_URL" not in env:
        raise Fatal("missing required env var: RELEASY_DATABASE_URL")
    s.database_url = env["RELEASY_DATABASE_URL"]
    s.database_max_connections = _parse_u32(env, "RELEASY_DATABASE_MAX_CONNECTIONS", 5)
    s.download_token_ttl_seconds = _parse_u32(env, "RELEASY_DOWNLOAD_TOKEN_TTL_SECONDS", 600)
    s.admin_api_key = _optional(env, "RELEASY_ADMIN_API_KEY")
    s.api_key_pepper = _optional(env, "RELEASY_API_KEY_PEPPER")
    s.public_base_url = _optional(env, "RELEASY_PUBLIC_BASE_URL")
    if s.public_base_url is not None and not _is_http_url_with_host(s.public_base_url):
        raise Fatal("invalid RELEASY_PUBLIC_BASE_URL: must be an http(s) URL with a host")

    s.operator_jwks_url = _optional(env, "RELEASY_OPERATOR_JWKS_URL")
    s.operator_issuer = _optional(env, "RELEASY_OPERATOR_ISSUER")
    s.operator_audience = _optional(env, "RELEASY_OPERATOR_AUDIENCE")
    s.operator_resource = _optional(env, "RELEASY_OPERATOR_RESOURCE")
    s.operator_jwks_ttl_seconds = _parse_u32(env, "RELEASY_OPERATOR_JWKS_TTL_SECONDS", 300)
    s.operator_jwt_leeway_seconds = _parse_u32(env, "RELEASY_OPERATOR_JWT_LEEWAY_SECONDS", 0)
    operator = (s.operator_jwks_url, s.operator_issuer, s.operator_audience)
    if any(v is not None for v in operator) and not all(v is not None for v in operator):
        raise Fatal("operator JWT config requires RELEASY_OPERATOR_JWKS_URL, "
                    "RELEASY_OPERATOR_ISSUER and RELEASY_OPERATOR_AUDIENCE together")
    if s.operator_jwks_url is not None and not _is_http_url_with_host(s.operator_jwks_url):
        raise Fatal("invalid RELEASY_OPERATOR_JWKS_URL: must be an http(s) URL with a host")

    bucket = _optional(env, "RELEASY_ARTIFACT_BUCKET")
    region = _optional(env, "RELEASY_ARTIFACT_REGION")
    endpoint = _optional(env, "RELEASY_ARTIFACT_ENDPOINT")
    access_key = _optional(env, "RELEASY_ARTIFACT_ACCESS_KEY")
    secret_key = _optional(env, "RELEASY_ARTIFACT_SECRET_KEY")
    path_style = _parse_bool(env, "RELEASY_ARTIFACT_PATH_STYLE", False)
    presign = _parse_u32(env, "RELEASY_ARTIFACT_PRESIGN_EXPIRES_SECONDS", 900)
    required = (bucket, region, access_key, secret_key)
    if all(v is not None for v in required):
        s.artifact = {"bucket": bucket, "region": region, "endpoint": endpoint,
                      "path_style": path_style, "presign_expires_seconds": presign}
    elif all(v is None for v in required) and endpoint is None:
        s.artifact = None
    else:
        raise Fatal("artifact storage config requires bucket, region, access key, and secret key")
    return s


def parse_bind_addr(value: str):
    """Parse like Rust's `SocketAddr::from_str`: `IPv4:port` or `[IPv6]:port`, no names."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)", value)
    if m:
        family = socket.AF_INET6
        try:
            host = str(ipaddress.IPv6Address(m.group(1)))
        except ValueError:
            raise ValueError(value) from None
    else:
        m = re.fullmatch(r"([0-9.]+):([0-9]+)", value)
        if not m:
            raise ValueError(value)
        family = socket.AF_INET
        try:
            host = str(ipaddress.IPv4Address(m.group(1)))
        except ValueError:
            raise ValueError(value) from None
    port = int(m.group(2))
    if port > 65535:
        raise ValueError(value)
    return family, host, port


# --------------------------------------------------------------------------- database URLs

def mask_database_url(url: str) -> str:
    """The URL with any password replaced by *** (for logs)."""
    if not url.startswith(("postgres://", "postgresql://")):
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostport}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{k}={'***' if k.lower() == 'password' else urllib.parse.quote(v, safe='/:')}"
            for k, v in pairs)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def postgres_password(url: str):
    """The password in a postgres URL, if any (so it can be redacted everywhere)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return None
    found = []
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    if ":" in userinfo:
        found.append(urllib.parse.unquote(userinfo.split(":", 1)[1]))
    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if k.lower() == "password":
            found.append(v)
    return found


PG_PARAM_MAP = {
    "sslmode": "sslmode", "ssl-mode": "sslmode",
    "sslrootcert": "sslrootcert", "ssl-root-cert": "sslrootcert", "ssl-ca": "sslrootcert",
    "sslcert": "sslcert", "ssl-cert": "sslcert", "sslkey": "sslkey", "ssl-key": "sslkey",
    "host": "host", "hostaddr": "hostaddr", "port": "port", "dbname": "dbname",
    "user": "user", "password": "password", "application_name": "application_name",
    "options": "options",
}


def parse_postgres_url(url: str, env) -> dict:
    """Connection keywords for libpq from a sqlx-style postgres URL."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise Fatal(f"database connect failed: error with configuration: {exc}") from None
    kwargs = {}
    netloc = parts.netloc
    userinfo, _, hostport = netloc.rpartition("@") if "@" in netloc else ("", "", netloc)
    if userinfo:
        user, sep, password = userinfo.partition(":")
        if user:
            kwargs["user"] = urllib.parse.unquote(user)
        if sep:
            kwargs["password"] = urllib.parse.unquote(password)
    port = ""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    else:
        host = hostport
    if port:
        if not port.isdigit() or int(port) > 65535:
            raise Fatal("database connect failed: error with configuration: invalid port number")
        kwargs["port"] = port
    host = urllib.parse.unquote(host)
    # sqlx: host from the URL, else PGHOST, else "localhost" (TCP, not libpq's unix socket)
    kwargs["host"] = host or env.get("PGHOST") or "localhost"
    dbname = urllib.parse.unquote(parts.path.lstrip("/"))
    if dbname:
        kwargs["dbname"] = dbname
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        mapped = PG_PARAM_MAP.get(key)
        if mapped is None:
            if key != "statement-cache-capacity":
                Log.warn(f"ignoring unrecognized connect parameter: {key}")
            continue
        kwargs[mapped] = value
    return kwargs


def parse_sqlite_url(url: str) -> dict:
    """sqlx `SqliteConnectOptions::from_str` semantics -> {uri, path, memory, mode}."""
    rest = url[len("sqlite://"):] if url.startswith("sqlite://") else url[len("sqlite:"):]
    path_part, _, query = rest.partition("?")
    memory = path_part == ":memory:"
    mode = "rw"                      # sqlx default: create_if_missing(false)
    immutable = False
    vfs = None
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key == "mode":
            if value not in ("ro", "rw", "rwc", "memory"):
                raise Fatal("database connect failed: error with configuration: "
                            f"unknown value {value!r} for `mode` query parameter")
            if value == "memory":
                memory = True
            else:
                mode = value
        elif key == "cache":
            if value not in ("private", "shared"):
                raise Fatal("database connect failed: error with configuration: "
                            f"unknown value {value!r} for `cache` query parameter")
        elif key == "immutable":
            if value not in ("true", "false"):
                raise Fatal("database connect failed: error with configuration: "
                            f"unknown value {value!r} for `immutable` query parameter")
            immutable = value == "true"
        elif key == "vfs":
            vfs = value
        else:
            raise Fatal("database connect failed: error with configuration: "
                        f"unknown query parameter `{key}` while parsing connection URL")
    if memory:
        uri = f"file:releasy-standin-{PID}?mode=memory&cache=shared"
        return {"uri": uri, "path": ":memory:", "memory": True, "mode": "memory"}
    path = urllib.parse.unquote(path_part)
    uri = "file:" + urllib.parse.quote(path, safe="/") + f"?mode={mode}"
    if immutable:
        uri += "&immutable=1"
    if vfs:
        uri += "&vfs=" + urllib.parse.quote(vfs, safe="")
    return {"uri": uri, "path": path, "memory": False, "mode": mode}


# --------------------------------------------------------------------------- database access

def _pg_error_text(exc) -> str:
    """sqlx-like rendering of a psycopg error."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if primary:
        return f"error returned from database: {primary}"
    text = str(exc).strip()
    m = re.search(r"FATAL:\s+(.*)", text)
    if m:
        return f"error returned from database: {m.group(1).strip()}"
    last = text.splitlines()[-1] if text else repr(exc)
    return f"error communicating with database: {last}"


def _sqlite_error_text(exc) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return f"error returned from database: {exc}"
    return f"error returned from database: (code: {code & 0xFF}) {exc}"


class Backend:
    """One kind of database: how to connect, and dialect details."""

    dialect = "?"

    def connect(self):
        raise NotImplementedError

    def error_text(self, exc) -> str:
        raise NotImplementedError

    def is_db_error(self, exc) -> bool:
        raise NotImplementedError


class PostgresBackend(Backend):
    dialect = "postgres"

    def __init__(self, url: str, env):
        self.kwargs = parse_postgres_url(url, env)
        try:
            import psycopg  # noqa: F401  (Debian: python3-psycopg)
        except ImportError:
            raise Fatal("database connect failed: python3-psycopg is not installed "
                        "(the stand-in needs it for PostgreSQL)") from None
        self.psycopg = psycopg

    def connect(self):
        return self.psycopg.connect(autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT,
                                    **self.kwargs)

    def connect_retrying(self, deadline: float):
        """Like sqlx's pool `connect`: retry refused connections and `57P03` until the
        acquire timeout, then `pool timed out while waiting for an open connection`."""
        backoff = 0.01
        while True:
            try:
                return self.connect()
            except self.psycopg.OperationalError as exc:
                text = str(exc)
                transient = ("Connection refused" in text
                             or "the database system is" in text
                             or getattr(exc, "sqlstate", None) == "57P03")
                if not transient:
                    raise Fatal(f"database connect failed: {_pg_error_text(exc)}") from None
                if time.monotonic() + backoff >= deadline:
                    raise Fatal("database connect failed: "
                                "pool timed out while waiting for an open connection") from None
                Log.debug(f"database not accepting connections yet: {text.strip()}")
                time.sleep(backoff)
                backoff = min(backoff * 2, POOL_ACQUIRE_TIMEOUT / 5)

    def error_text(self, exc) -> str:
        return _pg_error_text(exc)

    def is_db_error(self, exc) -> bool:
        return isinstance(exc, self.psycopg.Error)


class SqliteBackend(Backend):
    dialect = "sqlite"

    def __init__(self, url: str):
        self.opts = parse_sqlite_url(url)

    def connect(self):
        conn = sqlite3.connect(self.opts["uri"], uri=True, timeout=SQLITE_BUSY_TIMEOUT,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            if not self.opts["memory"] and self.opts["mode"] != "ro":
                conn.execute("PRAGMA journal_mode = WAL")   # sqlx's default journal mode
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def connect_retrying(self, deadline: float):
        try:
            return self.connect()
        except sqlite3.Error as exc:
            raise Fatal(f"database connect failed: {_sqlite_error_text(exc)}") from None

    def error_text(self, exc) -> str:
        return _sqlite_error_text(exc)

    def is_db_error(self, exc) -> bool:
        return isinstance(exc, sqlite3.Error)


def split_sqlite_statements(sql: str):
    """Split a script into complete statements (sqlite3's execute() takes one at a time)."""
    statements, buf = [], ""
    for chunk in sql.split(";"):
        buf += chunk + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip().strip(";").strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip().strip(";").strip():
        statements.append(buf.strip())
    return statements


class Session:
    """One database connection with dialect-neutral helpers. SQL uses %s placeholders."""

    def __init__(self, backend: Backend, conn):
        self.backend = backend
        self.conn = conn
        self.pg = backend.dialect == "postgres"

    def execute(self, sql, params=()):
        if self.pg:
            return self.conn.execute(sql, params)
        return self.conn.execute(sql.replace("%s", "?"), params)

    def execute_script(self, sql):
        if self.pg:
            return self.conn.execute(sql)            # no params: simple query protocol
        for statement in split_sqlite_statements(sql):
            self.conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self):
        if self.pg:
            with self.conn.transaction():
                yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def now(self):
        """(SQL fragment, params) for the current time: the database's clock on PostgreSQL
        (one clock for every host), the local clock on SQLite (single host anyway)."""
        if self.pg:
            return "clock_timestamp()", ()
        return "%s", (utc_now_iso(),)

    def close(self):
        with contextlib.suppress(Exception):
            self.conn.close()


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- stand-in bookkeeping

STANDIN_DDL = {
    "postgres": (
        """CREATE TABLE IF NOT EXISTS standin_start_log (
    id BIGSERIAL PRIMARY KEY,
    host TEXT NOT NULL,
    binary_version TEXT NOT NULL,
    pid INTEGER NOT NULL,
    bind_addr TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    lock_acquired_at TIMESTAMPTZ,
    migrated_at TIMESTAMPTZ,
    ready_at TIMESTAMPTZ,
    stopped_at TIMESTAMPTZ,
    migrations_applied INTEGER,
    error TEXT
)""",
        """CREATE TABLE IF NOT EXISTS standin_migration_log (
    id BIGSERIAL PRIMARY KEY,
    migration BIGINT NOT NULL,
    description TEXT NOT NULL,
    host TEXT NOT NULL,
    binary_version TEXT NOT NULL,
    pid INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL
)""",
    ),
    "sqlite": (
        """CREATE TABLE IF NOT EXISTS standin_start_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    host TEXT NOT NULL,
    binary_version TEXT NOT NULL,
    pid INTEGER NOT NULL,
    bind_addr TEXT NOT NULL,
    started_at TEXT NOT NULL,
    lock_acquired_at TEXT,
    migrated_at TEXT,
    ready_at TEXT,
    stopped_at TEXT,
    migrations_applied INTEGER,
    error TEXT
)""",
        """CREATE TABLE IF NOT EXISTS standin_migration_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    migration BIGINT NOT NULL,
    description TEXT NOT NULL,
    host TEXT NOT NULL,
    binary_version TEXT NOT NULL,
    pid INTEGER NOT NULL,
    applied_at TEXT NOT NULL
)""",
    ),
}


class StartLog:
    """This process's row in standin_start_log (best effort: bookkeeping never stops it)."""

    def __init__(self, session: Session, bind_addr: str):
        self.session = session
        self.bind_addr = bind_addr
        self.row_id = None
        self.lock = threading.Lock()

    def create_tables(self):
        for ddl in STANDIN_DDL[self.session.backend.dialect]:
            for attempt in range(5):
                try:
                    self.session.execute(ddl)
                    break
                except Exception as exc:
                    # Concurrent CREATE TABLE IF NOT EXISTS on PostgreSQL can still collide.
                    if getattr(exc, "sqlstate", None) in ("23505", "42P07", "42710") \
                            and attempt < 4:
                        time.sleep(0.05)
                        continue
                    raise

    def insert(self, started_at):
        s = self.session
        sql = ("INSERT INTO standin_start_log (host, binary_version, pid, bind_addr, started_at)"
               " VALUES (%s, %s, %s, %s, %s)")
        params = (HOSTNAME, VERSION, PID, self.bind_addr, started_at)
        if s.pg:
            self.row_id = s.execute(sql + " RETURNING id", params).fetchone()[0]
        else:
            self.row_id = s.execute(sql, params).lastrowid

    def _update(self, assignments: str, values) -> None:
        """UPDATE this row; after a failure (e.g. the database restarted) retry once on a
        new connection."""
        with self.lock:
            for attempt in (1, 2):
                try:
                    expr, now_params = self.session.now()
                    sql = (f"UPDATE standin_start_log SET {assignments.replace('{now}', expr)} "
                           "WHERE id = %s")
                    params = (list(now_params) if "{now}" in assignments else []) + list(values)
                    self.session.execute(sql, [*params, self.row_id])
                    return
                except Exception:
                    if attempt == 2:
                        raise
                    # A new connection just for bookkeeping; the old one may be the
                    # migrator's (holding the migration lock), so it is left alone.
                    self.session = Session(self.session.backend, self.session.backend.connect())

    def mark(self, column: str, **extra):
        """Set `column` to now (and any extra columns to values)."""
        if self.row_id is None:
            return
        assignments = ", ".join([f"{column} = {{now}}"] + [f"{key} = %s" for key in extra])
        try:
            self._update(assignments, list(extra.values()))
        except Exception as exc:
            Log.warn(f"standin: could not record {column}: {exc}")

    def set_error(self, message: str):
        if self.row_id is None:
            return
        try:
            self._update("error = %s", [REDACT(message)])
        except Exception as exc:
            Log.debug(f"standin: could not record the start-up error: {exc}")


# --------------------------------------------------------------------------- migrator (sqlx-like)

SQLX_TABLE_DDL = {
    "postgres": """CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
)""",
    "sqlite": """CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
)""",
}


def run_migrations(session: Session, start_log: StartLog) -> int:
    """Apply the embedded migrations like sqlx's `Migrator::run`. Returns how many were
    applied by this process. Raises MigrateError (message without the
    `database migration failed: ` prefix)."""
    backend = session.backend
    lock_key = None
    if session.pg:
        dbname = session.execute("SELECT current_database()").fetchone()[0]
        lock_key = migration_lock_key(dbname)
        Log.info(f"standin: waiting for the migration lock (pg_advisory_lock({lock_key}))")
        session.execute("SELECT pg_advisory_lock(%s::bigint)", (lock_key,))   # blocks, no timeout
    start_log.mark("lock_acquired_at")

    session.execute(SQLX_TABLE_DDL[backend.dialect])
    dirty = session.execute("SELECT version FROM _sqlx_migrations WHERE success = false "
                            "ORDER BY version LIMIT 1").fetchone()
    if dirty is not None:
        raise MigrateError(f"migration {dirty[0]} is partially applied; fix and remove row "
                           "from `_sqlx_migrations` table")
    applied = session.execute(
        "SELECT version, checksum FROM _sqlx_migrations ORDER BY version").fetchall()
    known = {version for version, _, _ in MIGRATIONS}
    for version, _ in applied:
        if version not in known:
            raise MigrateError(f"migration {version} was previously applied but is missing "
                               "in the resolved migrations")
    applied_map = {version: bytes(checksum) for version, checksum in applied}

    count = 0
    for version, description, sql in sorted(MIGRATIONS):
        checksum = migration_checksum(sql)
        if version in applied_map:
            if applied_map[version] != checksum:
                raise MigrateError(f"migration {version} was previously applied but has "
                                   "been modified")
            continue
        Log.info(f"standin: applying migration {version} ({description})")
        started = time.monotonic_ns()
        try:
            with session.transaction():
                session.execute_script(sql)
                if MIGRATION_SECONDS > 0:
                    time.sleep(MIGRATION_SECONDS)
                session.execute(
                    "INSERT INTO _sqlx_migrations "
                    "(version, description, success, checksum, execution_time) "
                    "VALUES (%s, %s, TRUE, %s, -1)",
                    (version, description, checksum))
                expr, now_params = session.now()
                session.execute(
                    "INSERT INTO standin_migration_log "
                    "(migration, description, host, binary_version, pid, applied_at) "
                    f"VALUES (%s, %s, %s, %s, %s, {expr})",
                    (version, description, HOSTNAME, VERSION, PID, *now_params))
        except Exception as exc:
            if not backend.is_db_error(exc):
                raise
            raise MigrateError(f"while executing migration {version}: "
                               f"{backend.error_text(exc)}") from None
        elapsed = time.monotonic_ns() - started
        session.execute("UPDATE _sqlx_migrations SET execution_time = %s WHERE version = %s",
                        (elapsed, version))
        count += 1
        Log.info(f"standin: applied migration {version} in {elapsed / 1e6:.1f} ms")

    # Recorded before the lock is released, so the log's order is the lock's order.
    start_log.mark("migrated_at", migrations_applied=count)
    if lock_key is not None:
        session.execute("SELECT pg_advisory_unlock(%s::bigint)", (lock_key,))
    return count


# --------------------------------------------------------------------------- health pool

class PingPool:
    """At most `size` connections (RELEASY_DATABASE_MAX_CONNECTIONS), reused; a broken idle
    connection is replaced once per check (like sqlx's test-before-acquire)."""

    def __init__(self, backend: Backend, size: int, seed=None):
        self.backend = backend
        self.slots = threading.BoundedSemaphore(max(1, size))
        self.idle = []
        self.idle_lock = threading.Lock()
        if seed is not None:
            self.idle.append(seed)

    def _checkout(self):
        with self.idle_lock:
            return self.idle.pop() if self.idle else None

    def _checkin(self, conn):
        with self.idle_lock:
            self.idle.append(conn)

    def ping(self) -> None:
        """SELECT 1 on a pooled connection; raises on failure."""
        if not self.slots.acquire(timeout=HEALTH_ACQUIRE_TIMEOUT):
            raise TimeoutError("pool timed out while waiting for an open connection")
        try:
            conn = self._checkout()
            if conn is not None:
                try:
                    conn.execute("SELECT 1").fetchone()
                    self._checkin(conn)
                    return
                except Exception:
                    with contextlib.suppress(Exception):
                        conn.close()
            conn = self.backend.connect()
            try:
                conn.execute("SELECT 1").fetchone()
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            self._checkin(conn)
        finally:
            self.slots.release()


# --------------------------------------------------------------------------- HTTP

class App:
    def __init__(self, pool: PingPool, bind_addr: str, public_base_url: str | None = None):
        self.pool = pool
        self.bind_addr = bind_addr
        # Like upstream, every link handed to clients is built from this base.
        self.public_base_url = (public_base_url or DEFAULT_PUBLIC_BASE_URL).rstrip("/")
        self.started = utc_now_iso()
        self.requests = 0
        self.requests_lock = threading.Lock()

    def count_request(self):
        with self.requests_lock:
            self.requests += 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"{SERVICE}/{VERSION}"
    timeout = IDLE_KEEPALIVE_TIMEOUT
    disable_nagle_algorithm = True
    app: App = None  # set on the subclass built in main()

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        if Log.level >= LEVELS["debug"]:
            Log.debug(f"http {self.address_string()} " + (format % args))

    # ---- request bodies
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise BadRequest("request body too large")
        return self.rfile.read(n)

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("invalid chunk size") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass                                   # trailers
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise BadRequest("request body too large")
            body += self.rfile.read(size)
            self.rfile.readline(65537)                     # CRLF after the chunk

    # ---- responses
    def _send(self, status: int, payload, extra_headers=()):
        body = (json.dumps(payload, separators=(",", ":")) + "\n").encode() \
            if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Standin-Version", VERSION)
        for key, value in extra_headers:
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _health(self):
        if NEVER_READY:
            return 503, {"status": "unavailable", "error": "database unavailable"}
        try:
            self.app.pool.ping()
        except Exception as exc:
            Log.error(f"health check failed: {exc}")
            return 503, {"status": "unavailable", "error": "database unavailable"}
        return 200, {"status": "ok"}

    def _route(self, method: str, path: str, body: bytes):
        if path in ("/health", "/ready"):
            if method not in ("GET", "HEAD"):
                return 405, None
            return self._health()
        if path == "/live":
            if method not in ("GET", "HEAD"):
                return 405, None
            return 200, {"status": "ok"}
        if path == "/version":
            if method not in ("GET", "HEAD"):
                return 405, None
            return 200, {"service": SERVICE, "version": VERSION, "host": HOSTNAME, "pid": PID,
                         "bind_addr": self.app.bind_addr, "started": self.app.started,
                         "migrations": [v for v, _, _ in MIGRATIONS],
                         "requests": self.app.requests,
                         "broken_migration": BROKEN_MIGRATION, "never_ready": NEVER_READY}
        if path == DOWNLOAD_LINK_PATH:
            # Upstream hands out download URLs built from RELEASY_PUBLIC_BASE_URL.
            if method not in ("GET", "HEAD"):
                return 405, None
            name = f"releasy-standin-{VERSION}.txt"
            return 200, {"url": f"{self.app.public_base_url}{DOWNLOADS_PREFIX}{name}"}
        if path.startswith(DOWNLOADS_PREFIX) and len(path) > len(DOWNLOADS_PREFIX):
            if method not in ("GET", "HEAD"):
                return 405, None
            return 200, {"download": path[len(DOWNLOADS_PREFIX):], "version": VERSION,
                         "host": HOSTNAME}
        if path == "/echo" or path.startswith("/api/") or path == "/api":
            if method == "POST" or (method in ("PUT", "PATCH") and path != "/echo"):
                return 200, {"length": len(body), "version": VERSION, "host": HOSTNAME}
            if method in ("GET", "HEAD") and path != "/echo":
                return 200, {"service": SERVICE, "version": VERSION, "host": HOSTNAME}
            return 405, None
        if path == "/":
            if method not in ("GET", "HEAD"):
                return 405, None
            return 200, {"service": SERVICE, "version": VERSION, "host": HOSTNAME}
        return 404, {"error": "not found"}

    def _dispatch(self):
        self.app.count_request()
        try:
            body = self._read_body()
        except BadRequest as exc:
            self.close_connection = True
            self._send(400, {"error": str(exc)})
            return
        path = urllib.parse.urlsplit(self.path).path or "/"
        status, payload = self._route(self.command, path, body)
        if status == 405:
            payload = {"error": "method not allowed"}
        self._send(status, payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError, OSError) as exc:
            Log.debug(f"http connection ended: {exc}")


class BadRequest(Exception):
    pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True       # tokio sets SO_REUSEADDR on its listeners as well
    request_queue_size = 1024

    def server_bind(self):
        # HTTPServer.server_bind would resolve the address with getfqdn (DNS): skip that.
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        Log.debug(f"http error from {client_address}: {sys.exc_info()[1]!r}")


# --------------------------------------------------------------------------- main

class Process:
    """Start-up/shutdown state shared with the signal handler."""

    phase = "startup"
    server = None
    start_log = None


def _exit_now(code: int) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(code)


def _on_signal(signum, frame):
    name = signal.Signals(signum).name
    if Process.phase != "serving":
        Log.info(f"standin: received {name} during start-up; exiting")
        _exit_now(0)
    Process.phase = "stopping"
    Log.info(f"standin: received {name}; exiting without draining (like upstream)")
    if Process.server is not None:
        with contextlib.suppress(Exception):
            Process.server.socket.close()          # stop accepting at once
    if Process.start_log is not None:
        recorder = threading.Thread(target=Process.start_log.mark, args=("stopped_at",),
                                    daemon=True)
        recorder.start()
        recorder.join(1.0)                          # bookkeeping only; never wait long
    _exit_now(0)


def fail(message: str, start_log=None) -> int:
    message = REDACT(message)
    if start_log is not None:
        start_log.set_error(message)
    with contextlib.suppress(Exception):
        sys.stderr.write(f"Error: {rust_debug_str(message)}\n")
        sys.stderr.flush()
    return 1


def main(env=None) -> int:
    env = os.environ if env is None else env
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    for key in SECRET_VARS:
        REDACT.add(_optional(env, key) or "")
    url = env.get("RELEASY_DATABASE_URL", "")
    for password in postgres_password(url) or ():
        REDACT.add(password)

    # 1. configuration
    try:
        settings = load_settings(env)
    except Fatal as exc:
        return fail(str(exc))
    Log.level = parse_log_filter(env.get("RUST_LOG"), settings.log_level)
    try:
        family, host, port = parse_bind_addr(settings.bind_addr)
    except ValueError:
        return fail(f"invalid RELEASY_BIND_ADDR: {settings.bind_addr}")
    Log.info(f"standin: releasy-server stand-in {VERSION} starting (host {HOSTNAME}, pid {PID}, "
             f"{len(MIGRATIONS)} embedded migrations)")

    # 2. database connect
    db_url = settings.database_url
    try:
        if db_url.startswith(("postgres://", "postgresql://")):
            backend = PostgresBackend(db_url, env)
        elif db_url.startswith("sqlite:"):
            backend = SqliteBackend(db_url)
        else:
            return fail("invalid RELEASY_DATABASE_URL: RELEASY_DATABASE_URL must start with "
                        "postgres://, postgresql:// or sqlite:")
        conn = backend.connect_retrying(time.monotonic() + POOL_ACQUIRE_TIMEOUT)
    except Fatal as exc:
        return fail(str(exc))
    session = Session(backend, conn)
    Log.info(f"standin: connected to {mask_database_url(db_url)}")

    # 3. migrations (stand-in bookkeeping around them)
    start_log = StartLog(session, settings.bind_addr)
    try:
        if session.pg:
            started_at = session.execute("SELECT clock_timestamp()").fetchone()[0]
        else:
            started_at = utc_now_iso()
        start_log.create_tables()
        start_log.insert(started_at)
    except Exception as exc:
        if not backend.is_db_error(exc):
            raise
        return fail(f"database migration failed: {backend.error_text(exc)}")
    Process.start_log = start_log
    try:
        run_migrations(session, start_log)
    except MigrateError as exc:
        return fail(f"database migration failed: {exc}", start_log)
    except Exception as exc:
        if not backend.is_db_error(exc):
            raise
        return fail(f"database migration failed: {backend.error_text(exc)}", start_log)

    # 4. bind, then serve
    pool = PingPool(backend, settings.database_max_connections)
    shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    Log.info(f"releasy-server listening on {shown}")
    handler = type("BoundHandler", (Handler,), {"app": App(pool, settings.bind_addr,
                                                              settings.public_base_url)})
    server_class = type("BoundServer", (Server,), {"address_family": family})
    try:
        server = server_class((host, port), handler)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return fail(f"bind failed: {reason} (os error {exc.errno})", start_log)
    Process.server = server
    start_log.mark("ready_at")
    Process.phase = "serving"
    if NEVER_READY:
        Log.info("standin: never-ready build: /health and /ready will answer 503")
    server.serve_forever(poll_interval=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
