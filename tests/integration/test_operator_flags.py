"""Operator conventions on the lab (proxy1, app1..app3, db1): fab's own core flags are
honoured or refused, `--canary`, `--limit`, the same flags on every rollout task. Which
hosts changed is proven on the hosts themselves (the unit's MainPID, the `current` link,
the proxy's upstream list, a file's content), read with plain OpenSSH.

One provisioned lab for the module (the shape test_rolling/test_rollback use): a fresh
database, `fab site --version 1.0.0`, then `fab deploy.rolling --version 1.1.0` (1.1.0 and
1.1.1 share their migrations, so a canary of 1.1.1 can be rolled back without a restore).
"""
from __future__ import annotations

import json

import pytest

from tests.integration.labtools import (assert_all_on, changed_total, current, main_pids, ready,
                                      rotation)

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("split", 3)]

APPS = ("app1", "app2", "app3")
ENV_FILE = "/etc/releasy/releasy.env"


def currents(lab) -> dict[str, str]:
    return {h: current(lab, h) for h in APPS}


@pytest.fixture(scope="module")
def lab(lab_session):
    lab = lab_session.use("split", apps=3)
    lab.reset("1.0.0")
    lab.fab("deploy.rolling", "--version", "1.1.0", "--yes")
    assert_all_on(lab, "1.1.0", APPS)
    yield lab
    # A canary stopped half-way leaves a mixed fleet: finish it, every host in rotation.
    lab.settle("1.1.1")


# ------------------------------------------------------------------------------ core flags
def test_hosts_flag_restarts_only_that_host_once(lab):
    before = main_pids(lab, APPS)
    proc = lab.fab("-H", "app1", "app.restart", "--yes")
    after = main_pids(lab, APPS)
    assert after["app1"] != before["app1"]
    assert {h: after[h] for h in ("app2", "app3")} == {h: before[h] for h in ("app2", "app3")}
    assert proc.stdout.count("rolling restart done") == 1, proc.stdout  # one run, not per host
    assert rotation(lab) == list(APPS)


def test_hosts_flag_with_a_command_runs_it_on_those_hosts_only(lab):
    proc = lab.fab("-H", "app2,db1", "run", "--", "hostname")
    lines = proc.stdout.splitlines()
    assert "[app2] | app2" in lines and "[db1] | db1" in lines
    assert not any(line.startswith(("[app1]", "[app3]", "[proxy1]")) for line in lines)


@pytest.mark.parametrize("args,message", [
    (["-H", "app1", "deploy.rolling", "--version", "1.1.1", "--yes"], "--canary N"),
    (["-H", "app9", "app.restart", "--yes"], "app9"),
    (["-H", "app1", "deploy.rollback", "--yes"], "-H/--hosts"),
    (["-w", "app.restart", "--yes"], "-w/--warn-only is not supported"),
    (["-T", "5", "app.restart", "--yes"], "-T/--command-timeout is not supported"),
    (["-p", "app.restart", "--yes"], "-p/--pty is not supported"),
    (["--hide", "both", "app.restart", "--yes"], "--hide is not supported"),
    (["-S", "/dev/null", "app.restart", "--yes"], "-S/--ssh-config is not supported"),
    (["-i", "/dev/null", "app.restart", "--yes"], "-i/--identity is not supported"),
    (["-R", "deploy.unfreeze"], "-R/--dry: `fab deploy.unfreeze` has no dry run"),
    (["-R", "run", "--tier", "app", "--", "touch /tmp/x"], "has no dry run"),
])
def test_core_flags_refused_touch_nothing(lab, args, message):
    before = main_pids(lab, APPS), currents(lab)
    proc = lab.fab(*args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert (main_pids(lab, APPS), currents(lab)) == before


def test_dry_flag_is_our_dry_run(lab):
    before = main_pids(lab, APPS)
    proc = lab.fab("-R", "deploy.rolling", "--version", "1.1.1", "--yes")
    assert "would migrate" in proc.stdout or "would roll" in proc.stdout, proc.stdout
    assert currents(lab) == {h: "1.1.0" for h in APPS}
    assert main_pids(lab, APPS) == before
    # A read-only task simply runs.
    assert lab.fab("-R", "status").returncode == 0


def test_echo_and_connect_timeout_are_honoured(lab):
    proc = lab.fab("-e", "-t", "7", "-H", "app3", "app.logs", "--lines", "1")
    assert "[app3] $ journalctl" in proc.stdout or "$ journalctl" in proc.stdout, proc.stdout
    assert "[app1]" not in proc.stdout


# ------------------------------------------------------------------------------ canary
def test_canary_then_rollback_then_canary_and_continue(lab):
    proc = lab.fab("deploy.rolling", "--version", "1.1.1", "--canary", "1", "--yes")
    assert currents(lab) == {"app1": "1.1.1", "app2": "1.1.0", "app3": "1.1.0"}
    assert all(ready(lab, h) for h in APPS) and rotation(lab) == list(APPS)
    assert "Continue: `fab deploy.rolling --version 1.1.1`" in proc.stdout
    assert "`fab deploy.rollback`" in proc.stdout

    status = lab.fab("status", check=False)
    assert "MIXED FLEET: 1.1.1 on app1; 1.1.0 on app2, app3" in status.stdout
    doc = json.loads(lab.fab("status", "--json", check=False).stdout)
    assert doc["mixed_releases"] and doc["releases"] == {"1.1.1": ["app1"],
                                                         "1.1.0": ["app2", "app3"]}

    back = lab.fab("deploy.rollback", "--yes")
    assert "rollback to 1.1.0 done: app1" in back.stdout, back.stdout
    assert_all_on(lab, "1.1.0", APPS)

    refused = lab.fab("deploy.rolling", "--version", "1.1.1", "--canary", "3", "--yes",
                      check=False)
    assert refused.returncode == 2 and "that is the whole rollout" in refused.stderr
    assert currents(lab) == {h: "1.1.0" for h in APPS}

    lab.fab("deploy.rolling", "--version", "1.1.1", "--canary", "2", "--yes")
    assert currents(lab) == {"app1": "1.1.1", "app2": "1.1.1", "app3": "1.1.0"}
    pids = main_pids(lab, APPS)
    done = lab.fab("deploy.rolling", "--version", "1.1.1", "--yes")  # continues
    assert "app1: " not in done.stdout.split("plan:", 1)[-1].splitlines()[0]
    assert_all_on(lab, "1.1.1", APPS)
    after = main_pids(lab, APPS)
    assert after["app1"] == pids["app1"] and after["app2"] == pids["app2"]


# ------------------------------------------------------------------------------ --limit
def test_limit_converges_only_the_named_hosts(lab):
    bad = lab.fab("site", "--limit", "app1,nope", check=False)
    assert bad.returncode == 2 and "nope is not in" in bad.stderr
    for h in ("app1", "app2"):
        lab.sudo(h, "sh", "-c", f"echo '# edited by hand' >> {ENV_FILE}")
    before = main_pids(lab, APPS)
    lab.fab("app.setup", "--limit", "app1")
    assert "edited by hand" not in lab.sudo("app1", "cat", ENV_FILE).stdout
    assert "edited by hand" in lab.sudo("app2", "cat", ENV_FILE).stdout
    after = main_pids(lab, APPS)
    assert after["app1"] != before["app1"]  # its env changed: restarted, drained first
    assert after["app2"] == before["app2"] and after["app3"] == before["app3"]
    # The same through fab's -H, on site: app2 converges now, in the usual tier order.
    proc = lab.fab("-H", "app2", "site")
    assert "edited by hand" not in lab.sudo("app2", "cat", ENV_FILE).stdout
    assert "(--limit)" in proc.stdout
    assert rotation(lab) == list(APPS) and all(ready(lab, h) for h in APPS)
    # No app host among them: the app step has nothing to do (it used to fail there).
    proc = lab.fab("site", "--limit", "db1,proxy1")
    assert changed_total(proc.stdout) == 0 and "(--limit)" in proc.stdout


# ------------------------------------------------------------------------------ consistency
def test_every_rollout_task_takes_the_same_flags(lab):
    for task in ("deploy.rolling", "deploy.rollback", "app.restart", "deploy.bluegreen"):
        proc = lab.fab("--help", task)
        for flag in ("--yes", "--dry-run", "--wait", "--ready-timeout", "--json-log"):
            assert flag in proc.stdout, (task, flag)
    # deploy.bluegreen takes --yes now (and still refuses a split topology: exit 2).
    proc = lab.fab("deploy.bluegreen", "--version", "1.1.1", "--yes", check=False)
    assert proc.returncode == 2 and "deploy.rolling" in proc.stderr
