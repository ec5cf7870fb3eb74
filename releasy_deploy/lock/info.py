"""Who holds a deploy lock, and the freeze marker: keys, holder labels, records and the
messages about them. Pure (unit-tested without SSH or PostgreSQL)."""
from __future__ import annotations

import getpass
import json
import os
import re
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import unquote, urlsplit

from ..commands.lock import HOLDER_PATH
from ..errors import DeployError, LockHeld
from ..inventory import check_version

#: classid of our two-int advisory key: b"RLSY" read as a big-endian int4 (0x524C5359).
LOCK_CLASSID = 0x52_4C_53_59
#: upstream sqlx's migration key is this times crc32(current_database()), one bigint.
UPSTREAM_MIGRATION_KEY_MULTIPLIER = 0x3D32AD9E
POLL_INTERVAL_S = 0.5
LABEL_PREFIX = "releasy-deploy"
MAX_LABEL_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1 (application_name is truncated there)
MIN_WHO_BYTES = 12  # of user@machine kept in a label when the version is very long
SINCE_FORMAT = "%Y%m%dT%H%M%SZ"

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


def lost_message(host: str, environment: str, what_ended: str) -> str:
    return (f"{host}: the deploy lock of {environment} was lost ({what_ended}). Stop here:"
            f" another deploy may have started. Check `fab deploy.lock`, then re-run.")


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


def identity() -> tuple[str, str, int]:
    """This process: (user, machine, pid), as lock labels and freeze records name it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return user, socket.gethostname().split(".")[0], os.getpid()


def parse_flock_status(stdout: str, *, environment: str, where: str) -> LockInfo | None:
    """Output of `FLOCK_STATUS_SCRIPT` -> None (free) or the holder."""
    lines = stdout.splitlines()
    if not lines or lines[0].strip() == "FREE":
        return None
    first = lines[0].split()
    if first[0] != "HELD":
        raise ValueError(f"unexpected lock status output {lines[0]!r}")
    return holder_from_file(lines[1:], environment=environment, where=where,
                             remote_pid=first[1] if len(first) > 1 else "?")


def holder_from_file(lines: list[str], *, environment: str, where: str,
                      remote_pid: str = "?") -> LockInfo:
    label = lines[0].strip() if lines else ""
    parsed = parse_label(label, environment=environment, where=where)
    if parsed is not None:
        return parsed
    return LockInfo(environment=environment, where=where, label=label,
                    note=f"an unknown process (flock taken by pid {remote_pid};"
                         f" no holder file {HOLDER_PATH})")


_REASON_MAX = 300


def check_reason(reason: str) -> str:
    text = " ".join((reason or "").split())
    if not text:
        raise ValueError("--reason is required: say why deploys are frozen")
    if len(text) > _REASON_MAX or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError(f"--reason must be one line of at most {_REASON_MAX} characters")
    return text


def freeze_record(reason: str, *, since: datetime | None = None) -> bytes:
    user, machine, _ = identity()
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


def frozen_message(environment: str, record: dict[str, str]) -> str:
    return (f"deploys of {environment} are frozen since {record['since']} by {record['by']}:"
            f" {record['reason']}\n  Nothing was changed. `fab deploy.unfreeze` lifts it.")

