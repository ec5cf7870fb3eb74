"""Maintenance tasks without the lab: argv builders as lists (values with spaces, quotes,
non-ASCII), rotation arithmetic and restart plans table-driven, the ad-hoc summary, and
`fab run` end to end through the real CLI against the loopback sshd (a single-host
inventory: the inventory refuses two hosts on one address)."""
from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from releasy_deploy import maintenance as mt
from releasy_deploy.cli import BadInput
from releasy_deploy.executor import render, with_sudo
from releasy_deploy.inventory import parse_inventory
from releasy_deploy.output import Reporter
from releasy_deploy.engine.plan import AppState

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")

INV = parse_inventory({
    "environment": "prod", "admin_cidrs": ["10.9.0.1/32"], "known_hosts": "known_hosts",
    "hosts": {"proxy1": {"address": "10.9.0.10"}, "app1": {"address": "10.9.0.21"},
              "app2": {"address": "10.9.0.22"}, "app3": {"address": "10.9.0.23"},
              "db1": {"address": "10.9.0.100"}},
    "tiers": {"proxy": ["proxy1"], "app": ["app1", "app2", "app3"], "db": ["db1"]},
    "release": {"source": "releases"},
    "tls": {"mode": "self-signed", "server_name": "releasy.example.test"}},
    "/nonexistent/hosts.yaml", check_files=False)
APPS = ["app1", "app2", "app3"]


# ------------------------------------------------------------------------------ argv
def test_logs_argv():
    assert mt.logs_argv(5) == [
        "journalctl", "--unit", "releasy.service", "--unit", "releasy@*.service",
        "--lines", "5", "--no-pager", "--output", "short-iso", "--quiet"]
    assert mt.logs_argv(1, follow=True)[-1] == "--follow"
    # The pattern reaches journalctl as one word: no remote shell expands it.
    assert "'releasy@*.service'" in render(mt.logs_argv(5))
    for bad in (0, 10001, "5", True):
        with pytest.raises(ValueError):
            mt.logs_argv(bad)


@pytest.mark.parametrize("command", [
    "hostname",
    "df -h / && uptime",
    "echo 'it''s' \"a  b\" $HOME",
    "printf '%s\\n' héllo wörld ☃",
    "cat /etc/os-release | grep -c ID; exit 3",
])
def test_adhoc_argv_is_one_shell_word(command):
    argv = mt.adhoc_argv(command)
    assert argv == ["sh", "-c", command]
    # What the executor sends for a non-root user, parsed back by a POSIX shell's rules.
    assert shlex.split(render(with_sudo(argv, is_root=False))) == [
        "sudo", "-n", "--", "sh", "-c", command]


def test_adhoc_argv_runs_the_operators_shell_snippet():
    """A real sh gets exactly what was typed: quoting and non-ASCII intact, exit code kept."""
    res = subprocess.run(mt.adhoc_argv("printf '%s|' \"a  b\" 'c''d' héllo; exit 7"),
                         capture_output=True, text=True)
    assert (res.stdout, res.returncode) == ("a  b|cd|héllo|", 7)


@pytest.mark.parametrize("bad", ["", "   ", "echo \x00 x", None])
def test_adhoc_argv_refuses_no_command(bad):
    with pytest.raises(BadInput):
        mt.adhoc_argv(bad)


def test_app_host():
    assert mt.app_host(INV, "app2").name == "app2"
    with pytest.raises(BadInput, match="db1: is not an app host .* app hosts: app1, app2, app3"):
        mt.app_host(INV, "db1")
    with pytest.raises(BadInput, match="nope: is unknown"):
        mt.app_host(INV, "nope")


# ------------------------------------------------------------------------------ rotation
READY = {n: True for n in APPS}


@pytest.mark.parametrize("rotation,host,expected", [
    (APPS, "app1", ["app2", "app3"]),
    (APPS, "app3", ["app1", "app2"]),
    (["app1", "app3"], "app3", ["app1"]),
    (["app3", "app1"], "app1", ["app3"]),  # inventory order, whatever the input order
])
def test_rotation_after_drain(rotation, host, expected):
    assert mt.rotation_after_drain(APPS, rotation, READY, host) == expected


def test_draining_the_last_host_in_rotation_is_refused():
    with pytest.raises(mt.LastHostInRotation, match=r"refusing to drain app2: it is the last"
                       r" app host in rotation \(out of rotation: app1, app3\).*`fab"
                       r" app.undrain --host app1`") as exc:
        mt.rotation_after_drain(APPS, ["app2"], READY, "app2")
    assert isinstance(exc.value, BadInput)  # exit code 2


def test_draining_is_refused_when_nothing_ready_would_stay():
    ready = {"app1": True, "app2": False, "app3": False}
    with pytest.raises(mt.LastHostInRotation, match="no other host in rotation answers"
                                                    r" /ready \(app2, app3\)"):
        mt.rotation_after_drain(APPS, APPS, ready, "app1")
    assert mt.rotation_after_drain(APPS, APPS, ready, "app2") == ["app1", "app3"]


def test_rotation_after_undrain():
    assert mt.rotation_after_undrain(APPS, ["app3"], "app1") == ["app1", "app3"]
    assert mt.rotation_after_undrain(APPS, APPS, "app2") == APPS


# ------------------------------------------------------------------------------ restart plan
def state(name, *, ready=True, in_rotation=True, current="1.0.0"):
    return AppState(name=name, current=current, ready=ready, in_rotation=in_rotation,
                    active="active" if ready else "failed")


def states(**kw):
    return [state(n, **kw.get(n, {})) for n in APPS]


@pytest.mark.parametrize("targets,batch,in_place,batches", [
    (APPS, 1, (), (("app1",), ("app2",), ("app3",))),
    (APPS, 2, (), (("app1", "app2"), ("app3",))),
    (APPS, 9, (), (("app1", "app2"), ("app3",))),  # never every host out at once
    (["app2"], 1, (), (("app2",),)),
])
def test_restart_plan_batches(targets, batch, in_place, batches):
    plan = mt.restart_plan(states(), targets, batch)
    assert (plan.in_place, plan.batches) == (in_place, batches)
    assert plan.hosts == [n for b in batches for n in b]


def test_restart_plan_restarts_hosts_not_ready_first():
    plan = mt.restart_plan(states(app3={"ready": False}), APPS, 1)
    assert plan.batches == (("app3",), ("app1",), ("app2",))


def test_restart_plan_leaves_a_drained_host_out():
    plan = mt.restart_plan(states(app2={"in_rotation": False}), APPS, 5)
    assert plan.in_place == ("app2",)
    assert plan.batches == (("app1",), ("app3",))  # 2 in rotation: one at a time
    assert plan.describe() == ("app2: out of rotation, restarted in place and left out;"
                               " batch 1: app1 (drain, restart, /ready, re-add);"
                               " batch 2: app3 (drain, restart, /ready, re-add)")


def test_restart_plan_refusals():
    only_one = states(app1={"in_rotation": False}, app2={"in_rotation": False})
    with pytest.raises(mt.LastHostInRotation, match="app3: it is the only app host in"
                                                    " rotation .*--host app1"):
        mt.restart_plan(only_one, APPS, 1)
    # Restarting only the drained ones is fine.
    assert mt.restart_plan(only_one, ["app1"], 1).in_place == ("app1",)
    with pytest.raises(BadInput, match="no release is installed on app2"):
        mt.restart_plan(states(app2={"current": None}), APPS, 1)
    # app1 would be drained while the only other host in rotation is not ready.
    two = [state("app1"), state("app2", ready=False), state("app3", in_rotation=False)]
    plan = mt.restart_plan(two, ["app2", "app1"], 1)  # app2 first: then app1 can go
    assert plan.batches == (("app2",), ("app1",))
    with pytest.raises(mt.LastHostInRotation, match="refusing to restart app1: no other host"
                                                    r" in rotation answers /ready \(app2\)"):
        mt.restart_plan(two, ["app1"], 1)


def test_the_restart_plan_says_restart_in_its_stage_lines():
    order = mt.restart_plan(states(app2={"in_rotation": False}), APPS, 1)
    plan = mt.plan_restart(order.in_place, order.batches, {s.name: s for s in states()})
    assert plan.target is None and plan.host_steps == ("start", "ready")
    assert plan.current_text == "1.0.0"
    in_place, first = plan.batches[0], plan.batches[1]
    assert plan.stage_words(first) == ("drain app1, restart releasy.service, wait for /ready,"
                                       " re-add")
    assert plan.stage_words(in_place).endswith("in place (out of rotation: it stays out)")
    assert plan.describe() == order.describe()


# ------------------------------------------------------------------------------ summary
def test_run_summary():
    runs = [mt.HostRun("app1", 0, 0.12), mt.HostRun("app22", 3, 1.5),
            mt.HostRun("app3", None, 5.0, "cannot connect: refused", unreachable=True)]
    assert mt.run_summary(runs, 5.2).splitlines() == [
        "  app1   exit   0     0.1 s  ok",
        "  app22  exit   3     1.5 s  FAILED",
        "  app3         -     5.0 s  FAILED (unreachable: cannot connect: refused)",
        "3 hosts, 2 failed, 5.2 s",
    ]


# ------------------------------------------------------------------------------ `fab run` for real
@pytest.fixture()
def solo_inventory(sshd, tmp_path) -> Path:
    (tmp_path / "releases").mkdir()
    inv = tmp_path / "hosts.yaml"
    inv.write_text(f"""environment: unit
admin_cidrs: [127.0.0.1/32]
known_hosts: {sshd.known_hosts}
ssh: {{user: {sshd.user}, port: {sshd.port}, identity_file: {sshd.client_key}}}
hosts:
  solo: {{address: 127.0.0.1}}
tiers: {{proxy: [solo], app: [solo], db: [solo]}}
database: {{kind: sqlite}}
release: {{source: releases}}
tls: {{mode: self-signed, server_name: releasy.unit.test}}
""")
    return inv


def fab(inventory: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RELEASY_INVENTORY": str(inventory), "PYTHONUNBUFFERED": "1",
           "RELEASY_PROGRESS": "plain"}
    return subprocess.run([FAB, "-r", str(ROOT / "fabfile"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_fab_run_takes_the_command_after_the_double_dash(solo_inventory):
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd logs in as the current user; `fab run` needs root")
    proc = fab(solo_inventory, "run", "--tier", "app", "--", "printf '%s|' \"a  b\" héllo;"
               " echo; exit 3")
    out = proc.stdout
    assert proc.returncode == 1, proc.stderr
    assert "[solo] | a  b|héllo|" in out.splitlines()
    assert "summary of `printf '%s|' \"a  b\" héllo; echo; exit 3` on the app hosts:" in out
    assert re.fullmatch(r"  solo  exit   3 +\d+\.\d s  FAILED", out.splitlines()[-2])
    assert out.splitlines()[-1].startswith("1 hosts, 1 failed, ")
    assert "error: the command failed on solo of 1 app host(s)" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = fab(solo_inventory, "run", "--tier", "db", "--host", "solo", "--", "id", "-u")
    assert ok.returncode == 0 and "[solo] | 0" in ok.stdout.splitlines()


@pytest.mark.parametrize("args,message", [
    (["status", "--", "hostname"], "only `fab run --tier TIER -- COMMAND...` takes a command"),
    (["run", "--tier", "app", "--command", "x", "--", "y"], "give the command once"),
    (["run", "--tier", "app"], "no command given"),
    (["run", "--tier", "web", "--", "true"], "--tier 'web': tiers are proxy, app, db"),
    (["run", "--tier", "app", "--host", "db9", "--", "true"], "--host db9: not one of the app hosts"),
])
def test_fab_run_refuses_bad_input_before_connecting(solo_inventory, args, message):
    proc = fab(solo_inventory, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
