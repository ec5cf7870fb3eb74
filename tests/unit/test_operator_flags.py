"""Operator flags as pure logic: fab's core flags read from a real Fabric `Config` and the
per-task policy (honour or refuse), host lists (--limit, --host, -H), and the canary and
--limit rollout plans (plans as data, like test_engine.py)."""
from __future__ import annotations

import pytest
from fabric import Config

from releasy_deploy import maintenance as mt
from releasy_deploy.cli import (CORE_HOSTS_KEY, READ_ONLY, BadInput, CoreFlags, core_flag_refusals,
                                core_flags)
from releasy_deploy.engine.plan import AppState, canary_problem, plan_release_rollout
from releasy_deploy.session import select_hosts, split_names
from tests.unit.test_maintenance import INV


def st(name, current="1.0.0", **kw):
    return AppState(name=name, current=current, ready=True, active="active", **kw)


# ------------------------------------------------------------------------------ core flags
def _config(**overrides) -> Config:
    config = Config(overrides=overrides)
    return config


def test_core_flags_are_read_from_fabrics_config():
    assert core_flags(_config()) == CoreFlags()
    config = _config(run={"dry": True, "echo": True, "warn": True, "hide": "both"},
                     timeouts={"command": 5},
                     connect_kwargs={"key_filename": ["/k"], "timeout": 7,
                                     "passphrase": "x"},
                     sudo={"password": "y"})
    config[CORE_HOSTS_KEY] = "app1, app2,"
    flags = core_flags(config)
    assert flags.hosts == ("app1", "app2") and flags.dry and flags.echo and flags.warn
    assert (flags.hide, flags.command_timeout, flags.connect_timeout) == ("both", 5, 7)
    assert flags.identities == ("/k",) and flags.passphrase and flags.sudo_password
    assert not flags.login_password and not flags.pty


def test_hosts_and_dry_are_refused_where_the_task_takes_no_subset_or_dry_run():
    flags = CoreFlags(hosts=("app1",), dry=True)
    assert core_flag_refusals(flags, "app.restart", hosts="host", dry="dry_run") == []
    refused = core_flag_refusals(flags, "deploy.rolling", hosts=None, dry="dry_run")
    assert len(refused) == 1 and "--canary N" in refused[0]
    refused = core_flag_refusals(CoreFlags(dry=True), "deploy.unfreeze", hosts=None, dry=None)
    assert refused == ["-R/--dry: `fab deploy.unfreeze` has no dry run (it would run for real)"]
    assert core_flag_refusals(CoreFlags(dry=True), "status", hosts="host", dry=READ_ONLY) == []


@pytest.mark.parametrize("flags,flag", [
    (CoreFlags(warn=True), "-w/--warn-only"), (CoreFlags(pty=True), "-p/--pty"),
    (CoreFlags(hide="both"), "--hide"), (CoreFlags(command_timeout=3), "-T/--command-timeout"),
    (CoreFlags(identities=("k",)), "-i/--identity"), (CoreFlags(ssh_config="c"), "-S/--ssh-config"),
    (CoreFlags(login_password=True), "--prompt-for-login-password"),
    (CoreFlags(passphrase=True), "--prompt-for-passphrase"),
    (CoreFlags(sudo_password=True), "--prompt-for-sudo-password"),
])
def test_flags_no_task_takes_are_refused_everywhere(flags, flag):
    for task in ("status", "site", "app.restart"):
        refused = core_flag_refusals(flags, task, hosts="host", dry=READ_ONLY)
        assert len(refused) == 1 and refused[0].startswith(f"{flag} is not supported: ")


def test_echo_and_connect_timeout_are_honoured_not_refused():
    assert core_flag_refusals(CoreFlags(echo=True, connect_timeout=5), "deploy.rolling",
                              hosts=None, dry="dry_run") == []


# ------------------------------------------------------------------------------ host lists
def test_host_lists_are_validated_against_the_inventory():
    assert split_names(" app2,app1,,app2 ") == ["app2", "app1"]
    assert [h.name for h in select_hosts(INV, "db1,app2")] == ["app2", "db1"]  # inventory order
    with pytest.raises(BadInput, match=r"--limit app1,nope,zz: nope, zz are not in"
                                       r" /nonexistent/hosts.yaml; hosts are proxy1, app1"):
        select_hosts(INV, "app1,nope,zz")
    with pytest.raises(BadInput, match="no host named"):
        select_hosts(INV, ",")
    assert [h.name for h in mt.app_hosts(INV, "app3,app1")] == ["app1", "app3"]
    with pytest.raises(BadInput, match="--host db1: is not an app host"):
        mt.app_hosts(INV, "app1,db1")
    with pytest.raises(BadInput, match="name the app host"):
        mt.app_host(INV, None)


def test_adhoc_hosts_by_tier_or_by_name():
    assert [h.name for h in mt.adhoc_hosts(INV, None, "db1,app1")] == ["app1", "db1"]
    assert [h.name for h in mt.adhoc_hosts(INV, "app", "app2")] == ["app2"]
    with pytest.raises(BadInput, match="--host db1: not one of the app hosts"):
        mt.adhoc_hosts(INV, "app", "db1")
    with pytest.raises(BadInput, match="say where to run it"):
        mt.adhoc_hosts(INV, None, None)


# ------------------------------------------------------------------------------ plans
def _plan(states, version="1.1.0", batch=1, **kw):
    return plan_release_rollout(states, version, batch, flow="deploy.rolling",
                                title="Rolling deploy", backup=True, stage_release=True, **kw)


def test_canary_changes_the_first_hosts_the_first_migrating_and_holds_the_rest():
    states = [st("app1"), st("app2"), st("app3"), st("app4")]
    plan = _plan(states, canary=2, held_advice="continue")
    assert [(b.stage, b.hosts) for b in plan.batches] == [("migrate", ("app1",)),
                                                          ("roll", ("app2",))]
    assert plan.held == ("app3", "app4") and plan.held_advice == "continue"
    assert plan.backup and plan.skipped == ()
    assert "then stop: app3 (1.0.0), app4 (1.0.0) keep their release" in plan.describe(
        {s.name: s for s in states})


def test_after_a_canary_the_plain_plan_continues_without_migrating_again():
    states = [st("app1", "1.1.0"), st("app2"), st("app3")]
    plan = _plan(states, batch=2)
    assert [(b.stage, b.hosts) for b in plan.batches] == [("roll", ("app2", "app3"))]
    assert plan.skipped == ("app1",) and plan.held == () and not plan.backup
    # A canary that would be the whole rollout is refused; a bad count too.
    assert "whole rollout" in canary_problem(states, "1.1.0", 2)
    assert canary_problem(states, "1.1.0", 1) is None
    assert "1 or more" in canary_problem(states, "1.1.0", 0)


def test_limit_holds_the_hosts_outside_it():
    states = [st("app1"), st("app2"), st("app3")]
    plan = _plan(states, only={"app2"}, held_advice="later")
    assert [(b.stage, b.hosts) for b in plan.batches] == [("migrate", ("app2",))]
    assert plan.held == ("app1", "app3")
    nothing = _plan(states, only={"db1"})
    assert nothing.batches == () and nothing.held == ("app1", "app2", "app3")
