"""`fab deploy.bluegreen` on the real lab: one host (proxy + app + db), once with SQLite and
once with PostgreSQL. The tests of one database run in file order on one host, shared with
the modules of that shape before it and reset first (a brand-new database, `fab site
--version 1.0.0`), then 1.0.0 -> 1.1.0 (hand-over from releasy.service) -> 1.1.1
(back to the first port), a release that never becomes ready, a conflicting releasy.service,
and a slow migration during which the deploy lock is shown held. Traffic comes from the
load generator in the outside namespace, HTTPS through the proxy; hosts are looked at with
plain OpenSSH.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from lab.standin.build import build_release
from releasy_deploy import bluegreen
from releasy_deploy.cli import session
from tests.integration.labtools import SOLO as HOST
from tests.integration.labtools import (last_audit, psql, running, sh, start_fab, steady_load, unit,
                                       upstreams, version_on, version_timeline)

pytestmark = pytest.mark.lab

HALF = "1.2.1"  # built by the test: migration 4 works, migration 5 fails
SLOW = "1.3.0"  # built by the test: migrations 4 and 5, sleeping inside the new one


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", params=[
    pytest.param(db, marks=pytest.mark.lab_shape("single", database=db))
    for db in ("sqlite", "postgres")])
def lab(request, lab_session):
    handle = lab_session.use("single", database=request.param).reset("1.0.0")
    handle.database = request.param
    return handle


def db_rows(lab, query: str) -> list[list[str]]:
    """The rows of ``query`` (columns split at |) on the single host's SQLite or PostgreSQL."""
    if lab.database == "postgres":
        return psql(lab, query, host=HOST)
    out = sh(lab, "sqlite3", "-separator", "|", "/var/lib/releasy/releasy.db", query)
    return [line.split("|") for line in out.splitlines() if line]


def assert_switched_once(summary: dict, old: str, new: str) -> None:
    """Only `old` answered, then only `new`: at most two seconds saw both."""
    timeline = version_timeline(summary)
    seen = [set(split) for _, split in timeline]
    assert seen and seen[0] == {old} and seen[-1] == {new}, timeline
    first_new = next(i for i, s in enumerate(seen) if new in s)
    last_old = max(i for i, s in enumerate(seen) if old in s)
    assert last_old - first_new <= 1, timeline
    assert all(s <= {old, new} for s in seen), timeline


def fab(lab, *args: str, inventory: Path | None = None, check: bool = True):
    proc = lab.fab(*args, inventory=inventory, check=check)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


# ------------------------------------------------------------------------------ the tests
def test_dry_run_shows_the_switch_and_changes_nothing(lab, tmp_path):
    log = tmp_path / "events.jsonl"
    before = unit(lab, "releasy.service")
    proc = fab(lab, "deploy.bluegreen", "--version", "1.1.0", "--dry-run", "--json-log", str(log))
    out = proc.stdout
    assert "live: releasy.service on 127.0.0.1:8080 running 1.0.0 (ready)" in out
    assert "would start releasy@8081.service with 1.1.0 on 127.0.0.1:8081" in out
    assert "would change: upstream 127.0.0.1:8080 -> 127.0.0.1:8081" in out
    assert "-    server 127.0.0.1:8080 max_fails=1 fail_timeout=10s;" in out  # the upstream diff
    assert "would change: releasy.service stopped (was live on 127.0.0.1:8080, 1.0.0)" in out
    assert re.search(r"would create backup /var/backups/releasy/lab_\d+T\d+Z_from-1\.0\.0"
                     r"_to-1\.1\.0_m2\.(sqlite3|dump) ", out), out
    assert "nothing was changed" in out
    assert unit(lab, "releasy.service") == before
    assert running(lab, "releasy@8081.service") == ("inactive", "disabled")
    assert upstreams(lab) == ["127.0.0.1:8080"]
    assert sh(lab, "ls", "/opt/releasy/releases").split() == ["1.0.0"]
    assert sh(lab, "ls", "-A", "/opt/releasy/instances") == ""
    events = [json.loads(line) for line in log.read_text().splitlines()]
    stages = [e["stage"] for e in events if e["event"] == "stage" and e.get("ok")]
    assert stages == ["preflight", "stage", "backup", "start", "switch", "finish"]
    assert lab.ssh(HOST, "test", "-e", "/var/backups/releasy", check=False).returncode == 1
    assert {e["pipeline"] for e in events if e["event"] == "stage"} == {"deploy.bluegreen"}


def test_first_deploy_hands_over_from_releasy_service_with_no_failed_request(lab, tmp_path):
    with steady_load(lab, tmp_path) as load:
        assert load.progress()["last_version"] == "1.0.0"
        proc = fab(lab, "deploy.bluegreen", "--yes", "--version", "1.1.0")
    summary = load.summary
    assert summary["failed"] == 0, summary["first_failures"]
    assert_switched_once(summary, "1.0.0", "1.1.0")
    assert "deploy.bluegreen: 1.0.0 -> 1.1.0 live on solo as releasy@8081.service" in proc.stdout
    for stage in ("preflight", "stage", "backup", "start", "switch", "finish"):
        assert re.search(rf"^\[solo\] {stage}: done in \d+\.\d s$", proc.stdout, re.M), stage

    assert running(lab, "releasy@8081.service") == ("active", "enabled")
    assert running(lab, "releasy.service") == ("inactive", "disabled")
    assert upstreams(lab) == ["127.0.0.1:8081"]
    assert sh(lab, "readlink", "/opt/releasy/current") == "releases/1.1.0"
    assert sh(lab, "readlink", "/opt/releasy/instances/8081") == "/opt/releasy/releases/1.1.0"
    assert version_on(lab, 8081) == "1.1.0"
    assert lab.probe(HOST, 8080, source=HOST) == "closed"
    # The new instance itself applied the new migration, once, before it got traffic.
    pid = unit(lab, "releasy@8081.service")["MainPID"]
    assert db_rows(lab, "SELECT binary_version, pid FROM standin_migration_log"
                        " WHERE migration = 3") == [["1.1.0", pid]]
    # What deploy.rollback judges from: a dump taken before, the level of each release.
    dumps = sh(lab, "ls", "/var/backups/releasy").split()
    assert len(dumps) == 1 and re.fullmatch(r"lab_\d+T\d+Z_from-1\.0\.0_to-1\.1\.0_m2\."
                                            r"(sqlite3|dump)", dumps[0]), dumps
    assert sh(lab, "cat", "/opt/releasy/releases/1.0.0/.schema-version") == "2"
    assert sh(lab, "cat", "/opt/releasy/releases/1.1.0/.schema-version") == "3"
    record = last_audit(lab)
    assert {k: record[k] for k in ("action", "environment", "from_versions", "to", "result",
                                   "hosts_changed", "backup", "schema_level", "from_unit",
                                   "live_unit", "host")} == {
        "action": "deploy.bluegreen", "environment": "lab", "from_versions": {"solo": "1.0.0"},
        "to": "1.1.0", "result": "ok", "hosts_changed": ["solo"], "backup": dumps[0],
        "schema_level": 3, "from_unit": "releasy.service", "live_unit": "releasy@8081.service",
        "host": "solo"}
    assert record["by"] and record["ts"] and record["seconds"] > 0


def test_deploying_the_live_version_again_changes_and_restarts_nothing(lab):
    pid = unit(lab, "releasy@8081.service")["MainPID"]
    proc = fab(lab, "deploy.bluegreen", "--yes", "--version", "1.1.0")
    assert ("deploy.bluegreen: 1.1.0 is already live on solo (releasy@8081.service); nothing"
            " was restarted") in proc.stdout
    assert re.search(r"^solo\s+0 changed / 1 unchanged / ok$", proc.stdout, re.M), proc.stdout
    assert unit(lab, "releasy@8081.service")["MainPID"] == pid
    assert last_audit(lab)["result"] == "already live"


def test_app_setup_and_site_leave_the_live_instance_alone(lab):
    pid = unit(lab, "releasy@8081.service")["MainPID"]
    proc = fab(lab, "site")
    assert "site: 0 changed" in proc.stdout, proc.stdout
    assert "releasy.service left stopped: releasy@8081.service is live" in proc.stdout
    assert running(lab, "releasy.service") == ("inactive", "disabled")
    assert unit(lab, "releasy@8081.service")["MainPID"] == pid
    refused = fab(lab, "app.setup", "--version", "1.1.1", check=False)
    assert refused.returncode == 2 and "fab deploy.bluegreen --version 1.1.1" in refused.stderr


def test_a_no_op_run_costs_at_most_three_round_trips(lab, monkeypatch):
    """facts + audit record (+ the database password for PostgreSQL's lock)."""
    monkeypatch.setenv("RELEASY_INVENTORY", str(lab.inventory))
    with session() as s:
        outcome = bluegreen.run(s, "1.1.0")
        trips = s.executor.round_trips
    assert outcome.result == "already live"
    assert list(trips) == ["solo"] and trips["solo"] <= 3, trips


def test_second_deploy_goes_back_to_the_first_port_with_no_failed_request(lab, tmp_path):
    with steady_load(lab, tmp_path) as load:
        fab(lab, "deploy.bluegreen", "--yes", "--version", "1.1.1")
    assert load.summary["failed"] == 0, load.summary["first_failures"]
    assert_switched_once(load.summary, "1.1.0", "1.1.1")
    assert running(lab, "releasy@8080.service") == ("active", "enabled")
    assert running(lab, "releasy@8081.service") == ("inactive", "disabled")
    assert running(lab, "releasy.service") == ("inactive", "disabled")
    assert upstreams(lab) == ["127.0.0.1:8080"]
    assert sh(lab, "readlink", "/opt/releasy/current") == "releases/1.1.1"
    assert version_on(lab, 8080) == "1.1.1"


def test_a_release_older_than_the_database_is_refused_before_anything_changes(lab):
    pid = unit(lab, "releasy@8080.service")["MainPID"]
    proc = fab(lab, "deploy.bluegreen", "--yes", "--version", "1.0.0", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("solo: 1.0.0 ran against migration level 2 (/opt/releasy/releases/1.0.0/"
            ".schema-version), but the database is at level 3") in proc.stderr
    assert "`fab deploy.rollback --to 1.0.0 --restore-db`" in proc.stderr
    assert unit(lab, "releasy@8080.service")["MainPID"] == pid
    assert running(lab, "releasy@8081.service") == ("inactive", "disabled")


def test_a_release_that_never_becomes_ready_fails_before_the_switch(lab, tmp_path):
    inventory = lab.inventory_variant(tmp_path, lambda d: d.update(app={"ready_timeout": 4}))
    pid = unit(lab, "releasy@8080.service")["MainPID"]
    with steady_load(lab, tmp_path / "load") as load:
        proc = fab(lab, "deploy.bluegreen", "--yes", "--version", "1.2.0-neverready",
                   inventory=inventory, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert re.search(r"^solo\s+\d+ changed / \d+ unchanged / FAILED \(1 errors\)$", proc.stdout,
                     re.M), proc.stdout
    assert ("solo: deploy.bluegreen of 1.2.0-neverready failed in stage 'start', before the"
            " switch: the proxy still sends every request to releasy@8080.service on"
            " 127.0.0.1:8080 (1.1.1), untouched; releasy@8081.service was stopped and its"
            " link removed.") in err
    assert "releasy@8081.service did not become ready within 4 s" in err
    assert "never-ready build" in err  # a line of the new instance's own journal
    assert "app.setup --version PREVIOUS" not in err
    assert load.summary["failed"] == 0, load.summary["first_failures"]
    assert set(load.summary["versions"]) == {"1.1.1"}
    assert unit(lab, "releasy@8080.service")["MainPID"] == pid
    assert upstreams(lab) == ["127.0.0.1:8080"]
    assert running(lab, "releasy@8081.service") == ("inactive", "disabled")
    assert sh(lab, "ls", "-A", "/opt/releasy/instances") == "8080"
    assert sh(lab, "readlink", "/opt/releasy/current") == "releases/1.1.1"
    assert last_audit(lab)["result"] == "failed in start, before the switch"
    assert fab(lab, "deploy.lock").stdout.strip() == "deploy lock of lab: free"


def test_leftovers_and_a_restarted_releasy_service_are_reported_and_stopped(lab):
    """Two things a re-run must converge: releasy.service enabled and started again (what
    `fab app.setup` does today after a hand-over, see the report; the live instance holds
    its port, so it crash-loops), and an idle instance left running by a killed deploy."""
    pid = unit(lab, "releasy@8080.service")["MainPID"]
    sh(lab, "systemctl", "enable", "--now", "releasy.service")
    sh(lab, "ln", "-sfn", "/opt/releasy/releases/1.1.0", "/opt/releasy/instances/8081")
    sh(lab, "systemctl", "start", "releasy@8081.service")
    proc = fab(lab, "deploy.bluegreen", "--yes", "--version", "1.1.1")
    assert re.search(r"conflict: releasy\.service is enabled( and \w+)? while releasy@8080\.service"
                     r" is live", proc.stdout), proc.stdout
    assert "changed: releasy.service disabled (no longer starts at boot)" in proc.stdout
    assert ("changed: releasy@8081.service stopped (was active, not in rotation)"
            in proc.stdout)
    # drained before stopping anything
    assert re.search(r"in-flight requests to .*releasy@8081\.service.* finished", proc.stdout)
    assert running(lab, "releasy.service") == ("inactive", "disabled")
    assert running(lab, "releasy@8081.service") == ("inactive", "disabled")
    assert unit(lab, "releasy@8080.service")["MainPID"] == pid
    assert last_audit(lab)["result"] == "already live, converged"
    again = fab(lab, "deploy.bluegreen", "--yes", "--version", "1.1.1")
    assert re.search(r"^solo\s+0 changed / 1 unchanged / ok$", again.stdout, re.M), again.stdout


def test_a_half_applied_migration_keeps_the_old_release_serving_and_says_how_to_restore(lab):
    """Migration 4 commits, migration 5 fails: the database is ahead of the live release,
    which keeps serving but could not start again; the message says which dump restores."""
    build_release(HALF, lab.releases, migrations=5, broken_migration=True)
    pid = unit(lab, "releasy@8080.service")["MainPID"]
    proc = fab(lab, "deploy.bluegreen", "--yes", "--version", HALF, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    dump = last_audit(lab)["backup"]
    assert dump and re.fullmatch(rf"lab_\d+T\d+Z_from-1\.1\.1_to-{re.escape(HALF)}_m3\.\w+", dump)
    assert ("The database is now at migration level 4 (was 3): 1.1.1 keeps serving, but would"
            " refuse to start again (sqlx VersionMissing): `fab deploy.rollback --to 1.1.1"
            f" --restore-db --backup {dump}` restores the dump taken before this deploy"
            in proc.stderr), proc.stderr
    assert "database migration failed: while executing migration 5" in proc.stderr
    assert unit(lab, "releasy@8080.service")["MainPID"] == pid
    assert version_on(lab, 8080) == "1.1.1"
    assert upstreams(lab) == ["127.0.0.1:8080"]
    assert last_audit(lab)["schema_level"] == 4


def test_the_lock_is_held_for_the_whole_deploy(lab, captured_outputs):
    build_release(SLOW, lab.releases, migrations=5, migration_seconds=8)
    slow = start_fab(lab.inventory, "deploy.bluegreen", "--yes", "--version", SLOW,
                     stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            shown = fab(lab, "deploy.lock").stdout.strip()
            if f"version={SLOW}" in shown:
                break
            assert slow.poll() is None, slow.stdout.read()
            assert time.monotonic() < deadline, shown
        assert shown.startswith("deploy lock of lab: held by ") and f"pid={slow.pid}" in shown
        busy = fab(lab, "deploy.bluegreen", "--yes", "--version", "1.1.0", check=False)
        assert busy.returncode == 3, busy.stdout + busy.stderr
        assert "deploy of lab held by" in busy.stderr and f"pid={slow.pid}" in busy.stderr
        out, _ = slow.communicate(timeout=300)
    finally:
        if slow.poll() is None:
            slow.kill()  # only the process this test started
            slow.wait(timeout=30)
    captured_outputs.append(out)
    assert slow.returncode == 0, out
    assert f"deploy.bluegreen: 1.1.1 -> {SLOW} live on solo as releasy@8081.service" in out
    assert version_on(lab, 8081) == SLOW
    assert sh(lab, "cat", f"/opt/releasy/releases/{SLOW}/.schema-version") == "5"
    assert fab(lab, "deploy.lock").stdout.strip() == "deploy lock of lab: free"


def test_a_changed_setting_applied_by_site_switches_to_a_fresh_instance_with_no_failed_request(
        lab, tmp_path):
    """`fab site` with a changed app setting on the single host that serves: the new env
    file is written, a fresh instance of the live release starts beside the live one and
    the proxy switches to it (no restart in place), under steady load."""
    (before,) = upstreams(lab)
    release = sh(lab, "readlink", "/opt/releasy/current").removeprefix("releases/")
    (tmp_path / "inventory").mkdir()
    changed = lab.inventory_variant(tmp_path / "inventory", lambda d: d.setdefault(
        "app", {}).update(log_level="debug"))
    (tmp_path / "load").mkdir()
    with steady_load(lab, tmp_path / "load") as load:
        proc = fab(lab, "site", inventory=changed)
    assert load.summary["failed"] == 0, load.summary["first_failures"]
    assert "by starting a fresh instance and switching to it" in proc.stdout, proc.stdout
    (after,) = upstreams(lab)
    assert after != before
    port = int(after.rsplit(":", 1)[1])
    assert running(lab, f"releasy@{port}.service") == ("active", "enabled")
    assert running(lab, f"releasy@{before.rsplit(':', 1)[1]}.service")[0] == "inactive"
    assert version_on(lab, port) == release
    assert "debug" in sh(lab, "grep", "LOG", "/etc/releasy/releasy.env")
    # Back to the lab's own inventory: the same switch, then nothing left to do.
    fab(lab, "site")
    assert "site: 0 changed" in fab(lab, "site").stdout


def test_no_secret_appears_in_any_output(lab, captured_outputs):
    secrets = list(yaml.safe_load((lab.state_dir / "secrets.yaml").read_text()).values())
    if lab.database == "postgres":
        secrets.append(sh(lab, "cat", "/etc/releasy/database-password"))
    assert all(len(value) >= 16 for value in secrets)
    assert captured_outputs  # every fab run of this module, success or failure
    for out in captured_outputs:
        for value in secrets:
            assert value not in out
