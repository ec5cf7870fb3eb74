"""`fab db.backup / db.backups / db.restore / db.psql` on the lab.

Split topology (proxy1, app1, app2 as `deploy`, db1), provisioned from a brand-new database
with `fab site --version 1.0.0`: a row is added to a stand-in table, a dump is taken (and
downloaded, checked byte for byte), the row is deleted, the dump is restored: the row is
back, both app hosts answer /ready and are in the proxy's rotation, and the data that was
replaced is kept in a pre-restore dump. `fab db.psql` runs in a real terminal (a local pty
driving the real CLI). Then the same backup/restore round trip on the single-host SQLite
topology, where the dump is SQLite's online backup of the live file."""
from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import threading
import time

import pytest

from releasy_deploy.commands.postgres import SQLITE_PATH
from tests.integration.labtools import (SOLO, FabTerminal, psql, ready, rotation,
                                       serving_through_proxy, sqlite, start_fab)

pytestmark = pytest.mark.lab

APPS = ("app1", "app2")
DUMP_RE = re.compile(r"lab_\d{8}T\d{6}Z_manual_at-1\.0\.0_m2\.(?:dump|sqlite3)")


def dump_name(output: str) -> str:
    names = set(DUMP_RE.findall(output))
    assert len(names) == 1, output
    return names.pop()


@pytest.fixture(scope="module")
def split(lab_session):
    lab = lab_session.use("split", 2)
    # A brand-new database and no dumps, whatever earlier modules left behind.
    lab.reset("1.0.0")
    return lab


def test_backup_then_restore_brings_back_a_row_deleted_in_between(split, tmp_path):
    lab = split
    psql(lab, "INSERT INTO standin_m1 (id, label) VALUES (4242, 'kept by the dump')")
    out = lab.fab("db.backup", "--download", str(tmp_path)).stdout
    name = dump_name(out)
    assert re.search(rf"\[db1\] changed: backup /var/backups/releasy/{name} \(pg_dump, \d+"
                     r" bytes, migration level 2\)", out), out
    assert re.search(r"^db1\s+\d+ changed / 0 unchanged / ok$", out, re.MULTILINE), out
    # The download is the host's file, byte for byte, private, and a real custom-format dump.
    local = tmp_path / name
    remote = lab.sudo("db1", "sha256sum", f"/var/backups/releasy/{name}").stdout.split()[0]
    assert hashlib.sha256(local.read_bytes()).hexdigest() == remote
    assert local.read_bytes()[:5] == b"PGDMP" and local.stat().st_mode & 0o777 == 0o600
    assert lab.sudo("db1", "stat", "-c", "%U:%G %a", "/var/backups/releasy",
                f"/var/backups/releasy/{name}").stdout.split("\n")[:2] == [
        "postgres:postgres 700", "postgres:postgres 600"]

    psql(lab, "DELETE FROM standin_m1 WHERE id = 4242")
    assert psql(lab, "SELECT label FROM standin_m1 WHERE id = 4242") == []
    proc = lab.fab("db.restore", "--file", name, "--yes")
    assert proc.returncode == 0
    assert psql(lab, "SELECT label FROM standin_m1 WHERE id = 4242") == [["kept by the dump"]]
    for host in APPS:
        assert f"[{host}] changed: stopped releasy.service (database restore)" in proc.stdout
        assert ready(lab, host), host
    assert set(rotation(lab)) == set(APPS)
    assert serving_through_proxy(lab)
    # The data it replaced was saved first, and the listing tells the dumps apart.
    listing = lab.fab("db.backups").stdout
    assert re.search(rf"^{name}\s+[\d.]+ KiB\s+\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\s+2\s+manual"
                     r" \(1\.0\.0 running\)$", listing, re.MULTILINE), listing
    assert re.search(r"^lab_\S+_pre-restore_at-1\.0\.0_m2\.dump .* pre-restore \(1\.0\.0"
                     r" running\)$", listing, re.MULTILINE), listing


def test_a_restore_that_fails_before_it_begins_is_not_taken_for_the_last_one(split):
    """The restore above committed, and its transaction id stays on db1. A restore whose
    command fails before its own transaction begins (here it never runs: RELEASY_FAULT
    replaces it) must read "not started", never that older id: it once said "WAS fully
    applied" and started Releasy on data that was never restored."""
    lab = split
    name = dump_name(lab.fab("db.backup").stdout)
    psql(lab, "INSERT INTO standin_m1 (id, label) VALUES (4343, 'written after the dump')")
    # backup (1), the page on proxy1 (2), stop on app1 and app2 (3, 4), the restore (5)
    proc = lab.fab("db.restore", "--file", name, "--yes", check=False,
                   env={"RELEASY_FAULT": "5"})
    said = proc.stdout + proc.stderr
    assert "#5 failed on purpose: db1: setsid -w sh -c" in proc.stderr, said
    assert proc.returncode == 1, said
    assert "Nothing of the restore was applied" in proc.stderr and "WAS" not in said, said
    assert psql(lab, "SELECT label FROM standin_m1 WHERE id = 4343") == [
        ["written after the dump"]]
    assert all(ready(lab, host) for host in APPS) and serving_through_proxy(lab)
    psql(lab, "DELETE FROM standin_m1 WHERE id = 4343")


def test_restore_asks_and_without_a_terminal_refuses(split):
    name = dump_name(split.fab("db.backup").stdout)
    before = psql(split, "SELECT count(*) FROM standin_m1")
    proc = split.fab("db.restore", "--file", name, check=False)  # stdin: /dev/null
    assert proc.returncode == 2, proc.stderr
    assert "re-run with --yes" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert "DOWN" in proc.stderr  # the question says it is downtime
    # --dry-run: the plan the run would follow, from the same data; nothing is touched.
    dry = split.fab("db.restore", "--file", name, "--dry-run").stdout
    assert "4. restore: restore " + name in dry, dry
    assert ("3. stop: stop releasy.service on app1, app2 (undone by: start them again and"
            " wait for /ready)") in dry, dry
    assert "changed: stopped" not in dry and "would create backup" in dry
    missing = split.fab("db.restore", "--file", name.replace("_m2.", "_m9."), "--yes",
                        check=False)
    assert missing.returncode == 2 and "no dump named" in missing.stderr
    assert psql(split, "SELECT count(*) FROM standin_m1") == before
    assert all(ready(split, h) for h in APPS)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_a_restore_interrupted_mid_way_is_ended_on_the_host_and_says_what_it_left(
        split, captured_outputs, signum, code):
    """The restore is held inside its transaction (another session holds a lock its DROP
    SCHEMA waits for), then fab gets Ctrl-C / SIGTERM: the remote psql and its database
    session end, the database holds the old content, the message says so (read on the
    database), Releasy runs again and the lock is free."""
    lab = split
    psql(lab, "DELETE FROM standin_m1 WHERE id = 777")  # the other signal's run restored it
    psql(lab, "INSERT INTO standin_m1 (id, label) VALUES (777, 'only in the dump')")
    name = dump_name(lab.fab("db.backup").stdout)
    psql(lab, "DELETE FROM standin_m1 WHERE id = 777")
    before = psql(lab, "SELECT count(*) FROM standin_m1")
    hold = ("cd / && exec runuser -u postgres -- env PGAPPNAME=test-blocker psql -XAtq -d"
            " releasy -c 'LOCK TABLE standin_m1 IN ACCESS SHARE MODE; SELECT pg_sleep(300)'")
    blocker = threading.Thread(target=lab.ssh, args=("db1", "sudo", "-n", "sh", "-c", hold),
                               kwargs={"check": False, "timeout": 400}, daemon=True)
    blocker.start()
    proc = start_fab(lab.inventory, "db.restore", "--file", name, "--yes",
                     stdin=subprocess.DEVNULL)
    try:
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                   " 'releasy-restore' AND wait_event_type = 'Lock'")
        deadline = time.monotonic() + 120
        while psql(lab, waiting) != [["1"]]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the restore never reached its transaction"
            time.sleep(0.3)
        proc.send_signal(signum)  # the fab we started, by its PID
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        psql(lab, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                  " WHERE application_name = 'test-blocker'")
        blocker.join(timeout=60)
    captured_outputs.append(out + err)
    assert proc.returncode == code, out + err
    assert "Nothing of the restore was applied: its transaction was rolled back (read on the"
    " database" in " ".join(err.split()), err
    assert "Traceback" not in out + err
    # Checked independently: nothing of the restore is left running, the old content is there.
    for program in ("psql", "pg_restore"):
        assert lab.ssh("db1", "pgrep", "-x", program, check=False).returncode == 1, program
    assert psql(lab, "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                     " 'releasy-restore'") == [["0"]]
    assert psql(lab, "SELECT count(*) FROM standin_m1") == before
    assert psql(lab, "SELECT label FROM standin_m1 WHERE id = 777") == []
    for host in APPS:
        assert ready(lab, host), host
    assert set(rotation(lab)) == set(APPS)
    assert "free" in lab.fab("deploy.lock").stdout
    # The same restore, run again, applies it.
    lab.fab("db.restore", "--file", name, "--yes")
    assert psql(lab, "SELECT label FROM standin_m1 WHERE id = 777") == [["only in the dump"]]


def test_psql_in_a_real_terminal_as_the_app_role(split, captured_outputs):
    with FabTerminal(split.inventory, "db.psql", TERM="vt100") as term:
        term.read_until(b"releasy=> ")
        term.write(b"SELECT current_user AS who, 6 * 7 AS answer;\n")
        term.read_until(b"(1 row)")
        term.write(b"\\q\n")
        text = term.finish(30, "fab db.psql did not end after \\q")
    captured_outputs.append(text)
    assert term.exit_code == 0, text
    assert re.search(r"^ releasy \|\s+42$", text, re.MULTILINE), text
    # The pty echoed what was "typed": psql really had a terminal.
    assert "releasy=> SELECT current_user" in text
    # The password file is gone, and the password was never on a command line there.
    assert split.sudo("db1", "sh", "-c", "ls /tmp/releasy-pgpass.* 2>/dev/null",
                check=False).stdout == ""


@pytest.mark.lab_shape("single", database="sqlite")
def test_sqlite_single_host_backup_and_restore(lab_session, captured_outputs):
    lab = lab_session.use("single", database="sqlite").reset("1.0.0")
    sqlite(lab, "INSERT INTO standin_m1 (id, label) VALUES (4242, 'kept by the dump')")
    name = dump_name(lab.fab("db.backup").stdout)
    assert name.endswith(".sqlite3")
    sqlite(lab, "DELETE FROM standin_m1 WHERE id = 4242")
    proc = lab.fab("db.restore", "--file", name, "--yes")
    assert "[solo] changed: stopped releasy.service (database restore)" in proc.stdout
    assert sqlite(lab, "SELECT label FROM standin_m1 WHERE id = 4242") == ["kept by the dump"]
    owners = lab.ssh("solo", "sh", "-c", f"stat -c %U {SQLITE_PATH}*").stdout.split()
    assert set(owners) == {"releasy"}, owners
    assert serving_through_proxy(lab, SOLO)
    # The SQLite variant of db.psql: sqlite3 on the file, fed from a pipe.
    shell = lab.fab("db.psql", input="SELECT label FROM standin_m1 WHERE id = 4242;\n",
                    check=False, timeout=120)
    assert shell.returncode == 0, shell.stderr
    assert "kept by the dump" in shell.stdout


@pytest.mark.lab_shape("single", database="sqlite")
def test_sqlite_backup_and_restore_never_follow_the_service_accounts_symlinks(lab_session):
    """The service account owns /var/lib/releasy: it plants symlinks to a root-owned file at
    every name there a root step could touch (the database, -wal, -shm, -journal). Backup
    and restore either work or refuse; the root-owned file is untouched either way."""
    lab = lab_session.use("single", database="sqlite")
    canary, db = "/etc/releasy-canary", SQLITE_PATH
    lab.sudo("solo", "sh", "-c", f"printf 'root only\\n' > {canary} && chmod 0644 {canary}")

    def canary_state() -> str:
        return lab.sudo("solo", "sh", "-c", f"stat -c '%U:%G %a %s' {canary};"
                                            f" sha256sum < {canary}").stdout

    before = canary_state()
    name = dump_name(lab.fab("db.backup").stdout)  # a good dump, taken before the planting
    as_service = ["runuser", "-u", "releasy", "--", "sh", "-c"]
    lab.sudo("solo", "systemctl", "stop", "releasy.service")
    lab.sudo("solo", *as_service, f"cp -p {db} {db}.keep")
    try:
        lab.sudo("solo", *as_service, f"cd /var/lib/releasy && for s in -wal -shm -journal; do"
                                      f" rm -f releasy.db$s; ln -s {canary} releasy.db$s; done")
        results = [lab.fab("db.backup", check=False),
                   lab.fab("db.restore", "--file", name, "--yes", check=False)]
        lab.sudo("solo", "systemctl", "stop", "releasy.service")
        lab.sudo("solo", *as_service, f"rm -f {db} && ln -s {canary} {db}")
        results += [lab.fab("db.backup", check=False),
                    lab.fab("db.restore", "--file", name, "--yes", check=False)]
        for proc in results:
            print(proc.args[3:], proc.returncode, proc.stderr.strip()[-300:])
            assert proc.returncode in (0, 1, 2), proc.stdout + proc.stderr
            assert "Traceback" not in proc.stdout + proc.stderr
            if proc.returncode == 1:
                assert "solo" in proc.stderr + proc.stdout
        assert canary_state() == before
    finally:
        lab.sudo("solo", "sh", "-c", f"rm -f {db} {db}-wal {db}-shm {db}-journal {canary}")
        lab.sudo("solo", *as_service, f"mv {db}.keep {db}")
        lab.sudo("solo", "systemctl", "start", "releasy.service")
    lab.fab("db.restore", "--file", name, "--yes")  # the tasks work again
    assert serving_through_proxy(lab, SOLO)
