"""The deploy lock: one per environment, held for a whole rollout, freed by the holder's death.

PostgreSQL environments: a session-level advisory lock on the app database, taken over an
SSH tunnel to the db host (a direct-tcpip channel of the executor's connection to it,
bridged to a unix socket in a 0700 directory of ours; psycopg connects there and reaches
127.0.0.1:5432 on the db host), so the database port never has to be exposed and
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

Here: the public API. `info` (pure: keys, labels, freeze records, messages), `postgres` and
`flock` (the two variants) beside it; the remote scripts and SQL in `commands.lock`; the
tunnel, line channels and heartbeat in `releasy_deploy.channels`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..channels import SshTunnel
from ..commands.kept_secrets import WRITE_SCRIPT
from ..commands.lock import FREEZE_FILE, STATE_DIR
from ..errors import DeployError, first_line
from ..inventory import check_version
from ..session import Session
from .flock import flock_holder, flock_lock, flock_unlock
from .info import (
    LOCK_CLASSID,
    DeployFrozen,
    LockBusy,
    LockInfo,
    LockLost,
    LockUnavailable,
    busy_message,
    check_reason,
    database_credentials,
    freeze_record,
    frozen_message,
    holder_label,
    identity,
    lock_key,
    parse_freeze,
    parse_label,
    upstream_migration_key,
)
from .postgres import postgres_holder, postgres_lock, postgres_unlock, preload_driver

__all__ = [
    "LOCK_CLASSID", "LockBusy", "LockUnavailable", "LockLost", "LockInfo", "DeployFrozen",
    "lock_key", "upstream_migration_key", "holder_label", "parse_label", "busy_message",
    "database_credentials", "deploy_lock", "lock_holder", "holder_info", "force_unlock",
    "prepare_lock",
    "freeze", "unfreeze", "frozen", "check_reason", "SshTunnel",
]


def holder_info(session: Session) -> LockInfo | None:
    """Who holds the environment's deploy lock (None: free). Read-only."""
    if session.inventory.database.kind == "sqlite":
        return flock_holder(session)
    return postgres_holder(session)


def prepare_lock(session: Session) -> None:
    """Call before a task's first wait on its hosts when it reads or takes the lock after:
    the PostgreSQL driver (the heaviest import) loads meanwhile. Nothing for flock."""
    if session.inventory.database.kind != "sqlite":
        preload_driver()


def force_unlock(session: Session) -> LockInfo | None:
    """End whichever session holds the environment's lock (`fab deploy.unlock`): its
    PostgreSQL backend, or its flock process. Returns whom it ended, None when free."""
    if session.inventory.database.kind == "sqlite":
        return flock_unlock(session)
    return postgres_unlock(session)


def lock_holder(session: Session) -> str | None:
    """``user@machine pid=N version=V since <ISO 8601>`` of the holder, or None when free."""
    info = holder_info(session)
    return None if info is None else info.describe()


# --------------------------------------------------------------------------------------
# Freeze marker
# --------------------------------------------------------------------------------------
def frozen(session: Session) -> dict[str, str] | None:
    """The freeze in force on the environment's lock host, or None. Read-only."""
    conn = session.executor.conn(session.inventory.db_host)
    return parse_freeze(conn.read_file(FREEZE_FILE, sudo=True))


def freeze(session: Session, reason: str) -> bool:
    """Leave the freeze marker (True), or keep the one already there (False)."""
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


@contextmanager
def deploy_lock(session: Session, *, version: str | None,
                wait: float = 0) -> Iterator[LockInfo]:
    """Hold the environment's deploy lock for the ``with`` block.

    Raises `LockBusy` (exit code 3) at once when another deploy holds it, or after
    ``wait`` seconds of polling. Released explicitly on exit; if this process dies the
    lock frees itself when its SSH session ends (see the docstring above). In dry-run
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
        user, machine, pid = identity()
        yield LockInfo(environment=inv.environment, where=f"dry run on {where}", user=user,
                       machine=machine, pid=pid, version=version,
                       note="dry run: lock not taken")
        return
    take = flock_lock if inv.database.kind == "sqlite" else postgres_lock
    with take(session, version=version, wait=wait) as info:
        # Read while holding the lock (by the lock's own remote helper, no extra command):
        # a freeze cannot slip in between the check and the deploy.
        record = info.frozen
        if record is not None:
            raise DeployFrozen(frozen_message(inv.environment, record),
                               host=inv.db_host.name)
        yield info
