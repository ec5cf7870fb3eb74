"""A rollout as a named pipeline of stages (Capistrano's idea): every stage is logged with
its host and duration, to the terminal and to the JSON event log, and the timings are kept
so a failure report and the benchmark can say where the time went."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .errors import first_line
from .output import Reporter

# The stage names operators see, in order. "failed" runs only after a failure.
ROLLING_STAGES = ("preflight", "stage", "backup", "migrate", "roll", "finish", "failed")


@dataclass(frozen=True)
class StageTiming:
    stage: str
    host: str | None
    seconds: float
    ok: bool


@dataclass
class Pipeline:
    name: str
    reporter: Reporter
    timings: list[StageTiming] = field(default_factory=list)

    @contextmanager
    def stage(self, stage: str, host: str | None = None, what: str = "") -> Iterator[None]:
        """Run one stage (optionally on one host); logs start, end and duration."""
        label = host or self.name
        self.reporter.stage(label, stage, f"{what or 'started'}", pipeline=self.name)
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            seconds = time.monotonic() - started
            self.timings.append(StageTiming(stage, host, seconds, False))
            self.reporter.stage(label, stage, f"FAILED after {seconds:.1f} s: "
                                f"{first_line(exc)}",
                                pipeline=self.name, seconds=round(seconds, 3), ok=False)
            raise
        seconds = time.monotonic() - started
        self.timings.append(StageTiming(stage, host, seconds, True))
        self.reporter.stage(label, stage, f"done in {seconds:.1f} s", pipeline=self.name,
                            seconds=round(seconds, 3), ok=True)

    def total(self, stage: str | None = None, host: str | None = None) -> float:
        return sum(t.seconds for t in self.timings
                   if (stage is None or t.stage == stage) and (host is None or t.host == host))
