"""The deploy lock: one per environment, held for a whole rollout, freed by the holder's death.

PostgreSQL environments: a session-level advisory lock on the app database, taken over an
SSH tunnel to the db host (a direct-tcpip channel of the executor's connection to it,
bridged to an ephemeral port on this machine's 127.0.0.1; psycopg connects there and
reaches 127.0.0.1:5432 on the db host), so the database port never has to be exposed and
the lock lives exactly as long as our session:

- a clean exit unlocks and disconnects;
- a crash or ``kill -9`` closes our TCP connection, sshd closes the channel, PostgreSQL sees
  EOF on its loopback socket and ends the session: the lock is free at once;
- a laptop that vanishes (sleep, lost Wi-Fi) sends no FIN. What bounds the release then is
  sshd's ``ClientAliveInterval`` x ``ClientAliveCountMax``: sshd probes the silent client,
  gives up, closes the channel -> EOF on the loopback socket -> session ends -> lock freed.
  Recommended on every host: ``ClientAliveInterval 5`` / ``ClientAliveCountMax 3`` (~15 s).
  Without them (OpenSSH's default interval is 0: off) only the kernel's TCP keepalive
  (``TCPKeepAlive yes``, 2 h idle by default) would ever notice. The server-side
  ``tcp_keepalives_*`` we set on the lock session apply to the sshd->postgres loopback
  socket, whose peer (sshd) stays alive, so they only matter if sshd itself hangs. The SSH
  transport keepalive we set (every 5 s) keeps NAT/firewall state alive through the long
  quiet stretches of a rollout (a live client also answers sshd's ClientAlive probes).
No lock files, no TTLs: nothing can go stale.

Key: ``pg_advisory_lock(int4, int4)`` with classid = `LOCK_CLASSID` ('RLSY') and objid =
crc32(environment) as a signed int4. Upstream's migrator locks the single bigint
``0x3d32ad9e * crc32(dbname)``. Two-int keys and bigint keys are different key spaces in
``pg_locks`` (objsubid 2 vs 1) and can never collide: holding ours never blocks
Releasy's own migrations.

SQLite environments (one host, no PostgreSQL): ``flock`` on ``/run/releasy-deploy.lock``,
held by a ``flock`` process started on a dedicated SSH channel whose stdin we keep open; it
exits (freeing the lock) when that channel closes for any of the reasons above. The holder
is written to ``/run/releasy-deploy.holder`` while held. Whether the lock is held is read
from ``/proc/locks`` (read-only: probing with ``flock --nonblock`` would itself hold the
lock for an instant and could make a concurrent deploy fail), so a stale holder file left
by a crash never makes the lock look held.

Who holds it is a compact label (`holder_label`), PostgreSQL's ``application_name`` of the
lock session (63 bytes at most) or the holder file's content, parsed back by `parse_label`.
"""
from __future__ import annotations

import getpass
import os
import re
import selectors
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

import paramiko

from .errors import DeployError, LockHeld, UnreachableError, first_line
from .executor import HostConnection, render, with_sudo
from .inventory import POSTGRES_PORT, check_version
from .session import Session

__all__ = [
    "LOCK_CLASSID", "UPSTREAM_MIGRATION_KEY_MULTIPLIER", "POLL_INTERVAL_S", "LockBusy",
    "LockUnavailable", "LockLost", "LockInfo", "lock_key", "upstream_migration_key",
    "holder_label", "parse_label", "database_credentials", "deploy_lock", "lock_holder",
    "holder_info", "SshTunnel",
]

#: classid of our two-int advisory key: b"RLSY" read as a big-endian int4 (0x524C5359).
LOCK_CLASSID = 0x52_4C_53_59
#: upstream sqlx's migration key is this times crc32(current_database()), one bigint.
UPSTREAM_MIGRATION_KEY_MULTIPLIER = 0x3D32AD9E
POLL_INTERVAL_S = 0.5
LABEL_PREFIX = "releasy-deploy"
MAX_LABEL_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1 (application_name is truncated there)
MIN_WHO_BYTES = 12  # of user@machine kept in a label when the version is very long
SINCE_FORMAT = "%Y%m%dT%H%M%SZ"
FLOCK_PATH = "/run/releasy-deploy.lock"
HOLDER_PATH = "/run/releasy-deploy.holder"
TUNNEL_TIMEOUT_S = 10.0
#: seconds between client->server SSH keepalives on the connection carrying the lock.
SSH_KEEPALIVE_S = 5
#: server-side TCP keepalives of the lock session (see the module docstring for their reach).
SERVER_KEEPALIVES = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 2,
                     "tcp_keepalives_count": 3}

_LABEL_WORD = re.compile(r"[^A-Za-z0-9._@+-]")


class LockBusy(LockHeld):
    """Another deploy holds the environment's lock (exit code 3)."""

    def __init__(self, message: str, *, host: str | None = None,
                 holder: LockInfo | None = None) -> None:
        super().__init__(message, host=host)
        self.holder = holder


class LockUnavailable(DeployError):
    """The lock could not be checked or taken at all (database down, tunnel refused...)."""


class LockLost(DeployError):
    """The lock was held, but its session is gone: stop before changing anything else."""


# --------------------------------------------------------------------------------------
# Pure helpers (unit-tested without SSH or PostgreSQL)
# --------------------------------------------------------------------------------------
def _int4(value: int) -> int:
    """An unsigned 32-bit value as PostgreSQL's signed int4."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def lock_key(environment: str) -> tuple[int, int]:
    """The two int4 arguments of ``pg_advisory_lock(int4, int4)`` for this environment."""
    return LOCK_CLASSID, _int4(zlib.crc32(environment.encode("utf-8")))


def pg_locks_ids(key: tuple[int, int]) -> tuple[int, int]:
    """classid/objid as ``pg_locks`` shows them (type oid: unsigned 32-bit)."""
    return key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF


def upstream_migration_key(database: str) -> int:
    """Upstream sqlx's migration lock key for a database (a bigint; ours never equals it)."""
    return UPSTREAM_MIGRATION_KEY_MULTIPLIER * zlib.crc32(database.encode("utf-8"))


def _clean(word: str) -> str:
    """One label word: ASCII without spaces (PostgreSQL turns non-ASCII into '?' anyway)."""
    return _LABEL_WORD.sub("?", word) or "?"


def holder_label(*, user: str, machine: str, pid: int, version: str | None,
                 since: datetime) -> str:
    """``releasy-deploy <since> <pid> <version|-> <user>@<machine>``, at most 63 bytes.

    The free-form part comes last so it is the one cut when the label is too long.
    """
    if version is not None:
        check_version(version)
    stamp = since.astimezone(timezone.utc).strftime(SINCE_FORMAT)
    shown = version or "-"
    head = f"{LABEL_PREFIX} {stamp} {int(pid)} "
    # Leave room for at least a few characters of user@machine; a very long version is
    # shown cut, ending in "~" (the label is for people; nothing parses the version back).
    room = MAX_LABEL_BYTES - len(head) - 1 - MIN_WHO_BYTES
    if len(shown) > room:
        shown = shown[: room - 1] + "~"
    head = f"{head}{shown} "
    user, machine = _clean(user), _clean(machine)
    room = MAX_LABEL_BYTES - len(head) - 1  # for user + machine, around the "@"
    if len(user) + len(machine) > room:  # cut both, the user to at most half
        user = user[: max(1, min(len(user), room // 2))]
        machine = machine[: max(1, room - len(user))]
    return f"{head}{user}@{machine}"


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or, when yielded by `deploy_lock`, who now holds) an environment's lock."""

    environment: str
    where: str  # e.g. "PostgreSQL on db1", "flock on solo"
    user: str | None = None
    machine: str | None = None
    pid: int | None = None  # the deploying process, on its own machine
    version: str | None = None
    since: datetime | None = None
    label: str = ""  # the raw stored label (application_name / holder file)
    note: str | None = None  # for holders that are not ours (a psql session by hand...)
    _check: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def who(self) -> str:
        if self.user is None and self.machine is None:
            return self.note or "an unknown session"
        parts = [f"{self.user}@{self.machine}"]
        if self.pid is not None:
            parts.append(f"pid={self.pid}")
        if self.version is not None:
            parts.append(f"version={self.version}")
        return " ".join(parts)

    @property
    def when(self) -> str:
        return self.since.strftime("%Y-%m-%dT%H:%M:%SZ") if self.since else "an unknown time"

    def describe(self) -> str:
        """``user@machine pid=N version=V since 2026-11-26T07:50:00Z``."""
        return f"{self.who} since {self.when}"

    def ensure_held(self) -> None:
        """Raise `LockLost` if the session holding our lock is gone (call between steps)."""
        if self._check is not None:
            self._check()


def parse_label(label: str, *, environment: str, where: str) -> LockInfo | None:
    """Parse a `holder_label`; None when the text is not one of ours."""
    parts = label.strip().split(" ", 4)
    if len(parts) != 5 or parts[0] != LABEL_PREFIX:
        return None
    _, stamp, pid, version, who = parts
    try:
        since = datetime.strptime(stamp, SINCE_FORMAT).replace(tzinfo=timezone.utc)
        pid_number = int(pid)
    except ValueError:
        return None
    user, _, machine = who.partition("@")
    return LockInfo(environment=environment, where=where, user=user, machine=machine or "?",
                    pid=pid_number, version=None if version == "-" else version, since=since,
                    label=label.strip())


def busy_message(environment: str, holder: LockInfo, *, waited: float = 0) -> str:
    after = f" (waited {waited:g} s)" if waited > 0 else ""
    return (
        f"deploy of {environment} held by {holder.who} since {holder.when}"
        f" ({holder.where}){after}.\n"
        f"  Wait for that deploy to finish, or re-run with --wait SECONDS to queue behind it."
        f" If it is dead, its lock frees itself as soon as its SSH connection is dropped;"
        f" `fab deploy.lock` shows the holder."
    )


@dataclass(frozen=True)
class DatabaseCredentials:
    user: str
    password: str = field(repr=False)
    dbname: str


def database_credentials(url: str) -> DatabaseCredentials:
    """User, password and database name of a ``postgres://`` URL (the host is not used:
    the lock always connects to 127.0.0.1:5432 on the db host through the tunnel)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"not a PostgreSQL URL (scheme {parts.scheme!r})")
    dbname = unquote(parts.path.lstrip("/"))
    if not parts.username or not dbname:
        raise ValueError("the PostgreSQL URL lacks a user or a database name")
    return DatabaseCredentials(unquote(parts.username), unquote(parts.password or ""), dbname)


def _identity() -> tuple[str, str, int]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return user, socket.gethostname().split(".")[0], os.getpid()


# --------------------------------------------------------------------------------------
# SQL (parameters are always bound, never formatted in)
# --------------------------------------------------------------------------------------
TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(%s::int4, %s::int4)"
UNLOCK_SQL = "SELECT pg_advisory_unlock(%s::int4, %s::int4)"
SET_NAME_SQL = "SELECT set_config('application_name', %s, false)"
# objsubid 2 = the two-int key space (bigint keys have objsubid 1).
HOLDER_SQL = """
SELECT a.pid, a.application_name, a.usename, host(a.client_addr), a.backend_start,
       a.pid = pg_backend_pid()
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid::bigint = %s AND l.objid::bigint = %s
"""


def keepalive_statements() -> list[str]:
    return [f"SET {name} = {int(value)}" for name, value in SERVER_KEEPALIVES.items()]


# --------------------------------------------------------------------------------------
# Remote scripts of the flock variant (values only as positional parameters)
# --------------------------------------------------------------------------------------
# $1 lock file, $2 holder file, $3 seconds to wait (0: don't). Prints BUSY plus the holder
# file and exits 3; or takes the lock, prints ACQUIRED, reads the holder label from stdin
# (so its "since" is the moment the lock was granted), writes it to the holder file, prints
# LOCKED, then holds the lock until its stdin (our SSH channel) closes. The holder file is
# removed before the lock is released, so a stale one is only ever left by a crash (and
# the status script trusts /proc/locks, not the file, for held vs free).
# `flock --close FILE COMMAND` rather than `flock FD` in this shell: the lock must be held
# by exactly one live process (flock itself, waiting for COMMAND), because /proc/locks
# inside a container (a pid namespace) hides locks whose owner pid is gone -- and the
# status script reads /proc/locks. --close: COMMAND does not inherit the locked file, so
# the lock ends with the flock process whatever happens to it.
FLOCK_HOLD_SCRIPT = """set -u
lock=$1 holder=$2 wait=$3
hold='echo ACQUIRED
IFS= read -r label || exit 5
printf "%s\\n" "$label" > "$1.new" && mv -f -- "$1.new" "$1" || exit 4
echo LOCKED
cat > /dev/null
rm -f -- "$1"'
take() {
  flock "$@" --close --conflict-exit-code 75 "$lock" sh -c "$hold" releasy-deploy-lock "$holder"
}
if [ "$wait" = 0 ]; then take --nonblock; else take --wait "$wait"; fi
rc=$?
[ "$rc" = 75 ] || exit "$rc"
echo BUSY
cat -- "$holder" 2>/dev/null
exit 3
"""

# $1 lock file, $2 holder file. Prints FREE, or "HELD <pid>" and the holder file. Reads
# /proc/locks (granted locks only: blocked waiters are listed as "N: -> FLOCK ...") for the
# lock file's device:inode in the kernel's format (major:minor in hex, inode in decimal).
FLOCK_STATUS_SCRIPT = """set -u
[ -e "$1" ] || { echo FREE; exit 0; }
d=$(stat -c %d -- "$1") && i=$(stat -c %i -- "$1") || exit 4
id=$(printf '%02x:%02x:%s' $(( (d >> 8) & 0xfff )) $(( (d & 0xff) | ((d >> 12) & 0xfff00) )) "$i")
pid=$(awk -v id="$id" '$2 == "FLOCK" && $6 == id { print $5; exit }' /proc/locks)
[ -n "$pid" ] || { echo FREE; exit 0; }
echo "HELD $pid"
cat -- "$2" 2>/dev/null || true
"""


def flock_hold_argv(wait: float) -> list[str]:
    seconds = max(0, int(-(-wait // 1)))  # whole seconds, rounded up
    return ["sh", "-c", FLOCK_HOLD_SCRIPT, "releasy-deploy-lock", FLOCK_PATH, HOLDER_PATH,
            str(seconds)]


def flock_status_argv() -> list[str]:
    return ["sh", "-c", FLOCK_STATUS_SCRIPT, "releasy-deploy-lock", FLOCK_PATH, HOLDER_PATH]


def parse_flock_status(stdout: str, *, environment: str, where: str) -> LockInfo | None:
    """Output of `FLOCK_STATUS_SCRIPT` -> None (free) or the holder."""
    lines = stdout.splitlines()
    if not lines or lines[0].strip() == "FREE":
        return None
    first = lines[0].split()
    if first[0] != "HELD":
        raise ValueError(f"unexpected lock status output {lines[0]!r}")
    return _holder_from_file(lines[1:], environment=environment, where=where,
                             remote_pid=first[1] if len(first) > 1 else "?")


def _holder_from_file(lines: list[str], *, environment: str, where: str,
                      remote_pid: str = "?") -> LockInfo:
    label = lines[0].strip() if lines else ""
    parsed = parse_label(label, environment=environment, where=where)
    if parsed is not None:
        return parsed
    return LockInfo(environment=environment, where=where, label=label,
                    note=f"an unknown process (flock taken by pid {remote_pid};"
                         f" no holder file {HOLDER_PATH})")


# --------------------------------------------------------------------------------------
# The SSH tunnel
# --------------------------------------------------------------------------------------
def _transport(conn: HostConnection) -> paramiko.Transport:
    # The executor's own verified, lazily opened connection: no second SSH login.
    return conn.transport()


class SshTunnel:
    """127.0.0.1:<ephemeral port> here -> ``dest`` as seen from the SSH server.

    One direct-tcpip channel, opened at once (so a refused forward or a closed port is
    reported before any client tries), bridged to the first client that connects; the
    listener is closed after that one accept, so nothing else can use the tunnel.
    """

    def __init__(self, conn: HostConnection, dest: tuple[str, int], *,
                 timeout: float = TUNNEL_TIMEOUT_S) -> None:
        self.host = conn.name
        transport = _transport(conn)
        transport.set_keepalive(SSH_KEEPALIVE_S)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self.port: int = self._listener.getsockname()[1]
        try:
            self._chan = transport.open_channel(
                "direct-tcpip", dest, ("127.0.0.1", self.port), timeout=timeout)
        except paramiko.ChannelException as exc:
            self._listener.close()
            why = exc.text or f"code {exc.code}"
            hint = (
                "sshd refuses TCP forwarding: set `AllowTcpForwarding local` (or yes) in"
                f" {conn.name}'s sshd_config"
                if exc.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
                else f"nothing accepts connections on {dest[0]}:{dest[1]} there"
            )
            raise LockUnavailable(
                f"{conn.name}: cannot open an SSH tunnel to {dest[0]}:{dest[1]} ({why}): {hint}",
                host=conn.name,
            ) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self._listener.close()
            raise UnreachableError(
                f"{conn.name}: lost the SSH connection while opening a tunnel"
                f" ({type(exc).__name__}: {exc})", host=conn.name) from None
        self._client: socket.socket | None = None
        self._listener.settimeout(timeout)
        self._thread = threading.Thread(target=self._serve, name=f"tunnel-{conn.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._chan.closed and self._chan.get_transport().is_active()

    def _serve(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            self._chan.close()
            return
        finally:
            self._listener.close()
        self._client = client
        try:
            _bridge(client, self._chan)
        finally:
            client.close()
            self._chan.close()

    def close(self) -> None:
        self._listener.close()
        self._chan.close()
        if self._client is not None:
            try:
                self._client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)


def _bridge(sock: socket.socket, chan: paramiko.Channel) -> None:
    """Copy bytes both ways until either side closes."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ, chan)
        sel.register(chan, selectors.EVENT_READ, sock)
        while True:
            for key, _ in sel.select():
                src = key.fileobj
                try:
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                except (OSError, EOFError, paramiko.SSHException):
                    return


# --------------------------------------------------------------------------------------
# PostgreSQL variant
# --------------------------------------------------------------------------------------
def _app_database_url(session: Session) -> str:
    from .tiers import db as db_tier  # imported late: the db tier imports much more

    return db_tier.database_url(session)


class _PgLockSession:
    """One psycopg connection through an `SshTunnel` to the db host's 127.0.0.1:5432."""

    def __init__(self, session: Session, *, application_name: str) -> None:
        import psycopg  # late: only PostgreSQL environments need it

        inv = session.inventory
        self.environment = inv.environment
        self.db_host = inv.db_host.name
        self.where = f"PostgreSQL on {self.db_host}"
        self.key = lock_key(inv.environment)
        self._mask = session.executor.masker
        try:
            creds = database_credentials(_app_database_url(session))
        except ValueError as exc:
            raise LockUnavailable(
                f"{self.db_host}: cannot use the app's database URL for the deploy lock: {exc}",
                host=self.db_host) from None
        self._mask.add([creds.password])
        try:
            self.tunnel = SshTunnel(session.executor.conn(inv.db_host),
                                    ("127.0.0.1", POSTGRES_PORT))
        except LockUnavailable as exc:
            raise LockUnavailable(
                f"{exc}\n  Is PostgreSQL running on {self.db_host}? `fab db.setup` installs"
                f" and starts it.", host=self.db_host) from None
        try:
            self.conn = psycopg.connect(
                host="127.0.0.1", port=self.tunnel.port, user=creds.user,
                password=creds.password, dbname=creds.dbname,
                application_name=application_name, connect_timeout=int(TUNNEL_TIMEOUT_S),
                # SSH already encrypts the way here and the rest is the db host's loopback.
                # Also, with "prefer" libpq retries a refused TLS login on a second
                # connection, which the one-client tunnel would not accept.
                sslmode="disable", autocommit=True)
        except psycopg.Error as exc:
            self.tunnel.close()
            raise self._connect_error(exc, creds) from None
        try:
            for statement in keepalive_statements():
                self.conn.execute(statement)
        except psycopg.Error as exc:
            self.close()
            raise self._query_error(exc) from None

    def _connect_error(self, exc: Exception, creds: DatabaseCredentials) -> LockUnavailable:
        text = self._mask(" ".join(str(exc).split()))
        if "pg_hba.conf" in text:
            hint = (f"pg_hba.conf on {self.db_host} must admit 127.0.0.1/32 for role"
                    f" {creds.user} on database {creds.dbname} (the lock's SSH tunnel arrives"
                    f" on loopback): run `fab db.setup`")
        elif "password authentication failed" in text or "does not exist" in text:
            hint = f"the app role or database is not set up on {self.db_host}: run `fab db.setup`"
        else:
            hint = f"is PostgreSQL running on {self.db_host}? (`fab db.setup` sets it up)"
        return LockUnavailable(
            f"{self.db_host}: cannot connect to PostgreSQL through the SSH tunnel for the"
            f" deploy lock of {self.environment}: {text}\n  {hint}", host=self.db_host)

    def _query_error(self, exc: Exception) -> LockUnavailable:
        return LockUnavailable(
            f"{self.db_host}: deploy lock query failed: "
            f"{self._mask(' '.join(str(exc).split()))}", host=self.db_host)

    def _scalar(self, sql: str, params: tuple = ()) -> Any:
        import psycopg

        try:
            row = self.conn.execute(sql, params).fetchone()
        except psycopg.Error as exc:
            raise self._query_error(exc) from None
        return None if row is None else row[0]

    def try_lock(self) -> bool:
        return bool(self._scalar(TRY_LOCK_SQL, self.key))

    def unlock(self) -> bool:
        return bool(self._scalar(UNLOCK_SQL, self.key))

    def set_label(self, label: str) -> None:
        self._scalar(SET_NAME_SQL, (label,))

    def holder(self) -> LockInfo | None:
        """The session holding the environment's key, or None when it is free."""
        import psycopg

        try:
            rows = self.conn.execute(HOLDER_SQL, pg_locks_ids(self.key)).fetchall()
        except psycopg.Error as exc:
            raise self._query_error(exc) from None
        if not rows:
            return None
        pid, app_name, usename, client, backend_start, _is_us = rows[0]
        parsed = parse_label(app_name or "", environment=self.environment, where=self.where)
        if parsed is not None:
            return parsed
        since = backend_start.astimezone(timezone.utc) if backend_start else None
        return LockInfo(
            environment=self.environment, where=self.where, since=since, label=app_name or "",
            note=f"PostgreSQL backend pid {pid} (role {usename}, application_name"
                 f" {app_name!r}, from {client or 'a local socket'})")

    def held_by_us(self) -> bool:
        rows = self.conn.execute(HOLDER_SQL, pg_locks_ids(self.key)).fetchall()
        return any(row[5] for row in rows)

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.tunnel.close()


@contextmanager
def _postgres_lock(session: Session, *, version: str | None, wait: float) -> Iterator[LockInfo]:
    user, machine, pid = _identity()
    env = session.inventory.environment
    pg = _PgLockSession(session, application_name=f"{LABEL_PREFIX} waiting {pid}")
    try:
        deadline = time.monotonic() + max(0.0, wait)
        quick_retries = 0
        while not pg.try_lock():
            holder = pg.holder()
            if holder is None and quick_retries < 3:
                quick_retries += 1  # released between our two queries: try again at once
                continue
            if time.monotonic() + POLL_INTERVAL_S > deadline:
                holder = holder or LockInfo(env, pg.where, note="a session that just let go")
                raise LockBusy(busy_message(env, holder, waited=wait), host=pg.db_host,
                               holder=holder)
            time.sleep(POLL_INTERVAL_S)
        since = datetime.now(timezone.utc).replace(microsecond=0)
        label = holder_label(user=user, machine=machine, pid=pid, version=version, since=since)
        pg.set_label(label)
        info = parse_label(label, environment=env, where=pg.where)
        assert info is not None

        def check() -> None:
            try:
                ok = pg.tunnel.alive and pg.held_by_us()
            except Exception:  # noqa: BLE001 - any failure here means the session is gone
                ok = False
            if not ok:
                raise LockLost(
                    f"{pg.db_host}: the deploy lock of {env} was lost (its PostgreSQL session"
                    f" through the SSH tunnel ended). Stop here: another deploy may have"
                    f" started. Check `fab deploy.lock`, then re-run.", host=pg.db_host)

        session.reporter.info(pg.db_host, f"deploy lock of {env} taken ({pg.where})")
        try:
            yield replace(info, _check=check)
        finally:
            try:
                if pg.unlock():
                    session.reporter.info(pg.db_host, f"deploy lock of {env} released")
                else:
                    session.reporter.error(
                        pg.db_host, f"deploy lock of {env} was no longer held when releasing it")
            except DeployError as exc:
                session.reporter.error(pg.db_host, f"releasing the deploy lock of {env}: {exc}")
    finally:
        pg.close()  # ends the session: frees the lock even if the unlock above failed


# --------------------------------------------------------------------------------------
# flock variant (SQLite: one host)
# --------------------------------------------------------------------------------------
def _read_line(chan: paramiko.Channel, deadline: float, err: bytearray) -> str | None:
    """One line of the channel's stdout (None at EOF); stderr is appended to ``err``."""
    buf = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(chan, selectors.EVENT_READ)
        while b"\n" not in buf:
            while chan.recv_stderr_ready():  # drained, or the fd stays readable: a busy loop
                err += chan.recv_stderr(65536)
            if chan.recv_ready():
                data = chan.recv(1)  # byte by byte: the rest belongs to the next read
                if not data:
                    break
                buf += data
                continue
            if chan.eof_received or chan.closed:
                if not chan.recv_ready():
                    break
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sel.select(min(left, 1.0))
    if not buf:
        return None
    return buf.decode("utf-8", "replace").rstrip("\n")


def _read_rest(chan: paramiko.Channel, deadline: float, err: bytearray) -> tuple[str, str]:
    out = bytearray()
    while not (chan.exit_status_ready() and not chan.recv_ready()
               and not chan.recv_stderr_ready()):
        if time.monotonic() > deadline:
            break
        while chan.recv_ready():
            out += chan.recv(65536)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        if not chan.recv_ready() and not chan.recv_stderr_ready():
            chan.status_event.wait(0.05)
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


@contextmanager
def _flock_lock(session: Session, *, version: str | None, wait: float) -> Iterator[LockInfo]:
    inv = session.inventory
    env = inv.environment
    host = inv.db_host  # sqlite: the one app host is also the db host
    conn = session.executor.conn(host)
    where = f"flock on {host.name}"
    user, machine, pid = _identity()
    argv = with_sudo(flock_hold_argv(wait), is_root=host.is_root)
    transport = _transport(conn)
    transport.set_keepalive(SSH_KEEPALIVE_S)
    budget = max(0.0, wait) + TUNNEL_TIMEOUT_S
    deadline = time.monotonic() + budget
    chan: paramiko.Channel | None = None
    label = ""
    err = bytearray()
    try:
        chan = transport.open_session(timeout=TUNNEL_TIMEOUT_S)
        chan.exec_command(render(argv))
        first = _read_line(chan, deadline, err)
        if first == "ACQUIRED":
            since = datetime.now(timezone.utc).replace(microsecond=0)
            label = holder_label(user=user, machine=machine, pid=pid, version=version,
                                 since=since)
            chan.sendall((label + "\n").encode())
            first = _read_line(chan, deadline, err)
    except TimeoutError:
        if chan is not None:
            chan.close()
        raise LockUnavailable(f"{host.name}: no answer from the deploy lock command within"
                              f" {budget:g} s", host=host.name) from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if chan is not None:
            chan.close()
        raise UnreachableError(f"{host.name}: lost the SSH connection while taking the deploy"
                               f" lock ({type(exc).__name__}: {exc})", host=host.name) from None
    if first != "LOCKED":
        out, errors = _read_rest(chan, time.monotonic() + 5, err)
        code = chan.exit_status if chan.exit_status_ready() else None
        chan.close()
        if first == "BUSY":
            holder = _holder_from_file(out.splitlines(), environment=env, where=where)
            raise LockBusy(busy_message(env, holder, waited=wait), host=host.name,
                           holder=holder)
        said = session.executor.masker(" ".join((errors or out or first or "").split()))
        raise LockUnavailable(
            f"{host.name}: cannot take the deploy lock {FLOCK_PATH} (exit code {code}):"
            f" {said or 'no output'}\n  Check that {host.ssh_user} can run `sudo -n flock` on"
            f" {host.name} and that /run is writable.", host=host.name)

    info = parse_label(label, environment=env, where=where)
    assert info is not None

    def check() -> None:
        if chan.closed or chan.exit_status_ready() or not transport.is_active():
            raise LockLost(f"{host.name}: the deploy lock of {env} was lost (the SSH session"
                           f" holding {FLOCK_PATH} ended). Stop here: another deploy may have"
                           f" started. Check `fab deploy.lock`, then re-run.", host=host.name)

    session.reporter.info(host.name, f"deploy lock of {env} taken ({where})")
    try:
        yield replace(info, _check=check)
    finally:
        # EOF on its stdin: the remote shell removes the holder file and exits, which
        # releases the flock. Wait briefly for that so the next deploy sees it free.
        try:
            chan.shutdown_write()
            chan.status_event.wait(5)
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            chan.close()
        session.reporter.info(host.name, f"deploy lock of {env} released")


def _flock_holder(session: Session) -> LockInfo | None:
    inv = session.inventory
    host = inv.db_host
    conn = session.executor.conn(host)
    result = conn.run(flock_status_argv(), mutates=False)
    try:
        return parse_flock_status(result.stdout, environment=inv.environment,
                                  where=f"flock on {host.name}")
    except ValueError as exc:
        raise LockUnavailable(f"{host.name}: cannot read the deploy lock state: {exc}",
                              host=host.name) from None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def holder_info(session: Session) -> LockInfo | None:
    """Who holds the environment's deploy lock (None: free). Read-only."""
    if session.inventory.database.kind == "sqlite":
        return _flock_holder(session)
    pg = _PgLockSession(session, application_name=f"{LABEL_PREFIX} status")
    try:
        return pg.holder()
    finally:
        pg.close()


def lock_holder(session: Session) -> str | None:
    """``user@machine pid=N version=V since <ISO 8601>`` of the holder, or None when free."""
    info = holder_info(session)
    return None if info is None else info.describe()


@contextmanager
def deploy_lock(session: Session, *, version: str | None,
                wait: float = 0) -> Iterator[LockInfo]:
    """Hold the environment's deploy lock for the ``with`` block.

    Raises `LockBusy` (exit code 3) at once when another deploy holds it, or after
    ``wait`` seconds of polling. Released explicitly on exit; if this process dies the
    lock frees itself when its SSH session ends (see the module docstring). In dry-run
    the lock is neither waited for nor taken: the holder, if any, is only reported.
    """
    if version is not None:
        check_version(version)
    inv = session.inventory
    if session.dry_run:
        where = inv.db_host.name
        try:
            holder = holder_info(session)
            state = "free" if holder is None else f"now held by {holder.describe()}"
        except DeployError as exc:
            state = f"state unknown: {first_line(exc)}"
        session.reporter.would(where, f"take the deploy lock of {inv.environment} ({state})")
        user, machine, pid = _identity()
        yield LockInfo(environment=inv.environment, where=f"dry run on {where}", user=user,
                       machine=machine, pid=pid, version=version,
                       note="dry run: lock not taken")
        return
    if inv.database.kind == "sqlite":
        with _flock_lock(session, version=version, wait=wait) as info:
            yield info
    else:
        with _postgres_lock(session, version=version, wait=wait) as info:
            yield info
