"""Pure parts of issue 14: the hooks' schema, environment and runner (real `sh`
processes); environments merged key by key with per-key origin files (real files through
`load_inventory`); the audit trail's merge; the maintenance switch's script (run by `sh`
on a scratch directory)."""
from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from releasy_deploy import audit, hooks
from releasy_deploy.commands import nginx as nginxcmd
from releasy_deploy.hook_schema import Hooks, parse_hooks
from releasy_deploy.inventory import InventoryError, load_inventory
from releasy_deploy.inventory_files import Origins, merge
from test_egress import SPLIT

# The split inventory of the egress tests, without its environment (RELEASY_ENV names it)
# and with an app: mapping for the merge to work on.
SHARED = yaml.safe_dump({**{k: v for k, v in yaml.safe_load(SPLIT).items()
                            if k not in ("environment", "egress")},
                         "app": {"bind_port": 8080, "log_level": "info"}})


# ------------------------------------------------------------------------ hook schema
def _problems(value):
    found = []
    hooks_ = parse_hooks(value, lambda p, m: found.append((p, m)))
    return hooks_, found


def test_hooks_schema_accepts_lists_and_defaults():
    h, found = _problems({"before_deploy": ["true"], "after_deploy": "echo done",
                          "pass_env": ["CHAT_WEBHOOK_URL"], "timeout": 5})
    assert not found
    assert h == Hooks(before_deploy=("true",), after_deploy=("echo done",), timeout=5,
                      pass_env=("CHAT_WEBHOOK_URL",))
    assert _problems(None) == (Hooks(), [])


@pytest.mark.parametrize("value, path, words", [
    ({"before": ["x"]}, "hooks.before", "unknown key"),
    ({"before_deploy": [""]}, "hooks.before_deploy[0]", "non-empty string"),
    ({"on_failure": [1]}, "hooks.on_failure[0]", "non-empty string"),
    ({"after_deploy": {"a": 1}}, "hooks.after_deploy", "list of strings"),
    ({"timeout": 0}, "hooks.timeout", "1 to 600"),
    ({"timeout": 601}, "hooks.timeout", "1 to 600"),
    ({"timeout": True}, "hooks.timeout", "1 to 600"),
    ({"pass_env": ["RELEASY_ADMIN_API_KEY"]}, "hooks.pass_env[0]", "the tool's own"),
    ({"pass_env": ["A-B"]}, "hooks.pass_env[0]", "not an environment variable name"),
    (["true"], "hooks", "must be a mapping"),
])
def test_hooks_schema_names_the_yaml_path(value, path, words):
    _, found = _problems(value)
    assert [(p, words in m) for p, m in found] == [(path, True)], found


def test_hooks_errors_name_the_inventory_file(tmp_path):
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "releases").mkdir()
    data = yaml.safe_load(SHARED) | {"environment": "prod", "hooks": {"timeout": "soon"}}
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InventoryError) as exc:
        load_inventory(tmp_path / "inv.yaml")
    assert f"{tmp_path / 'inv.yaml'}: hooks.timeout: must be whole seconds" in str(exc.value)


# ------------------------------------------------------------------------ hook runner
def test_hook_env_is_built_from_scratch():
    environ = {"PATH": "/bin", "HOME": "/root", "RELEASY_ADMIN_API_KEY": "s3cret" * 4,
               "AWS_SECRET_ACCESS_KEY": "x" * 20, "CHAT_WEBHOOK_URL": "https://chat/hook"}
    env = hooks.hook_env(
        kind="after_deploy", action="deploy.rolling", environment="prod",
        inventory="/i/prod.yaml", hosts=["app1", "app2"], version="1.1.0",
        outcome={"from_versions": {"app1": "1.0.0", "app2": None},
                 "hosts_changed": ["app1"]},
        result="ok", exit_code=0, duration=3.14159, pass_env=["CHAT_WEBHOOK_URL"],
        environ=environ)
    assert env == {
        "PATH": "/bin", "HOME": "/root", "CHAT_WEBHOOK_URL": "https://chat/hook",
        "RELEASY_HOOK": "after_deploy", "RELEASY_ACTION": "deploy.rolling",
        "RELEASY_ENVIRONMENT": "prod", "RELEASY_INVENTORY": "/i/prod.yaml",
        "RELEASY_OPERATOR": audit.operator_identity(), "RELEASY_HOSTS": "app1 app2",
        "RELEASY_VERSION": "1.1.0", "RELEASY_FROM_VERSIONS": "app1=1.0.0 app2=-",
        "RELEASY_RESULT": "ok", "RELEASY_EXIT_CODE": "0", "RELEASY_DURATION": "3.1",
        "RELEASY_HOSTS_CHANGED": "app1"}


def test_hook_command_runs_with_that_environment_only(tmp_path):
    res = hooks.run_command("env; echo out; echo err >&2; exit 4", {"PATH": "/usr/bin:/bin",
                            "RELEASY_ACTION": "app.restart"}, timeout=10, cwd=str(tmp_path))
    assert res.code == 4 and not res.ok
    lines = res.output.splitlines()
    assert "RELEASY_ACTION=app.restart" in lines and "out" in lines and "err" in lines
    assert not any(line.startswith("HOME=") for line in lines)


def test_hook_timeout_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "child-survived"
    started = time.monotonic()
    # The background child would outlive a kill of `sh` alone.
    res = hooks.run_command(f"(sleep 3; touch {marker}) & sleep 30", {"PATH": "/usr/bin:/bin"},
                            timeout=1)
    assert res.code is None and res.describe(1) == "timed out after 1 s (killed)"
    assert time.monotonic() - started < 10
    time.sleep(3.5)
    assert not marker.exists()


# ---------------------------------------------------------------------- environments
def test_merge_is_deep_for_mappings_and_tracks_origins():
    origins = Origins("env.yaml")
    base = {"app": {"bind_port": 8080, "log_level": "info"}, "admin_cidrs": ["a", "b"],
            "tls": {"mode": "files"}}
    over = {"app": {"log_level": "debug"}, "admin_cidrs": ["c"], "tls": None}
    merged = merge(base, over, "base.yaml", "env.yaml", origins)
    assert merged == {"app": {"bind_port": 8080, "log_level": "debug"},
                      "admin_cidrs": ["c"]}
    assert origins.file_of("app.bind_port") == "base.yaml"
    assert origins.file_of("app.log_level") == "env.yaml"
    assert origins.file_of("admin_cidrs[0]") == "env.yaml"
    assert origins.file_of("app.missing_key") == "env.yaml"  # the mapping is in both
    assert origins.file_of("nowhere") == "env.yaml"


def _environments(tmp_path, shared, own, name="staging"):
    d = tmp_path / "inventories"
    d.mkdir(exist_ok=True)
    (d / "known_hosts").write_text("")
    (d / "releases").mkdir(exist_ok=True)
    (d / "base.yaml").write_text(shared if isinstance(shared, str) else yaml.safe_dump(shared))
    (d / f"{name}.yaml").write_text(yaml.safe_dump(own))
    return d


def test_releasy_env_selects_the_environment_over_the_shared_file(tmp_path, monkeypatch):
    d = _environments(tmp_path, SHARED, {"app": {"log_level": "debug"},
                                          "hooks": {"after_deploy": ["true"]}})
    monkeypatch.delenv("RELEASY_INVENTORY", raising=False)
    monkeypatch.setenv("RELEASY_ENV", "staging")
    monkeypatch.setenv("RELEASY_INVENTORIES", str(d))
    inv = load_inventory()
    assert inv.environment == "staging"  # named by RELEASY_ENV: its own lock and audit
    assert inv.path == (d / "staging.yaml").absolute() and inv.base_path == d / "base.yaml"
    assert inv.app.log_level == "debug" and inv.app.bind_port == 8080
    assert inv.secrets_file == d / "staging.secrets.yaml"  # never shared by default
    assert inv.hooks.after_deploy == ("true",)
    assert inv.known_hosts == d / "known_hosts"


@pytest.mark.parametrize("shared_change, own, file, path", [
    ({"app": {"bind_port": 70000}}, {}, "base.yaml", "app.bind_port"),
    ({}, {"app": {"bind_port": 70000}}, "staging.yaml", "app.bind_port"),
    ({}, {"hosts": {"app1": {"address": "not an address"}}}, "staging.yaml",
     "hosts.app1.address"),
    ({"environment": "staging"}, {}, "base.yaml", "environment"),
    ({}, {"environment": "production"}, "staging.yaml", "environment"),
])
def test_errors_name_the_file_each_value_came_from(tmp_path, monkeypatch, shared_change,
                                                    own, file, path):
    shared = yaml.safe_load(SHARED)
    for key, value in shared_change.items():
        shared[key] = {**shared[key], **value} if isinstance(value, dict) else value
    d = _environments(tmp_path, shared, own)
    monkeypatch.delenv("RELEASY_INVENTORY", raising=False)
    monkeypatch.setenv("RELEASY_ENV", "staging")
    monkeypatch.setenv("RELEASY_INVENTORIES", str(d))
    with pytest.raises(InventoryError) as exc:
        load_inventory()
    assert any(p.file == str(d / file) and p.path == path for p in exc.value.problems), \
        str(exc.value)


@pytest.mark.parametrize("environ, words", [
    ({"RELEASY_ENV": "Prod"}, "not an environment name"),
    ({"RELEASY_ENV": "base"}, "not an environment name"),
    ({"RELEASY_ENV": "prod", "RELEASY_INVENTORY": "hosts.yaml"}, "set one of them"),
    ({"RELEASY_ENV": "nosuch"}, "no such file"),
])
def test_bad_selection_is_bad_input(tmp_path, monkeypatch, environ, words):
    monkeypatch.delenv("RELEASY_INVENTORY", raising=False)
    monkeypatch.setenv("RELEASY_INVENTORIES", str(tmp_path))
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InventoryError) as exc:
        load_inventory()
    assert words in str(exc.value)


# ----------------------------------------------------------------------------- audit
def test_audit_merge_shows_each_record_once_newest_first():
    a = audit.record("site", "prod", result="ok") | {"ts": "2026-01-01T10:00:00+00:00"}
    b = audit.record("deploy.rolling", "prod", to="1.1.0") | {"ts": "2026-01-02T10:00:00+00:00"}
    other = audit.record("site", "staging") | {"ts": "2026-01-03T10:00:00+00:00"}
    by_host = {"app1": [a | {"host": "app1"}, b | {"host": "app1"}, other | {"host": "app1"}],
               "db1": [a | {"host": "db1"}]}
    merged = audit.merge(by_host, "prod", last=10)
    assert [r["action"] for r in merged] == ["deploy.rolling", "site"]
    assert merged[1]["hosts"] == ["app1", "db1"] and "host" not in merged[1]
    assert audit.merge(by_host, "prod", last=1) == merged[:1]
    lines = audit.render(merged)
    assert lines[0].startswith("2026-01-02T10:00:00+00:00 deploy.rolling") and "to=1.1.0" in lines[0]


def test_audit_log_lines_that_are_not_records_are_skipped():
    text = '{"action": "site"}\nnot json\n[1, 2]\n\n{"action": "app.drain"}\n'
    assert [r["action"] for r in audit.parse_lines(text)] == ["site", "app.drain"]


def test_task_entry_keeps_flags_and_changed_hosts_only():
    entry = audit.task_entry("proxy.maintenance", "prod", result="ok", seconds=1.234,
                             changed={"proxy1": 1, "app1": 0},
                             args={"on": True, "off": False, "file": None})
    assert entry["changed"] == {"proxy1": 1} and entry["seconds"] == 1.2
    assert entry["on"] is True and "off" not in entry and "file" not in entry


def test_a_run_that_changed_nothing_is_recorded_on_the_database_host_only(tmp_path):
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "releases").mkdir()
    (tmp_path / "inv.yaml").write_text(SPLIT)
    inv = load_inventory(tmp_path / "inv.yaml")

    def names(hosts):
        return [h.name for h in hosts]

    everyone = names(inv.hosts)
    nothing = {"proxy1": 0, "app1": 0, "app2": 0, "db1": 0}
    assert names(audit.entry_hosts(inv, nothing, ok=True)) == ["db1"]
    assert names(audit.entry_hosts(inv, {}, ok=True)) == ["db1"]
    # A change anywhere, or a run that did not end ok: every host keeps the record.
    assert names(audit.entry_hosts(inv, {**nothing, "app2": 1}, ok=True)) == everyone
    assert names(audit.entry_hosts(inv, nothing, ok=False)) == everyone


# ------------------------------------------------------------------- maintenance page
def test_maintenance_switch_script_is_idempotent(tmp_path):
    def run(on: bool) -> subprocess.CompletedProcess:
        argv = nginxcmd.maintenance_argv(on)
        script = argv[2].replace(nginxcmd.MAINTENANCE_FLAG, str(tmp_path / "flag")).replace(
            nginxcmd.MAINTENANCE_PAGE, str(tmp_path / "page.html"))
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True)

    assert run(True).returncode == nginxcmd.EXIT_NO_MAINTENANCE_PAGE  # no page yet
    assert not (tmp_path / "flag").exists()
    (tmp_path / "page.html").write_text("down")
    assert run(True).stdout.strip() == "@changed" and (tmp_path / "flag").exists()
    assert run(True).stdout.strip() == "@unchanged"
    assert run(False).stdout.strip() == "@changed" and not (tmp_path / "flag").exists()
    assert run(False).stdout.strip() == "@unchanged"
