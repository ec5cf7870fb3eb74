"""The `Executor`: every SSH connection of one task (one per host, opened lazily, a jump
host's shared by the hosts behind it, all closed at the end), the parallel `Executor.each`
over hosts, and what the task measures (round trips and connections per host; with
``trace=True`` every exec request and connection set-up, timed)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from fabric import Connection

from ..errors import DeployError, ParallelError
from ..output import Masker, Reporter
from .argv import secret_values
from .faults import FaultInjection
from .host import HostConnection

T = TypeVar("T")

# Hosts worked on at once. Past the bound hosts wait for a free worker, a second wave of
# round trips: 20 lab hosts took 0.39 s with 16 workers, 0.29 s with 32. At 43 hosts (40
# app hosts, 2 proxies, the db) 32 workers left 11 reads for a second wave; on the lab,
# where every host shares the same 2 cores, one wave took as long (3.0-3.1 s for a no-op
# site), but on real hosts a wave is a network round trip each.
MAX_PARALLEL = 64


@dataclass(frozen=True)
class CommandTrace:
    """When and how long one exec request (or, as ``(ssh connect)``, one connection set-up)
    took on a host; recorded only by an `Executor` made with ``trace=True`` (the benchmark
    splits a rollout's time with it)."""

    host: str
    command: str  # the masked display form, never the raw command line
    started_s: float  # since the executor was created
    seconds: float
    exit_code: int | None  # None: connection set-up, time-out or lost connection


class Executor:
    """Owns every SSH connection of one task: one per host, opened lazily, closed at the end."""

    def __init__(
        self,
        inventory: Any,
        *,
        dry_run: bool = False,
        reporter: Reporter | None = None,
        secrets: Any = None,
        max_parallel: int = MAX_PARALLEL,
        trace: bool = False,
        faults: FaultInjection | None = None,
        echo: bool = False,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be >= 1")
        self.ahead_slots = threading.BoundedSemaphore(max_parallel)
        self.inventory = inventory
        self.dry_run = dry_run
        self.reporter = reporter if reporter is not None else Reporter()
        self.secrets: dict[str, str] = secret_values(secrets)
        # Share the reporter's masker so everything it prints is masked too.
        self.masker: Masker = self.reporter.masker
        self.masker.add(self.secrets.values())
        self.max_parallel = max_parallel
        #: host name -> exec requests sent (each command, script, read or upload is one).
        self.round_trips: dict[str, int] = {}
        #: host name -> SSH connections opened (1 per task unless a connection dropped).
        self.connections_opened: dict[str, int] = {}
        #: with ``trace=True``: every connection set-up and exec request, in finishing order.
        self.trace: list[CommandTrace] | None = [] if trace else None
        self.faults = faults
        #: fab -e/--echo: print every command (masked) on its host's line before it runs.
        self.echo = echo
        self.created_at = time.time()  # wall clock; trace times are relative to it
        self._created = time.monotonic()
        self._conns: dict[str, HostConnection] = {}
        self._jumps: dict[str, HostConnection] = {}  # jump hosts that are not inventory hosts
        self._lock = threading.Lock()
        #: set once a Ctrl-C reached `each`: its hosts' functions still run to the end
        #: (the pool waits for them), but should begin nothing new (`interrupted`).
        self._interrupted = threading.Event()

    def _count(self, counter: dict[str, int], name: str) -> None:
        with self._lock:
            counter[name] = counter.get(name, 0) + 1

    def _trace(self, name: str, command: str, started: float, exit_code: int | None) -> None:
        if self.trace is None:
            return
        record = CommandTrace(name, self.masker(command), round(started - self._created, 4),
                              round(time.monotonic() - started, 4), exit_code)
        with self._lock:
            self.trace.append(record)

    def host(self, host_or_name: Any) -> Any:
        if not isinstance(host_or_name, str):
            return host_or_name
        for h in self.inventory.hosts:
            if h.name == host_or_name:
                return h
        known = ", ".join(h.name for h in self.inventory.hosts)
        raise DeployError(
            f"unknown host {host_or_name!r} (inventory {getattr(self.inventory, 'path', '?')}"
            f" has: {known})"
        )

    def conn(self, host_or_name: Any) -> HostConnection:
        host = self.host(host_or_name)
        with self._lock:
            hc = self._conns.get(host.name)
            if hc is None:
                hc = self._conns[host.name] = HostConnection(host, self)
            return hc

    def connect_ahead(self, hosts: Iterable[Any]) -> None:
        """Start connecting to ``hosts`` in the background (`HostConnection.connect_ahead`):
        for a task that will work on all of them once it has loaded its flow."""
        for h in hosts:
            self.conn(h).connect_ahead()

    def gateway(self, jump: Any) -> Connection:
        """The connected `Connection` to a jump host, opened once per task and shared by
        every host behind it (one TCP connection, many SSH sessions in its channels). An
        inventory host that is also a jump host uses its own, single connection."""
        if getattr(jump, "managed", False):
            return self.conn(jump.name).connection()
        with self._lock:
            hc = self._jumps.get(jump.name)
            if hc is None:
                hc = self._jumps[jump.name] = HostConnection(jump, self)
        return hc.connection()

    def each(self, hosts: Iterable[Any], fn: Callable[[HostConnection], T], *,
             close_on_interrupt: bool = False) -> dict[str, T]:
        """Run ``fn(conn)`` for every host on a bounded thread pool.

        Every host runs to completion; failures are reported as they happen and then raised
        together as one `ParallelError`. Returns host name -> result in the given order.
        ``close_on_interrupt``: on Ctrl-C, close these hosts' connections (ending commands
        that would never end by themselves, e.g. `tail -f`) instead of waiting for them;
        they reconnect on next use.
        """
        targets = [self.host(h) for h in hosts]
        if not targets:
            return {}
        results: dict[str, T] = {}
        failures: dict[str, BaseException] = {}
        workers = min(self.max_parallel, len(targets))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="releasy-host") as pool:
            futures: dict[Any, str] = {}
            try:
                for h in targets:
                    futures[pool.submit(fn, self.conn(h))] = h.name
                for fut in self._completed(futures):
                    name = futures[fut]
                    try:
                        results[name] = fut.result()
                    except Exception as exc:  # noqa: BLE001 - collected, re-raised below
                        failures[name] = exc
                        msg = (str(exc) if isinstance(exc, DeployError)
                               else f"{type(exc).__name__}: {exc}")
                        # One line now; the full text comes once, in the final error.
                        first = (msg.splitlines() or [""])[0].removeprefix(f"{name}: ")
                        self.reporter.error(name, first + (" (details below)" if "\n" in msg
                                                           else ""))
            except KeyboardInterrupt:
                self._interrupted.set()
                if close_on_interrupt:
                    for fut in futures:
                        fut.cancel()
                    for h in targets:
                        self.conn(h).close()
                raise
        if failures:
            raise ParallelError(failures, results, mask=self.masker)
        return {h.name: results[h.name] for h in targets}

    @property
    def interrupted(self) -> bool:
        """A Ctrl-C reached `each` in this task: a host's function that is still running
        (the pool waits for it) checks this before it begins another step."""
        return self._interrupted.is_set()

    @staticmethod
    def _completed(futures):
        """as_completed, waking up regularly so Ctrl-C reaches the main thread at once."""
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            yield from finished

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            jumps, self._jumps = list(self._jumps.values()), {}
        # Hosts behind a jump host first: their sessions run inside its connection.
        conns.sort(key=lambda hc: getattr(hc.host, "jump", None) is None)
        for hc in [*conns, *jumps]:
            hc.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
