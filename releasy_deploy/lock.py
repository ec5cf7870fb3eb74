"""The deploy lock: one per environment, held for a whole rollout, freed by the holder's death.

PostgreSQL environments: a session-level advisory lock on the app database, taken over an
SSH tunnel to the db host (a direct-tcpip channel of the executor's connection to it,
bridged to an ephemeral port on this machine's 127.0.0.1; psycopg connects there and
reaches 127.0.0.1:5432 on the db host), so the database port never has to be exposed and
the lock lives exactly as long as our session:

- a clean exit unlocks and disconnects;
- a crash or ``kill -9`` closes our TCP connection, sshd closes the channel, PostgreSQL sees
  EOF on its loopback socket and ends the session: the lock is free at once;
- a laptop that vanishes (sleep, lost Wi-Fi) sends no FIN, and a stock sshd
  (``ClientAliveInterval 0``) would keep its channels open until TCP keepalive gives up
  (about two hours). So the lock does not rely on sshd: a watchdog runs on the db host
  beside the session (`WATCHDOG_SCRIPT`, on its own SSH channel) and reads a heartbeat
  line we send every `HEARTBEAT_S` seconds. After `WATCHDOG_QUIET_S` seconds without one
  (or at EOF) it terminates exactly our backend (pid + backend_start), which frees the lock:
  within ~15 s of the operator's network vanishing. A clean release tells it "release"
  first. The server-side ``tcp_keepalives_*`` we set on the lock session apply to the
  sshd->postgres loopback socket, whose peer (sshd) stays alive, so they only matter if sshd
  itself hangs; the SSH transport keepalive (every 5 s) keeps NAT state alive.
No lock files, no TTLs: nothing can go stale.

`fab deploy.freeze --reason TEXT` leaves a marker (`FREEZE_FILE` on the lock's host, root
0600 in a root 0700 directory): every deploy then refuses with exit code 3 and the reason
once it holds the lock, until `fab deploy.unfreeze`. `fab deploy.unlock` ends another
holder's lock session (its backend, or its flock process).

Key: ``pg_advisory_lock(int4, int4)`` with classid = `LOCK_CLASSID` ('RLSY') and objid =
crc32(environment) as a signed int4. Upstream's migrator locks the single bigint
``0x3d32ad9e * crc32(dbname)``. Two-int keys and bigint keys are different key spaces in
``pg_locks`` (objsubid 2 vs 1) and can never collide: holding ours never blocks
Releasy's own migrations.

SQLite environments (one host, no PostgreSQL): ``flock`` on ``/run/releasy-deploy.lock``,
held by a ``flock`` process started on a dedicated SSH channel whose stdin we keep open; it
exits (freeing the lock) when that channel closes, or when our heartbeat stops for
`WATCHDOG_QUIET_S` seconds (the same watchdog rule as above, in the holding shell). The holder
is written to ``/run/releasy-deploy.holder`` while held. Whether the lock is held is read
from ``/proc/locks`` (read-only: probing with ``flock --nonblock`` would itself hold the
lock for an instant and could make a concurrent deploy fail), so a stale holder file left
by a crash never makes the lock look held.

Who holds it is a compact label (`holder_label`), PostgreSQL's ``application_name`` of the
lock session (63 bytes at most) or the holder file's content, parsed back by `parse_label`.
"""
from __future__ import annotations

import getpass
import json
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
    "holder_info", "SshTunnel", "DeployFrozen", "force_unlock", "freeze", "unfreeze",
    "frozen", "Watchdog", "Heartbeat",
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
#: a heartbeat line every HEARTBEAT_S; the host's watchdog frees the lock after
#: WATCHDOG_QUIET_S without one (so within ~15 s of our network vanishing).
HEARTBEAT_S = 3
WATCHDOG_QUIET_S = 12
#: where `fab deploy.freeze` leaves its marker, on the lock's host (root only).
STATE_DIR = "/etc/releasy-deploy"
FREEZE_FILE = f"{STATE_DIR}/frozen"
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


class DeployFrozen(LockHeld):
    """`fab deploy.freeze` is in force: no deploy until `fab deploy.unfreeze` (exit 3)."""


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
    #: the freeze marker seen while taking the lock (ours only); None: not frozen
    frozen: dict[str, str] | None = field(default=None, repr=False, compare=False)
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
# LOCKED and the freeze marker ($5: "FROZEN <record>" or THAWED, read while holding the
# lock), then holds the lock until its stdin (our SSH channel) closes, says "release", or
# stays silent for $4 seconds (no heartbeat: we are gone). The holder file is
# removed before the lock is released, so a stale one is only ever left by a crash (and
# the status script trusts /proc/locks, not the file, for held vs free).
# `flock --close FILE COMMAND` rather than `flock FD` in this shell: the lock must be held
# by exactly one live process (flock itself, waiting for COMMAND), because /proc/locks
# inside a container (a pid namespace) hides locks whose owner pid is gone -- and the
# status script reads /proc/locks. --close: COMMAND does not inherit the locked file, so
# the lock ends with the flock process whatever happens to it.
FLOCK_HOLD_SCRIPT = """set -u
lock=$1 holder=$2 wait=$3 quiet=$4 frozen=$5
hold='echo ACQUIRED
IFS= read -r label || exit 5
printf "%s\\n" "$label" > "$1.new" && mv -f -- "$1.new" "$1" || exit 4
echo LOCKED
if [ -f "$3" ]; then printf "FROZEN %s\\n" "$(head -c 2000 -- "$3" | tr -d "\\n")"; else echo THAWED; fi
while IFS= read -r -t "$2" beat; do [ "$beat" = release ] && break; done
rm -f -- "$1"'
take() {
  flock "$@" --close --conflict-exit-code 75 "$lock" bash -c "$hold" releasy-deploy-lock \
    "$holder" "$quiet" "$frozen"
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
            str(seconds), str(WATCHDOG_QUIET_S), FREEZE_FILE]


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


# $1 backend pid, $2 its backend_start (epoch text), $3 seconds of silence allowed, $4 the
# freeze marker. Reads heartbeat lines; after $3 s without one, or at EOF, terminates that
# one backend (ending the lock session); "release" ends it quietly; "frozen?" is answered
# with "FROZEN <record>" or THAWED (no extra SSH command for it). bash: for `read -t`.
WATCHDOG_SCRIPT = """set -u
pid=$1 start=$2 quiet=$3 frozen=$4
case "$pid" in ''|*[!0-9]*) echo "bad backend pid" >&2; exit 2;; esac
case "$start" in ''|*[!0-9.]*) echo "bad backend start" >&2; exit 2;; esac
case "$quiet" in ''|*[!0-9]*) echo "bad timeout" >&2; exit 2;; esac
echo WATCHING
while IFS= read -r -t "$quiet" beat; do
  case "$beat" in
    release) exit 0;;
    frozen?) if [ -f "$frozen" ]; then printf 'FROZEN %s\\n' "$(head -c 2000 -- "$frozen" | tr -d '\\n')"
             else echo THAWED; fi;;
  esac
done
cd /
runuser -u postgres -- psql -X -A -t -q -d postgres -c "SELECT pg_terminate_backend(pid)
  FROM pg_stat_activity WHERE pid = $pid AND extract(epoch FROM backend_start)::text = '$start'"
echo "no heartbeat for $quiet s: ended deploy lock session $pid" >&2
"""

BACKEND_SQL = ("SELECT pid, extract(epoch FROM backend_start)::text FROM pg_stat_activity"
               " WHERE pid = pg_backend_pid()")
TERMINATE_SQL = "SELECT pg_terminate_backend(%s)"


CHECK_TIMEOUT_S = 10.0


def _answers_within(seconds: float, fn: Callable[[], bool]) -> bool:
    """``fn()`` on a daemon thread; False when it raises or takes longer than ``seconds``."""
    result: list[bool] = []

    def run() -> None:
        try:
            result.append(bool(fn()))
        except Exception:  # noqa: BLE001 - any failure means the session is gone
            result.append(False)

    worker = threading.Thread(target=run, name="lock-check", daemon=True)
    worker.start()
    worker.join(seconds)
    return bool(result and result[0])


def watchdog_argv(pid: int, backend_start: str, quiet: int = WATCHDOG_QUIET_S) -> list[str]:
    if not re.fullmatch(r"\d+(\.\d+)?", backend_start):
        raise ValueError(f"not an epoch: {backend_start!r}")
    return ["bash", "-c", WATCHDOG_SCRIPT, "releasy-deploy-watchdog", str(int(pid)),
            backend_start, str(int(quiet)), FREEZE_FILE]


class Heartbeat:
    """Sends a line on ``chan`` every `HEARTBEAT_S` s (a daemon thread) until stopped."""

    def __init__(self, chan: paramiko.Channel, interval: float = HEARTBEAT_S) -> None:
        self._chan = chan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,),
                                        name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._chan.sendall(b".\n")
            except (OSError, EOFError, paramiko.SSHException):
                return

    def stop(self, *, release: bool) -> None:
        """Stop beating; ``release``: tell the remote side to let go quietly first."""
        self._stop.set()
        self._thread.join(timeout=5)
        if release:
            try:
                self._chan.sendall(b"release\n")
            except (OSError, EOFError, paramiko.SSHException):
                pass


class Watchdog:
    """`WATCHDOG_SCRIPT` on the db host for our lock backend, fed by a `Heartbeat`."""

    def __init__(self, conn: HostConnection, pid: int, backend_start: str) -> None:
        self.host = conn.name
        argv = with_sudo(watchdog_argv(pid, backend_start), is_root=conn.host.is_root)
        err = bytearray()
        try:
            self._chan = _transport(conn).open_session(timeout=TUNNEL_TIMEOUT_S)
            self._chan.exec_command(render(argv))
            first = _read_line(self._chan, time.monotonic() + TUNNEL_TIMEOUT_S, err)
        except (TimeoutError, paramiko.SSHException, EOFError, OSError) as exc:
            raise LockUnavailable(f"{conn.name}: cannot start the deploy lock's watchdog"
                                  f" ({type(exc).__name__}: {exc})", host=conn.name) from None
        if first != "WATCHING":
            self._chan.close()
            said = " ".join(err.decode("utf-8", "replace").split()) or "no output"
            raise LockUnavailable(f"{conn.name}: the deploy lock's watchdog did not start:"
                                  f" {said}\n  Check that {conn.host.ssh_user} can run"
                                  f" `sudo -n bash` and `runuser` there.", host=conn.name)
        self._beat = Heartbeat(self._chan)

    def frozen(self) -> dict[str, str] | None:
        """Ask the watchdog (as root on the lock host) for the freeze marker."""
        err = bytearray()
        try:
            self._chan.sendall(b"frozen?\n")
            line = _read_line(self._chan, time.monotonic() + TUNNEL_TIMEOUT_S, err)
        except (TimeoutError, paramiko.SSHException, EOFError, OSError) as exc:
            raise LockLost(f"{self.host}: the deploy lock's watchdog stopped answering"
                           f" ({type(exc).__name__})", host=self.host) from None
        return parse_freeze_line(line)

    def close(self) -> None:
        self._beat.stop(release=True)
        try:
            self._chan.shutdown_write()
            self._chan.status_event.wait(5)
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            self._chan.close()


# --------------------------------------------------------------------------------------
# The SSH tunnel
# --------------------------------------------------------------------------------------
def _transport(conn: HostConnection) -> paramiko.Transport:
    # The executor's own verified, lazily opened connection: no second SSH login.
    return conn.transport()


class SshTunnel:
    """A unix socket here (``path``, in a fresh 0700 directory of ours) -> ``dest`` as seen
    from the SSH server.

    One direct-tcpip channel, opened at once (so a refused forward or a closed port is
    reported before any client tries), bridged to the first client that connects; the
    listener is closed after that one accept. Only our own user (and root) can reach the
    socket at all: a TCP listener on 127.0.0.1 would take the first connection from any
    local user. The socket is named the way libpq looks for one (``.s.PGSQL.PORT``), so
    psycopg connects with ``host=directory``.
    """

    def __init__(self, conn: HostConnection, dest: tuple[str, int], *,
                 timeout: float = TUNNEL_TIMEOUT_S) -> None:
        import tempfile

        self.host = conn.name
        transport = _transport(conn)
        transport.set_keepalive(SSH_KEEPALIVE_S)
        self.port = dest[1]
        self.directory = tempfile.mkdtemp(prefix="releasy-lock-")  # 0700
        self.path = os.path.join(self.directory, f".s.PGSQL.{self.port}")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        try:
            self._chan = transport.open_channel(
                "direct-tcpip", dest, ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as exc:
            self._cleanup()
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
            self._cleanup()
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
            self._cleanup()
        self._client = client
        try:
            _bridge(client, self._chan)
        finally:
            client.close()
            self._chan.close()

    def _cleanup(self) -> None:
        """Close the listener and remove its socket and directory (idempotent)."""
        self._listener.close()
        for remove in (lambda: os.unlink(self.path), lambda: os.rmdir(self.directory)):
            try:
                remove()
            except OSError:
                pass

    def close(self) -> None:
        self._cleanup()
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
                host=self.tunnel.directory, port=self.tunnel.port, user=creds.user,
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

    def backend(self) -> tuple[int, str]:
        """Our backend's pid and start time (what the watchdog may terminate)."""
        import psycopg

        try:
            pid, start = self.conn.execute(BACKEND_SQL).fetchone()
        except psycopg.Error as exc:
            raise self._query_error(exc) from None
        return int(pid), str(start)

    def terminate_holder(self) -> LockInfo | None:
        """End the session holding the environment's key (not ours); its holder, or None."""
        import psycopg

        try:
            rows = self.conn.execute(HOLDER_SQL, pg_locks_ids(self.key)).fetchall()
            holder = self.holder() if rows else None
            for row in rows:
                if not row[5]:
                    self.conn.execute(TERMINATE_SQL, (row[0],))
        except psycopg.Error as exc:
            raise self._query_error(exc) from None
        return holder

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
    dog: Watchdog | None = None
    lost: list[bool] = []
    try:
        # Before the lock is ours: if we vanish while waiting or holding, the watchdog
        # ends this session within WATCHDOG_QUIET_S, stock sshd or not.
        dog = Watchdog(session.executor.conn(session.inventory.db_host), *pg.backend())
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
        info = replace(info, frozen=dog.frozen())  # read while holding the lock

        def check() -> None:
            # Bounded: with the network gone a query would wait for TCP to give up (minutes),
            # while the watchdog has long freed the lock.
            ok = not lost and pg.tunnel.alive and _answers_within(CHECK_TIMEOUT_S,
                                                                  pg.held_by_us)
            if not ok:
                lost.append(True)
                raise LockLost(
                    f"{pg.db_host}: the deploy lock of {env} was lost (its PostgreSQL session"
                    f" through the SSH tunnel ended). Stop here: another deploy may have"
                    f" started. Check `fab deploy.lock`, then re-run.", host=pg.db_host)

        session.reporter.info(pg.db_host, f"deploy lock of {env} taken ({pg.where})")
        try:
            yield replace(info, _check=check)
        finally:
            try:
                if lost:
                    pg.tunnel.close()  # a query may still hang on it: end that first
                    session.reporter.error(pg.db_host, f"releasing the deploy lock of {env}:"
                                                       " it was already lost (session ended)")
                elif pg.unlock():
                    session.reporter.info(pg.db_host, f"deploy lock of {env} released")
                else:
                    session.reporter.error(
                        pg.db_host, f"deploy lock of {env} was no longer held when releasing it")
            except DeployError as exc:
                session.reporter.error(pg.db_host, f"releasing the deploy lock of {env}: {exc}")
    finally:
        if dog is not None:
            dog.close()
        if lost:
            pg.tunnel.close()
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
    try:
        info = replace(info, frozen=parse_freeze_line(
            _read_line(chan, time.monotonic() + TUNNEL_TIMEOUT_S, err)))
    except (TimeoutError, LockUnavailable, paramiko.SSHException, EOFError, OSError):
        chan.close()
        raise LockUnavailable(f"{host.name}: the deploy lock command did not say whether"
                              f" deploys are frozen", host=host.name) from None
    beat = Heartbeat(chan)

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
        beat.stop(release=True)
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


def force_unlock(session: Session) -> LockInfo | None:
    """End whichever session holds the environment's lock (`fab deploy.unlock`): its
    PostgreSQL backend, or its flock process. Returns whom it ended, None when free."""
    inv = session.inventory
    if inv.database.kind == "sqlite":
        conn = session.executor.conn(inv.db_host)
        res = conn.run(flock_status_argv(), mutates=False)
        first = (res.stdout.splitlines() or ["FREE"])[0].split()
        holder = _flock_holder(session)
        if holder is None or len(first) < 2 or not first[1].isdigit():
            return None
        conn.run(["kill", "-TERM", "--", first[1]], sudo=True)
        return holder
    pg = _PgLockSession(session, application_name=f"{LABEL_PREFIX} unlock")
    try:
        return pg.terminate_holder()
    finally:
        pg.close()


# --------------------------------------------------------------------------------------
# Freeze marker
# --------------------------------------------------------------------------------------
_REASON_MAX = 300


def check_reason(reason: str) -> str:
    text = " ".join((reason or "").split())
    if not text:
        raise ValueError("--reason is required: say why deploys are frozen")
    if len(text) > _REASON_MAX or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError(f"--reason must be one line of at most {_REASON_MAX} characters")
    return text


def freeze_record(reason: str, *, since: datetime | None = None) -> bytes:
    user, machine, _ = _identity()
    when = (since or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (json.dumps({"reason": check_reason(reason), "by": f"{user}@{machine}",
                        "since": when}) + "\n").encode()


def parse_freeze_line(line: str | None) -> dict[str, str] | None:
    """``FROZEN <record>`` / ``THAWED`` as the lock's remote helpers print them."""
    if line is not None and line.startswith("FROZEN "):
        return parse_freeze(line[len("FROZEN "):].encode())
    if line == "THAWED":
        return None
    raise LockUnavailable(f"unexpected answer about the freeze marker: {line!r}")


def parse_freeze(data: bytes | None) -> dict[str, str] | None:
    """The freeze record, or None (not frozen). An unreadable marker still freezes."""
    if data is None:
        return None
    try:
        record = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return {"reason": "(unreadable marker)", "by": "?", "since": "?"}
    return {k: str(record.get(k, "?")) for k in ("reason", "by", "since")}


def frozen(session: Session) -> dict[str, str] | None:
    """The freeze in force on the environment's lock host, or None. Read-only."""
    conn = session.executor.conn(session.inventory.db_host)
    return parse_freeze(conn.read_file(FREEZE_FILE, sudo=True))


def frozen_message(environment: str, record: dict[str, str]) -> str:
    return (f"deploys of {environment} are frozen since {record['since']} by {record['by']}:"
            f" {record['reason']}\n  Nothing was changed. `fab deploy.unfreeze` lifts it.")


def freeze(session: Session, reason: str) -> bool:
    """Leave the freeze marker (True), or keep the one already there (False)."""
    from .commands.kept_secrets import WRITE_SCRIPT

    data = freeze_record(reason)
    if frozen(session) is not None:
        return False
    conn = session.executor.conn(session.inventory.db_host)
    if not conn.dry_run:
        conn.run(["sh", "-c", WRITE_SCRIPT, "releasy-freeze", STATE_DIR, FREEZE_FILE],
                 sudo=True, stdin=data)
    return True


def unfreeze(session: Session) -> dict[str, str] | None:
    """Remove the freeze marker; returns the freeze lifted (None: there was none)."""
    record = frozen(session)
    conn = session.executor.conn(session.inventory.db_host)
    if record is not None and not conn.dry_run:
        conn.run(["rm", "-f", "--", FREEZE_FILE], sudo=True)
    return record


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
        record = frozen(session)
        if record is not None:
            session.reporter.info(where, "a real run would refuse: "
                                  + frozen_message(inv.environment, record).splitlines()[0])
        user, machine, pid = _identity()
        yield LockInfo(environment=inv.environment, where=f"dry run on {where}", user=user,
                       machine=machine, pid=pid, version=version,
                       note="dry run: lock not taken")
        return
    take = _flock_lock if inv.database.kind == "sqlite" else _postgres_lock
    with take(session, version=version, wait=wait) as info:
        # Read while holding the lock (by the lock's own remote helper, no extra command):
        # a freeze cannot slip in between the check and the deploy.
        record = info.frozen
        if record is not None:
            raise DeployFrozen(frozen_message(inv.environment, record),
                               host=inv.db_host.name)
        yield info
