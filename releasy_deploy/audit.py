"""Audit records on the hosts themselves: who changed what, when, from where, and how it
ended. One JSON object per line in AUDIT_LOG (root-only), one round trip per host, all
hosts in parallel. Every task that changes a host appends one: the rollouts (with their
versions, written by the runner and blue/green), and `task_entry` for the others (site,
the setups, firewall.apply, db.restore, freeze/unfreeze, proxy.maintenance...), on the
hosts `entry_hosts` picks.

`fab audit` reads the logs back (read-only, no lock): every host's tail, the records of
this environment, the copies of one record on several hosts shown once, newest first."""
from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from .commands.shell_read import copy_stdin

AUDIT_DIR = "/var/log/releasy-deploy"
AUDIT_LOG = f"{AUDIT_DIR}/audit.log"

# The record arrives on stdin: nothing of it is in the command line. One line, appended by
# the shell itself (no mkdir or cat process once the directory is there).
_APPEND = f'umask 027; [ -d "$1" ] || mkdir -p "$1" || exit; {copy_stdin()} >> "$2"'


def operator_identity() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def now() -> str:
    """UTC now, to the second, ISO 8601 (the records' time stamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record(action: str, environment: str, **fields: object) -> dict:
    where = os.environ.get("SSH_CLIENT", "").split(" ")[0]
    return {"ts": now(),
            "action": action, "environment": environment, "by": operator_identity(),
            **({"ssh_from": where} if where else {}), "pid": os.getpid(), **fields}


def task_entry(action: str, environment: str, *, result: str, seconds: float,
               changed: Mapping[str, int], args: Mapping[str, Any]) -> dict:
    """The record of a task other than a rollout: its arguments (never secrets: only the
    flags the edge passes), the result, and how many changes it made on which host."""
    return record(action, environment, result=result, seconds=round(seconds, 1),
                  changed={h: n for h, n in changed.items() if n},
                  **{k: v for k, v in args.items() if v not in (None, False, (), [])})


def entry_hosts(inventory, changed: Mapping[str, int], ok: bool) -> list:
    """Where a `task_entry` goes: every host of the inventory, except for a run that ended
    ok without changing anything, which is recorded on the database host only (where the
    deploy lock lives). The trail still shows every run, and a no-op convergence (a
    second `fab site`, a cron-driven check) costs the app hosts their read and nothing
    more: their logs stay as they were."""
    if ok and not any(changed.values()):
        return [inventory.db_host]
    return list(inventory.hosts)


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


def read_tail_argv(lines: int) -> list[str]:
    return ["tail", "-n", str(int(lines)), AUDIT_LOG]


def parse_lines(text: str) -> list[dict]:
    """The records of an audit log's text; a line that is not a JSON object is skipped."""
    found = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def merge(by_host: Mapping[str, Sequence[dict]], environment: str,
          last: int) -> list[dict]:
    """This environment's records from every host's log, each record once (its copies on
    several hosts differ only in ``host``: they become ``hosts``), newest first."""
    merged: dict[str, dict] = {}
    order: list[str] = []
    for host, records in by_host.items():
        for rec in records:
            if rec.get("environment") != environment:
                continue
            body = {k: v for k, v in rec.items() if k != "host"}
            key = json.dumps(body, sort_keys=True)
            if key not in merged:
                merged[key] = {**body, "hosts": []}
                order.append(key)
            merged[key]["hosts"].append(rec.get("host", host))
    out = [merged[k] for k in order]
    out.sort(key=lambda r: (str(r.get("ts", "")), int(r.get("pid", 0) or 0)), reverse=True)
    return out[:max(0, last)]


def read_all(executor, hosts: Sequence, lines: int) -> tuple[dict[str, list[dict]],
                                                               dict[str, str]]:
    """Every host's last ``lines`` records (read-only, in parallel), and the hosts that
    could not be read with why."""
    problems: dict[str, str] = {}

    def tail(conn) -> list[dict]:
        try:
            res = conn.run(read_tail_argv(lines), sudo=True, check=False, mutates=False)
        except Exception as exc:  # noqa: BLE001 - the other hosts' records still count
            problems[conn.name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return []
        return parse_lines(res.stdout)

    found = executor.each(list(hosts), tail)
    return {h: found.get(h, []) for h in found}, problems


_SHOWN_FIRST = ("ts", "action", "result", "by")
_NOT_SHOWN = {"environment", "pid", "hosts", "host"}


def render(records: Sequence[dict]) -> list[str]:
    """One line per record: time, action, result, who, then the other fields."""
    lines = []
    for rec in records:
        rest = " ".join(f"{k}={json.dumps(v, sort_keys=True, separators=(',', ':'))}"
                        if not isinstance(v, str) else f"{k}={v}"
                        for k, v in rec.items() if k not in _SHOWN_FIRST and k not in _NOT_SHOWN)
        result = str(rec.get("result", "?"))
        lines.append(f"{rec.get('ts', '?'):<25} {rec.get('action', '?'):<18}"
                     f" {result:<10} {rec.get('by', '?')}  {rest}".rstrip())
    return lines
