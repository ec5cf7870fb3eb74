"""The sequence runner (blue/green, restore) as data: a plan, actions that record what they
did, and a failure at every step: what the runner puts back, in which order, and what the
flow's failure hook is given."""
from __future__ import annotations

import io

import pytest

from releasy_deploy.engine.sequence import (Failure, Kept, SequencePlan, Step, plan_undo,
                                            run_sequence)
from releasy_deploy.errors import StepFailed
from releasy_deploy.output import Reporter
from releasy_deploy.pipeline import Pipeline

PLAN = SequencePlan("demo.flow", "Demo", (
    Step("read", "preflight", ("h1",), "read the state", changes=False),
    Step("stage", "stage", ("h1",), "upload the release"),
    Step("start", "start", ("h1",), "start the new instance", undo="stop_new",
         undo_what="stop the new instance"),
    Step("switch", "switch", ("p1", "p2"), "point the proxies at it", undo="switch_back",
         undo_what="point the proxies back"),
    Step("finish", "finish", ("h1",), "stop the old instance"),
))


class Lock:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def ensure_held(self) -> None:
        self.log.append("lock")


def _run(fail_at: str | None = None, *, undo_fails: str | None = None,
         hook=lambda f: StepFailed(f"{f.step.kind} failed")):
    log: list[str] = []
    seen: list[Failure] = []

    def act(step: Step):
        log.append(step.kind)
        if step.kind in (fail_at, undo_fails):
            raise RuntimeError(f"{step.kind} broke")
        return f"{step.kind} ok"

    kinds = {*PLAN.kinds, "stop_new", "switch_back"}

    def on_failure(f: Failure):
        seen.append(f)
        return hook(f)

    pipe = Pipeline("demo.flow", Reporter(io.StringIO()))
    try:
        done = run_sequence(PLAN, {k: act for k in kinds}, pipe=pipe, lock=Lock(log),
                            on_failure=on_failure)
    except BaseException as exc:  # noqa: BLE001 - returned for the assertions
        return log, seen, exc, pipe
    return log, seen, done, pipe


def test_a_plan_runs_in_order_with_the_lock_checked_before_each_changing_step():
    log, seen, done, pipe = _run()
    assert log == ["read", "lock", "stage", "lock", "start", "lock", "switch", "lock", "finish"]
    assert done == {k: f"{k} ok" for k in PLAN.kinds}
    assert not seen
    assert [t.stage for t in pipe.timings] == ["preflight", "stage", "start", "switch", "finish"]


@pytest.mark.parametrize("kind,undo", [
    ("read", []), ("stage", []), ("start", ["stop_new"]),
    ("switch", ["switch_back", "stop_new"]), ("finish", ["switch_back", "stop_new"]),
])
def test_plan_undo_puts_back_every_step_reached_latest_first(kind, undo):
    assert [s.kind for s in plan_undo(PLAN, kind)] == undo
    assert all(s.stage == "failed" for s in plan_undo(PLAN, kind))


@pytest.mark.parametrize("kind", PLAN.kinds)
def test_a_failure_at_every_step_runs_exactly_the_planned_undo(kind):
    log, seen, exc, pipe = _run(kind)
    assert isinstance(exc, StepFailed) and str(exc) == f"{kind} failed"
    at = log.index(kind)
    assert log[at + 1:] == [s.kind for s in plan_undo(PLAN, kind)]
    (failure,) = seen
    assert failure.step.kind == kind
    assert str(failure.cause) == f"{kind} broke"
    assert list(failure.done) == list(PLAN.kinds[: PLAN.kinds.index(kind)])
    assert [u.step.kind for u in failure.undone] == [s.kind for s in plan_undo(PLAN, kind)]
    assert all(u.ok for u in failure.undone)
    failed_stage = [t for t in pipe.timings if not t.ok]
    assert [t.stage for t in failed_stage] == [PLAN.step(kind).stage]


def test_an_undo_that_fails_is_recorded_and_the_rest_still_runs():
    log, seen, exc, _ = _run("finish", undo_fails="switch_back")
    assert log[-2:] == ["switch_back", "stop_new"]
    undone = seen[0].undone
    assert [u.ok for u in undone] == [False, True]
    assert str(undone[0].error) == "switch_back broke"
    assert seen[0].undo_result("stop_new").result == "stop_new ok"
    assert isinstance(exc, StepFailed)


def test_a_hook_returning_none_re_raises_the_original_error():
    _log, _seen, exc, _ = _run("stage", hook=lambda f: None)
    assert isinstance(exc, RuntimeError) and str(exc) == "stage broke"


def test_a_plan_without_an_action_for_a_step_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="switch_back"):
        run_sequence(PLAN, {k: print for k in PLAN.kinds},
                     pipe=Pipeline("x", Reporter(io.StringIO())), lock=None,
                     on_failure=lambda f: None)


def test_duplicate_step_kinds_are_refused_and_the_plan_describes_itself():
    with pytest.raises(ValueError):
        SequencePlan("f", "F", (Step("a", "s", (), "x"), Step("a", "s", (), "y")))
    lines = PLAN.describe()
    assert lines[2] == "3. start: start the new instance on h1 (undone by: stop the new instance)"
    assert lines[3].startswith("4. switch: point the proxies at it on p1, p2")


FINAL = SequencePlan("demo.final", "Demo", (
    Step("start", "start", ("h1",), "start it", undo="stop_new", undo_what="stop it"),
    Step("switch", "switch", ("h1",), "switch", undo="check", undo_what="check", final=True),
    Step("finish", "finish", ("h1",), "finish"),
))


def test_a_final_step_that_finished_is_the_point_of_no_return():
    assert [s.kind for s in plan_undo(FINAL, "switch")] == ["check", "stop_new"]
    assert plan_undo(FINAL, "finish") == ()


@pytest.mark.parametrize("check, undone", [
    ("not switched", ["check", "stop_new"]),
    (Kept("it is live", found=True), ["check"]),
])
def test_an_undo_that_returns_kept_ends_the_undo(check, undone):
    log: list[str] = []
    seen: list[Failure] = []

    def act(step: Step):
        log.append(step.kind)
        if step.kind == "switch":
            raise RuntimeError("switch broke")
        return check if step.kind == "check" else None

    with pytest.raises(StepFailed):
        run_sequence(FINAL, {k: act for k in ("start", "switch", "finish", "stop_new", "check")},
                     pipe=Pipeline("x", Reporter(io.StringIO())), lock=None,
                     on_failure=lambda f: seen.append(f) or StepFailed("x"))
    assert log == ["start", "switch", *undone]
    assert [u.step.kind for u in seen[0].undone] == undone
    assert seen[0].kept == (check if isinstance(check, Kept) else None)


def test_a_step_that_settles_an_earlier_one_ends_its_undo():
    plan = SequencePlan("f", "F", (
        Step("stop", "stop", ("h1",), "stop it", undo="start", undo_what="start it again"),
        Step("work", "work", ("h1",), "the work"),
        Step("start", "start", ("h1",), "start it", settles=("stop",)),
    ))
    assert [s.kind for s in plan_undo(plan, "work")] == ["start"]
    assert plan_undo(plan, "start") == ()
