"""The Releasy stand-in on real hosts: started from its release tarball on app hosts against
PostgreSQL on db1, it answers /ready, and two instances started at the same moment apply each
migration exactly once (upstream's own advisory lock serialises them)."""
from __future__ import annotations

import tarfile
import time

import pytest

from lab.standin.build import build_release
from releasy_deploy.executor import Executor
from releasy_deploy.inventory import load_inventory
from releasy_deploy.output import Reporter

PORT = 18080
UNIT = "standin-test"


@pytest.fixture(scope="module")
def lab(lab_session):
    handle = lab_session.use("split", 2)
    # The migration log must start empty: no Releasy set up by an earlier module may run
    # against the database, which starts out brand-new.
    handle.clear(("app1", "app2"))
    handle.fab("db.setup")
    yield handle
    # Leave an empty application database behind for the modules that follow.
    handle.clear(())
    handle.fab("db.setup")


def db_query(lab, sql: str) -> list[list[str]]:
    out = lab.ssh("db1", "runuser", "-u", "postgres", "--", "psql", "-XAtq", "-F", "|",
                  "-d", "releasy", "-c", sql).stdout
    return [line.split("|") for line in out.splitlines() if line]


def test_concurrent_starts_apply_each_migration_once(lab, tmp_path):
    # Slow migrations widen the window in which both instances race for the lock.
    tarball = build_release("9.0.0", tmp_path, migrations=3, migration_seconds=1.0)
    with tarfile.open(tarball) as tar:
        assert tar.getnames() == ["releasy-server"]
    inv = load_inventory(lab.inventory)
    password = lab.ssh("db1", "cat", "/etc/releasy/database-password").stdout.strip()
    db_host = inv.db_host.private_address
    with Executor(inv, reporter=Reporter(), secrets={"db": password}) as ex:
        def start(c):
            c.run(["mkdir", "-p", "/opt/standin-test"], sudo=True)
            c.put_bytes(tarball.read_bytes(), "/opt/standin-test/release.tar.gz")
            c.run(["tar", "-xzf", "/opt/standin-test/release.tar.gz", "-C",
                   "/opt/standin-test"], sudo=True)
            env = (f"RELEASY_DATABASE_URL=postgres://releasy:{password}@{db_host}:5432/releasy\n"
                   f"RELEASY_BIND_ADDR={c.host.private_address}:{PORT}\n")
            c.put_bytes(env.encode(), "/opt/standin-test/env", mode=0o600, secret=True)
            c.run(["systemctl", "reset-failed", UNIT], sudo=True, check=False)
            c.run(["systemd-run", f"--unit={UNIT}",
                   "--property=EnvironmentFile=/opt/standin-test/env",
                   "/opt/standin-test/releasy-server"], sudo=True)

        def wait_ready(c):
            url = f"http://{c.host.private_address}:{PORT}/ready"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if c.run(["curl", "-fsS", "--max-time", "2", url], check=False,
                         mutates=False).ok:
                    return c.run(["curl", "-fsS", url.replace("/ready", "/version")],
                                 mutates=False).stdout
                time.sleep(0.3)
            journal = c.run(["journalctl", "-u", UNIT, "-n", "30", "--no-pager"], sudo=True,
                            check=False, mutates=False).stdout
            raise AssertionError(f"{c.name} never became ready:\n{journal}")

        try:
            # Upload and unpack first, then start both at (nearly) the same moment.
            ex.each(["app1", "app2"], start)
            versions = ex.each(["app1", "app2"], wait_ready)
        finally:
            ex.each(["app1", "app2"],
                    lambda c: c.run(["systemctl", "stop", UNIT], sudo=True, check=False))
    assert all('"9.0.0"' in v for v in versions.values())

    applied = db_query(lab, "SELECT version, success FROM _sqlx_migrations ORDER BY version")
    assert applied == [["1", "t"], ["2", "t"], ["3", "t"]]
    log = db_query(lab, "SELECT migration, count(*), min(host) FROM standin_migration_log "
                        "GROUP BY migration ORDER BY migration")
    assert [row[:2] for row in log] == [["1", "1"], ["2", "1"], ["3", "1"]]
    # One host applied all three; the other found them done once it got the lock.
    assert len({row[2] for row in log}) == 1
    starts = db_query(lab, "SELECT host, migrations_applied FROM standin_start_log "
                           "WHERE binary_version = '9.0.0' ORDER BY host")
    assert sorted(r[0] for r in starts) == ["app1", "app2"]
    assert sorted(int(r[1]) for r in starts) == [0, 3]
