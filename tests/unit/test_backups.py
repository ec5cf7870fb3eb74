"""Day-2 database tasks: dump names and what they mean, the listing, the decisions a restore
makes before touching anything, the download target, the psql command line, and the remote
scripts (SQLite restore, the psql wrapper) run for real with the local `sh`. The interactive
channel runs against the loopback sshd from conftest: a real pty on a real SSH session."""
from __future__ import annotations

import io
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from releasy_deploy import backups, db_state, db_tasks, interactive
from releasy_deploy.backups import MANUAL, PRE_DEPLOY, PRE_RESTORE
from releasy_deploy.cli import BadInput
from releasy_deploy.commands import backup as backupcmd
from releasy_deploy.commands import dbshell as dbshell_cmd
from releasy_deploy.executor import Executor
from releasy_deploy.output import Reporter

T0 = datetime(2026, 11, 26, 8, 0, 0, tzinfo=timezone.utc)


# ====================================================================== names
@pytest.mark.parametrize("purpose", [MANUAL, PRE_RESTORE])
@pytest.mark.parametrize("running", ["1.0.0", None, "1.2.0-rc.1", "1.2.0+build.7"])
def test_snapshot_names_round_trip(purpose, running):
    name = backups.snapshot_name("prod-eu", T0, running, 3, "postgres", purpose)
    b = backups.parse_backup_name(name, 4096)
    assert (b.environment, b.taken_at, b.from_version, b.to_version, b.level, b.kind, b.size,
            b.purpose) == ("prod-eu", T0, running, None, 3, "postgres", 4096, purpose)
    assert b.path == f"/var/backups/releasy/{name}"


def test_snapshot_name_format():
    assert backups.snapshot_name("lab", T0, "1.0.0", 2, "postgres") == (
        "lab_20261126T080000Z_manual_at-1.0.0_m2.dump")
    assert backups.snapshot_name("lab", T0, None, 0, "sqlite", PRE_RESTORE) == (
        "lab_20261126T080000Z_pre-restore_at-none_m0.sqlite3")


@pytest.mark.parametrize("bad", [
    dict(purpose=PRE_DEPLOY), dict(purpose="nightly"), dict(level=-1), dict(level=True),
    dict(running="x; rm -rf /"), dict(kind="mysql"), dict(environment="Prod"),
])
def test_snapshot_name_refuses_bad_values(bad):
    args = dict(environment="lab", taken_at=T0, running="1.0.0", level=2, kind="postgres",
                purpose=MANUAL) | bad
    with pytest.raises(ValueError):
        backups.snapshot_name(**args)


@pytest.mark.parametrize("name", [
    "lab_20261126T080000Z_manual_at-1.0.0_m2.dump.partial",
    "lab_20261126T080000Z_manual_from-1.0.0_m2.dump",
    "lab_20261126T080000Z_nightly_at-1.0.0_m2.dump",
    "lab_20261126T080000Z_manual_at-../x_m2.dump",
    "lab_20261126T080000Z_manual_at-1.0.0_m2.sql",
])
def test_near_misses_are_not_backups(name):
    assert backups.parse_backup_name(name) is None


def test_origin_says_what_a_dump_is():
    pre = backups.parse_backup_name(backups.backup_name("lab", T0, "1.0.0", "1.1.0", 2,
                                                        "postgres"))
    manual = backups.parse_backup_name(backups.snapshot_name("lab", T0, "1.0.0", 2, "postgres"))
    mixed = backups.parse_backup_name(backups.snapshot_name("lab", T0, None, 2, "sqlite",
                                                            PRE_RESTORE))
    assert pre.origin == "pre-deploy 1.0.0 -> 1.1.0"
    assert manual.origin == "manual (1.0.0 running)"
    assert mixed.origin == "pre-restore (no single release)"
    assert "manual (1.0.0 running), taken 2026-11-26 08:00:00 UTC, migration level 2" in \
        manual.describe()


def snaps(*specs, purpose=MANUAL):
    return [backups.parse_backup_name(backups.snapshot_name(
        "lab", T0 + timedelta(minutes=m), "1.0.0", 2, "postgres", purpose)) for m in specs]


def test_pruning_counts_each_purpose_apart():
    pre = [backups.parse_backup_name(backups.backup_name(
        "lab", T0 + timedelta(minutes=m), "1.0.0", "1.1.0", 2, "postgres")) for m in range(3)]
    manual = snaps(*range(10, 14))
    restore = snaps(20, purpose=PRE_RESTORE)
    every = [*pre, *manual, *restore]
    # A deploy keeping 2 prunes only pre-deploy dumps, never one taken by hand.
    assert backups.backups_to_prune(every, 2, "lab") == pre[:1]
    assert backups.backups_to_prune(every, 2, "lab", purpose=MANUAL) == manual[:2]
    assert backups.backups_to_prune(every, 2, "lab", protect=[manual[0].name],
                                    purpose=MANUAL) == manual[1:2]
    assert backups.backups_to_prune(every, 1, "lab", purpose=PRE_RESTORE) == []


def test_a_manual_dump_is_a_restore_point_and_tells_the_level_of_its_release():
    from releasy_deploy import schema

    (manual,) = snaps(30)
    assert backups.choose_restore_point([manual], 2, "lab", "postgres") == manual
    assert schema.known_level("1.0.0", [], [manual]).level == 2


# ====================================================================== listing
@pytest.mark.parametrize("size, text", [(None, "?"), (0, "0 B"), (812, "812 B"),
                                        (12_595, "12.3 KiB"), (3 * 2**30 // 2, "1.5 GiB")])
def test_format_size(size, text):
    assert backups.format_size(size) == text


def test_listing_rows_are_aligned_with_a_header():
    a = backups.parse_backup_name(backups.snapshot_name("lab", T0, "1.0.0", 2, "postgres"), 8753)
    b = backups.parse_backup_name(backups.backup_name("lab", T0 + timedelta(hours=1), "1.0.0",
                                                      "1.1.0", 2, "postgres"), 10_240)
    rows = backups.listing_rows([a, b])
    assert rows[0].split() == ["NAME", "SIZE", "TAKEN", "(UTC)", "LEVEL", "KIND"]
    assert rows[1].startswith(a.name + "  ") and rows[1].endswith("manual (1.0.0 running)")
    assert "8.5 KiB" in rows[1] and "2026-11-26 08:00:00" in rows[1]
    assert rows[2].endswith("pre-deploy 1.0.0 -> 1.1.0")
    assert len({r.index("LEVEL") for r in rows[:1]} | {rows[1].index(" 2 ") + 1}) == 1


# ====================================================================== restore decisions
def listing():
    return [*snaps(0, 5), backups.parse_backup_name(backups.snapshot_name(
        "lab", T0, "1.0.0", 2, "sqlite")), backups.parse_backup_name(backups.snapshot_name(
            "staging", T0, "1.0.0", 2, "postgres"))]


def test_find_backup_returns_the_named_dump():
    dumps = listing()
    assert backups.find_backup(dumps, dumps[1].name, environment="lab", kind="postgres",
                               host="db1") == dumps[1]


@pytest.mark.parametrize("name, said", [
    ("/var/backups/releasy/x.dump", "not a path"),
    ("lab_2026.dump", "is not a dump name"),
    ("lab_20261126T090000Z_manual_at-1.0.0_m2.dump", "no dump named"),
    ("lab_20261126T080000Z_manual_at-1.0.0_m2.sqlite3", "is a sqlite dump"),
    ("staging_20261126T080000Z_manual_at-1.0.0_m2.dump", "belongs to environment staging"),
])
def test_find_backup_refuses_with_a_reason(name, said):
    with pytest.raises(BadInput, match=said):
        backups.find_backup(listing(), name, environment="lab", kind="postgres", host="db1")


def at_level(level):
    return backups.parse_backup_name(backups.snapshot_name("lab", T0, "1.1.0", level, "postgres"))


@pytest.mark.parametrize("dump_level, db_level, running, blocked", [
    (2, 2, {"app1": ("1.0.0", 2)}, False),
    (1, 3, {"app1": ("1.1.0", 3)}, False),  # older: the release migrates it forward
    (3, 2, {"app1": ("1.0.0", 2), "app2": ("1.0.0", None)}, True),  # newer than it knows
    (3, 2, {"app1": ("1.1.0", 3)}, False),  # its record says it ran at 3 before
    (3, 2, {"app1": (None, None)}, False),  # nothing installed: nothing to refuse
])
def test_restore_level_problem(dump_level, db_level, running, blocked):
    problem = db_state.restore_level_problem(at_level(dump_level), db_level, running)
    assert (problem is not None) is blocked
    if blocked:
        assert "1.0.0 (on app1, app2) knows migrations up to 2" in problem
        assert "Nothing was changed" in problem


def test_units_on_hosts_groups_hosts():
    assert db_state.units_on_hosts({"app1": ["releasy.service"], "app2": ["releasy.service"],
                                   "app3": []}) == "releasy.service on app1, app2"
    assert db_state.units_on_hosts({"solo": []}).startswith("nothing")


# ====================================================================== download target
def test_download_target(tmp_path):
    assert db_tasks.download_target(tmp_path) == tmp_path
    assert db_tasks.download_target(tmp_path, "x.dump") == tmp_path / "x.dump"
    assert db_tasks.download_target(tmp_path / "my copy.dump", "x.dump") == \
        tmp_path / "my copy.dump"
    (tmp_path / "old.dump").write_text("keep")
    with pytest.raises(BadInput, match="exists"):
        db_tasks.download_target(tmp_path / "old.dump", "x.dump")
    with pytest.raises(BadInput, match="does not exist"):
        db_tasks.download_target(tmp_path / "nope" / "x.dump")


# ====================================================================== remote scripts
needs_root_sqlite3 = pytest.mark.skipif(shutil.which("sqlite3") is None or os.geteuid() != 0,
                                        reason="needs the sqlite3 CLI and root (chown)")


@pytest.fixture
def service_dir():
    """A directory owned by `nobody` (standing in for the service account) that nobody
    can reach: outside pytest's root-only 0700 tmp tree."""
    if os.geteuid() != 0 or shutil.which("sqlite3") is None or shutil.which("runuser") is None:
        pytest.skip("needs root, runuser and the sqlite3 CLI")
    nobody = pwd.getpwnam("nobody")
    d = Path(tempfile.mkdtemp(prefix="releasy-unit-"))
    os.chown(d, nobody.pw_uid, nobody.pw_gid)
    try:
        yield d, nobody
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody(nobody, fn):
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@needs_root_sqlite3
def test_sqlite_restore_runs_as_the_service_account(service_dir, tmp_path):
    d, nobody = service_dir
    db = d / "releasy.db"

    def make():
        with sqlite3.connect(db) as c:
            c.execute("PRAGMA journal_mode = WAL")
            c.execute("CREATE TABLE t (v TEXT)")
            c.execute("INSERT INTO t VALUES ('kept')")
    _as_nobody(nobody, make)
    name = backups.snapshot_name("lab", T0, "1.0.0", 1, "sqlite")
    dump = tmp_path / name
    subprocess.run(["sqlite3", str(db), f".backup {dump}"], check=True)
    _as_nobody(nobody, lambda: sqlite3.connect(db).execute("DELETE FROM t").connection.commit())
    argv = backupcmd.restore_argv("sqlite", str(db), name, user="nobody")
    argv[4] = str(dump)  # the dump's path: here, not in /var/backups/releasy
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if f.exists():
            assert (f.stat().st_uid, f.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid), f
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT v FROM t").fetchall() == [("kept",)]


@needs_root_sqlite3
def test_sqlite_dump_and_restore_never_write_through_planted_symlinks(service_dir, tmp_path):
    """The service account plants symlinks to a root-owned file at every name next to the
    database: the dump and the restore either work or fail, and the file is untouched."""
    d, nobody = service_dir
    canary = tmp_path / "canary"
    canary.write_text("root's file\n")
    canary.chmod(0o644)
    before = (canary.read_bytes(), canary.stat().st_mode, canary.stat().st_uid)
    db = d / "releasy.db"
    _as_nobody(nobody, lambda: sqlite3.connect(db).execute("CREATE TABLE t (v)").connection
               .commit())
    name = backups.snapshot_name("lab", T0, "1.0.0", 1, "sqlite")
    store = tmp_path / "store"
    dump = backupcmd.dump_argv("sqlite", str(db), name, user="nobody")
    dump[4] = str(store)
    assert subprocess.run(dump, capture_output=True, text=True).returncode == 0
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").symlink_to(canary)
    os.lchown(f"{db}-wal", nobody.pw_uid, nobody.pw_gid)
    restore = backupcmd.restore_argv("sqlite", str(db), name, user="nobody")
    restore[4] = str(store / name)
    subprocess.run(restore, capture_output=True, text=True)
    db.unlink()
    db.symlink_to(canary)
    subprocess.run(restore, capture_output=True, text=True)
    dump2 = backupcmd.dump_argv("sqlite", str(db), backups.snapshot_name(
        "lab", T0 + timedelta(hours=1), "1.0.0", 1, "sqlite"), user="nobody")
    dump2[4] = str(store)
    subprocess.run(dump2, capture_output=True, text=True)
    assert (canary.read_bytes(), canary.stat().st_mode, canary.stat().st_uid) == before


def test_pgpass_line_escapes_separators():
    assert dbshell_cmd.pgpass_line("127.0.0.1", 5432, "releasy", "releasy", r"p:w\d") == \
        "127.0.0.1:5432:releasy:releasy:p\\:w\\\\d\n"
    with pytest.raises(ValueError):
        dbshell_cmd.pgpass_line("127.0.0.1", 5432, "db", "u", "two\nlines")


@pytest.mark.parametrize("database, user, expected", [
    ("releasy", "releasy", "dbname=releasy user=releasy"),
    ("my db", "o'brien", "dbname='my db' user='o\\'brien'"),
    ("données", "rôle", "dbname=données user=rôle"),
])
def test_psql_argv_is_a_list_without_the_password(database, user, expected):
    argv = dbshell_cmd.psql_argv("/tmp/releasy-pgpass.abc", host="127.0.0.1", port=5432,
                                 database=database, user=user)
    assert argv[:2] == ["sh", "-c"] and argv[3:5] == ["releasy-psql", "/tmp/releasy-pgpass.abc"]
    assert argv[5] == (f"host=127.0.0.1 port=5432 {expected}"
                       f" application_name=releasy-db.psql")


def test_psql_wrapper_passes_the_file_and_removes_it(tmp_path):
    """The wrapper for real, with a fake psql that records what it got."""
    fake = tmp_path / "bin" / "psql"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "PGPASSFILE=$PGPASSFILE"; cat "$PGPASSFILE";'
                    ' printf "arg:%s\\n" "$@"; exit 3\n')
    fake.chmod(0o755)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text("127.0.0.1:5432:releasy:releasy:secret\n")
    argv = dbshell_cmd.psql_argv(str(pgpass), host="127.0.0.1", port=5432,
                                 database="releasy", user="releasy")
    res = subprocess.run(argv, capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert res.returncode == 3  # psql's own exit code comes through
    assert res.stdout.splitlines() == [
        f"PGPASSFILE={pgpass}", "127.0.0.1:5432:releasy:releasy:secret",
        "arg:host=127.0.0.1 port=5432 dbname=releasy user=releasy"
        " application_name=releasy-db.psql"]
    assert not pgpass.exists()


def test_sqlite_shell_runs_as_the_service_account():
    assert dbshell_cmd.sqlite_shell_argv("/var/lib/releasy/releasy.db", "releasy") == [
        "runuser", "-u", "releasy", "--", "sqlite3", "/var/lib/releasy/releasy.db"]


# ====================================================================== the pty channel
@pytest.fixture
def loop(sshd):
    with Executor(sshd.inventory(), reporter=Reporter(io.StringIO())) as ex:
        yield ex.conn("loop")


def run_with(conn, argv, data: bytes, *, pty: bool) -> tuple[int, bytes, bytes]:
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    os.write(w_in, data)
    os.close(w_in)
    try:
        code = interactive.run_interactive(conn, argv, pty=pty, stdin_fd=r_in,
                                           stdout_fd=w_out, stderr_fd=w_err, term="vt100")
    finally:
        for fd in (r_in, w_out, w_err):
            os.close(fd)
    with os.fdopen(r_out, "rb") as out, os.fdopen(r_err, "rb") as err:
        return code, out.read(), err.read()


def test_the_remote_program_gets_a_real_terminal(loop):
    script = 'read line; echo "got:$line"; test -t 0 && echo "tty:$TERM"; exit 7'
    code, out, _ = run_with(loop, ["sh", "-c", script], b"hello world\n", pty=True)
    assert code == 7
    text = out.decode().replace("\r\n", "\n")
    assert "got:hello world\n" in text and "tty:vt100\n" in text
    assert "hello world\n" in text.split("got:")[0]  # the pty echoed what was typed


def test_without_a_pty_stdin_ends_and_stderr_stays_apart(loop):
    code, out, err = run_with(loop, ["sh", "-c", 'cat; echo oops >&2; test -t 0 || exit 5'],
                              b"line 1\nline 2\n", pty=False)
    assert (code, out, err) == (5, b"line 1\nline 2\n", b"oops\n")


def test_a_secret_never_reaches_the_command_line(loop):
    loop.mask.add(["s3cret-value"])
    with pytest.raises(ValueError, match="secret"):
        interactive.run_interactive(loop, ["echo", "s3cret-value"], pty=False)
