"""Fault injection, the test hook for recovery paths (``RELEASY_FAULT=N[:drop]``): which
host-changing command of the task fails on purpose, and what runs instead of it. The host
connection asks `FaultInjection.due` before each host-changing command it sends."""
from __future__ import annotations

import threading

#: What an injected fault runs instead of the host-changing command it replaces.
INJECTED_FAULT_ARGV = ("sh", "-c", "echo 'injected fault (RELEASY_FAULT)' >&2; exit 97")


class FaultInjection:
    """A test hook for recovery paths (``RELEASY_FAULT=N``): the N-th host-changing command
    of the task (a mutating run, script or upload, counted across hosts in the order they
    start) is replaced by one that fails on its host; with ``drop`` (``RELEASY_FAULT=N:drop``)
    the host's SSH connection is closed there instead. ``at=0`` only counts them."""

    def __init__(self, at: int, *, drop: bool = False) -> None:
        self.at = at
        self.drop = drop
        self.count = 0
        self.fired: str | None = None  # "host: command" of the one that failed
        self._lock = threading.Lock()

    def due(self, host: str, display: str) -> bool:
        with self._lock:
            self.count += 1
            if self.count != self.at:
                return False
            self.fired = f"{host}: {display}"
            return True

    def summary(self) -> str:
        how = "connection dropped on purpose" if self.drop else "failed on purpose"
        fired = f"; #{self.at} {how}: {self.fired}" if self.fired else ""
        return f"fault injection: {self.count} host-changing command(s){fired}"

