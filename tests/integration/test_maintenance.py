"""Day-2 tasks on the split lab (proxy1, app1, app2 as `deploy` with sudo, db1), run with the
real CLI: `app.restart` under HTTPS load through the proxy, `app.drain`/`app.undrain`,
`app.logs`, `fab run`, and the deploy lock. Hosts and the proxy's upstream file are
inspected with plain OpenSSH."""
from __future__ import annotations

import time

import pytest

from tests.integration.labtools import (Following, deploy_lock_held, last_audit, load_through_proxy,
                                       main_pid, main_pids, rotation, wait_ready)

pytestmark = pytest.mark.lab

APPS = ("app1", "app2")


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def lab(split_lab):
    split_lab.reset("1.0.0")
    for host in APPS:
        wait_ready(split_lab, host)
    return split_lab


@pytest.fixture()
def back_to_normal(lab):
    """Whatever a test did: every app host running and in rotation afterwards."""
    yield
    for host in APPS:
        lab.ssh(host, "sudo", "-n", "systemctl", "start", "releasy.service")
        wait_ready(lab, host)
    lab.fab("proxy.setup", "--reset-upstreams")
    assert rotation(lab) == list(APPS)


# ------------------------------------------------------------------------------ restart
def test_rolling_restart_under_load_fails_no_request(lab, tmp_path, back_to_normal):
    before = main_pids(lab, APPS)
    with load_through_proxy(lab, tmp_path / "load") as load:
        load.wait_until(lambda p: p["ok"] >= 100, timeout=60)
        proc = lab.fab("app.restart", "--yes")
        after = load.progress()["total"]
        load.wait_until(lambda p: p["total"] >= after + 100, timeout=60)
    summary = load.summary
    print(f"\napp.restart under load: {summary['total']} requests, {summary['ok']} ok,"
          f" {summary['failed']} failed, {summary['retried_stale_connections']} retried on a"
          f" connection nginx closed at a reload, {summary['requests_per_s']} req/s")
    assert summary["failed"] == 0, summary["first_failures"]
    assert summary["failed_by_method"] == {}
    pids = main_pids(lab, APPS)
    assert all(pids[h] != "0" and pids[h] != before[h] for h in APPS), (before, pids)
    out = proc.stdout
    assert "rolling restart done: app1, app2" in out
    assert out.index("[app1] changed: releasy.service restarted") < out.index(
        "[app2] changed: releasy.service restarted")
    assert out.count("nginx reloaded") == 3  # out app1; app1 back + app2 out; app2 back
    assert rotation(lab) == list(APPS)
    record = last_audit(lab, "app2")
    assert (record["action"], record["result"], record["hosts_changed"]) == (
        "app.restart", "ok", ["app1", "app2"])
    # Without --yes and without a terminal it asks nobody and changes nothing.
    refused = lab.fab("app.restart", check=False)
    assert refused.returncode == 2 and "re-run with --yes" in refused.stderr
    assert main_pids(lab, APPS) == pids


def test_a_host_that_does_not_come_back_stays_out_and_the_rest_is_untouched(lab,
                                                                           back_to_normal):
    """app1's service is broken by hand (a drop-in replacing ExecStart): the restart stops
    there, app1 is restarted once more, stays out of rotation, app2 is not touched."""
    dropin = "/etc/systemd/system/releasy.service.d"
    broken = "[Service]\nExecStart=\nExecStart=/bin/sh -c 'echo broken on purpose; exit 1'"
    lab.ssh("app1", "sh", "-c", 'mkdir -p "$1" && printf "%s\\n" "$2" > "$1/zz-broken.conf"'
                                " && systemctl daemon-reload", "sh", dropin, broken)
    app2_pid = main_pid(lab, "app2")
    try:
        proc = lab.fab("app.restart", "--yes", "--ready-timeout", "3", check=False)
        err = proc.stderr
        assert proc.returncode == 1 and "Traceback" not in err, proc.stdout + err
        # A crash is noticed at once (the unit waits to be restarted), not after the timeout.
        assert ("error: Rolling restart of lab to 1.0.0 stopped at app1, stage restart (step"
                " ready): releasy.service stopped before it became ready") in err
        assert "it stays out of rotation. Not reached, untouched: app2. In rotation now: app2."\
            in err
        assert "`fab app.undrain --host NAME` puts it back" in err
        assert "broken on purpose" in err.split("Last journal lines of releasy.service on"
                                                " app1:", 1)[1]
        assert rotation(lab) == ["app2"] and main_pid(lab, "app2") == app2_pid
        assert last_audit(lab, "db1")["result"] == "failed"
    finally:
        lab.ssh("app1", "sh", "-c", 'rm -rf "$1" && systemctl daemon-reload', "sh", dropin)
    lab.ssh("app1", "systemctl", "restart", "releasy.service")
    wait_ready(lab, "app1")
    lab.fab("app.undrain", "--host", "app1")
    assert rotation(lab) == list(APPS)


# ------------------------------------------------------------------------------ drain
def test_drain_refuses_the_last_host_and_undrain_checks_ready(lab, back_to_normal):
    first = lab.fab("app.drain", "--host", "app1")
    assert rotation(lab) == ["app2"]
    assert "[app1] changed: out of rotation (in rotation now: app2)" in first.stdout
    assert "no request in flight any more" in first.stdout
    again = lab.fab("app.drain", "--host", "app1")
    assert "[app1] ok: out of rotation already" in again.stdout

    last = lab.fab("app.drain", "--host", "app2", check=False)
    assert last.returncode == 2, last.stdout + last.stderr
    assert "refusing to drain app2: it is the last app host in rotation" in last.stderr
    assert "Traceback" not in last.stderr and rotation(lab) == ["app2"]

    # Drained stays drained: proxy.setup keeps the live list; status reports it.
    lab.fab("proxy.setup")
    assert rotation(lab) == ["app2"]
    status = lab.fab("status", check=False)
    assert status.returncode == 1
    assert "app1: out of rotation (`fab app.undrain --host app1` puts it back)" in status.stdout
    # A restart of the drained host happens in place: it stays out.
    pid = main_pid(lab, "app1")
    lab.fab("app.restart", "--host", "app1", "--yes")
    assert main_pid(lab, "app1") != pid and rotation(lab) == ["app2"]

    # Not ready: not put back.
    lab.ssh("app1", "systemctl", "stop", "releasy.service")
    sick = lab.fab("app.undrain", "--host", "app1", check=False)
    assert sick.returncode == 1 and "Traceback" not in sick.stderr
    assert "app1: not putting it back into rotation: it does not answer /ready" in sick.stderr
    assert rotation(lab) == ["app2"]
    lab.ssh("app1", "systemctl", "start", "releasy.service")
    wait_ready(lab, "app1")

    back = lab.fab("app.undrain", "--host", "app1")
    assert "[app1] changed: back in rotation (in rotation now: app1, app2)" in back.stdout
    assert rotation(lab) == list(APPS)
    assert last_audit(lab, "proxy1")["action"] == "app.undrain"


# ------------------------------------------------------------------------------ logs
def test_logs_prefix_every_line_with_its_host(lab):
    proc = lab.fab("app.logs", "--lines", "5")
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith(("[app1] | ", "[app2] | ")) for line in lines), lines
    for host in APPS:
        mine = [line for line in lines if line.startswith(f"[{host}] | ")]
        assert 1 <= len(mine) <= 5
        # short-iso: "TIMESTAMP HOSTNAME IDENTIFIER[PID]: ...": each host's own journal
        assert all(line.split()[3] == host for line in mine), mine
    one = lab.fab("app.logs", "--host", "app2", "--lines", "2").stdout.splitlines()
    assert len(one) == 2 and all(line.startswith("[app2] | ") for line in one)


def test_logs_follow_streams_every_host_until_ctrl_c(lab):
    with Following(lab.inventory, "app.logs", "--follow", "--lines", "1") as logs:
        logs.wait_for(lambda lines: all(any(s.startswith(f"[{h}] | ") for s in lines)
                                        for h in APPS), "a line from every app host")
        # New lines arrive too: a restart logs on app2 while we follow.
        count = len(logs.lines)
        lab.ssh("app2", "sudo", "-n", "systemctl", "restart", "releasy.service")
        logs.wait_for(lambda lines: any("listening" in s and s.startswith("[app2] | ")
                                        for s in lines[count:]), "app2's restart")
    seen = logs.lines
    assert logs.exit_code == 0, logs.proc.stderr.read()
    assert all(s.startswith(("[app1] ", "[app2] ")) for s in seen), seen
    # The remote journalctl processes end with our connections.
    deadline = time.monotonic() + 20
    while lab.ssh("app1", "pgrep", "-x", "journalctl", check=False).returncode == 0:
        assert time.monotonic() < deadline, "journalctl still running on app1"
        time.sleep(0.2)
    wait_ready(lab, "app2")


# ------------------------------------------------------------------------------ fab run
def test_run_on_every_host_of_a_tier(lab):
    proc = lab.fab("run", "--tier", "app", "--", "hostname")
    lines = proc.stdout.splitlines()
    assert "[app1] | app1" in lines and "[app2] | app2" in lines
    assert "[app2] $ sudo -n -- sh -c hostname" in lines  # deploy is not root
    assert lines[-1].startswith("2 hosts, 0 failed, ")

    failed = lab.fab("run", "--tier", "app", "--", "false", check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    summary = failed.stdout.split("summary of `false` on the app hosts:\n", 1)[1].splitlines()
    assert [line.split()[:3] + line.split()[-1:] for line in summary[:2]] == [
        ["app1", "exit", "1", "FAILED"], ["app2", "exit", "1", "FAILED"]]
    assert summary[2].startswith("2 hosts, 2 failed, ")
    assert "error: the command failed on app1, app2 of 2 app host(s)" in failed.stderr

    quoted = lab.fab("run", "--tier", "db", "--", "printf '%s|' \"a  b\" héllo; echo")
    assert "[db1] | a  b|héllo|" in quoted.stdout.splitlines()


# ------------------------------------------------------------------------------ the lock
def test_restart_and_drain_refuse_while_another_deploy_holds_the_lock(lab):
    with deploy_lock_held(lab.inventory) as holder:
        pids = main_pids(lab, APPS)
        for args in (["app.restart", "--yes"], ["app.drain", "--host", "app1"],
                     ["app.undrain", "--host", "app1"]):
            proc = lab.fab(*args, check=False)
            assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
            assert f"pid={holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
        assert main_pids(lab, APPS) == pids and rotation(lab) == list(APPS)
        status = lab.fab("status")  # read-only: not blocked, and says who holds it
        assert "deploy lock: held by " in status.stdout and f"pid={holder.pid}" in status.stdout
