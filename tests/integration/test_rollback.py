"""`fab deploy.rollback` on the lab (proxy1, app1..app3, db1): back over releases with the
same migrations, then across a migration, which is refused unless the pre-deploy dump is
restored (--restore-db). The database is inspected with psql on db1 over plain OpenSSH.

One provisioned lab for the module: `fab site --version 1.0.0` on a fresh database, then
`fab deploy.rolling` to 1.1.0 and 1.1.1 (the lab's default releases: 1.0.0 has
migrations 1-2, 1.1.0 and 1.1.1 add migration 3)."""
from __future__ import annotations


import pytest

from tests.integration.labtools import AUDIT_LOG, assert_all_on, last_audit, psql

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("split", 3)]

APPS = ("app1", "app2", "app3")


def level(lab) -> int:
    return int(psql(lab, "SELECT max(version) FROM _sqlx_migrations WHERE success")[0][0])


@pytest.fixture(scope="module")
def lab(lab_session):
    lab = lab_session.use("split", apps=3)
    # A brand-new database, no dumps, no recorded levels left from earlier tests.
    lab.reset("1.0.0")
    # `fab site` recorded the migration level of the release it installed (not only rollouts).
    assert {h: lab.ssh(h, "cat", "/opt/releasy/releases/1.0.0/.schema-version").stdout.strip()
            for h in APPS} == {h: "2" for h in APPS}
    for version in ("1.1.0", "1.1.1"):
        lab.fab("deploy.rolling", "--version", version, "--yes")
    assert_all_on(lab, "1.1.1", APPS)
    assert level(lab) == 3
    return lab


def test_a_rollout_to_a_release_behind_the_database_is_refused_before_anything(lab):
    """1.0.0 ran against level 2 (recorded by `fab site`), the database is at 3: every task
    that would switch to it refuses in preflight, exit 2, pointing at --restore-db."""
    dumps_before = lab.sudo("db1", "ls", "/var/backups/releasy").stdout.split()
    audit_before = lab.sudo("app1", "wc", "-l", AUDIT_LOG).stdout
    for task in (("deploy.rolling", "--version", "1.0.0", "--yes"),
                 ("site", "--version", "1.0.0"), ("app.setup", "--version", "1.0.0")):
        proc = lab.fab(*task, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert ("refusing to roll out 1.0.0. 1.0.0 ran against migration level 2"
                " (/opt/releasy/releases/1.0.0/.schema-version), but the database is at"
                " level 3") in out, out
        assert "`fab deploy.rollback --to 1.0.0 --restore-db`" in out, out
        assert "drain" not in out and " changed: " not in proc.stdout, out
    # Nothing touched: no dump taken, no host drained or switched, no audit record.
    assert lab.sudo("db1", "ls", "/var/backups/releasy").stdout.split() == dumps_before
    assert lab.sudo("app1", "wc", "-l", AUDIT_LOG).stdout == audit_before
    assert_all_on(lab, "1.1.1", APPS)
    assert level(lab) == 3


def test_rollback_to_a_release_with_the_same_migrations(lab):
    proc = lab.fab("deploy.rollback", "--yes")  # default target: the previous release
    assert "rollback to 1.1.0 done: app1, app2, app3" in proc.stdout
    assert_all_on(lab, "1.1.0", APPS)
    assert level(lab) == 3
    # No dump is taken for a rollback that restores nothing.
    assert not any("from-1.1.1_to-1.1.0" in line for line in lab.sudo(
        "db1", "ls", "/var/backups/releasy").stdout.split())
    record = last_audit(lab, "app1")
    assert (record["action"], record["to"], record["result"]) == ("deploy.rollback", "1.1.0",
                                                                 "ok")
    assert record["from_versions"] == {h: "1.1.1" for h in APPS}


def test_rollback_across_a_migration_is_refused_then_restores_the_dump(lab):
    assert_all_on(lab, "1.1.0", APPS)
    # A write after the deploy that added migration 3: the restore loses it.
    psql(lab, "INSERT INTO standin_m1 (id, label) VALUES (42, 'written after the dump')")

    refused = lab.fab("deploy.rollback", check=False)  # default target: 1.0.0
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2, out
    assert ("error: refusing to roll back to 1.0.0: it ran against database migrations up to 2"
            " (/opt/releasy/releases/1.0.0/.schema-version), but the database is at 3.") in out
    assert "`fab deploy.rollback --to 1.0.0 --restore-db`" in out
    assert "_from-1.0.0_to-1.1.0_m2.dump" in out and "loses every write made since" in out
    assert "Nothing was changed." in out and " changed: " not in refused.stdout

    unconfirmed = lab.fab("deploy.rollback", "--restore-db", check=False, timeout=300)
    out = unconfirmed.stdout + unconfirmed.stderr
    assert unconfirmed.returncode == 2, out
    assert "every write made since" in out and "is LOST" in out
    assert "stdin is not a terminal, so nobody can answer: re-run with --yes" in out
    assert " changed: " not in unconfirmed.stdout
    assert_all_on(lab, "1.1.0", APPS)
    assert level(lab) == 3

    restored = lab.fab("deploy.rollback", "--restore-db", "--yes")
    assert "rollback to 1.0.0 done" in restored.stdout
    assert_all_on(lab, "1.0.0", APPS)
    assert level(lab) == 2  # the database is back at 1.0.0's migrations
    assert psql(lab, "SELECT to_regclass('standin_m3') IS NULL,"
                     " count(*) FILTER (WHERE id = 42) FROM standin_m1") == [["t", "0"]]
    # What the database held just before the restore was saved first.
    dumps = lab.sudo("db1", "ls", "/var/backups/releasy").stdout.split()
    assert [d for d in dumps if d.endswith("_from-1.1.0_to-1.0.0_m3.dump")], dumps
    assert lab.ssh("app1", "cat", "/opt/releasy/releases/1.0.0/.schema-version"
                   ).stdout.strip() == "2"
