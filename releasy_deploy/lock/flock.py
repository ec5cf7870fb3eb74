"""The deploy lock of a SQLite environment (one host): ``flock`` on `FLOCK_PATH`, held by a
remote process on its own SSH channel for as long as we keep that channel (see the package
docstring)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone

from ..channels import CHANNEL_TIMEOUT_S, ChannelError, Heartbeat, LineChannel
from ..commands.lock import FLOCK_PATH, flock_hold_argv, flock_status_argv
from ..executor import with_sudo
from ..session import Session
from .info import (
    LockBusy,
    LockInfo,
    LockLost,
    LockUnavailable,
    busy_message,
    holder_from_file,
    holder_label,
    identity,
    lost_message,
    parse_flock_status,
    parse_freeze_line,
    parse_label,
)


@contextmanager
def flock_lock(session: Session, *, version: str | None, wait: float) -> Iterator[LockInfo]:
    inv = session.inventory
    env = inv.environment
    host = inv.db_host  # sqlite: the one app host is also the db host
    where = f"flock on {host.name}"
    user, machine, pid = identity()
    argv = with_sudo(flock_hold_argv(wait), is_root=host.is_root)
    budget = max(0.0, wait) + CHANNEL_TIMEOUT_S
    deadline = time.monotonic() + budget
    chan: LineChannel | None = None
    label = ""
    try:
        chan = LineChannel(session.executor.conn(host), argv, doing="taking the deploy lock")
        first = chan.read_line(deadline)
        if first == "ACQUIRED":
            since = datetime.now(timezone.utc).replace(microsecond=0)
            label = holder_label(user=user, machine=machine, pid=pid, version=version,
                                 since=since)
            chan.send((label + "\n").encode(), doing="taking the deploy lock")
            first = chan.read_line(deadline)
    except TimeoutError:
        if chan is not None:
            chan.close()
        raise LockUnavailable(f"{host.name}: no answer from the deploy lock command within"
                              f" {budget:g} s", host=host.name) from None
    except ChannelError:
        if chan is not None:
            chan.close()
        raise
    if first != "LOCKED":
        out, errors = chan.read_rest(time.monotonic() + 5)
        code = chan.exit_code
        chan.close()
        if first == "BUSY":
            holder = holder_from_file(out.splitlines(), environment=env, where=where)
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
            chan.read_line(time.monotonic() + CHANNEL_TIMEOUT_S)))
    except (TimeoutError, LockUnavailable, ChannelError):
        chan.close()
        raise LockUnavailable(f"{host.name}: the deploy lock command did not say whether"
                              f" deploys are frozen", host=host.name) from None
    beat = Heartbeat(chan)

    def check() -> None:
        if chan.finished:
            raise LockLost(lost_message(host.name, env, f"the SSH session holding {FLOCK_PATH}"
                                                        f" ended"), host=host.name)

    session.reporter.info(host.name, f"deploy lock of {env} taken ({where})")
    try:
        yield replace(info, _check=check)
    finally:
        # EOF on its stdin: the remote shell removes the holder file and exits, which
        # releases the flock. Wait briefly for that so the next deploy sees it free.
        beat.stop(release=True)
        chan.finish()
        session.reporter.info(host.name, f"deploy lock of {env} released")


def _status(session: Session) -> tuple[LockInfo | None, str | None]:
    """The holder (None: free) and its flock process id on the host."""
    inv = session.inventory
    host = inv.db_host
    result = session.executor.conn(host).run(flock_status_argv(), mutates=False)
    try:
        holder = parse_flock_status(result.stdout, environment=inv.environment,
                                    where=f"flock on {host.name}")
    except ValueError as exc:
        raise LockUnavailable(f"{host.name}: cannot read the deploy lock state: {exc}",
                              host=host.name) from None
    first = (result.stdout.splitlines() or ["FREE"])[0].split()
    remote_pid = first[1] if len(first) > 1 and first[1].isdigit() else None
    return holder, remote_pid


def flock_holder(session: Session) -> LockInfo | None:
    """Who holds the environment's flock (None: free). Read-only."""
    return _status(session)[0]


def flock_unlock(session: Session) -> LockInfo | None:
    """End the flock process holding the lock; whom it ended, None when free."""
    holder, remote_pid = _status(session)
    if holder is None or remote_pid is None:
        return None
    session.executor.conn(session.inventory.db_host).run(
        ["kill", "-TERM", "--", remote_pid], sudo=True)
    return holder
