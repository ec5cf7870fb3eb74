"""The change engine as data: planners (pure) and the one recovery path, without a lab.

For every flow the plan of a normal case is checked, and for a failure at every step of a
batch, what the recovery puts back: which hosts restart on which release, and what is in
rotation afterwards."""
from __future__ import annotations

import pytest

from releasy_deploy.engine import plan as planmod
from releasy_deploy.engine.plan import AppState, Batch, RollingPlan
from releasy_deploy.engine.recovery import FailureReport, explain_failure, plan_recovery

APPS = ("app1", "app2", "app3")


def fleet(current="1.0.0", **over):
    return {n: AppState(**{"name": n, "current": current, "installed": (current,),
                           "active": "active", "ready": True, **over.get(n, {})})
            for n in APPS}


# ------------------------------------------------------------------------------ planners
def test_rolling_deploy_plan_first_host_alone_then_batches():
    states = fleet()
    plan = planmod.plan_release_rollout(list(states.values()), "1.1.0", 1,
                                        flow="deploy.rolling", title="Rolling deploy",
                                        backup=True, stage_release=True)
    assert [(b.stage, b.hosts) for b in plan.batches] == [
        ("migrate", ("app1",)), ("roll", ("app2",)), ("roll", ("app3",))]
    assert plan.host_steps == ("switch", "start", "ready", "validate")
    assert plan.backup and plan.stage_release and plan.records_release
    assert plan.describe(states, "db1") == (
        "app1: 1.0.0 -> 1.1.0 (first, alone: any migrations run here); app2: 1.0.0 -> 1.1.0;"
        " app3: 1.0.0 -> 1.1.0; then 2 batch(es) of 1; database dump on db1 first")
    assert plan.stage_words(plan.batches[0]) == (
        "drain app1, switch to 1.1.0, start alone (migrations run here), wait for /ready,"
        " check /version, re-add")


def test_rolling_deploy_resumed_skips_hosts_on_the_target_and_does_not_migrate_again():
    states = fleet(app1={"current": "1.1.0"})
    plan = planmod.plan_release_rollout(list(states.values()), "1.1.0", 2,
                                        flow="deploy.rolling", title="Rolling deploy",
                                        backup=True, stage_release=True)
    assert [(b.stage, b.hosts) for b in plan.batches] == [("roll", ("app2", "app3"))]
    assert plan.skipped == ("app1",) and not plan.backup


def test_a_fleet_already_there_has_an_empty_plan():
    plan = planmod.plan_release_rollout(list(fleet("1.1.0").values()), "1.1.0", 1,
                                        flow="deploy.rollback", title="Rollback",
                                        backup=False, stage_release=True)
    assert plan.batches == () and not plan.stage_release


def test_restart_plan_keeps_each_hosts_release():
    plan = planmod.plan_restart(["app2"], [["app1"], ["app3"]], fleet())
    assert plan.target is None and plan.target_text == "1.0.0"
    assert [b.rotates for b in plan.batches] == [False, True, True]
    assert "app.undrain" in plan.left_out_advice


def test_reconfiguration_is_a_planner_over_the_same_runner():
    states = fleet(app3={"in_rotation": False})
    plan = planmod.plan_reconfigure(["app1", "app2", "app3"], states, batch=5)
    assert plan.flow == "app.setup" and plan.title == "Rolling reconfiguration"
    # app3 is out of rotation: restarted in place; one of the two serving hosts always stays.
    assert [(b.hosts, b.rotates) for b in plan.batches] == [
        (("app3",), False), (("app1",), True), (("app2",), True)]
    assert plan.host_steps == ("start", "ready")


def test_plans_refuse_unknown_steps_and_a_switch_without_target():
    with pytest.raises(ValueError):
        RollingPlan("x", "X", None, ("switch",), ())
    with pytest.raises(ValueError):
        RollingPlan("x", "X", "1.0.0", ("reboot",), ())


# ------------------------------------------------------------------------------ recovery
RELEASE_STEPS = ("lock check", "drain", "switch", "start", "ready", "validate")


@pytest.mark.parametrize("step", RELEASE_STEPS)
def test_recovery_for_a_failure_at_every_step_of_a_single_host_batch(step):
    # app1 finished earlier (waiting to be re-added with this batch's drain), app2 fails.
    rec = plan_recovery(app_names=APPS, reached={"app1": "re-add", "app2": step},
                        failed=["app2"], succeeded=[], rotation=["app3"], pending=["app1"],
                        ready_before={n: True for n in APPS},
                        previous={n: "1.0.0" for n in APPS})
    if step in ("switch", "start", "ready", "validate"):
        # It no longer runs what it ran: restart it on 1.0.0, re-add only once ready.
        assert rec.put_back == {"app2": "1.0.0"}
        assert rec.rotation == ("app1", "app3")
    else:
        # Not changed yet: it still serves its release, straight back in.
        assert rec.put_back == {}
        assert rec.rotation == ("app1", "app2", "app3")


@pytest.mark.parametrize("step", RELEASE_STEPS)
def test_recovery_in_a_parallel_batch_keeps_the_hosts_that_finished(step):
    rec = plan_recovery(app_names=APPS, reached={"app2": "re-add", "app3": step},
                        failed=["app3"], succeeded=["app2"], rotation=["app1"], pending=[],
                        ready_before={n: True for n in APPS},
                        previous={"app1": "1.0.0", "app2": "1.0.0", "app3": "0.9.0"})
    assert "app2" in rec.rotation and "app1" in rec.rotation
    changed = step in ("switch", "start", "ready", "validate")
    assert rec.put_back == ({"app3": "0.9.0"} if changed else {})
    assert ("app3" in rec.rotation) is (not changed)


def test_recovery_never_re_adds_a_host_that_was_not_serving():
    rec = plan_recovery(app_names=APPS, reached={"app2": "drain"}, failed=["app2"],
                        succeeded=[], rotation=["app1", "app3"], pending=[],
                        ready_before={"app1": True, "app2": False, "app3": True},
                        previous={n: "1.0.0" for n in APPS})
    assert rec.rotation == ("app1", "app3") and rec.put_back == {}


def test_a_host_without_previous_release_is_put_back_as_none():
    rec = plan_recovery(app_names=APPS, reached={"app1": "start"}, failed=["app1"],
                        succeeded=[], rotation=["app2", "app3"], pending=[],
                        ready_before={}, previous={"app1": None})
    assert rec.put_back == {"app1": None}


def test_the_failure_paragraph_carries_the_flows_advice_before_the_journal():
    text = explain_failure(FailureReport(
        action="Rolling restart", environment="lab", version="1.0.0", host="app1",
        stage="restart", step="ready", reason="no /ready within 30 s",
        reverted={"app1": ("1.0.0", False)}, rotation=("app2", "app3"),
        journal="boom", advice="Once fixed, `fab app.undrain --host NAME`."))
    head, _, journal = text.partition("\nLast journal lines")
    assert head.startswith("Rolling restart of lab to 1.0.0 stopped at app1, stage restart")
    assert head.endswith("Once fixed, `fab app.undrain --host NAME`.")
    assert "app1 could not be brought back on 1.0.0" in head and "boom" in journal


def test_batch_label_joins_hosts():
    assert Batch("roll", ("app2", "app3")).label == "app2+app3"
