"""`fab status` on the split lab (proxy1, app1, app2 as `deploy` with sudo, db1), run as an
operator would; hosts are broken and inspected with plain OpenSSH."""
from __future__ import annotations

import json

import pytest

from releasy_deploy import status as status_ops
from releasy_deploy.cli import session
from tests.integration.labtools import wait_ready

pytestmark = pytest.mark.lab

HOSTS = ["proxy1", "app1", "app2", "db1"]


def rows(stdout: str) -> dict[str, str]:
    """Table rows by host name."""
    return {line.split()[0]: line for line in stdout.splitlines()
            if line.split() and line.split()[0] in HOSTS}


@pytest.fixture(scope="module")
def lab(split_lab):
    return split_lab.reset("1.0.0")


def test_status_on_a_healthy_split_lab(lab, monkeypatch):
    proc = lab.fab("status")
    table = rows(proc.stdout)
    assert list(table) == HOSTS, proc.stdout
    for app in ("app1", "app2"):
        cells = table[app].split()
        assert cells[1:6] == ["app", "ok", "Debian", "12", "1.0.0"], table[app]
        assert "releasy active pid" in table[app] and " yes " in table[app]
        assert " in " in table[app] and " ok " in table[app]
    assert "nginx active" in table["proxy1"] and "2 server(s)" in table["proxy1"]
    assert "postgres 15 up" in table["db1"] and "pgdata" in table["db1"]
    assert "deploy lock: free" in proc.stdout
    assert proc.stdout.rstrip().endswith("lab: healthy")

    doc = json.loads(lab.fab("status", "--json").stdout)
    assert doc["healthy"] is True and doc["problems"] == []
    assert [h["name"] for h in doc["hosts"]] == HOSTS
    assert all(h["reachable"] and h["firewall"]["matches_plan"] for h in doc["hosts"])
    apps = {h["name"]: h["app"] for h in doc["hosts"] if h["app"]}
    assert {n: (a["running"], a["current"], a["ready"], a["in_rotation"])
            for n, a in apps.items()} == {n: ("1.0.0", "1.0.0", True, True)
                                          for n in ("app1", "app2")}
    assert doc["hosts"][3]["db"]["up"] is True and doc["hosts"][3]["db"]["size_bytes"] > 0

    # One round trip per host; the db host also answers the lock query (its password
    # read; the query itself goes through an SSH tunnel, not an exec request).
    monkeypatch.setenv("RELEASY_INVENTORY", str(lab.inventory))
    with session(need_secrets=False) as s:
        report = status_ops.status(s)
        trips = dict(s.executor.round_trips)
    assert report.healthy
    assert {h: trips[h] for h in ("proxy1", "app1", "app2")} == {"proxy1": 1, "app1": 1,
                                                                 "app2": 1}
    assert trips["db1"] <= 2


def test_a_stopped_service_makes_status_fail_and_names_the_host(lab):
    lab.ssh("app1", "systemctl", "stop", "releasy.service")
    try:
        proc = lab.fab("status", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        table = rows(proc.stdout)
        assert "INACTIVE" in table["app1"] and " NO " in table["app1"]
        assert "stopped (current 1.0.0)" in table["app1"]
        assert "INACTIVE" not in table["app2"]
        problems = proc.stdout.split("lab: UNHEALTHY\n", 1)[1].splitlines()
        # The headline first: the proxies still route to it (a stopped, not a dead, host).
        assert problems == [
            "  ! app1: the proxies route requests to it but it does not answer /ready; fix it"
            " (`fab app.restart --host app1`) or `fab app.drain --host app1`",
            "  - app1: releasy.service is inactive (dead), not active",
            "  - app1: /ready does not answer 200"]
        doc = json.loads(lab.fab("status", "--json", check=False).stdout)
        assert doc["healthy"] is False
        assert {h["name"]: h["healthy"] for h in doc["hosts"]} == {
            "proxy1": True, "app1": False, "app2": True, "db1": True}
    finally:
        lab.ssh("app1", "systemctl", "start", "releasy.service")
        wait_ready(lab, "app1")
    assert lab.fab("status").returncode == 0


def test_an_unreachable_host_is_a_marked_row(lab, tmp_path):
    """app2 through a port nothing listens on: its row says so, the rest is read."""
    inventory = lab.inventory_variant(tmp_path,
                                      lambda d: d["hosts"]["app2"].update(ssh_port=2))
    proc = lab.fab("status", inventory=inventory, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    table = rows(proc.stdout)
    assert table["app2"].split()[2] == "UNREACHABLE"
    assert "1.0.0" in table["app1"] and " in " in table["app1"]
    assert "  - app2: unreachable: app2 (deploy@" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("  - ")] == [
        line for line in proc.stdout.splitlines() if line.startswith("  - app2: ")]
