"""Rollouts, backups and migration bookkeeping: the pure decisions, table-driven, and the
remote shell snippets run for real with the local `sh` (paths passed as arguments point at
temp directories; a fake `runuser` on PATH records the argv psql would get)."""
from __future__ import annotations

import os
import pwd
import shlex
import shutil
import sqlite3
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType

import pytest

from releasy_deploy import backups, rollout, schema
from releasy_deploy.engine import plan, runner, steps
from releasy_deploy.backups import Backup
from releasy_deploy.commands import backup as backupcmd
from releasy_deploy.errors import BadInput
from releasy_deploy.inventory import ReleaseSource
from releasy_deploy.engine.plan import AppState
from releasy_deploy.engine.recovery import FailureReport, explain_failure
from releasy_deploy.releases import available_versions, newest_release
from releasy_deploy.rollout.preflight import parse_instance_links, preflight_problems
from releasy_deploy.rollout.verdict import default_target, previous_release, rollback_verdict

from inventories import build

T0 = datetime(2026, 11, 26, 8, 0, 0, tzinfo=timezone.utc)


def state(name, current="1.0.0", *, ready=True, in_rotation=True, active="active", **kw):
    return AppState(name=name, current=current, ready=ready, in_rotation=in_rotation,
                    active=active, **kw)


# ====================================================================== batch planning
@pytest.mark.parametrize("todo,batch,hosts,first,batches", [
    (["a1", "a2", "a3"], 1, 3, "a1", [["a2"], ["a3"]]),
    (["a1", "a2", "a3", "a4", "a5"], 2, 5, "a1", [["a2", "a3"], ["a4", "a5"]]),
    (["a1", "a2", "a3", "a4"], 3, 4, "a1", [["a2", "a3", "a4"]]),
    (["a1", "a2"], 5, 2, "a1", [["a2"]]),  # clamped to hosts - 1
    (["a2", "a3"], 1, 3, None, [["a2"], ["a3"]]),  # migrations already done by a1
    ([], 1, 3, None, []),
])
def test_plan_batches(todo, batch, hosts, first, batches):
    assert plan.plan_batches(todo, batch, hosts, migrate_first=first is not None) == (
        first, batches)


@pytest.mark.parametrize("hosts", range(2, 9))
@pytest.mark.parametrize("batch", range(1, 10))
def test_a_batch_never_takes_every_host_out(hosts, batch):
    names = [f"app{i}" for i in range(hosts)]
    first, batches = plan.plan_batches(names, batch, hosts, migrate_first=True)
    assert first == "app0"
    assert all(1 <= len(b) <= hosts - 1 for b in batches)
    assert [first, *[n for b in batches for n in b]] == names  # each host once, in order


def test_plan_batches_refuses_nonsense():
    with pytest.raises(ValueError, match="batch"):
        plan.plan_batches(["a"], 0, 2, migrate_first=True)
    with pytest.raises(ValueError, match="two app hosts"):
        plan.plan_batches(["a"], 1, 1, migrate_first=True)


# ====================================================================== skip / converge logic
def test_hosts_to_roll_skips_hosts_already_on_v_and_puts_out_of_rotation_hosts_first():
    states = [state("app1", "1.1.0"), state("app2", "1.0.0"),
              state("app3", "1.1.0", ready=False, in_rotation=False),
              state("app4", "1.0.0", in_rotation=False)]
    assert plan.hosts_to_roll(states, "1.1.0") == ["app3", "app4", "app2"]
    assert plan.hosts_to_roll(states[:1], "1.1.0") == []


@pytest.mark.parametrize("st,fragment", [
    (state("app1", None), "no release is installed"),
    (state("app1", ready=False, active="failed"), "in rotation but not answering /ready"),
    (state("app1", "0.9.0", ready=False, in_rotation=False, active="inactive"),
     "out of rotation and not answering /ready"),
])
def test_preflight_problems_name_the_host_and_what_to_do(st, fragment):
    (problem,) = preflight_problems([st, state("app2")], "1.1.0")
    assert problem.startswith("app1: ") and fragment in problem


@pytest.mark.parametrize("st", [
    state("app1"),  # in rotation and ready
    state("app1", in_rotation=False),  # left out by a killed rollout, ready: put back
    state("app1", "1.1.0", ready=False, in_rotation=False),  # cut while starting V: re-rolled
])
def test_preflight_accepts_what_a_rerun_converges(st):
    assert preflight_problems([st], "1.1.0") == []


# ====================================================================== releases
@pytest.mark.parametrize("installed,keep,protect,pruned", [
    (["1.0.0", "1.1.0", "1.2.0"], 5, ["1.2.0", "1.1.0"], []),
    ([f"1.{i}.0" for i in range(8)], 5, ["1.7.0", "1.6.0"], ["1.0.0", "1.1.0", "1.2.0"]),
    # the previous release is old: kept anyway, and counts towards keep
    ([f"1.{i}.0" for i in range(8)], 5, ["1.7.0", "1.0.0"], ["1.1.0", "1.2.0", "1.3.0"]),
    # protected ones beyond keep: nothing else is kept
    (["1.0.0", "1.1.0", "1.2.0", "1.3.0"], 2, ["1.3.0", "1.0.0", "1.1.0"], ["1.2.0"]),
    # version order, not text order: 1.10.0 is newer than 1.9.0, 1.10.0-rc.1 in between
    (["1.9.0", "1.10.0", "1.10.0-rc.1", "1.2.0"], 2, ["1.10.0"], ["1.2.0", "1.9.0"]),
    (["1.0.0"], 5, [None, "1.0.0"], []),
])
def test_releases_to_prune(installed, keep, protect, pruned):
    assert runner.releases_to_prune(installed, keep, protect) == pruned


@pytest.mark.parametrize("installed,current,previous", [
    (["1.0.0", "1.1.0", "1.1.1"], "1.1.1", "1.1.0"),
    (["1.0.0", "1.1.0", "1.1.1"], "1.1.0", "1.0.0"),
    (["1.0.0", "1.1.0"], "1.0.0", None),
    (["1.2.0-rc.1", "1.1.0", "1.2.0"], "1.2.0", "1.2.0-rc.1"),
    ([], None, None),
])
def test_previous_release(installed, current, previous):
    assert previous_release(installed, current) == previous


def test_disk_needed_counts_tarball_unpacked_and_margin():
    assert runner.disk_needed(10, 30) == 40 + steps.DISK_MARGIN_BYTES


def test_instance_links_name_the_releases_blue_green_uses():
    out = "/opt/releasy/releases/1.1.0\nreleases/1.2.0-rc.1/\n/elsewhere\nreleases/../x\n"
    assert parse_instance_links(out) == {"1.1.0", "1.2.0-rc.1"}


# ====================================================================== version probe
@pytest.mark.parametrize("stdout,parsed", [
    ('{"version":"1.1.0","host":"app1"}\n\n@status 200\n', (200, "1.1.0")),
    ('{"error":"not found"}\n@status 404\n', (404, None)),
    ("\n@status 000\n", (0, None)),
    ("<html>oops</html>\n@status 200\n", (200, None)),
    ("garbage", (None, None)),
])
def test_parse_version_probe(stdout, parsed):
    assert runner.parse_version_probe(stdout) == parsed


def test_version_probe_argv_is_a_list_with_the_url_last():
    argv = runner.version_probe_argv("[2001:db8::21]:8080")
    assert argv[0] == "curl" and argv[-1] == "http://[2001:db8::21]:8080/version"


# ====================================================================== newest release
def _source(tmp: Path, *, url: bool = False, sha256=None, sha256_file=None) -> ReleaseSource:
    return ReleaseSource(
        source="https://example.com/v{version}/r.tar.gz" if url else str(tmp),
        is_url=url, directory=None if url else tmp, arch="x86_64",
        sha256=MappingProxyType(sha256 or {}), sha256_file=sha256_file)


def test_newest_release_of_a_directory_ignores_unpinned_prereleases_and_other_arches(tmp_path):
    for v in ("1.0.0", "1.9.0", "1.10.0", "1.11.0-rc.1"):
        name = f"releasy-server-{v}-linux-x86_64.tar.gz"
        (tmp_path / name).write_bytes(b"x")
        (tmp_path / f"{name}.sha256").write_text(f"{'a' * 64}  {name}\n")
    (tmp_path / "releasy-server-2.0.0-linux-x86_64.tar.gz").write_bytes(b"no sum pinned")
    (tmp_path / "releasy-server-3.0.0-linux-arm64.tar.gz").write_bytes(b"other arch")
    source = _source(tmp_path)
    assert available_versions(source) == ["1.0.0", "1.9.0", "1.10.0", "1.11.0-rc.1"]
    assert newest_release(source) == "1.10.0"
    assert newest_release(source, prereleases=True) == "1.11.0-rc.1"


def test_newest_release_of_a_url_source_is_the_newest_pinned(tmp_path):
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'b' * 64}  releasy-server-1.4.0-linux-x86_64.tar.gz\n"
                    f"{'c' * 64} *releasy-server-9.0.0-linux-arm64.tar.gz\n")
    source = _source(tmp_path, url=True, sha256={"1.2.0": "d" * 64, "1.3.0-rc.1": "e" * 64},
                     sha256_file=sums)
    assert newest_release(source) == "1.4.0"
    assert newest_release(_source(tmp_path, url=True)) is None


# ====================================================================== backups: names
@pytest.mark.parametrize("from_v,to_v,level", [
    ("1.0.0", "1.1.0", 2), (None, "1.0.0", 0), ("1.2.0-rc.1", "1.2.0+build.7", 14),
    ("1.0.0-to-x", "1.0.1", 3),  # "-to-" inside a version cannot confuse the parser
])
def test_backup_names_round_trip(from_v, to_v, level):
    name = backups.backup_name("prod-eu", T0, from_v, to_v, level, "postgres")
    assert "/" not in name and " " not in name
    b = backups.parse_backup_name(name, 123)
    assert (b.environment, b.taken_at, b.from_version, b.to_version, b.level, b.kind,
            b.size) == ("prod-eu", T0, from_v, to_v, level, "postgres", 123)
    assert b.path == f"/var/backups/releasy/{name}"


def test_backup_name_format_and_sqlite_extension():
    assert backups.backup_name("lab", T0, "1.0.0", "1.1.0", 2, "postgres") == (
        "lab_20261126T080000Z_from-1.0.0_to-1.1.0_m2.dump")
    name = backups.backup_name("lab", T0, None, "1.0.0", 0, "sqlite")
    assert name == "lab_20261126T080000Z_from-none_to-1.0.0_m0.sqlite3"
    assert backups.parse_backup_name(name).kind == "sqlite"


@pytest.mark.parametrize("name", [
    "lab_20261126T080000Z_from-1.0.0_to-1.1.0_m2.dump.partial",
    ".lab_20261126T080000Z_from-1.0.0_to-1.1.0_m2.dump.partial",
    "lab_20261126T080000Z_from-1.0.0_to-../etc_m2.dump", "notes.txt",
    "lab_20261126T0800Z_from-1.0.0_to-1.1.0_m2.dump", "Lab_20261126T080000Z_from-1.0.0_to-1.1.0_m2.dump",
])
def test_other_files_are_not_backups(name):
    assert backups.parse_backup_name(name) is None


@pytest.mark.parametrize("bad", [
    dict(level=-1), dict(level=True), dict(to_version="1.0"), dict(from_version="x; rm -rf /"),
    dict(kind="mysql"), dict(environment="Prod"),
])
def test_backup_name_refuses_bad_values(bad):
    args = dict(environment="lab", taken_at=T0, from_version="1.0.0", to_version="1.1.0",
                level=2, kind="postgres") | bad
    with pytest.raises(ValueError):
        backups.backup_name(**args)


def dumps(*specs, env="lab", kind="postgres"):
    """(minutes after T0, from, to, level) -> Backups."""
    return [backups.parse_backup_name(backups.backup_name(
        env, T0 + timedelta(minutes=m), f, t, lv, kind)) for m, f, t, lv in specs]


def test_parse_listing_sorts_by_time_and_skips_foreign_files():
    a, b = dumps((5, "1.1.0", "1.2.0", 3), (1, "1.0.0", "1.1.0", 2))
    out = f"{a.name} 900\nREADME 10\n{b.name} 800\n.{a.name}.partial 5\n"
    listed = backups.parse_listing(out)
    assert [x.name for x in listed] == [b.name, a.name] and listed[0].size == 800


def test_backups_to_prune_keeps_the_newest_of_this_environment_and_protected_ones():
    mine = dumps(*[(m, "1.0.0", "1.1.0", 2) for m in range(7)])
    other = dumps((0, "1.0.0", "1.1.0", 2), env="staging")
    pruned = backups.backups_to_prune([*reversed(mine), *other], 5, "lab")
    assert pruned == mine[:2]
    assert backups.backups_to_prune(mine, 5, "lab", protect=[mine[0].name]) == [mine[1]]
    assert backups.backups_to_prune(mine, 10, "lab") == []
    with pytest.raises(ValueError):
        backups.backups_to_prune(mine, 0, "lab")


def test_choose_restore_point_is_the_newest_dump_the_target_can_start_on():
    m2_old, m2, m3, m4 = dumps((0, None, "1.0.0", 2), (10, "1.0.0", "1.1.0", 2),
                               (20, "1.1.0", "1.2.0", 3), (30, "1.2.0", "1.3.0", 4))
    all_dumps = [m3, m2_old, m4, m2]
    assert backups.choose_restore_point(all_dumps, 2, "lab", "postgres") == m2
    assert backups.choose_restore_point(all_dumps, 3, "lab", "postgres") == m3
    assert backups.choose_restore_point(all_dumps, 1, "lab", "postgres") is None
    assert backups.choose_restore_point(all_dumps, 9, "lab", "sqlite") is None


def test_dump_and_restore_argv_are_lists_and_refuse_foreign_names():
    name = backups.backup_name("lab", T0, "1.0.0", "1.1.0", 2, "postgres")
    argv = backupcmd.dump_argv("postgres", "my db", name, [name])
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["releasy-backup", "/var/backups/releasy",
                                                      name, "my db", name]
    assert backupcmd.restore_argv("sqlite", "/var/lib/releasy/releasy.db", name,
                                user="releasy")[3:] == [
        "releasy-restore", f"/var/backups/releasy/{name}", "/var/lib/releasy/releasy.db",
        "releasy"]
    with pytest.raises(ValueError, match="service account"):
        backupcmd.restore_argv("sqlite", "/var/lib/releasy/releasy.db", name)
    for bad in ("../../etc/shadow", "x.dump", f"{name}; reboot"):
        with pytest.raises(ValueError, match="not a backup name"):
            backupcmd.restore_argv("postgres", "releasy", bad)
        with pytest.raises(ValueError, match="not a backup name"):
            backupcmd.dump_argv("postgres", "releasy", name, [bad])


needs_sqlite3 = pytest.mark.skipif(shutil.which("sqlite3") is None or os.geteuid() != 0,
                                   reason="needs the sqlite3 CLI and root (chown)")


@needs_sqlite3
def test_sqlite_dump_prune_and_restore_scripts_for_real(tmp_path):
    nobody = pwd.getpwnam("nobody")
    data = Path(tempfile.mkdtemp(prefix="releasy-unit-"))  # reachable by nobody
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    db = data / "releasy.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE t (v TEXT)")
        c.execute("INSERT INTO t VALUES ('before')")
    os.chown(db, nobody.pw_uid, nobody.pw_gid)
    store = tmp_path / "backups"
    old = backups.backup_name("lab", T0, None, "0.9.0", 1, "sqlite")
    store.mkdir()
    (store / old).write_text("old dump")
    name = backups.backup_name("lab", T0 + timedelta(hours=1), "1.0.0", "1.1.0", 2, "sqlite")

    def run(argv):
        argv = list(argv)
        argv[4] = str(store) if argv[3] == "releasy-backup" else argv[4].replace(
            backups.BACKUP_DIR, str(store))
        return subprocess.run(argv, capture_output=True, text=True)

    res = run(backupcmd.dump_argv("sqlite", str(db), name, [old], user="nobody"))
    assert res.returncode == 0, res.stderr
    assert f"@pruned {old}" in res.stdout and not (store / old).exists()
    assert oct((store / name).stat().st_mode & 0o777) == "0o600"
    assert oct(store.stat().st_mode & 0o777) == "0o700"
    # never overwritten
    assert run(backupcmd.dump_argv("sqlite", str(db), name, user="nobody")).returncode == 3
    with sqlite3.connect(db) as c:
        c.execute("UPDATE t SET v = 'after'")
        c.execute("CREATE TABLE newer (x)")
    res = run(backupcmd.restore_argv("sqlite", str(db), name, user="nobody"))
    assert res.returncode == 0, res.stderr
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT v FROM t").fetchall() == [("before",)]
        assert c.execute("SELECT count(*) FROM sqlite_master WHERE name = 'newer'"
                         ).fetchone() == (0,)
    shutil.rmtree(data)


# ====================================================================== schema bookkeeping
@pytest.mark.parametrize("out,code,level", [
    ("3\n", 0, 3), ("0", 0, 0), ("", 0, None), ("t\n", 0, None), ("3", 4, None),
    ("-1", 0, None),
])
def test_parse_level(out, code, level):
    assert schema.parse_level(out, code) == level


def fake_runuser(tmp: Path, answer: str) -> dict:
    """A `runuser` that records its argv (NUL-separated, one call per line) and its stdin,
    and prints ``answer``."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    log = tmp / "calls"
    script = bin_dir / "runuser"
    script.write_text("#!/bin/sh\n"
                      f"for a in \"$@\"; do printf '%s\\0' \"$a\"; done >> {log}\n"
                      f"echo >> {log}\n"
                      f"cat > {tmp / 'stdin'}\n"
                      f"echo {shlex.quote(answer)}\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("database", ["releasy", "my 'odd' db; $(reboot) é"])
def test_postgres_level_shell_is_one_psql_with_the_sql_on_stdin(tmp_path, database):
    env = fake_runuser(tmp_path, "7")
    res = subprocess.run(["sh", "-c", schema.postgres_level_shell(database)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0 and schema.parse_level(res.stdout, 0) == 7
    [call] = [line.split("\0")[:-1] for line in
              (tmp_path / "calls").read_text().splitlines()]
    assert call[:3] == ["-u", "postgres", "--"] and call[3].endswith("/psql")
    assert call[4] == "-X" and call[call.index("-d") + 1] == database
    assert not any("SELECT" in word for word in call)  # SQL travels on stdin only
    assert (tmp_path / "stdin").read_text() == schema.LEVEL_SCRIPT + "\n"


@needs_sqlite3
def test_sqlite_level_shell_for_real(tmp_path):
    db = tmp_path / "r.db"
    probe = ["sh", "-c", schema.sqlite_level_shell(str(db), "root")]
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "0"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE _sqlx_migrations (version BIGINT, success BOOLEAN)")
        c.executemany("INSERT INTO _sqlx_migrations VALUES (?, ?)", [(1, 1), (2, 1), (3, 0)])
    res = subprocess.run(probe, capture_output=True, text=True)
    assert schema.parse_level(res.stdout, res.returncode) == 2


def test_record_script_writes_levels_only_into_staged_releases(tmp_path):
    (tmp_path / "1.0.0").mkdir()
    (tmp_path / "1.1.0").mkdir()
    argv = schema.record_script_argv({"1.0.0": 2, "1.1.0": 3, "9.9.9": 5})
    argv[4] = str(tmp_path)  # the releases dir is the first positional parameter
    subprocess.run(argv, check=True)
    assert (tmp_path / "1.0.0" / ".schema-version").read_text() == "2\n"
    assert (tmp_path / "1.1.0" / ".schema-version").read_text() == "3\n"
    assert not (tmp_path / "9.9.9").exists()
    probe = schema.RECORDED_PROBE.replace(schema.appcmd.RELEASES_DIR, str(tmp_path))
    out = subprocess.run(["sh", "-c", probe], capture_output=True, text=True).stdout
    assert schema.parse_recorded(out) == {"1.0.0": 2, "1.1.0": 3}


@pytest.mark.parametrize("levels", [{"1.0.0": -1}, {"1.0.0": True}, {"x": 1}, {}])
def test_record_script_refuses_bad_values(levels):
    with pytest.raises(ValueError):
        schema.record_script_argv(levels)


def test_known_level_prefers_host_records_then_the_dump_taken_when_leaving():
    leaving = dumps((0, "1.0.0", "1.1.0", 2), (5, "1.0.0", "1.1.1", 2))
    assert schema.known_level("1.0.0", [{"1.0.0": 2}, {"1.0.0": 3}], leaving).level == 3
    found = schema.known_level("1.0.0", [{}, {}], leaving)
    assert found.level == 2 and leaving[1].name in found.source
    assert schema.known_level("0.9.0", [{}], leaving).level is None


def test_a_rollout_to_a_release_behind_the_database_is_refused_pointing_at_restore_db():
    leaving = dumps((0, "1.0.0", "1.1.0", 2))
    said = schema.older_than_database("1.0.0", [{"1.1.0": 3}, {"1.0.0": 2}], (), 3)
    assert said.startswith("1.0.0 ran against migration level 2 (/opt/releasy/releases/1.0.0/")
    assert "`fab deploy.rollback --to 1.0.0 --restore-db`" in said
    assert "Nothing was changed" in said
    # Known from the dump taken when leaving it, when no host kept the record.
    assert "the dump " + leaving[0].name in schema.older_than_database("1.0.0", [{}], leaving, 3)
    # Not behind (same level or above), unknown level, unreadable database: not refused.
    assert schema.older_than_database("1.1.0", [{"1.1.0": 3}], (), 3) is None
    assert schema.older_than_database("0.9.0", [{"1.0.0": 2}], leaving, 3) is None
    assert schema.older_than_database("1.0.0", [{"1.0.0": 2}], (), None) is None
    with pytest.raises(BadInput, match=r"refusing to roll out 1\.0\.0\. 1\.0\.0 ran against"):
        schema.refuse_if_behind("1.0.0", [{"1.0.0": 2}], (), 3)
    schema.refuse_if_behind("1.0.0", [{"1.0.0": 2}], (), 2)


def test_levels_are_recorded_for_running_releases_that_have_none():
    running = {"app1": "1.0.0", "app2": "1.0.0", "app3": None}
    recorded = {"app1": {"1.0.0": 2}, "app2": {"0.9.0": 1}}
    assert schema.levels_to_record(running, recorded) == {"app2": "1.0.0"}
    assert schema.levels_to_record({"app1": "1.0.0"}, recorded) == {}


# ====================================================================== migration-aware refusal
def verdict(target_level, db_level, *, restore_db=False, backup_name=None, backups_=()):
    return rollback_verdict(
        environment="lab", kind="postgres", target="1.0.0", target_level=target_level,
        level_source="(record)", db_level=db_level, backups=list(backups_),
        restore_db=restore_db, backup_name=backup_name, db_host="db1")


PRE_110 = dumps((10, "1.0.0", "1.1.0", 2), (20, "1.1.0", "1.1.1", 3))


def test_rollback_with_the_same_migrations_is_allowed_without_restore():
    v = verdict(3, 3, backups_=PRE_110)
    assert (v.refusal, v.restore, v.note) == (None, None, None)
    v = verdict(3, 2, restore_db=True)  # the target migrates forward itself
    assert v.refusal is None and v.restore is None and "not needed" in v.note


def test_rollback_behind_the_database_is_refused_with_the_command_that_would_work():
    v = verdict(2, 3, backups_=PRE_110)
    assert v.restore is None
    assert "refusing to roll back to 1.0.0" in v.refusal
    assert "does not know migration 3" in v.refusal
    assert "`fab deploy.rollback --to 1.0.0 --restore-db`" in v.refusal
    assert PRE_110[0].name in v.refusal and "loses every write" in v.refusal


def test_restore_db_chooses_the_dump_taken_before_the_migrations():
    v = verdict(2, 3, restore_db=True, backups_=PRE_110)
    assert v.refusal is None and v.restore == PRE_110[0]


def test_restore_db_without_a_fitting_dump_is_refused():
    assert "no dump at migration level 2 or lower" in verdict(
        2, 3, restore_db=True, backups_=PRE_110[1:]).refusal
    assert "not possible without one" in verdict(2, 4, backups_=PRE_110[1:]).refusal


def test_an_explicit_backup_must_exist_and_fit():
    assert "no dump named" in verdict(2, 3, restore_db=True, backup_name="lab_x",
                                      backups_=PRE_110).refusal
    too_new = verdict(2, 3, restore_db=True, backup_name=PRE_110[1].name, backups_=PRE_110)
    assert "could not start on it" in too_new.refusal
    chosen = verdict(3, 3, restore_db=True, backup_name=PRE_110[1].name, backups_=PRE_110)
    assert chosen.restore == PRE_110[1]


def test_unknown_level_is_refused_unless_a_dump_taken_on_that_release_is_restored():
    assert "no record of which database migrations" in verdict(None, 3).refusal
    leaving = dumps((0, "1.0.0", "1.1.0", 2))
    assert verdict(None, 3, restore_db=True, backups_=leaving).restore == leaving[0]
    assert "no dump taken while 1.0.0 was running" in verdict(
        None, 3, restore_db=True, backups_=PRE_110[1:]).refusal


# ====================================================================== explanation
def report(**kw) -> FailureReport:
    base = dict(action="Rolling deploy", environment="lab", version="1.2.0", host="app1",
                stage="migrate", step="ready",
                reason="releasy.service stopped before it became ready",
                reverted={"app1": ("1.1.0", True)}, untouched=["app2", "app3"],
                rotation=["app1", "app2", "app3"],
                journal="line one\nError: \"database migration failed: boom\"\n",
                level_before=3, level_now=3, from_version="1.1.0")
    return FailureReport(**(base | kw))


def test_explanation_is_one_paragraph_then_the_journal():
    text = explain_failure(report())
    paragraph, journal = text.split("\nLast journal lines of releasy.service on app1:\n")
    assert "\n" not in paragraph
    assert paragraph.startswith("Rolling deploy of lab to 1.2.0 stopped at app1, stage migrate"
                                " (step ready): releasy.service stopped before it became ready.")
    assert "app1 was switched back to 1.1.0, is ready and back in rotation." in paragraph
    assert "Not reached, untouched: app2, app3." in paragraph
    assert "In rotation now: app1, app2, app3." in paragraph
    assert "migration" not in paragraph
    assert journal == "    line one\n    Error: \"database migration failed: boom\""


def test_explanation_of_a_failed_migration_names_the_dump_and_the_restore_command():
    dump = PRE_110[1]
    unchanged = explain_failure(report(migration_failed=True, backup=dump,
                                               backup_host="db1"))
    assert f"The dump taken before this deploy is on db1: {dump.path}." in unchanged
    assert "still at migration level 3" in unchanged and "nothing needs restoring" in unchanged
    assert f"`fab deploy.rollback --to 1.1.0 --restore-db --backup {dump.name}`" in unchanged
    moved = explain_failure(report(migration_failed=True, backup=dump,
                                           backup_host="db1", level_now=4))
    assert "now at migration level 4 (was 3)" in moved and "loses writes made since" in moved
    off = explain_failure(report(migration_failed=True, backups_enabled=False))
    assert "no dump was taken before this deploy" in off


def test_explanation_when_the_revert_and_the_rotation_fail_too():
    text = explain_failure(report(
        reverted={"app1": ("1.1.0", False)}, reverted_notes={"app1": " (not ready in 60 s)"},
        rotation_error="proxy1: nginx -t failed", succeeded=["app4"], done=["app5"],
        journal=""))
    assert "app1 could not be brought back on 1.1.0 (not ready in 60 s): it stays out" in text
    assert "Restoring the rotation FAILED (proxy1: nginx -t failed)" in text
    assert "app4" in text and "app5" in text and "Last journal lines" not in text


# ====================================================================== input checks
def _inventory(tmp: Path, apps: list[str]):
    hosts = {"proxy1": {"address": "10.0.0.10"}, "db1": {"address": "10.0.0.100"},
             **{a: {"address": f"10.0.0.{21 + i}"} for i, a in enumerate(apps)}}
    data = {"environment": "prod", "admin_cidrs": ["10.0.0.1/32"], "known_hosts": "kh",
            "hosts": hosts, "tiers": {"proxy": ["proxy1"], "app": apps, "db": ["db1"]},
            "release": {"source": str(tmp)}, "tls": {"mode": "self-signed",
                                                     "server_name": "r.example.com"}}
    return build(data, tmp / "hosts.yaml")


def test_rolling_needs_two_app_hosts_and_sane_flags(tmp_path):
    one = _inventory(tmp_path, ["app1"])
    with pytest.raises(BadInput, match="at least two app hosts.*deploy.bluegreen"):
        rollout._check_common(one, 1, None)
    two = _inventory(tmp_path, ["app1", "app2"])
    assert rollout._check_common(two, "3", None) == (3, 60.0)  # app.ready_timeout default
    assert rollout._check_common(two, 1, "7.5") == (1, 7.5)
    for batch, timeout, why in ((0, None, "--batch"), ("x", None, "--batch"),
                                (1, "0", "--ready-timeout"), (1, "soon", "--ready-timeout")):
        with pytest.raises(BadInput, match=why):
            rollout._check_common(two, batch, timeout)


def test_resolve_version(tmp_path):
    inv = _inventory(tmp_path, ["app1", "app2"])
    with pytest.raises(BadInput, match="offers no stable release"):
        rollout.resolve_version(inv, "newest")
    name = "releasy-server-2.0.0-linux-x86_64.tar.gz"
    (tmp_path / name).write_bytes(b"x")
    (tmp_path / f"{name}.sha256").write_text(f"{'a' * 64}  {name}\n")
    assert rollout.resolve_version(inv, "newest") == "2.0.0"
    assert rollout.resolve_version(inv, "1.0.0") == "1.0.0"
    with pytest.raises(BadInput, match="invalid release version"):
        rollout.resolve_version(inv, "1.0.0; reboot")


def test_recent_journal_argv_only_covers_this_attempt():
    argv = runner.recent_journal_argv("releasy.service", 7.2, 12)
    assert argv[0] == "journalctl" and argv[-2:] == ["--since", "-8s"]
    assert argv[argv.index("--lines") + 1] == "12"
    assert runner.recent_journal_argv("releasy.service", 0)[-1] == "-1s"


def _pre(*states) -> runner.Preflight:
    return runner.Preflight({st.name: st for st in states}, {}, 3, [])


def test_default_rollback_target_is_the_previous_release_that_actually_ran():
    installed = ("1.0.0", "1.1.0", "1.2.0-broken", "1.2.0")
    ran = {"1.0.0": 2, "1.1.0": 3, "1.2.0": 3}  # 1.2.0-broken was staged, never ran
    pre = _pre(state("app1", "1.2.0", installed=installed, levels=ran),
               state("app2", "1.2.0", installed=installed, levels={}))
    assert default_target(pre) == "1.1.0"
    # No records at all (releases installed by hand): the newest older installed one.
    pre = _pre(state("app1", "1.2.0", installed=installed))
    assert default_target(pre) == "1.2.0-broken"
    # Only releases every host holds.
    pre = _pre(state("app1", "1.2.0", installed=installed, levels=ran),
               state("app2", "1.2.0", installed=("1.0.0", "1.2.0"), levels=ran))
    assert default_target(pre) == "1.0.0"


def test_default_rollback_target_of_a_canary_is_the_release_the_other_hosts_run():
    pre = _pre(state("app1", "1.1.0"), state("app2", "1.0.0"), state("app3", "1.0.0"))
    assert default_target(pre) == "1.0.0"


def test_default_rollback_target_needs_one_current_release_and_an_older_one():
    with pytest.raises(BadInput, match=r"different releases \(app1: 1.1.0, app2: 1.0.0,"
                                       r" app3: 1.2.0\)"):
        default_target(_pre(state("app1", "1.1.0"), state("app2", "1.0.0"),
                                    state("app3", "1.2.0")))
    with pytest.raises(BadInput, match="no release older than 1.0.0"):
        default_target(_pre(state("app1", "1.0.0", installed=("1.0.0", "1.1.0"))))
