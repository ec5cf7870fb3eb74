"""Operator conventions on the lab (issue 14): hooks, the maintenance page, the audit trail,
and environments selected by RELEASY_ENV.

Split topology (proxy1, app1, app2 as `deploy`, db1) from a brand-new database with `fab
site --version 1.0.0`, shared by every test here (they run in file order):

- hooks: a hook writes its whole environment to a file: it sees the task, versions, hosts,
  result and duration, and none of our secrets; a failing after_deploy changes nothing; a
  refused rollout runs on_failure; a failing or hanging before_deploy stops the task before
  any host is touched (the app's PIDs and the audit logs unchanged);
- maintenance: a client probing through the proxy during `fab db.restore` and `fab
  deploy.rollback --restore-db` sees 200s, then 503s carrying Retry-After (the page), then
  200s: never a 502; `fab proxy.maintenance --on/--off` by hand, idempotent;
- audit: `fab audit` shows the records of the tasks above merged across hosts, newest
  first (a run that changed nothing only from the database host), and reads only;
- environments: `RELEASY_ENV=lab` with inventories/base.yaml + inventories/lab.yaml runs the
  real tasks on the lab; a bad value is reported with the file it came from.
"""
from __future__ import annotations

import getpass
import json
import re
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.integration.labtools import audit_line_counts, current, load_through_proxy, main_pids
from releasy_deploy.cli import session
from releasy_deploy.lock import deploy_lock

pytestmark = pytest.mark.lab

APPS = ("app1", "app2")
HOSTS = ("proxy1", "app1", "app2", "db1")
DUMP_RE = re.compile(r"lab_\d{8}T\d{6}Z_manual_at-[0-9.]+_m\d+\.dump")


@pytest.fixture(scope="module")
def lab(lab_session):
    lab = lab_session.use("split", 2)
    lab.reset("1.0.0")
    yield lab
    # The next module finds every host in rotation, the page off, deploys not frozen.
    lab.settle()


def env_file(path: Path) -> dict[str, str]:
    """`env` output -> dict (values without newlines here)."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def audit_lines(lab) -> dict[str, int]:
    return audit_line_counts(lab, HOSTS)


def lab_secrets(lab) -> list[str]:
    values = yaml.safe_load((lab.state_dir / "secrets.yaml").read_text()) or {}
    return [str(v) for v in values.values() if v]


def https_get(lab, path: str = "/ready") -> tuple[int, dict[str, str], str]:
    """One request through proxy1 from this machine: status, headers, body."""
    proc = subprocess.run(
        ["curl", "-ksS", "--max-time", "10", "-D", "-", "--resolve",
         f"releasy.lab.test:443:10.77.{lab.ident.subnet_octet}.10",
         f"https://releasy.lab.test{path}"], capture_output=True, text=True, timeout=30)
    head, _, body = proc.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1]) if lines else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


# ------------------------------------------------------------------------------ hooks
def test_hooks_see_the_task_and_no_secret(lab, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    def add_hooks(data):
        data["hooks"] = {
            "before_deploy": ['env > "$HOOK_OUT/before.env"'],
            "after_deploy": ['env > "$HOOK_OUT/after.env"',
                             "echo after-hook-complains; exit 7"],
            "on_failure": ['env > "$HOOK_OUT/failure.env"'],
            "pass_env": ["HOOK_OUT"],
        }
    inv = lab.inventory_variant(tmp_path, add_hooks)
    planted = "not-for-hooks-5f1d0c9a7e"
    env = {"HOOK_OUT": str(out), "AWS_SECRET_ACCESS_KEY": planted}

    proc = lab.fab("deploy.rolling", "--version", "1.1.0", "--yes", inventory=inv, env=env)
    before, after = env_file(out / "before.env"), env_file(out / "after.env")
    assert before["RELEASY_HOOK"] == "before_deploy"
    assert before["RELEASY_ACTION"] == "deploy.rolling"
    assert before["RELEASY_ENVIRONMENT"] == "lab"
    assert before["RELEASY_VERSION"] == "1.1.0"
    assert before["RELEASY_HOSTS"] == "app1 app2"
    assert "RELEASY_RESULT" not in before
    assert after["RELEASY_RESULT"] == "ok" and after["RELEASY_EXIT_CODE"] == "0"
    assert after["RELEASY_FROM_VERSIONS"] == "app1=1.0.0 app2=1.0.0"
    assert after["RELEASY_HOSTS_CHANGED"] == "app1 app2"
    assert float(after["RELEASY_DURATION"]) > 0
    # Built from scratch: nothing of the caller's environment but PATH & co and pass_env.
    for seen in (before, after):
        text = "\n".join(f"{k}={v}" for k, v in seen.items())
        assert "AWS_SECRET_ACCESS_KEY" not in seen and planted not in text
        assert not any(secret in text for secret in lab_secrets(lab))
        assert set(seen) <= {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER",
                             "LOGNAME", "TMPDIR", "HOOK_OUT", "PWD", "SHLVL", "_",
                             "OLDPWD"} | {k for k in seen if k.startswith("RELEASY_")}
    # The failing after_deploy hook is reported; the rollout's result stands.
    said = proc.stdout + proc.stderr
    assert "after-hook-complains" in said and "exited 7" in said
    assert all(current(lab, h) == "1.1.0" for h in APPS)

    # A refused rollout (no such release) runs on_failure with the error.
    proc = lab.fab("deploy.rolling", "--version", "9.9.9", "--yes", inventory=inv, env=env,
                   check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    failure = env_file(out / "failure.env")
    assert failure["RELEASY_RESULT"] == "refused" and failure["RELEASY_EXIT_CODE"] == "2"
    assert "9.9.9" in failure["RELEASY_ERROR"]


@pytest.mark.parametrize("hook, says", [
    ("echo 'no deploys on a Friday' >&2; exit 3", "exited 3"),
    ("sleep 60", "timed out after 2 s"),
])
def test_failing_before_hook_touches_nothing(lab, tmp_path, hook, says):
    def add_hooks(data):
        data["hooks"] = {"before_deploy": [hook], "timeout": 2,
                         "after_deploy": ["touch after-ran"], "on_failure": ["touch failure-ran"]}
    inv = lab.inventory_variant(tmp_path, add_hooks)
    pids, logged = main_pids(lab, APPS), audit_lines(lab)
    proc = lab.fab("app.restart", "--yes", inventory=inv, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stdout + proc.stderr
    assert "no host was contacted" in proc.stdout + proc.stderr
    assert main_pids(lab, APPS) == pids and audit_lines(lab) == logged
    assert not (tmp_path / "after-ran").exists() and not (tmp_path / "failure-ran").exists()


# ------------------------------------------------------------------------ maintenance
def probe_during(lab, tmp_path, *fab_args: str) -> list[dict]:
    """Requests through the proxy (100/s from outside) before, during and after a task."""
    with load_through_proxy(lab, tmp_path) as load:
        load.wait_until(lambda p: p["ok"] >= 30, timeout=60)
        lab.fab(*fab_args)
        after = load.progress()["ok"]
        load.wait_until(lambda p: p["ok"] >= after + 30, timeout=60)
    return sorted(load.records(), key=lambda r: r["t"])


def assert_page_then_back(what: str, records: list[dict]) -> None:
    """200s, then only 503s with Retry-After (the page), then 200s: never a 502 or error."""
    statuses = Counter(r["status"] for r in records)
    errors = [r for r in records if r["error"]]
    print(f"\nthrough the proxy during {what}: {dict(statuses)}, {len(errors)} errors")
    assert not errors, errors[:5]
    assert set(statuses) <= {200, 503}, statuses  # never a 502
    page = [r for r in records if r["status"] == 503]
    assert page, f"{what}'s downtime never showed the maintenance page"
    assert {r["retry_after"] for r in page} == {"30"}
    first, last = records.index(page[0]), records.index(page[-1])
    assert all(r["status"] == 503 for r in records[first:last + 1])  # one window
    assert records[-1]["status"] == 200 and records[0]["status"] == 200


def test_restore_shows_the_maintenance_page_never_a_502(lab, tmp_path):
    name = DUMP_RE.findall(lab.fab("db.backup").stdout)[0]
    assert_page_then_back("db.restore",
                          probe_during(lab, tmp_path, "db.restore", "--file", name, "--yes"))


def test_rollback_restoring_the_database_shows_the_page(lab, tmp_path):
    # 1.1.0's migration is undone by restoring the dump the rollout to it took.
    records = probe_during(lab, tmp_path, "deploy.rollback", "--restore-db", "--yes")
    assert_page_then_back("deploy.rollback --restore-db", records)
    assert all(current(lab, h) == "1.0.0" for h in APPS)


def test_maintenance_by_hand(lab):
    assert lab.fab("proxy.maintenance", check=False).returncode == 2
    on = lab.fab("proxy.maintenance", "--on")
    assert "maintenance page on" in on.stdout
    status, headers, body = https_get(lab, "/version")
    assert status == 503 and headers["retry-after"] == "30", (status, headers)
    assert "Down for maintenance" in body
    # The page's internal URL is nginx's own: never served to a client as such.
    assert https_get(lab, "/releasy-maintenance.html")[0] == 404
    again = lab.fab("proxy.maintenance", "--on")
    assert re.search(r"proxy1\s+0 changed", again.stdout), again.stdout
    lab.fab("proxy.maintenance", "--off")
    assert https_get(lab, "/ready")[0] == 200
    assert re.search(r"proxy1\s+0 changed", lab.fab("proxy.maintenance", "--off").stdout)


# ------------------------------------------------------------------------------ audit
def test_audit_trail_merges_every_task(lab):
    lab.fab("app.drain", "--host", "app2")
    lab.fab("app.undrain", "--host", "app2")
    lab.fab("deploy.freeze", "--reason", "audit trail test")
    lab.fab("deploy.unfreeze")
    lab.fab("firewall.apply")
    logged = audit_lines(lab)

    records = json.loads(lab.fab("audit", "--json", "--last", "200").stdout)
    actions = [r["action"] for r in records]
    for action in ("site", "deploy.rolling", "db.restore", "deploy.rollback",
                   "proxy.maintenance", "app.drain",
                   "app.undrain", "deploy.freeze", "deploy.unfreeze", "firewall.apply"):
        assert action in actions, (action, actions)
    stamps = [r["ts"] for r in records]
    assert stamps == sorted(stamps, reverse=True)
    newest = records[0]
    assert newest["action"] == "firewall.apply" and newest["result"] == "ok"
    assert newest["by"] == f"{getpass.getuser()}@{socket.gethostname()}"
    # The firewall was already as planned: a run that changed nothing is recorded on the
    # database host only; one that changed hosts is on every host, shown once.
    assert newest["changed"] == {} and newest["hosts"] == ["db1"], newest
    restore = next(r for r in records if r["action"] == "db.restore")
    assert restore["result"] == "ok" and DUMP_RE.fullmatch(restore["file"])
    assert restore["changed"]  # which hosts it changed, and how much
    assert sorted(restore["hosts"]) == sorted(HOSTS), restore
    freeze = next(r for r in records if r["action"] == "deploy.freeze")
    assert freeze["reason"] == "audit trail test"

    table = lab.fab("audit", "--last", "2", "--host", "db1").stdout.splitlines()
    assert len(table) == 2 and "firewall.apply" in table[0] and "deploy.unfreeze" in table[1]
    # Read-only: reading wrote nothing anywhere.
    assert audit_lines(lab) == logged


def test_audit_reads_while_another_task_holds_the_lock(lab, monkeypatch):
    monkeypatch.setenv("RELEASY_INVENTORY", str(lab.inventory))
    with session() as s, deploy_lock(s, version=None):
        proc = lab.fab("audit", "--last", "1")
        assert proc.stdout.strip()
        # The lock really is held: a task that changes hosts is refused meanwhile.
        assert lab.fab("proxy.maintenance", "--on", check=False).returncode == 3


# --------------------------------------------------------------------- environments
def test_environment_selected_by_releasy_env(lab, tmp_path):
    base = yaml.safe_load(lab.inventory_variant(tmp_path).read_text())
    inventories = tmp_path / "inventories"
    inventories.mkdir()
    base.pop("environment")
    (inventories / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    # The environment's file overrides one key deep inside a shared mapping.
    (inventories / "lab.yaml").write_text(yaml.safe_dump({"app": {"ready_timeout": 45}}))
    env = {"RELEASY_INVENTORY": "", "RELEASY_ENV": "lab",
           "RELEASY_INVENTORIES": str(inventories)}

    check = lab.fab("inventory.check", env=env)
    assert "environment lab" in check.stdout and str(inventories / "lab.yaml") in check.stdout
    site = lab.fab("site", env=env)
    assert re.search(r"site: 0 changed", site.stdout), site.stdout
    status = lab.fab("status", "--json", env=env)
    assert json.loads(status.stdout)["environment"] == "lab"
    records = json.loads(lab.fab("audit", "--json", "--last", "1", env=env).stdout)
    assert records[0]["action"] == "site" and records[0]["environment"] == "lab"

    # A bad shared value is reported with the shared file's name and its YAML path.
    base["app"] = {"bind_port": 70000}
    (inventories / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    bad = lab.fab("inventory.check", env=env, check=False)
    assert bad.returncode == 2
    assert f"{inventories / 'base.yaml'}: app.bind_port:" in bad.stdout + bad.stderr
    # Setting both selectors is refused before anything.
    both = lab.fab("status", env={**env, "RELEASY_INVENTORY": str(lab.inventory)}, check=False)
    assert both.returncode == 2 and "set one of them" in both.stdout + both.stderr
