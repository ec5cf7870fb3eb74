"""Audit records on the hosts themselves: who deployed what, when, from which version to
which, and how it ended. One JSON object per line in AUDIT_LOG (root-only), one round trip
per host, all hosts in parallel."""
from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import datetime, timezone
from typing import Iterable

AUDIT_DIR = "/var/log/releasy-deploy"
AUDIT_LOG = f"{AUDIT_DIR}/audit.log"

# The record arrives on stdin: nothing of it is in the command line.
_APPEND = ('umask 027; mkdir -p "$1" && cat >> "$2"')


def operator_identity() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def now() -> str:
    """UTC now, to the second, ISO 8601 (the records' time stamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record(action: str, environment: str, **fields: object) -> dict:
    return {"ts": now(),
            "action": action, "environment": environment, "by": operator_identity(),
            "pid": os.getpid(), **fields}


def append_argv() -> list[str]:
    return ["sh", "-c", _APPEND, "releasy-audit", AUDIT_DIR, AUDIT_LOG]


def write(executor, hosts: Iterable, entry: dict) -> None:
    """Append ``entry`` (plus the host name) to every host's audit log; dry-run: nothing."""
    if executor.dry_run:
        return

    def append(conn):
        line = json.dumps({**entry, "host": conn.name}, sort_keys=True) + "\n"
        conn.run(append_argv(), sudo=True, stdin=line.encode())

    executor.each(list(hosts), append)


def read(conn, lines: int = 20) -> list[dict]:
    out = conn.run(["tail", "-n", str(int(lines)), AUDIT_LOG], sudo=True, check=False,
                   mutates=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]
