"""`fab deploy.rolling` on the lab (proxy1, app1..app3, db1), run as an operator would, with
a load generator in the outside namespace sending HTTPS through the proxy the whole time.
Hosts, the proxy's upstream list and the stand-in's own migration/start logs in PostgreSQL
are inspected with plain OpenSSH.

One provisioned lab for the module: `fab site --version 1.0.0` on a fresh database. The
module's inventory is a copy of the lab's whose release source is a directory of its own
(the lab's default releases plus 1.3.0, a release whose new migration takes a while), so
`--version newest` means the same thing whatever other test modules build."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lab.standin.build import build_release
from tests.integration.labtools import (ROOT, assert_all_on, assert_no_failed_request, current,
                                       fab_env, last_audit, load_through_proxy, psql, report_load,
                                       rotation, start_fab)

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("split", 3)]

APPS = ("app1", "app2", "app3")
SLOW_MIGRATION_S = 6
LOCK_FREE_WITHIN_S = 15


# ------------------------------------------------------------------------------ helpers
def provision(lab, inventory: Path) -> None:
    """Every app host on 1.0.0 against a brand-new database, all in rotation, no dumps and
    no recorded migration levels left from earlier tests."""
    lab.reset("1.0.0", inventory=inventory)
    assert_all_on(lab, "1.0.0", APPS)


@pytest.fixture(scope="module")
def lab(lab_session):
    return lab_session.use("split", apps=3)


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory) -> Path:
    """The lab inventory (absolute paths) with a release directory of this module's own."""
    tmp = tmp_path_factory.mktemp("rolling")
    releases = tmp / "releases"
    releases.mkdir()
    for p in lab.releases.glob("releasy-server-1.[0-2].*"):
        shutil.copy2(p, releases / p.name)
    build_release("1.3.0", releases, migrations=4, migration_seconds=SLOW_MIGRATION_S)
    path = lab.inventory_variant(tmp, lambda d: d["release"].update(source=str(releases)))
    provision(lab, path)
    return path


# ------------------------------------------------------------------------------ tests
def test_rolling_deploy_under_load_fails_no_request_and_migrates_once(lab, inventory,
                                                                      tmp_path):
    dry = lab.fab("deploy.rolling", "--version", "1.1.0", "--dry-run", inventory=inventory)
    assert "would migrate: drain app1" in dry.stdout and "would create backup" in dry.stdout
    assert_all_on(lab, "1.0.0", APPS)  # the dry run touched nothing
    assert lab.sudo("db1", "ls", "/var/backups/releasy", check=False).stdout == ""

    events = tmp_path / "events.jsonl"
    with load_through_proxy(lab, tmp_path / "load") as load:
        load.wait_until(lambda p: p["ok"] >= 100, timeout=60)
        proc = lab.fab("deploy.rolling", "--version", "1.1.0", "--yes",
                       "--json-log", str(events), inventory=inventory)
        after = load.progress()["total"]
        load.wait_until(lambda p: p["total"] >= after + 100, timeout=60)
    summary = load.summary
    report_load("deploy.rolling 1.0.0 -> 1.1.0 (3 app hosts)", summary)
    assert_no_failed_request(load, summary)
    # By second in time order: the JSON summary's keys may come back sorted as strings.
    seconds = [v for _, v in sorted(summary["per_second"].items(), key=lambda kv: int(kv[0]))]
    assert set(seconds[0]) == {"1.0.0"} and set(seconds[-1]) == {"1.1.0"}
    assert_all_on(lab, "1.1.0", APPS)
    assert "rolling deploy to 1.1.0 done: app1, app2, app3" in proc.stdout

    # Migration 3 was applied exactly once, by app1, before any other host started 1.1.0.
    applied = psql(lab, "SELECT host, binary_version, extract(epoch FROM applied_at)"
                        " FROM standin_migration_log WHERE migration = 3")
    assert [row[:2] for row in applied] == [["app1", "1.1.0"]]
    starts = {row[0]: (float(row[1]), float(row[2] or "nan")) for row in psql(
        lab, "SELECT host, extract(epoch FROM started_at), extract(epoch FROM ready_at)"
             " FROM standin_start_log WHERE binary_version = '1.1.0'")}
    assert set(starts) == set(APPS)
    migrated_at, app1_ready = float(applied[0][2]), starts["app1"][1]
    for host in ("app2", "app3"):
        assert starts[host][0] > app1_ready > migrated_at, (host, starts, migrated_at)
    assert psql(lab, "SELECT max(version) FROM _sqlx_migrations") == [["3"]]

    # The pipeline's stages are in the JSON log, with host and duration.
    stages = [json.loads(line) for line in events.read_text().splitlines()]
    done = [(e["stage"], e["host"]) for e in stages
            if e["event"] == "stage" and e["message"].startswith("done in")]
    assert done == [("preflight", "deploy.rolling"), ("stage", "deploy.rolling"),
                    ("backup", "db1"), ("migrate", "app1"), ("roll", "app2"),
                    ("roll", "app3"), ("finish", "deploy.rolling")]
    assert all("seconds" in e for e in stages if e["event"] == "stage"
               and e["message"].startswith("done in"))

    # The pre-deploy dump: root/postgres only, named after what it is.
    lines = lab.sudo("db1", "sh", "-c", "stat -c '%U:%G %a %n' /var/backups/releasy"
                                         " /var/backups/releasy/*").stdout.splitlines()
    assert lines[0] == "postgres:postgres 700 /var/backups/releasy"
    assert len(lines) == 2 and lines[1].startswith("postgres:postgres 600 /var/backups/releasy/"
                                                   "lab_") and lines[1].endswith(
        "_from-1.0.0_to-1.1.0_m2.dump")
    # Levels recorded next to the releases, and an audit record on every host.
    assert lab.ssh("app2", "cat", "/opt/releasy/releases/1.0.0/.schema-version",
                   "/opt/releasy/releases/1.1.0/.schema-version").stdout.split() == ["2", "3"]
    for host in ("proxy1", "app2", "db1"):
        record = last_audit(lab, host)
        assert (record["action"], record["to"], record["result"], record["host"]) == (
            "deploy.rolling", "1.1.0", "ok", host)

    # Again: nothing to do, nothing restarted.
    starts_before = psql(lab, "SELECT count(*) FROM standin_start_log")
    again = lab.fab("deploy.rolling", "--version", "1.1.0", "--yes", inventory=inventory)
    assert "every app host already runs 1.1.0 and is ready: nothing to do" in again.stdout
    assert " changed: " not in again.stdout
    assert psql(lab, "SELECT count(*) FROM standin_start_log") == starts_before


@pytest.mark.parametrize("bad,timeout,cause", [
    ("1.2.0-neverready", 8, "did not become ready within 8 s"),
    ("1.2.0-broken", 30, "stopped before it became ready"),
])
def test_a_bad_release_stops_at_the_first_host_and_no_request_fails(lab, inventory, tmp_path,
                                                                   bad, timeout, cause):
    assert_all_on(lab, "1.1.0", APPS)
    with load_through_proxy(lab, tmp_path / "load") as load:
        load.wait_until(lambda p: p["ok"] >= 100, timeout=60)
        proc = lab.fab("deploy.rolling", "--version", bad, "--yes", "--ready-timeout",
                       str(timeout), inventory=inventory, check=False)
        after = load.progress()["total"]
        load.wait_until(lambda p: p["total"] >= after + 50, timeout=60)
    summary = load.summary
    report_load(f"deploy.rolling 1.1.0 -> {bad} (refused at app1)", summary)
    assert_no_failed_request(load, summary)
    assert summary["versions"].keys() == {"1.1.0"}
    out = proc.stdout + proc.stderr

    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert (f"error: Rolling deploy of lab to {bad} stopped at app1, stage migrate (step ready):"
            f" releasy.service {cause}") in out
    assert ("app1 was switched back to 1.1.0, is ready and back in rotation. Not reached,"
            " untouched: app2, app3. In rotation now: app1, app2, app3.") in out
    assert "Last journal lines of releasy.service on app1:" in out
    paragraph = proc.stderr.split("error: ", 1)[1].split("\nLast journal lines")[0]
    assert "\n" not in paragraph
    assert_all_on(lab, "1.1.0", APPS)
    if bad == "1.2.0-broken":
        assert "The failure came from a database migration." in out
        assert "_from-1.1.0_to-1.2.0-broken_m3.dump" in out
        assert "still at migration level 3" in out and "--restore-db --backup lab_" in out
        assert "database migration failed" in out  # the journal line saying so
        assert psql(lab, "SELECT max(version) FROM _sqlx_migrations") == [["3"]]
    else:
        assert "database migration" not in paragraph


def test_second_deploy_is_refused_and_a_killed_deploy_converges_from_cron(lab, inventory,
                                                                          tmp_path):
    first = start_fab(inventory, "deploy.rolling", "--version", "1.3.0", "--yes",
                      stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        for line in first.stdout:  # until app1 runs 1.3.0's slow migration
            seen.append(line)
            if line.startswith("[app1] changed: releasy.service restarted"):
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            pytest.fail("the first deploy ended early:\n" + "".join(seen))

        second = lab.fab("deploy.rolling", "--version", "1.3.0", "--yes", inventory=inventory,
                         check=False)
        assert second.returncode == 3, second.stdout + second.stderr
        assert "error: deploy of lab held by " in second.stderr
        assert f"pid={first.pid} version=1.3.0 since 20" in second.stderr
        assert " changed: " not in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)  # only the process this test started, by its PID
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    # Killed mid-roll: app1 is out of rotation, switched to 1.3.0, maybe still migrating.
    assert rotation(lab) == ["app2", "app3"]
    assert current(lab, "app1") == "1.3.0"

    started = time.monotonic()
    while "deploy lock of lab: free" not in lab.fab("deploy.lock", inventory=inventory).stdout:
        assert time.monotonic() - started < LOCK_FREE_WITHIN_S, "the lock is still held"
        time.sleep(0.3)

    # The rerun: cron's wrapper upgrades to the newest release, 1.3.0, converging.
    logs = tmp_path / "cron"
    cron_env = fab_env(inventory, RELEASY_CRON_LOG_DIR=str(logs))
    cron = subprocess.run([str(ROOT / "scripts" / "cron-upgrade.sh")], env=cron_env,
                          capture_output=True, text=True, timeout=300)
    log = (logs / "cron.log").read_text()
    assert cron.returncode == 0, cron.stderr + log
    assert cron.stdout == cron.stderr == ""  # cron mails nothing when all went well
    assert "rolling deploy to 1.3.0 done" in log
    assert_all_on(lab, "1.3.0", APPS)
    assert psql(lab, "SELECT host, binary_version FROM standin_migration_log"
                     " WHERE migration = 4") == [["app1", "1.3.0"]]
    events = [json.loads(line) for line in (logs / "cron.jsonl").read_text().splitlines()]
    assert any(e.get("stage") == "finish" and e["message"].startswith("done in")
               for e in events)

    again = subprocess.run([str(ROOT / "scripts" / "cron-upgrade.sh")], env=cron_env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "every app host already runs 1.3.0 and is ready: nothing to do" in (
        logs / "cron.log").read_text().split("cron-upgrade (pid")[-1]
