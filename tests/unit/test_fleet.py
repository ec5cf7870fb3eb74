"""Hosts behind the fleet (issue 18): the record on the db host, the verdicts that keep a
host that missed a rollout out of rotation, and the plans that skip or hold out hosts."""
from __future__ import annotations

import pytest

from releasy_deploy import fleet
from releasy_deploy.engine.plan import (AppState, hold_out_behind, plan_release_rollout,
                                        serving_problems)
from releasy_deploy.fleet import FleetRecord
from releasy_deploy.maintenance import Rotation, RotationView
from releasy_deploy.rollout.preflight import preflight_problems

RECORD = FleetRecord("1.1.0", 3, {"app3": "1.0.0"}, "deploy.rolling", "2026-12-06T16:00Z")


def state(name, current="1.0.0", *, in_rotation=True, ready=True, levels=None, held=False):
    return AppState(name, current, installed=(current,), ready=ready, active="active",
                    in_rotation=in_rotation, levels=levels or {}, held_out=held)


# ------------------------------------------------------------------------------ the record
def test_the_record_round_trips_and_garbage_is_no_record():
    assert FleetRecord.parse(RECORD.to_json()) == RECORD
    for text in ("", "not json", "[]", '{"release": "no version"}', '{"level": 3}'):
        assert FleetRecord.parse(text) is None
    assert fleet.FleetFile().parse("", 3) is None


def test_next_record_keeps_skipped_hosts_behind_until_a_rollout_updates_them():
    first = fleet.next_record(None, release="1.1.0", level=3, skipped=["app3"],
                              updated=["app1", "app2"], by="deploy.rolling", at="t1",
                              was="1.0.0")
    assert first.behind == {"app3": "1.0.0"}
    # A later rollout that still cannot reach app3 keeps what it knew of it.
    second = fleet.next_record(first, release="1.2.0", level=4, skipped=["app3"],
                               updated=["app1", "app2"], by="deploy.rolling", at="t2",
                               was="1.1.0")
    assert second.behind == {"app3": "1.0.0"} and second.release == "1.2.0"
    done = fleet.next_record(second, release="1.2.0", level=4, skipped=[],
                             updated=["app1", "app2", "app3"], by="deploy.rolling", at="t3")
    assert done.behind == {}


# ------------------------------------------------------------------------------ verdicts
def test_behind_reason():
    assert fleet.behind_reason("app3", "1.0.0", fleet="1.1.0", fleet_hosts=["app1", "app2"]) \
        == "it runs 1.0.0, but the hosts in rotation (app1, app2) run 1.1.0"
    assert fleet.behind_reason("app3", "1.1.0", fleet="1.1.0") is None
    # Same release as the fleet, but the database moved on since it last ran.
    assert fleet.behind_reason("app3", "1.1.0", fleet=None, level=2, db_level=3) == (
        "it runs 1.1.0, which ran against database migration level 2; the database is at 3"
        " now")
    # Nothing live to compare with: the record says it.
    assert "deploy.rolling left the fleet on 1.1.0" in fleet.behind_reason(
        "app3", "1.0.0", fleet=None, record=RECORD)
    assert fleet.behind_reason("app2", "1.0.0", fleet=None, record=RECORD) is None
    assert fleet.behind_reason("app3", None, fleet="1.1.0") is None  # nothing installed


def test_undrain_refusal_points_at_the_deploy_that_fixes_it():
    text = fleet.undrain_refusal("app3", "it runs 1.0.0, ...", "1.1.0")
    assert text.startswith("refusing to put app3 back into rotation: it is behind the fleet")
    assert "`fab deploy.rolling --version 1.1.0 --yes`" in text
    assert text.endswith("then `fab app.undrain --host app3`. Nothing was changed.")


def test_undrain_verdict_from_what_the_hosts_and_the_database_say():
    views = {"app1": RotationView("app1", True, True, "active", current="1.1.0", level=3),
             "app2": RotationView("app2", True, True, "active", current="1.1.0", level=3),
             "app3": RotationView("app3", False, True, "active", current="1.0.0", level=2)}
    reason, release = Rotation(views, 3, None).behind("app3")
    assert reason.startswith("it runs 1.0.0, but the hosts in rotation (app1, app2)")
    assert release == "1.1.0"
    views["app3"] = RotationView("app3", False, True, "active", current="1.1.0", level=3)
    assert Rotation(views, 3, RECORD).behind("app3") == (None, "1.1.0")


def test_fleet_headlines():
    apps = {"app1": fleet.AppView(True, "1.1.0", True), "app2": fleet.AppView(True, "1.1.0",
                                                                                False),
            "app3": fleet.AppView(False)}
    lines = fleet.fleet_headlines(apps, {"app1": True, "app2": True, "app3": True}, None)
    assert lines == [
        "app2: the proxies route requests to it but it does not answer /ready; fix it (`fab"
        " app.restart --host app2`) or `fab app.drain --host app2`",
        "app3: unreachable, and the proxies still route requests to it; `fab app.drain --host"
        " app3` takes it out (it does not need app3)"]
    assert fleet.fleet_headlines(apps, {"app1": True, "app2": True, "app3": False}, None) \
        == lines[:1]


# ------------------------------------------------------------------------------ plans
def test_hosts_a_rollout_left_behind_are_held_out():
    apps = {"app1": state("app1", "1.1.0"), "app2": state("app2", "1.1.0"),
            "app3": state("app3", "1.0.0", in_rotation=False),
            "app4": state("app4", "1.0.0", in_rotation=False)}
    record = FleetRecord("1.1.0", 3, {"app3": "1.0.0"})
    held = hold_out_behind(apps, record)
    assert [n for n, st in held.items() if st.held_out] == ["app3"]
    # app4: left out by an interrupted rollout, not recorded: re-added and rolled as before
    assert not any(st.held_out for st in hold_out_behind(apps, None).values())
    # in rotation (an operator put it back by hand): nothing to hold
    apps["app3"] = state("app3", "1.0.0")
    assert not hold_out_behind(apps, record)["app3"].held_out


def test_a_held_out_host_is_updated_in_place_and_skipped_hosts_are_named():
    states = [state("app1", "1.1.0"), state("app2", "1.1.0"),
              state("app3", "1.0.0", in_rotation=False, held=True)]
    plan = plan_release_rollout(states, "1.1.0", 1, flow="deploy.rolling", title="Rolling deploy",
                                backup=True, stage_release=True)
    assert [(b.stage, b.hosts, b.rotates) for b in plan.batches] == [("roll", ("app3",), False)]
    assert plan.describe({s.name: s for s in states}) == (
        "app3: 1.0.0 -> 1.1.0 (out of rotation, behind: updated in place, stays out);"
        " already on 1.1.0: app1, app2")

    reachable = [state("app1"), state("app2")]
    plan = plan_release_rollout(reachable, "1.1.0", 1, flow="deploy.rolling",
                                title="Rolling deploy", backup=True, stage_release=True,
                                unreachable=[("app3", True)])
    assert [(b.stage, b.hosts, b.rotates) for b in plan.batches] == [
        ("migrate", ("app1",), True), ("roll", ("app2",), True)]
    assert plan.describe({s.name: s for s in reachable}, "db1").startswith(
        "app3: unreachable, taken out of rotation first, skipped (recorded as behind);"
        " app1: 1.0.0 -> 1.1.0 (first, alone: any migrations run here); app2: 1.0.0 -> 1.1.0")


@pytest.mark.parametrize("states, unreachable, ok", [
    ([state("app1"), state("app2")], ["app3"], True),
    ([state("app1"), state("app2", in_rotation=False, held=True)], ["app3"], False),
    ([state("app1")], ["app2"], False),
    ([state("app1"), state("app2")], [], True),
])
def test_skipping_hosts_needs_two_others_to_take_turns(states, unreachable, ok):
    problems = serving_problems(states, unreachable)
    assert (problems == []) is ok
    if not ok:
        assert "a rolling deploy needs two app hosts taking turns" in problems[0]


def test_a_held_out_host_that_does_not_start_does_not_block_the_deploy_that_fixes_it():
    # Its old release may refuse the database's newer migrations: it is updated in place.
    back = state("app3", "1.0.0", in_rotation=False, ready=False, held=True)
    assert preflight_problems([state("app1", "1.1.0"), back], "1.1.0") == []
    not_behind = state("app3", "1.0.0", in_rotation=False, ready=False)
    assert preflight_problems([state("app1", "1.1.0"), not_behind], "1.1.0")
