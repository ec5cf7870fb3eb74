"""The deploy lock of a PostgreSQL environment: a session-level advisory lock on the app
database, held by a psycopg session through an `SshTunnel` to the db host, watched over by
a `Watchdog` there (see the package docstring)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from ..channels import (
    CHANNEL_TIMEOUT_S,
    ChannelError,
    Heartbeat,
    LineChannel,
    SshTunnel,
    TunnelRefused,
)
from ..commands.lock import (
    BACKEND_SQL,
    HOLDER_SQL,
    SET_NAME_SQL,
    TERMINATE_SQL,
    TRY_LOCK_SQL,
    UNLOCK_SQL,
    keepalive_statements,
    watchdog_argv,
)
from ..errors import DeployError
from ..executor import HostConnection, with_sudo
from ..inventory import POSTGRES_PORT
from ..lazy import import_in_background
from ..session import Session
from ..tiers import db as db_tier
from .info import (
    LABEL_PREFIX,
    POLL_INTERVAL_S,
    DatabaseCredentials,
    LockBusy,
    LockInfo,
    LockLost,
    LockUnavailable,
    busy_message,
    database_credentials,
    holder_label,
    identity,
    lock_key,
    lost_message,
    parse_freeze_line,
    parse_label,
    pg_locks_ids,
)

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


class Watchdog:
    """`WATCHDOG_SCRIPT` on the db host for our lock backend, fed by a `Heartbeat`."""

    def __init__(self, conn: HostConnection, pid: int, backend_start: str) -> None:
        self.host = conn.name
        argv = with_sudo(watchdog_argv(pid, backend_start), is_root=conn.host.is_root)
        try:
            self._chan = LineChannel(conn, argv, doing="starting the deploy lock's watchdog")
            first = self._chan.read_line(time.monotonic() + CHANNEL_TIMEOUT_S)
        except ChannelError as exc:
            raise LockUnavailable(f"{conn.name}: cannot start the deploy lock's watchdog"
                                  f" ({exc.reason})", host=conn.name) from None
        except TimeoutError:
            self._chan.close()
            raise LockUnavailable(f"{conn.name}: cannot start the deploy lock's watchdog"
                                  f" (no answer within {CHANNEL_TIMEOUT_S:g} s)",
                                  host=conn.name) from None
        if first != "WATCHING":
            self._chan.close()
            said = " ".join(self._chan.stderr.decode("utf-8", "replace").split()) or "no output"
            raise LockUnavailable(f"{conn.name}: the deploy lock's watchdog did not start:"
                                  f" {said}\n  Check that {conn.host.ssh_user} can run"
                                  f" `sudo -n bash` and `runuser` there.", host=conn.name)
        self._beat = Heartbeat(self._chan)

    def frozen(self) -> dict[str, str] | None:
        """Ask the watchdog (as root on the lock host) for the freeze marker."""
        try:
            self._chan.send(b"frozen?\n")
            line = self._chan.read_line(time.monotonic() + CHANNEL_TIMEOUT_S)
        except (TimeoutError, ChannelError) as exc:
            raise LockLost(f"{self.host}: the deploy lock's watchdog stopped answering"
                           f" ({type(exc).__name__})", host=self.host) from None
        return parse_freeze_line(line)

    def close(self) -> None:
        self._beat.stop(release=True)
        self._chan.finish()


def _psycopg() -> Any:
    """psycopg, imported on first use: it is the heaviest import of all (about 0.2 s) and
    only the PostgreSQL lock needs it, so every other task starts without it. The one
    import inside a function in the library (tests/unit/test_layers.py allows it)."""
    import psycopg

    return psycopg


def preload_driver() -> None:
    """Start loading psycopg in the background: for a task that first waits on its hosts
    (their facts) and then reads or takes the lock, the import overlaps that wait."""
    import_in_background("psycopg")


class _PgLockSession:
    """One psycopg connection through an `SshTunnel` to the db host's 127.0.0.1:5432."""

    def __init__(self, session: Session, *, application_name: str) -> None:
        psycopg = _psycopg()
        self._errors = psycopg.Error
        inv = session.inventory
        self.environment = inv.environment
        self.db_host = inv.db_host.name
        self.where = f"PostgreSQL on {self.db_host}"
        self.key = lock_key(inv.environment)
        self._mask = session.executor.masker
        try:
            creds = database_credentials(db_tier.database_url(session))
        except ValueError as exc:
            raise LockUnavailable(
                f"{self.db_host}: cannot use the app's database URL for the deploy lock: {exc}",
                host=self.db_host) from None
        self._mask.add([creds.password])
        try:
            self.tunnel = SshTunnel(session.executor.conn(inv.db_host),
                                    ("127.0.0.1", POSTGRES_PORT))
        except TunnelRefused as exc:
            raise LockUnavailable(
                f"{exc}\n  Is PostgreSQL running on {self.db_host}? `fab db.setup` installs"
                f" and starts it.", host=self.db_host) from None
        try:
            self.conn = psycopg.connect(
                host=self.tunnel.directory, port=self.tunnel.port, user=creds.user,
                password=creds.password, dbname=creds.dbname,
                application_name=application_name, connect_timeout=int(CHANNEL_TIMEOUT_S),
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
        try:
            row = self.conn.execute(sql, params).fetchone()
        except self._errors as exc:
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
        try:
            rows = self.conn.execute(HOLDER_SQL, pg_locks_ids(self.key)).fetchall()
        except self._errors as exc:
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
        try:
            pid, start = self.conn.execute(BACKEND_SQL).fetchone()
        except self._errors as exc:
            raise self._query_error(exc) from None
        return int(pid), str(start)

    def terminate_holder(self) -> LockInfo | None:
        """End the session holding the environment's key (not ours); its holder, or None."""
        try:
            rows = self.conn.execute(HOLDER_SQL, pg_locks_ids(self.key)).fetchall()
            holder = self.holder() if rows else None
            for row in rows:
                if not row[5]:
                    self.conn.execute(TERMINATE_SQL, (row[0],))
        except self._errors as exc:
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
def postgres_lock(session: Session, *, version: str | None, wait: float) -> Iterator[LockInfo]:
    user, machine, pid = identity()
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
                raise LockLost(lost_message(pg.db_host, env, "its PostgreSQL session through"
                                                             " the SSH tunnel ended"),
                               host=pg.db_host)

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


def postgres_holder(session: Session) -> LockInfo | None:
    """Who holds the environment's advisory lock (None: free). Read-only."""
    pg = _PgLockSession(session, application_name=f"{LABEL_PREFIX} status")
    try:
        return pg.holder()
    finally:
        pg.close()


def postgres_unlock(session: Session) -> LockInfo | None:
    """End the backend holding the environment's lock; whom it ended, None when free."""
    pg = _PgLockSession(session, application_name=f"{LABEL_PREFIX} unlock")
    try:
        return pg.terminate_holder()
    finally:
        pg.close()
