"""`fab db.setup` on real lab hosts: dry-run touches nothing; a real run installs PostgreSQL 15
listening on loopback + db1's private address only, admits app1/app2 (scram) and refuses
proxy1; a second run changes nothing and neither restarts nor reloads; drift is repaired
with a reload (pg_hba, password) or a restart (listen_addresses); the password never shows
in any output. Last, the single-host topology: loopback only.

The tests of this module share one fresh split lab and run in file order."""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from lab.config import current_identity

from lab import lab as lab_ops
from releasy_deploy.cli import session
from releasy_deploy.tiers import db as db_tier
from tests.integration.labtools import psql

pytestmark = pytest.mark.lab

PASSWORD_FILE = "/etc/releasy/database-password"
# db1's address in whichever lab runs the suite (LAB_ID picks the subnet).
DB = current_identity().address(100)
HBA = "/etc/postgresql/15/main/pg_hba.conf"
DROPIN = "/etc/postgresql/15/main/conf.d/releasy.conf"
DEFER = "/etc/postgresql-common/createcluster.d/zz-releasy-first-install.conf"
VERIFIER = "SELECT rolpassword FROM pg_authid WHERE rolname = 'releasy';"

# Runs on an app host: password on stdin, never in argv.
CONNECT = """
import sys, psycopg
host, password = sys.argv[1], sys.stdin.read()
try:
    with psycopg.connect(host=host, port=5432, dbname="releasy", user="releasy",
                         password=password, connect_timeout=5) as conn:
        print("connected as", conn.execute("SELECT current_user").fetchone()[0])
except psycopg.OperationalError as exc:
    print("refused:", " ".join(str(exc).split()))
"""


@pytest.fixture(scope="module")
def lab(lab_session):
    # The dry run needs a db host nothing has set up (the other hosts may be).
    return lab_session.pristine("split", 2,
                                untouched={"db1": ("/etc/postgresql", "/etc/releasy")})


def on(lab, host: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Plain OpenSSH (LabHandle.ssh quotes each word for the remote shell)."""
    return lab.ssh(host, *argv, check=check)


def ssh_input(lab, host: str, argv: list[str], data: str) -> str:
    proc = subprocess.run([*lab_ops.ssh_base(lab.ident), host, shlex.join(argv)], input=data,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def connect(lab, source: str, password: str, target: str | None = None) -> str:
    return ssh_input(lab, source, ["python3", "-c", CONNECT, target or DB], password)


def server_clock(lab, host: str = "db1") -> tuple[str, str, str]:
    """(postmaster PID, start time, config load time): a restart changes all, a reload the last."""
    pid = on(lab, host, "head", "-1", "/var/lib/postgresql/15/main/postmaster.pid").stdout
    pid = pid.strip()
    [[start, loaded]] = psql(lab, "SELECT pg_postmaster_start_time(), pg_conf_load_time();",
                             host, database="postgres")
    return pid, start, loaded


def listeners(lab, host: str) -> set[str]:
    out = on(lab, host, "ss", "-Hltn", "sport = :5432").stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def summary_line(stdout: str, host: str) -> str:
    return next(l for l in stdout.splitlines() if re.match(rf"{host}\s+\d+ changed", l))


def password(lab, host: str = "db1") -> str:
    return on(lab, host, "cat", PASSWORD_FILE).stdout.strip()


def test_dry_run_on_a_fresh_lab_reports_and_changes_nothing(lab, monkeypatch, capsys):
    monkeypatch.setenv("RELEASY_INVENTORY", str(lab.inventory))
    with session(dry_run=True) as s:
        url = db_tier.database_url(s)
    assert url == f"postgres://releasy:PASSWORD-NOT-GENERATED-YET@{DB}:5432/releasy"
    assert "does not exist yet" in capsys.readouterr().out
    proc = lab.fab("db.setup", "--dry-run")
    out = proc.stdout
    assert "[db1] would change: packages: install postgresql-15 postgresql-client-15" in out
    assert f"[db1] would change: file {PASSWORD_FILE} (created" in out
    assert "secret content changed (not shown)" in out
    assert f"+++ {DROPIN} (new)" in out and f"+listen_addresses = 'localhost,{DB}'" in out
    assert ("[db1] would create cluster 15/main after installing (the package is told not"
            " to), then start postgresql@15-main with the managed settings") in out
    assert "would change: role releasy (created" in out
    assert "would change: database releasy (created" in out
    assert "0 changed" in summary_line(out, "db1")
    assert on(lab, "db1", "dpkg-query", "-W", "postgresql-15", check=False).returncode != 0
    assert on(lab, "db1", "test", "-e", "/etc/releasy", check=False).returncode != 0


def test_setup_listens_on_loopback_and_the_private_address_only(lab):
    proc = lab.fab("db.setup")
    assert "[db1] changed: packages: installed postgresql-15 postgresql-client-15" in proc.stdout
    assert "[db1] changed: role releasy (created" in proc.stdout
    assert f"accepting connections on /var/run/postgresql, 127.0.0.1, {DB}" in proc.stdout
    # "localhost" may also mean ::1 where /etc/hosts says so; never a wildcard.
    assert listeners(lab, "db1") - {"[::1]:5432"} == {"127.0.0.1:5432", f"{DB}:5432"}


def test_password_file_is_root_only_and_strong(lab):
    assert on(lab, "db1", "stat", "-c", "%U %G %a %F", PASSWORD_FILE).stdout.strip() == (
        "root root 600 regular file")
    assert len(password(lab)) >= 40


def test_app_hosts_connect_with_scram_and_proxy_is_refused(lab):
    pw = password(lab)
    assert connect(lab, "app1", pw) == "connected as releasy"
    assert connect(lab, "app2", pw) == "connected as releasy"  # app2: the sudo user's host
    refused = connect(lab, "proxy1", pw)
    assert refused.startswith("refused:") and "no pg_hba.conf entry" in refused
    assert connect(lab, "app1", pw + "x").startswith("refused:")
    [[verifier]] = psql(lab, VERIFIER, database="postgres")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert psql(lab, "SHOW password_encryption;", database="postgres") == [["scram-sha-256"]]


def test_second_run_changes_nothing_and_neither_restarts_nor_reloads(lab):
    before = server_clock(lab)
    proc = lab.fab("db.setup")
    assert "changed:" not in proc.stdout
    assert summary_line(proc.stdout, "db1").startswith("db1  0 changed /")
    assert server_clock(lab) == before


def test_app_pools_larger_than_the_server_takes_are_a_warning_not_a_change(lab, tmp_path):
    # 2 app hosts x 50 = 100 connections; Debian's PostgreSQL takes 97 from the app role.
    big = lab.inventory_variant(tmp_path, lambda d: d.setdefault("app", {}).update(
        database_max_connections=50))
    proc = lab.fab("db.setup", inventory=big)
    assert ("WARNING: the app's connection pools may open 100 connections (2 x"
            " app.database_max_connections 50), but PostgreSQL accepts 97") in proc.stdout
    assert summary_line(proc.stdout, "db1").startswith("db1  0 changed /")
    assert "WARNING" not in lab.fab("db.setup").stdout


def test_database_url_reads_the_password_in_one_round_trip_and_masks_it(lab, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("RELEASY_INVENTORY", str(lab.inventory))
    with session() as s:
        url = db_tier.database_url(s)
        assert s.executor.round_trips == {"db1": 1}
        assert url == f"postgres://releasy:{password(lab)}@{DB}:5432/releasy"
        assert s.executor.masker(url) == f"postgres://releasy:****@{DB}:5432/releasy"


def test_pg_hba_drift_and_a_changed_password_are_fixed_by_a_reload_not_a_restart(lab):
    on(lab, "db1", "sh", "-c", f"echo 'host all all 0.0.0.0/0 trust' >> {HBA}")
    psql(lab, "ALTER ROLE releasy PASSWORD 'tampered' SUPERUSER;", database="postgres")
    pid, start, loaded = server_clock(lab)
    proc = lab.fab("db.setup")
    assert f"[db1] changed: file {HBA} (content)" in proc.stdout
    assert "[db1] changed: service postgresql@15-main reloaded (config files changed)" in proc.stdout
    assert ("[db1] changed: role releasy (attributes NOSUPERUSER, password set from "
            f"{PASSWORD_FILE})") in proc.stdout
    new_pid, new_start, new_loaded = server_clock(lab)
    assert (new_pid, new_start) == (pid, start) and new_loaded != loaded
    assert "0.0.0.0/0" not in on(lab, "db1", "cat", HBA).stdout
    assert connect(lab, "app1", password(lab)) == "connected as releasy"


def test_a_listen_addresses_change_restarts(lab):
    # Someone narrowed listen_addresses and restarted: the app hosts are cut off.
    on(lab, "db1", "sh", "-c", f"sed -i 's/localhost,{DB}/localhost/' {DROPIN} && "
                               "systemctl restart postgresql@15-main")
    assert listeners(lab, "db1") - {"[::1]:5432"} == {"127.0.0.1:5432"}
    pid, _, _ = server_clock(lab)
    dropin = on(lab, "db1", "cat", DROPIN).stdout
    # A restart is downtime: asked first, and without a terminal (nor --yes) refused with
    # nothing changed.
    refused = lab.fab("db.setup", check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ("db1: PostgreSQL must be RESTARTED to apply listen_addresses 'localhost' ->"
            f" 'localhost,{DB}'. That is DOWNTIME") in refused.stderr
    assert "re-run with --yes" in refused.stderr and "changed:" not in refused.stdout
    assert on(lab, "db1", "cat", DROPIN).stdout == dropin and server_clock(lab)[0] == pid
    proc = lab.fab("db.setup", "--yes")
    assert ("[db1] changed: service postgresql@15-main restarted (listen_addresses "
            f"'localhost' -> 'localhost,{DB}'; downtime: asked first)") in proc.stdout
    assert server_clock(lab)[0] != pid
    assert listeners(lab, "db1") - {"[::1]:5432"} == {"127.0.0.1:5432", f"{DB}:5432"}
    assert connect(lab, "app2", password(lab)) == "connected as releasy"


def test_a_cluster_cut_off_before_it_was_made_is_made_by_the_next_run(lab):
    """A first install cut off between the package and the cluster leaves our
    createcluster.d file: the next run makes the cluster (Debian's way), writes its files,
    starts it and removes the file. Without that file a missing cluster is refused, never
    re-created: an empty cluster would hide lost data."""
    on(lab, "db1", "pg_dropcluster", "--stop", "15", "main")
    refused = lab.fab("db.setup", check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert ("PostgreSQL 15 is installed but its cluster 15/main does not exist"
            in refused.stdout + refused.stderr)
    on(lab, "db1", "sh", "-c", f"mkdir -p {DEFER.rsplit('/', 1)[0]} &&"
                               f" echo 'create_main_cluster = false' > {DEFER}")
    proc = lab.fab("db.setup")
    for said in ("cluster 15/main created", "service postgresql@15-main started",
                 "role releasy (created", "database releasy (created"):
        assert f"[db1] changed: {said}" in proc.stdout, proc.stdout
    assert on(lab, "db1", "test", "-e", DEFER, check=False).returncode != 0
    active = on(lab, "db1", "systemctl", "is-active", "postgresql@15-main").stdout
    assert active.strip() == "active"
    assert listeners(lab, "db1") - {"[::1]:5432"} == {"127.0.0.1:5432", f"{DB}:5432"}
    assert connect(lab, "app1", password(lab)) == "connected as releasy"
    assert "0 changed" in summary_line(lab.fab("db.setup").stdout, "db1")


def test_password_and_verifier_never_appear_in_any_output(lab, captured_outputs):
    secrets = [password(lab),
               psql(lab, VERIFIER, database="postgres")[0][0]]
    assert captured_outputs  # the runs above were captured
    for output in captured_outputs:
        for secret in secrets:
            assert secret not in output
            assert secret.split("$")[-1] not in output  # not even the keys of the verifier


@pytest.mark.lab_shape("single", database="postgres")
def test_single_host_postgres_is_loopback_only(lab_session):
    solo = lab_session.use("single")
    proc = solo.fab("db.setup")
    assert "accepting connections on /var/run/postgresql, 127.0.0.1\n" in proc.stdout
    assert listeners(solo, "solo") - {"[::1]:5432"} == {"127.0.0.1:5432"}
    hba = [line.split() for line in on(solo, "solo", "cat", HBA).stdout.splitlines()
           if line.strip() and not line.startswith("#")]
    assert [r[3] for r in hba if r[0] == "host"] == ["127.0.0.1/32", "::1/128"]
    assert connect(solo, "solo", password(solo, "solo"), "127.0.0.1") == "connected as releasy"
