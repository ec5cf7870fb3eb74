"""What every bench measurement shares: the deadline budget, running the real `fab` with a
JSON log, and small number helpers."""
from __future__ import annotations

import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from releasy_deploy.cli import JSON_LOG_ENV, TRACE_ENV  # noqa: E402
from releasy_deploy.executor import Executor  # noqa: E402
from releasy_deploy.output import Reporter  # noqa: E402

FAB = str(Path(sys.executable).parent / "fab")
RESULTS = ROOT / "bench" / "results"
TOTAL_BUDGET_S = 1800.0  # the whole run, labs up and down included


class OutOfTime(Exception):
    pass


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def timeout(self, wanted: float) -> float:
        """A deadline for one step: what it wants, or what is left of the budget."""
        left = self.end - time.monotonic()
        if left < 10:
            raise OutOfTime(f"bench budget of {TOTAL_BUDGET_S:.0f} s used up")
        return min(wanted, left)


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def parse_ts(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def settle(budget: Budget, idle: float = 0.85, window: float = 1.0, most: float = 30.0) -> float:
    """Wait until the machine is idle (``idle`` of its CPU time over ``window`` seconds),
    at most ``most`` seconds; returns the seconds waited. Timed runs start from here: after
    a lab comes up or a host restarts, what the hosts do meanwhile (units starting, the app
    connecting to its database) is not the tool's cost."""
    start = time.monotonic()
    deadline = start + min(most, max(0.0, budget.end - start - 10))
    while True:
        busy0, total0 = cpu_busy_sample()
        time.sleep(window)
        busy1, total1 = cpu_busy_sample()
        done = (total1 - total0) - (busy1 - busy0) >= idle * max(1, total1 - total0)
        if done or time.monotonic() >= deadline:
            return round(time.monotonic() - start, 1)


# --------------------------------------------------------------------------------------
# Running the real CLI
# --------------------------------------------------------------------------------------
class FabRun:
    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess, seconds: float,
                 events: list[dict]) -> None:
        self.args = list(args)
        self.proc = proc
        self.seconds = seconds
        self.events = events
        self.launched = 0.0  # epoch seconds when the process was started
        self.cpu_s = 0.0  # the fab process's own CPU time (user + system)
        self.machine_cpu_s = 0.0  # the whole machine's busy CPU time meanwhile (every core)

    def startup_s(self) -> float | None:
        """From launching `fab` to its first SSH connection (needs trace=True): Python,
        imports, the inventory and the task's own preparation."""
        first = [parse_ts(e["ts"]) for e in self.of("command")]
        return round(min(first) - self.launched, 3) if first and self.launched else None

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind]

    def round_trips(self) -> dict[str, int]:
        return {e["host"]: e["round_trips"] for e in self.of("round_trips")}

    def connections(self) -> dict[str, int]:
        return {e["host"]: e["connections"] for e in self.of("round_trips")}


def fab(inventory: Path, *args: str, budget: Budget, timeout: float = 120,
        trace: bool = False, check: bool = True) -> FabRun:
    """Run `fab ARGS` as an operator would, with a JSON log; wall time includes start-up."""
    with tempfile.TemporaryDirectory(prefix="releasy-bench-") as tmp:
        log = Path(tmp) / "events.jsonl"
        env = {**os.environ, "RELEASY_INVENTORY": str(inventory), JSON_LOG_ENV: str(log),
               "PYTHONUNBUFFERED": "1"}
        env.pop(TRACE_ENV, None)
        if trace:
            env[TRACE_ENV] = "1"
        argv = [FAB, "-r", str(ROOT / "fabfile"), *args]
        launched = time.time()
        before = _children_cpu()
        machine_before = cpu_busy_sample()[0]
        started = time.perf_counter()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=budget.timeout(timeout))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"fab {' '.join(args)} did not finish within its deadline")
        seconds = time.perf_counter() - started
        machine = (cpu_busy_sample()[0] - machine_before) / CLOCK_TICKS
        cpu = _children_cpu() - before
        events = ([json.loads(line) for line in log.read_text().splitlines() if line.strip()]
                  if log.exists() else [])
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"fab {' '.join(args)} exited {proc.returncode}:\n{tail}")
    run = FabRun(args, proc, seconds, events)
    run.launched = launched
    run.cpu_s = cpu
    run.machine_cpu_s = machine
    return run


def _children_cpu() -> float:
    """CPU time of this process's waited-for children: the bench runs one `fab` at a time
    and `fab` starts no programs of its own (SSH is in-process), so a difference around one
    run is that run's client CPU."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fab_tasks() -> set[str]:
    proc = subprocess.run([FAB, "-r", str(ROOT / "fabfile"), "--list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return {m.group(1) for m in re.finditer(r"^\s+([\w.-]+)", proc.stdout, re.MULTILINE)}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/stat's unit, per second


def cpu_busy_sample() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def quiet_executor(inv: Any, **kw: Any) -> Executor:
    return Executor(inv, reporter=Reporter(io.StringIO()), **kw)

