"""Blue/green planning (pure): facts in, plan and argv out, table-driven. The remote scripts
run for real with the local `sh` (paths substituted into a temp dir, a fake `systemctl` on
PATH that logs its arguments and answers is-active from a file)."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import shlex
import stat
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest

from releasy_deploy import backups as backups_mod
from releasy_deploy import bluegreen as bg
from releasy_deploy import schema
from releasy_deploy.cli import exit_code_for
from releasy_deploy.engine.sequence import Kept, Step, plan_undo, run_sequence
from releasy_deploy.errors import BadInput, DeployError, StepFailed, UnreachableError
from releasy_deploy.pipeline import Pipeline
from releasy_deploy.session import Session
from releasy_deploy.commands import app as appcmd
from releasy_deploy.commands import systemd
from releasy_deploy.executor import Executor
from releasy_deploy.inventory import parse_inventory
from releasy_deploy.output import Reporter
from releasy_deploy.facts import FileSha256, FileStat, LinkTarget, build_facts_script
from releasy_deploy.secrets import Secrets
from releasy_deploy.tiers.app_facts import ReleasyReady, ReleasyReleases, ReleasyUnit
from releasy_deploy.tiers.proxy_state import ProxyText

PORTS = (8080, 8081)
# A single-host inventory (files are not checked: nothing here touches them).
INV = parse_inventory({
    "environment": "test", "admin_cidrs": ["192.0.2.0/28"], "known_hosts": "known_hosts",
    "hosts": {"solo": {"address": "192.0.2.5"}},
    "tiers": {"proxy": ["solo"], "app": ["solo"], "db": ["solo"]},
    "database": {"kind": "sqlite"}, "release": {"source": "releases"},
    "tls": {"mode": "self-signed", "server_name": "releasy.test"}},
    "/nonexistent/hosts.yaml", check_files=False)
UPSTREAM = """# Managed by releasy-deploy
upstream releasy_app {
    server 127.0.0.1:%d max_fails=0;
    keepalive 32;
}
"""


# ------------------------------------------------------------------------------ names
def test_names_of_an_instance():
    assert bg.instance_unit(8081) == "releasy@8081.service"
    assert bg.instance_link(8081) == "/opt/releasy/instances/8081"
    assert bg.instance_env_file(8081) == "/etc/releasy/instance-8081.env"
    assert bg.instance_bind(8081) == "127.0.0.1:8081"
    for bad in (0, 70000, "8081", True, 80.5):
        with pytest.raises(ValueError):
            bg.instance_unit(bad)


def test_instance_env_sets_only_the_bind_address():
    text = bg.render_instance_env(9001)
    assigned = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert assigned == ['RELEASY_BIND_ADDR="127.0.0.1:9001"']


@pytest.mark.parametrize("target, version", [
    ("/opt/releasy/releases/1.1.0", "1.1.0"),
    ("releases/1.2.0-rc.1", "1.2.0-rc.1"),
    ("/opt/releasy/releases/1.1.0/", "1.1.0"),
    ("/tmp/elsewhere", None),
    ("/opt/releasy/releases/not a version", None),
    ("", None),
    (None, None),
])
def test_version_of_link(target, version):
    assert bg.version_of_link(target) == version


# ------------------------------------------------------------------------------ facts
def test_every_fact_has_a_probe_and_the_script_quotes_its_arguments():
    names = bg.fact_names(INV)
    assert ReleasyUnit("releasy@8081.service") in names
    assert bg.Listening(8080) in names
    assert ProxyText("/etc/nginx/releasy/upstream.conf") in names
    assert schema.SchemaLevel("sqlite", "/var/lib/releasy/releasy.db", "releasy") in names
    assert len(names) == len(set(names))
    script = build_facts_script(names, "n0nce")
    assert "ss -Hltn 'sport = :8081'" in script
    assert "readlink -- /opt/releasy/instances/8080" in script
    with pytest.raises(ValueError):
        bg.Listening("8080; reboot")


def show(active="inactive", enabled="disabled", pid=0, reload="no") -> dict[str, str]:
    return {"LoadState": "loaded", "ActiveState": active, "UnitFileState": enabled,
            "MainPID": str(pid), "NeedDaemonReload": reload}


def found(*, plain=None, units=None, links=None, sums=None, listening=None, ready=None,
          current="releases/1.0.0", upstream_port=8080, upstream=None, template=True,
          db_level=2, levels=None, backups=()):
    """A read_facts() result as the host would report it."""
    units = units or {}
    links = links or {}
    result = {
        ReleasyUnit("releasy.service"): plain or show(),
        ReleasyReleases(): appcmd.ReleaseState(current, {
            "1.0.0": ("a" * 64, True), "1.1.0": ("b" * 64, True)}),
        # upstream: None -> the default file for upstream_port; False -> no file at all
        ProxyText("/etc/nginx/releasy/upstream.conf"):
            UPSTREAM % upstream_port if upstream is None else (upstream or None),
        FileStat("/etc/systemd/system/releasy@.service"):
            {"type": "regular file"} if template else None,
        schema.SchemaLevel("sqlite", "/var/lib/releasy/releasy.db", "releasy"): db_level,
        schema.RecordedLevels(): levels or {},
        backups_mod.BackupListing(): list(backups),
    }
    for port in PORTS:
        result[ReleasyUnit(f"releasy@{port}.service")] = units.get(port) or show()
        result[LinkTarget(f"/opt/releasy/instances/{port}")] = links.get(port)
        result[FileSha256(f"/etc/releasy/instance-{port}.env")] = (sums or {}).get(port)
        result[bg.Listening(port)] = (listening or {}).get(port, False)
        result[ReleasyReady(f"http://127.0.0.1:{port}/ready")] = (ready or {}).get(port, False)
    return result


def state(**kw) -> bg.HostState:
    return bg.parse_state("solo", found(**kw), INV)


# The three shapes a host is found in.
HANDOVER = dict(plain=show("active", "enabled", 100), listening={8080: True},
                ready={8080: True}, levels={"1.0.0": 2})
ON_8081 = dict(units={8081: show("active", "enabled", 200)},
               links={8081: "/opt/releasy/releases/1.1.0"}, listening={8081: True},
               ready={8081: True}, current="releases/1.1.0", upstream_port=8081,
               db_level=3, levels={"1.0.0": 2, "1.1.0": 3})
ON_8080 = dict(units={8080: show("active", "enabled", 300)},
               links={8080: "/opt/releasy/releases/1.1.0", 8081: "/opt/releasy/releases/1.0.0"},
               listening={8080: True}, ready={8080: True}, current="releases/1.1.0",
               db_level=3, levels={"1.0.0": 2, "1.1.0": 3})


# ------------------------------------------------------------------------------ live
@pytest.mark.parametrize("shape, live", [
    (HANDOVER, bg.Live(8080, "releasy.service", "1.0.0", True)),
    (ON_8081, bg.Live(8081, "releasy@8081.service", "1.1.0", True)),
    (ON_8080, bg.Live(8080, "releasy@8080.service", "1.1.0", True)),
    # the proxy points at a port where nothing of ours runs: the site is down
    (dict(upstream_port=8081), bg.Live(8081, None, None, False)),
    # releasy.service runs but the proxy uses the other port: it is not live
    (dict(plain=show("active", "enabled"), upstream_port=8081),
     bg.Live(8081, None, None, False)),
])
def test_find_live(shape, live):
    assert bg.find_live(state(**shape)) == live


@pytest.mark.parametrize("shape, message", [
    (dict(template=False), "releasy@.service is not installed"),
    (dict(upstream=False), "the proxy is not set up"),
    (dict(upstream=UPSTREAM % 8080 + "upstream x {\n server 127.0.0.1:8081;\n}\n"),
     "lists 127.0.0.1:8080, 127.0.0.1:8081"),
    (dict(upstream=UPSTREAM.replace("127.0.0.1:%d", "10.0.0.21:%d") % 8080),
     "lists 10.0.0.21:8080"),
    (dict(upstream_port=9000), "lists 127.0.0.1:9000; a blue/green deploy needs exactly one"),
    (dict(upstream="upstream releasy_app {\n}\n"), "lists no server"),
])
def test_states_a_deploy_cannot_start_from(shape, message):
    with pytest.raises(bg.NotBlueGreenReady) as exc:
        bg.find_live(state(**shape))
    assert message in str(exc.value)
    assert str(exc.value).startswith("solo: ")


# ------------------------------------------------------------------------------ plan
def test_first_deploy_hands_over_from_releasy_service():
    plan = bg.plan_deploy(state(**HANDOVER), "1.1.0")
    assert (plan.start, plan.idle_port, plan.new_unit, plan.stop_first, plan.notes) == (
        True, 8081, "releasy@8081.service", (), ())
    assert plan.target_unit == "releasy@8081.service" and plan.target_port == 8081


def test_second_deploy_flips_back_to_the_first_port():
    plan = bg.plan_deploy(state(**ON_8081), "1.1.1")
    assert (plan.start, plan.idle_port, plan.new_unit) == (True, 8080, "releasy@8080.service")


def test_the_live_version_again_starts_nothing():
    plan = bg.plan_deploy(state(**ON_8081), "1.1.0")
    assert not plan.start
    assert (plan.target_unit, plan.target_port) == ("releasy@8081.service", 8081)


def test_a_leftover_instance_on_the_idle_port_is_stopped_first():
    shape = {**ON_8081, "units": {8081: show("active", "enabled"), 8080: show("activating")},
             "listening": {8080: True, 8081: True}}
    plan = bg.plan_deploy(state(**shape), "1.1.1")
    assert plan.stop_first == ("releasy@8080.service",)
    assert plan.notes == ("releasy@8080.service was left running on the idle port 8080 (not in"
                          " rotation; an interrupted deploy?): stopping it first",)


def test_releasy_service_started_again_by_app_setup_is_a_reported_conflict():
    shape = {**ON_8081, "plain": show("active", "enabled"),
             "listening": {8080: True, 8081: True}}
    plan = bg.plan_deploy(state(**shape), "1.1.1")
    assert plan.stop_first == ("releasy.service",)
    assert len(plan.notes) == 1 and plan.notes[0].startswith(
        "conflict: releasy.service is enabled and active while releasy@8081.service is live")
    # ...also when the new version is already live (nothing to start, still converged)
    plan = bg.plan_deploy(state(**shape), "1.1.0")
    assert not plan.start and plan.notes[0].startswith("conflict: releasy.service")


def test_a_foreign_process_on_the_idle_port_is_refused_before_anything_changes():
    shape = {**HANDOVER, "listening": {8080: True, 8081: True}}
    with pytest.raises(bg.NotBlueGreenReady, match="port 8081 .* is in use by a process that is"
                                                   " not a Releasy unit of ours"):
        bg.plan_deploy(state(**shape), "1.1.0")


def test_nothing_live_still_deploys_to_the_other_port():
    plan = bg.plan_deploy(state(upstream_port=8081), "1.1.0")
    assert plan.start and plan.idle_port == 8080 and plan.live.unit is None


def test_plan_refuses_a_malformed_version():
    with pytest.raises(ValueError):
        bg.plan_deploy(state(**HANDOVER), "1.1.0; reboot")


# ------------------------------------------------------------------------------ finish
def test_finish_after_the_hand_over():
    s = state(**HANDOVER)
    steps = bg.finish_commands(s, bg.plan_deploy(s, "1.1.0"))
    assert steps == [
        ("releasy@8081.service enabled (starts at boot)",
         ["systemctl", "enable", "releasy@8081.service"]),
        ("releasy.service disabled (no longer starts at boot)",
         ["systemctl", "disable", "releasy.service"]),
        ("releasy.service stopped (was live on 127.0.0.1:8080, 1.0.0)",
         ["systemctl", "stop", "releasy.service"]),
        ("current -> releases/1.1.0 (was 1.0.0)", appcmd.activate_argv("1.1.0")),
    ]


def test_finish_of_a_flip_stops_the_old_instance():
    s = state(**ON_8081)
    steps = bg.finish_commands(s, bg.plan_deploy(s, "1.1.1"))
    assert [argv for _, argv in steps] == [
        ["systemctl", "enable", "releasy@8080.service"],
        ["systemctl", "disable", "releasy@8081.service"],
        ["systemctl", "stop", "releasy@8081.service"],
        appcmd.activate_argv("1.1.1"),
    ]


def test_finish_is_empty_when_everything_is_in_place():
    s = state(**ON_8081)
    assert bg.finish_commands(s, bg.plan_deploy(s, "1.1.0")) == []


def test_finish_converges_a_conflict_when_the_version_is_already_live():
    shape = {**ON_8080, "plain": show("failed", "enabled"),
             "units": {8080: show("active", "enabled"), 8081: show("active", "enabled")},
             "listening": {8080: True, 8081: True}, "current": "releases/1.0.0"}
    s = state(**shape)
    steps = bg.finish_commands(s, bg.plan_deploy(s, "1.1.0"))
    assert steps == [
        ("releasy.service disabled (no longer starts at boot)",
         ["systemctl", "disable", "releasy.service"]),
        ("releasy.service failed state cleared (not in rotation)",
         ["systemctl", "reset-failed", "releasy.service"]),
        ("releasy@8081.service disabled (no longer starts at boot)",
         ["systemctl", "disable", "releasy@8081.service"]),
        ("releasy@8081.service stopped (was active, not in rotation)",
         ["systemctl", "stop", "releasy@8081.service"]),
        ("current -> releases/1.1.0 (was 1.0.0)", appcmd.activate_argv("1.1.0")),
    ]


def test_units_stopped_before_the_start_are_not_stopped_twice():
    shape = {**ON_8081, "plain": show("active", "enabled"),
             "listening": {8080: True, 8081: True}}
    s = state(**shape)
    steps = bg.finish_commands(s, bg.plan_deploy(s, "1.1.1"))
    assert ["systemctl", "stop", "releasy.service"] not in [argv for _, argv in steps]
    assert ["systemctl", "disable", "releasy.service"] in [argv for _, argv in steps]


def test_finish_records_the_migration_level_of_each_release_quietly():
    s = state(**{**HANDOVER, "levels": {}})
    plan = bg.plan_deploy(s, "1.1.0")
    steps = bg.finish_commands(s, plan, level_now=3)
    # the new release at the level after its start, the old one at the level before
    assert steps[-1] == ("", schema.record_script_argv({"1.1.0": 3, "1.0.0": 2}))
    # already recorded: only the new one; already live and recorded: nothing
    s = state(**HANDOVER)
    assert bg.finish_commands(s, plan, level_now=3)[-1] == (
        "", schema.record_script_argv({"1.1.0": 3}))
    s = state(**ON_8081)
    assert bg.finish_commands(s, bg.plan_deploy(s, "1.1.0"), level_now=3) == []


@pytest.mark.parametrize("shape, version, refused", [
    # 1.0.0 ran at level 2 (recorded); the database is at 3: refused
    (ON_8081, "1.0.0", "1.0.0 ran against migration level 2 (/opt/releasy/releases/1.0.0/"
                       ".schema-version), but the database is at level 3"),
    # same level, or a newer release: fine
    (ON_8081, "1.1.1", None),
    ({**ON_8081, "levels": {"1.1.0": 3, "1.1.1": 3}}, "1.1.1", None),
    # nothing known about it: upstream's binary decides (and the deploy fails safely)
    ({**ON_8081, "levels": {}}, "1.0.0", None),
])
def test_a_release_older_than_the_database_is_refused(shape, version, refused):
    said = bg.schema_refusal(state(**shape), version)
    if refused is None:
        assert said is None
    else:
        assert refused in said and "fab deploy.rollback --to 1.0.0 --restore-db" in said


def test_a_dump_taken_when_leaving_a_release_tells_its_level_too():
    from datetime import datetime, timezone

    dump = backups_mod.Backup("x", "test", datetime(2026, 1, 1, tzinfo=timezone.utc), "1.0.0",
                              "1.1.0", 2, "sqlite")
    said = bg.schema_refusal(state(**{**ON_8081, "levels": {}, "backups": [dump]}), "1.0.0")
    assert "1.0.0 ran against migration level 2 (the dump x)" in said


def test_finish_script_renders_each_argv_with_shlex():
    script = bg.finish_script([("x", ["systemctl", "stop", "releasy@8081.service"]),
                               ("y", appcmd.activate_argv("1.1.0"))])
    assert script.startswith("set -e\nsystemctl stop releasy@8081.service\n")
    # every word survives quoting, including the multi-line script of activate_argv
    assert shlex.split(script.removeprefix("set -e\n")) == [
        "systemctl", "stop", "releasy@8081.service", *appcmd.activate_argv("1.1.0")]


# ------------------------------------------------------------------------------ scripts, for real
@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A fake host: /opt/releasy and /etc/releasy under tmp_path, and a `systemctl` on PATH
    that logs each call and answers is-active with the content of tmp_path/unit-state."""
    root = tmp_path / "root"
    for d in ("opt/releasy/releases/1.1.0", "opt/releasy/instances", "etc/releasy"):
        (root / d).mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(f"""#!/bin/sh
printf '%s\\n' "$*" >> {shlex.quote(str(tmp_path / 'systemctl.log'))}
if [ "$1" = is-active ]; then cat {shlex.quote(str(tmp_path / 'unit-state'))}; fi
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "unit-state").write_text("active\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def run_local(script: str, tree: Path) -> subprocess.CompletedProcess:
    script = (script.replace("/opt/releasy", str(tree / "root/opt/releasy"))
              .replace("/etc/releasy", str(tree / "root/etc/releasy")))
    return subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True, timeout=30)


def calls(tree: Path) -> list[str]:
    log = tree / "systemctl.log"
    return log.read_text().splitlines() if log.exists() else []


def test_start_script_links_the_release_writes_the_env_file_then_starts(tree):
    shape = {**ON_8081, "plain": show("active", "enabled"),
             "listening": {8080: True, 8081: True}}
    s = state(**shape)
    plan = bg.plan_deploy(s, "1.1.1")
    proc = run_local(bg.start_script(s, plan), tree)
    assert proc.returncode == 0, proc.stderr
    link = tree / "root/opt/releasy/instances/8080"
    assert os.readlink(link) == str(tree / "root/opt/releasy/releases/1.1.1")
    env = tree / "root/etc/releasy/instance-8080.env"
    assert env.read_text().splitlines()[-1] == 'RELEASY_BIND_ADDR="127.0.0.1:8080"'
    assert oct(env.stat().st_mode & 0o777) == "0o644"
    assert calls(tree) == ["stop releasy.service", "reset-failed releasy@8080.service",
                           "start releasy@8080.service"]
    assert [p.name for p in (tree / "root/opt/releasy/instances").iterdir()] == ["8080"]


def test_start_script_keeps_an_env_file_that_is_already_right_and_reloads_when_told(tree):
    text = bg.render_instance_env(8081)
    env = tree / "root/etc/releasy/instance-8081.env"
    env.write_text(text)
    before = env.stat().st_ino
    shape = {**HANDOVER, "sums": {8081: hashlib.sha256(text.encode()).hexdigest()},
             "units": {8081: show(reload="yes")}}
    s = state(**shape)
    proc = run_local(bg.start_script(s, bg.plan_deploy(s, "1.1.0")), tree)
    assert proc.returncode == 0, proc.stderr
    assert env.stat().st_ino == before  # not rewritten
    assert calls(tree) == ["daemon-reload", "reset-failed releasy@8081.service",
                           "start releasy@8081.service"]


def test_start_script_stops_at_the_first_failure(tree):
    s = state(**HANDOVER)
    script = bg.start_script(s, bg.plan_deploy(s, "1.1.0"))
    (tree / "root/opt/releasy/instances").rmdir()  # the link cannot be created
    proc = run_local(script, tree)
    assert proc.returncode != 0
    assert "start releasy@8081.service" not in calls(tree)


def test_cleanup_script_stops_the_idle_instance_and_removes_its_link(tree):
    link = tree / "root/opt/releasy/instances/8081"
    link.symlink_to(tree / "root/opt/releasy/releases/1.1.0")
    proc = run_local(bg.cleanup_script(8081), tree)
    assert proc.returncode == 0, proc.stderr
    assert not link.is_symlink()
    assert calls(tree) == ["stop releasy@8081.service", "reset-failed releasy@8081.service"]


class _Ready:
    """A local /ready answering the statuses of ``script`` in turn (then its last one)."""

    def __init__(self, script: list[int]) -> None:
        outer = self
        self.script = list(script)
        self.seen = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                status = outer.script[min(outer.seen, len(outer.script) - 1)]
                outer.seen += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.bind = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("statuses, unit_state, code, said", [
    ([200], "active", 0, "warm: 3 answers in a row"),
    ([200, 503, 200, 200, 200], "active", 0, "warm: 3 answers in a row"),
    ([200, 503], "active", 3, "only 0 /ready answers in a row within 1 s"),
    ([200, 503, 200, 503], "active", 3, "/ready answers in a row within 1 s"),
    ([200], "failed", 4, "releasy@8081.service is failed"),
    ([200], "activating", 3, "(releasy@8081.service is activating)"),
])
def test_warmup_script_wants_answers_in_a_row_from_an_active_unit(tree, statuses, unit_state,
                                                                  code, said):
    (tree / "unit-state").write_text(unit_state + "\n")
    server = _Ready(statuses)
    try:
        argv = bg.warmup_argv(server.bind, "releasy@8081.service", successes=3, interval=0.05,
                              timeout=1)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    finally:
        server.close()
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert said in proc.stdout


def test_warmup_argv_validates():
    argv = bg.warmup_argv("127.0.0.1:8081", "releasy@8081.service", timeout=60)
    assert argv[3:] == ["releasy-warmup", "http://127.0.0.1:8081/ready", "releasy@8081.service",
                        "3", "0.3", "60"]
    for kw in ({"timeout": 0}, {"timeout": 5, "successes": 0}, {"timeout": 5, "interval": 0}):
        with pytest.raises(ValueError):
            bg.warmup_argv("127.0.0.1:8081", "releasy@8081.service", **kw)
    with pytest.raises(ValueError):
        bg.warmup_argv("127.0.0.1:8081", "releasy@8081.service; reboot", timeout=5)
    assert systemd.check_unit(bg.instance_unit(8081))


# ------------------------------------------------------------------------------ run()
def session_for(tmp: Path, *, single: bool) -> Session:
    (tmp / "known_hosts").write_text("# test\n")
    (tmp / "releases").mkdir(exist_ok=True)
    if single:
        hosts = {"solo": {"address": "192.0.2.5"}}
        tiers = {"proxy": ["solo"], "app": ["solo"], "db": ["solo"]}
        database = {"kind": "sqlite"}
    else:
        hosts = {"proxy1": {"address": "192.0.2.10"}, "app1": {"address": "192.0.2.21"},
                 "db1": {"address": "192.0.2.30"}}
        tiers = {"proxy": ["proxy1"], "app": ["app1"], "db": ["db1"]}
        database = {"kind": "postgres"}
    inv = parse_inventory({
        "environment": "test", "admin_cidrs": ["192.0.2.0/28"], "known_hosts": "known_hosts",
        "hosts": hosts, "tiers": tiers, "database": database, "release": {"source": "releases"},
        "tls": {"mode": "self-signed", "server_name": "releasy.test"}}, tmp / "hosts.yaml")
    reporter = Reporter()
    return Session(inv, Secrets(), Executor(inv, reporter=reporter), reporter)


def test_split_topology_is_refused_before_any_connection(tmp_path):
    s = session_for(tmp_path, single=False)
    with pytest.raises(BadInput, match="use `fab deploy.rolling --version 1.1.0` there"):
        bg.run(s, "1.1.0")
    assert s.executor.round_trips == {} and s.executor.connections_opened == {}


@pytest.mark.parametrize("version, message", [
    ("1.1.0", "release 1.1.0 not found"),
    ("1.1.0; reboot", "invalid release version"),
])
def test_a_missing_or_bad_artifact_is_refused_before_any_connection(tmp_path, version, message):
    s = session_for(tmp_path, single=True)
    with pytest.raises(BadInput, match=message):
        bg.run(s, version)
    assert s.executor.round_trips == {} and s.executor.connections_opened == {}


# ------------------------------------------------------------------------------ the plan
def deploy_plan(shape, version="1.1.0", *, restart=False):
    st = state(**shape)
    plan = bg.plan_deploy(st, version, restart=restart)
    return st, plan, bg.plan_bluegreen(st, plan, stage=not restart, backup=not restart,
                                        proxies=["solo"])


def test_the_plan_of_a_deploy_is_stage_backup_start_switch_finish():
    _st, _plan, steps = deploy_plan(HANDOVER)
    assert steps.flow == "deploy.bluegreen"
    assert steps.kinds == ("stage", "backup", "start", "switch", "finish")
    assert [s.stage for s in steps.steps] == list(bg.STAGES[1:6])
    assert {s.hosts for s in steps.steps} == {("solo",)}
    assert [(s.undo, s.final) for s in steps.steps] == [
        (None, False), (None, False), ("stop_idle", False), ("check_switch", True),
        (None, False)]
    assert steps.describe() == [
        "1. stage: upload and unpack 1.1.0 on solo",
        "2. backup: dump the database (migration level 2) on solo",
        "3. start: releasy@8081.service with 1.1.0: migrations, /ready, warm-up on solo"
        " (undone by: stop releasy@8081.service (never in rotation), remove its link)",
        "4. switch: proxy -> 127.0.0.1:8081, drain 127.0.0.1:8080 on solo (undone by: stop"
        " releasy@8081.service if no proxy uses 127.0.0.1:8081 yet; once one does, it stays"
        " live (a re-run converges))",
        "5. finish: stop releasy.service, enable releasy@8081.service, current -> 1.1.0 on solo",
    ]


def test_the_plan_of_a_restart_stages_and_dumps_nothing():
    _st, plan, steps = deploy_plan(ON_8081, restart=True)
    assert plan.start and plan.new_unit == "releasy@8080.service"
    assert steps.kinds == ("start", "switch", "finish")
    assert steps.step("switch").what == "proxy -> 127.0.0.1:8080, drain 127.0.0.1:8081"


def test_the_plan_of_the_live_version_is_one_converging_finish():
    _st, plan, steps = deploy_plan(ON_8081)
    assert not plan.start
    assert steps.kinds == ("converge",)
    assert steps.describe() == ["1. finish: 1.1.0 is already live on solo"]
    assert plan_undo(steps, "converge") == ()


@pytest.mark.parametrize("kind, undo", [
    ("stage", []), ("backup", []), ("start", ["stop_idle"]),
    ("switch", ["check_switch", "stop_idle"]),
    ("finish", []),  # the switch finished: the point of no return
])
def test_what_the_plan_puts_back_after_a_failure_at_each_step(kind, undo):
    _st, _plan, steps = deploy_plan(HANDOVER)
    assert [s.kind for s in plan_undo(steps, kind)] == undo


# ------------------------------------------------------------------------------ failures
DUMP = backups_mod.Backup("pre-deploy-test-1.0.0-to-1.1.0.dump", "test",
                          datetime(2026, 12, 1, 12, 0), "1.0.0",
                          "1.1.0", 2, "sqlite")


def run_failing(tmp_path, fail_at, shape=HANDOVER, *, exc=None, switched=False,
                cleaned=True, level=None, version="1.1.0"):
    """The deploy's plan run by the sequence runner with recording actions (the real
    ones talk SSH) and the flow's own failure hook; returns (actions run, error raised,
    audit records, the failed stages)."""
    s = session_for(tmp_path, single=True)
    st, plan, steps = deploy_plan(shape, version)
    records: list[tuple[str, dict]] = []
    flow = bg.Flow(s, s.executor.conn("solo"), st, plan,
                   record=lambda result, **f: records.append((result, f)))
    results = {"backup": DUMP, "stop_idle": bg.Cleanup(cleaned, level),
               "check_switch": "no proxy uses it" if switched is False
               else Kept("live", found=switched)}
    log: list[str] = []

    def act(step: Step):
        log.append(step.kind)
        if step.kind == fail_at:
            raise exc if exc is not None else DeployError(f"solo: {step.kind} broke")
        return results.get(step.kind)

    pipe = Pipeline(bg.PIPELINE, Reporter(io.StringIO()))
    kinds = {*steps.kinds, "stop_idle", "check_switch"} & set(flow.actions())
    with pytest.raises(BaseException) as raised:
        run_sequence(steps, {k: act for k in kinds}, pipe=pipe, lock=None,
                     on_failure=flow.on_failure)
    failed = [t.stage for t in pipe.timings if not t.ok]
    return log, raised.value, records, failed


KEPT = ("the proxy still sends every request to releasy.service on 127.0.0.1:8080 (1.0.0),"
        " untouched")


@pytest.mark.parametrize("kind", ["stage", "backup"])
def test_a_failure_before_anything_started_undoes_nothing(tmp_path, kind):
    log, exc, records, failed = run_failing(tmp_path, kind)
    assert log[-1] == kind  # nothing ran after it
    assert isinstance(exc, StepFailed) and exc.cause.args == (f"solo: {kind} broke",)
    assert str(exc).startswith(
        f"solo: deploy.bluegreen of 1.1.0 failed in stage '{kind}', before the switch:"
        f" {KEPT}; nothing was started.\n  Cause: {kind} broke\n")
    assert str(exc).endswith("Fix the cause, then deploy again (the same or another version).")
    assert records == [(f"failed in {kind}, before the switch", dict(
        changed=False, backup=None,
        live_unit="releasy.service", live_port=8080, schema_level=None))]
    assert failed == [kind]


@pytest.mark.parametrize("cleaned, said", [
    (True, "releasy@8081.service was stopped and its link removed"),
    (None, "releasy@8081.service may still be running (not in rotation); a re-run stops it"),
    (False, "stopping releasy@8081.service failed too (it is not in rotation); a re-run"
            " stops it"),
])
def test_a_failed_start_stops_the_idle_instance(tmp_path, cleaned, said):
    log, exc, records, failed = run_failing(tmp_path, "start", cleaned=cleaned)
    assert log == ["stage", "backup", "start", "stop_idle"]
    assert (f"failed in stage 'start', before the switch: {KEPT}; {said}.\n  Cause: start"
            f" broke") in str(exc)
    assert records[0][0] == "failed in start, before the switch"
    assert records[0][1]["changed"] is True and records[0][1]["backup"] == DUMP
    assert failed == ["start"]


def test_a_failed_start_that_migrated_says_how_to_restore_the_dump(tmp_path):
    _log, exc, records, _ = run_failing(tmp_path, "start", level=3)
    assert ("The database is now at migration level 3 (was 2): 1.0.0 keeps serving, but"
            " would refuse to start again (sqlx VersionMissing): `fab deploy.rollback --to"
            " 1.0.0 --restore-db --backup pre-deploy-test-1.0.0-to-1.1.0.dump` restores"
            " the dump taken before this deploy") in str(exc)
    assert records[0][1]["schema_level"] == 3


def test_a_switch_that_did_not_happen_stops_the_idle_instance(tmp_path):
    log, exc, records, _ = run_failing(tmp_path, "switch", switched=False)
    assert log == ["stage", "backup", "start", "switch", "check_switch", "stop_idle"]
    assert (f"failed in stage 'switch', before the switch: {KEPT}; releasy@8081.service was"
            f" stopped and its link removed.") in str(exc)
    assert records[0][0] == "failed in switch, before the switch"


@pytest.mark.parametrize("switched, now, result, live_unit", [
    (True, "is live", "failed in switch", "releasy@8081.service"),
    (None, "is running and may be live", "failed in switch (switch state unknown)", None),
])
def test_a_switch_that_happened_or_may_have_is_kept(tmp_path, switched, now, result,
                                                    live_unit):
    log, exc, records, failed = run_failing(tmp_path, "switch", switched=switched)
    assert log == ["stage", "backup", "start", "switch", "check_switch"]  # no stop_idle
    assert str(exc) == (
        f"solo: deploy.bluegreen of 1.1.0 failed in stage 'switch': releasy@8081.service on"
        f" 127.0.0.1:8081 {now}; nothing was rolled back.\n  Cause: solo: switch broke\n"
        f"  Re-run `fab deploy.bluegreen --version 1.1.0`: it converges.")
    assert records == [(result, dict(changed=True, backup=DUMP, live_unit=live_unit))]
    assert failed == ["switch"]


def test_a_failed_finish_undoes_nothing_the_new_release_is_live(tmp_path):
    log, exc, records, _ = run_failing(tmp_path, "finish")
    assert log == ["stage", "backup", "start", "switch", "finish"]
    assert str(exc) == (
        "solo: 1.1.0 is live (releasy@8081.service on 127.0.0.1:8081), but stage 'finish'"
        " failed: solo: finish broke\n  Re-run `fab deploy.bluegreen --version 1.1.0`: it"
        " converges.")
    assert records[0][0] == "switched, then finish failed"


def test_a_failed_convergence_of_the_live_version_is_raised_as_it_is(tmp_path):
    log, exc, records, _ = run_failing(tmp_path, "converge", ON_8081)
    assert log == ["converge"] and records == []
    assert type(exc) is DeployError and str(exc) == "solo: converge broke"


def test_bad_input_keeps_its_exit_code_and_ctrl_c_stays_an_interrupt(tmp_path):
    _log, exc, records, _ = run_failing(tmp_path, "stage", exc=BadInput("bad artifact"))
    assert type(exc) is BadInput and exit_code_for(exc) == 2
    assert records[0][0] == "failed in stage, before the switch"
    log, exc, _records, _ = run_failing(tmp_path, "start", exc=KeyboardInterrupt())
    assert type(exc) is KeyboardInterrupt and log[-1] == "stop_idle"  # still put back


def test_a_dropped_connection_exits_as_unreachable(tmp_path):
    _log, exc, _records, _ = run_failing(tmp_path, "start",
                                         exc=UnreachableError("solo: connection dropped"))
    assert isinstance(exc, StepFailed) and exit_code_for(exc) == 4


@pytest.mark.parametrize("shape, restart", [(HANDOVER, False), (ON_8081, True), (ON_8081, False)])
def test_the_flow_has_an_action_for_every_step_and_undo_it_plans(tmp_path, shape, restart):
    s = session_for(tmp_path, single=True)
    st, plan, steps = deploy_plan(shape, restart=restart)
    wanted = {*steps.kinds, *(step.undo for step in steps.steps if step.undo)}
    assert wanted <= set(bg.Flow(s, s.executor.conn("solo"), st, plan).actions())
