"""Flows that are one sequence of steps (blue/green, restore) as data, and their one runner.

A sequence planner is a pure function from what preflight read to a `SequencePlan`: ordered
`Step`s, each naming the stage it shows under, the hosts it touches, what it does and what
undoing it means (the kind of the step that puts it back). `run_sequence` executes any such
plan with the flow's actions (step kind -> callable): one pipeline stage per step, the deploy
lock verified before every step that changes a host. When a step fails, `plan_undo` (pure)
picks what to put back, latest first; the runner runs it with Ctrl-C/SIGTERM deferred (the
hosts must not be left half-way), and hands a `Failure` record to the flow's `on_failure`,
which writes the audit record and returns the one failure paragraph as an error.

The rolling flows (deploy, rollback, restart, reconfigure) have their own runner
(`engine.runner`) because their stages repeat per batch; both share the pipeline, the lock
check and the failure-paragraph conventions.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import interrupts
from ..pipeline import Pipeline

__all__ = ["Step", "SequencePlan", "Kept", "Undone", "Failure", "plan_undo", "run_sequence"]


@dataclass(frozen=True)
class Step:
    """One typed step of a sequence plan."""

    kind: str  # the action that runs it: a key of the flow's actions
    stage: str  # the pipeline stage it shows under ("start", "switch", "restore"...)
    hosts: tuple[str, ...]
    what: str  # the progress line: what it does
    #: the kind of the action that puts this step back, or None: nothing to undo (a read,
    #: a dump) or nothing that can be undone safely (the flow's failure paragraph says so).
    undo: str | None = None
    #: what undoing it means, in words (dry-run and the failure paragraph say it)
    undo_what: str = ""
    #: changes a host: the lock is verified right before it
    changes: bool = True
    #: the point of no return: once this step has finished, a later failure undoes nothing
    #: of it or before it (e.g. traffic already goes to the new instance: fixed forward,
    #: a re-run converges)
    final: bool = False
    #: kinds of earlier steps this one takes over once reached: their undo no longer runs
    #: after a failure here or later (starting the units again ends what stopping them
    #: began; a retry of what just failed is not a way back).
    settles: tuple[str, ...] = ()

    @property
    def label(self) -> str | None:
        """The host the pipeline names (one host), else the flow."""
        return self.hosts[0] if len(self.hosts) == 1 else None


@dataclass(frozen=True)
class SequencePlan:
    """A whole sequence flow, as data."""

    flow: str  # the task, also the audit action: "deploy.bluegreen", "db.restore"
    title: str  # how messages name it
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()  # said before the first step (what preflight found)

    def __post_init__(self) -> None:
        kinds = [s.kind for s in self.steps]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"{self.flow}: a step kind appears twice: {kinds}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.steps)

    def step(self, kind: str) -> Step:
        for s in self.steps:
            if s.kind == kind:
                return s
        raise KeyError(kind)

    def describe(self) -> list[str]:
        """One line per step, in order (what `--dry-run` and the confirmation show)."""
        lines = []
        for n, s in enumerate(self.steps, 1):
            on = f" on {', '.join(s.hosts)}" if s.hosts else ""
            back = f" (undone by: {s.undo_what})" if s.undo_what else ""
            lines.append(f"{n}. {s.stage}: {s.what}{on}{back}")
        return lines


def plan_undo(plan: SequencePlan, failed: str) -> tuple[Step, ...]:
    """What puts things back after step ``failed`` failed: the undo of every step reached
    (the failed one included: it may have half-run), latest first, each once; nothing of a
    `final` step that finished, or of the steps before it; not that of a step a reached step
    settles."""
    reached = plan.kinds[: plan.kinds.index(failed) + 1]
    settled = {k for kind in reached for k in plan.step(kind).settles}
    undo: list[Step] = []
    seen: set[str] = set()
    for kind in reversed(reached):
        s = plan.step(kind)
        if s.final and kind != failed:
            break
        if s.undo is None or s.undo in seen or kind in settled:
            continue
        seen.add(s.undo)
        undo.append(Step(s.undo, "failed", s.hosts, s.undo_what or f"undo {s.what}",
                         changes=True))
    return tuple(undo)


@dataclass(frozen=True)
class Kept:
    """What an undo action returns when it finds its step took effect and must stay (e.g. a
    proxy already sends traffic to the new instance): the runner undoes nothing before it.
    ``found``: what it found, for the failure paragraph."""

    why: str
    found: Any = None


@dataclass(frozen=True)
class Undone:
    """One undo step after a failure: what its action returned, or the error it raised."""

    step: Step
    result: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not False

    @property
    def kept(self) -> bool:
        """The undo found its step must stay (`Kept`): the steps before it stayed too."""
        return isinstance(self.result, Kept)


@dataclass(frozen=True)
class Failure:
    """Everything the flow's failure paragraph needs, as data."""

    plan: SequencePlan
    step: Step  # the step that failed
    cause: BaseException
    done: Mapping[str, Any] = field(default_factory=dict)  # kind -> result, steps finished
    undone: tuple[Undone, ...] = ()

    def undo_result(self, kind: str) -> Undone | None:
        return next((u for u in self.undone if u.step.kind == kind), None)

    @property
    def kept(self) -> Kept | None:
        """The `Kept` an undo returned (the undo stopped there), or None."""
        return next((u.result for u in self.undone if u.kept), None)


class HeldLock(Protocol):
    def ensure_held(self) -> None: ...


Action = Callable[[Step], Any]


def run_sequence(plan: SequencePlan, actions: Mapping[str, Action], *, pipe: Pipeline,
                 lock: HeldLock | None,
                 on_failure: Callable[[Failure], BaseException | None]) -> dict[str, Any]:
    """Run ``plan``'s steps in order; returns each step's result by kind.

    On a failure: the undo steps `plan_undo` picks run (signals deferred; an undo that
    fails is recorded, never raised over the original failure; one that returns `Kept`
    ends the undo: what came before stays), then ``on_failure`` gets the
    `Failure` and returns the error to raise (None: the original one is re-raised, e.g. bad
    input keeps its exit code).
    """
    wanted = [*plan.kinds, *(s.undo for s in plan.steps if s.undo)]
    missing = [k for k in wanted if k not in actions]
    if missing:
        raise ValueError(f"{plan.flow}: no action for step(s) {', '.join(missing)}")
    done: dict[str, Any] = {}
    for step in plan.steps:
        try:
            if step.changes and lock is not None:
                lock.ensure_held()
            with pipe.stage(step.stage, step.label, step.what):
                done[step.kind] = actions[step.kind](step)
        except BaseException as exc:
            undone = _undo(plan, step, actions, pipe)
            raised = on_failure(Failure(plan, step, exc, dict(done), undone))
            if raised is None:
                raise
            raise raised from None
    return done


def _undo(plan: SequencePlan, failed: Step, actions: Mapping[str, Action],
          pipe: Pipeline) -> tuple[Undone, ...]:
    todo = plan_undo(plan, failed.kind)
    if not todo:
        return ()
    undone: list[Undone] = []
    with interrupts.deferred(f"putting back what {plan.flow} changed"):
        for step in todo:
            try:
                with pipe.stage(step.stage, step.label, step.what):
                    undone.append(Undone(step, actions[step.kind](step)))
            except Exception as exc:  # noqa: BLE001 - the original failure is the one raised
                undone.append(Undone(step, error=exc))
            if undone[-1].kept:
                break
    return tuple(undone)

