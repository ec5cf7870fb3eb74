"""`fab app.setup` on the real lab: single host with SQLite, from a never-provisioned host.

The tests run in file order and build on each other (fresh host -> 1.0.0 -> idempotent ->
1.1.0 -> ...), like a molecule converge/idempotence sequence. Hosts are looked at with
plain OpenSSH (`lab.ssh`), independently of the code under test.
"""
from __future__ import annotations

import hashlib
import re
import shutil

import pytest
import yaml

from releasy_deploy.cli import session
from releasy_deploy.releases import fetch_release
from releasy_deploy.tiers import app, app_setup
from tests.integration.labtools import SOLO, main_pid, sh, version_on

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("single", database="sqlite")]

HOST = SOLO
WEIRD_KEY = "adm key 'sq' \"dq\" $HOME `id` \\back é€ # ;x"


@pytest.fixture(scope="module")
def lab(lab_session):
    return lab_session.fresh("single", database="sqlite")


def remote(lab, *argv: str, check: bool = True):
    return lab.ssh(HOST, *argv, check=check)  # argv arrives as words (operator_ssh quotes)


def http(lab, port: int, path: str) -> str:
    return sh(lab, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
              f"http://127.0.0.1:{port}{path}", check=False)


def changed_count(out: str) -> int:
    m = re.search(rf"^{HOST}\s+(\d+) changed", out, re.MULTILINE)
    assert m, out
    return int(m.group(1))


# ------------------------------------------------------------------------------ fresh host
def test_without_version_a_fresh_host_is_refused_and_untouched(lab):
    proc = lab.fab("app.setup", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"no release installed on {HOST}: pass --version" in proc.stderr
    assert sh(lab, "sh", "-c", "test -e /opt/releasy || echo absent") == "absent"
    assert sh(lab, "sh", "-c", "id releasy >/dev/null 2>&1 || echo absent") == "absent"


def test_dry_run_on_a_fresh_host_reports_and_touches_nothing(lab):
    proc = lab.fab("app.setup", "--version", "1.0.0", "--dry-run")
    out = proc.stdout
    assert "would change: user releasy" in out
    assert "would change: release 1.0.0" in out
    assert "+RELEASY_BIND_ADDR=\"127.0.0.1:8080\"" in out  # the env file diff, secrets masked
    assert "+RELEASY_ADMIN_API_KEY=****" in out
    assert "+ExecStart=/opt/releasy/current/releasy-server" in out
    assert sh(lab, "sh", "-c", "test -e /opt/releasy || echo absent") == "absent"
    assert sh(lab, "sh", "-c", "id releasy >/dev/null 2>&1 || echo absent") == "absent"
    assert sh(lab, "systemctl", "is-active", "releasy.service", check=False) == "inactive"


# ------------------------------------------------------------------------------ first install
def test_setup_installs_and_starts_the_release(lab):
    proc = lab.fab("app.setup", "--version", "1.0.0")
    assert "ready at http://127.0.0.1:8080/ready" in proc.stdout
    assert sh(lab, "systemctl", "is-active", "releasy.service") == "active"
    assert sh(lab, "systemctl", "is-enabled", "releasy.service") == "enabled"
    assert http(lab, 8080, "/ready") == "200"
    assert version_on(lab) == "1.0.0"
    assert sh(lab, "readlink", "/opt/releasy/current") == "releases/1.0.0"
    stats = sh(lab, "stat", "-c", "%n %U %G %a", "/etc/releasy/releasy.env", "/etc/releasy",
               "/var/lib/releasy", "/var/lib/releasy/releasy.db", "/opt/releasy/releases/1.0.0")
    assert stats.splitlines() == [
        "/etc/releasy/releasy.env root releasy 640",
        "/etc/releasy root releasy 750",
        "/var/lib/releasy releasy releasy 750",
        "/var/lib/releasy/releasy.db releasy releasy 600",
        "/opt/releasy/releases/1.0.0 root root 755",
    ]
    assert sh(lab, "getent", "passwd", "releasy").split(":")[2::4] == ["10001", "/usr/sbin/nologin"]


def test_the_service_runs_sandboxed_as_the_service_user(lab):
    pid = main_pid(lab)
    status = sh(lab, "cat", f"/proc/{pid}/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "10001"
    assert fields["NoNewPrivs"] == "1"
    assert fields["CapBnd"] == "0000000000000000"
    assert fields["Seccomp"] == "2"
    # ProtectSystem=strict: the service's view of /etc is read-only
    denied = sh(lab, "nsenter", "-t", pid, "-m", "sh", "-c", "touch /etc/x 2>&1 || true")
    assert "Read-only file system" in denied


def test_second_run_changes_nothing_and_restarts_nothing(lab):
    before = main_pid(lab)
    proc = lab.fab("app.setup", "--version", "1.0.0")
    assert changed_count(proc.stdout) == 0, proc.stdout
    assert "changed:" not in proc.stdout
    assert main_pid(lab) == before
    # and without --version it keeps what runs
    proc = lab.fab("app.setup")
    assert changed_count(proc.stdout) == 0, proc.stdout
    assert main_pid(lab) == before


def test_a_no_op_run_costs_one_round_trip(lab, monkeypatch, capsys):
    monkeypatch.setenv("RELEASY_INVENTORY", str(lab.inventory))
    with session() as s:
        app_setup.setup(s, "1.0.0")
        trips = dict(s.executor.round_trips)
        tally = s.reporter.tally()[HOST]
    assert tally.changed == 0 and tally.errors == 0
    assert trips == {HOST: 1}, trips


def test_owner_and_mode_drift_is_fixed_without_a_restart(lab):
    sh(lab, "chmod", "0644", "/etc/releasy/releasy.env")
    sh(lab, "chmod", "0600", "/etc/systemd/system/releasy@.service")
    before = main_pid(lab)
    proc = lab.fab("app.setup")
    assert "changed: file /etc/releasy/releasy.env (root:releasy 0644 -> root:releasy 0640)" in proc.stdout
    assert "changed: unit /etc/systemd/system/releasy@.service (owner/mode fixed" in proc.stdout
    assert "restarted" not in proc.stdout
    assert main_pid(lab) == before
    assert sh(lab, "stat", "-c", "%a", "/etc/releasy/releasy.env",
              "/etc/systemd/system/releasy@.service").split() == ["640", "644"]


# ------------------------------------------------------------------------------ changes
def test_dry_run_shows_a_masked_env_diff_and_changes_nothing(lab, tmp_path):
    inv = lab.inventory_variant(tmp_path, lambda d: d.update(app={"log_level": "debug"}))
    before_sum = sh(lab, "sha256sum", "/etc/releasy/releasy.env")
    before_pid = main_pid(lab)
    proc = lab.fab("app.setup", "--dry-run", "--rotate-secret", "admin_api_key", inventory=inv,
                   env={"RELEASY_ADMIN_API_KEY": WEIRD_KEY})
    out = proc.stdout
    assert '-RELEASY_LOG_LEVEL="info"' in out and '+RELEASY_LOG_LEVEL="debug"' in out
    assert "-RELEASY_ADMIN_API_KEY=****  (old value, not shown)" in out
    assert "+RELEASY_ADMIN_API_KEY=****  (new value, not shown)" in out
    assert "would change: releasy.service restarted (env file changed)" in out
    assert WEIRD_KEY not in out + proc.stderr
    assert sh(lab, "sha256sum", "/etc/releasy/releasy.env") == before_sum
    assert main_pid(lab) == before_pid


def test_env_values_with_spaces_quotes_and_non_ascii_reach_the_process_exactly(lab):
    before = main_pid(lab)
    proc = lab.fab("app.setup", "--rotate-secret", "admin_api_key",
                   env={"RELEASY_ADMIN_API_KEY": WEIRD_KEY})
    assert "releasy.service restarted (env file changed)" in proc.stdout
    assert WEIRD_KEY not in proc.stdout + proc.stderr
    pid = main_pid(lab)
    assert pid != before
    environ = remote(lab, "cat", f"/proc/{pid}/environ").stdout.split("\0")
    assert f"RELEASY_ADMIN_API_KEY={WEIRD_KEY}" in environ
    assert "RELEASY_BIND_ADDR=127.0.0.1:8080" in environ
    # back to the lab's own secrets
    lab.fab("app.setup", "--rotate-secret", "admin_api_key")


def test_new_version_switches_current_and_restarts(lab):
    before = main_pid(lab)
    proc = lab.fab("app.setup", "--version", "1.1.0")
    assert "changed: current -> releases/1.1.0 (was 1.0.0)" in proc.stdout
    assert "releasy.service restarted" in proc.stdout
    assert sh(lab, "readlink", "/opt/releasy/current") == "releases/1.1.0"
    assert version_on(lab) == "1.1.0"
    assert main_pid(lab) != before
    assert sh(lab, "ls", "/opt/releasy/releases").split() == ["1.0.0", "1.1.0"]


def test_building_blocks_run_a_second_version_on_a_second_port(lab, monkeypatch):
    """What blue/green will do: stage without activating, then a releasy@PORT instance."""
    monkeypatch.setenv("RELEASY_INVENTORY", str(lab.inventory))
    with session() as s:
        conn = s.executor.conn(HOST)
        release = fetch_release(s.inventory, "1.1.1")
        assert app.stage_release(conn, release).changed
        assert not app.stage_release(conn, release).changed  # same sha256 marker: skipped
        assert app.installed_releases(conn) == ["1.0.0", "1.1.0", "1.1.1"]
        assert app.current_release(conn) == "1.1.0"
        remote(lab, "sh", "-c",
                "ln -sfn /opt/releasy/releases/1.1.1 /opt/releasy/instances/8081 && "
                "printf 'RELEASY_BIND_ADDR=\"127.0.0.1:8081\"\\n' > /etc/releasy/instance-8081.env"
                " && systemctl start releasy@8081.service")
        try:
            app.wait_ready(conn, "127.0.0.1:8081", 30, unit="releasy@8081.service")
            assert version_on(lab, 8081) == "1.1.1"
            assert version_on(lab, 8080) == "1.1.0"
            assert "releasy@8081.service" in app.journal_tail(conn, "releasy@8081.service")
        finally:
            remote(lab, "sh", "-c", "systemctl stop releasy@8081.service; rm -f "
                    "/opt/releasy/instances/8081 /etc/releasy/instance-8081.env")


# ------------------------------------------------------------------------------ failures
def test_tampered_tarball_fails_before_any_upload(lab, tmp_path):
    releases = tmp_path / "releases"
    shutil.copytree(lab.releases, releases)
    tarball = releases / "releasy-server-1.2.0-broken-linux-x86_64.tar.gz"
    data = bytearray(tarball.read_bytes())
    expected = hashlib.sha256(data).hexdigest()
    data[len(data) // 2] ^= 0x01
    tarball.write_bytes(bytes(data))
    inv = lab.inventory_variant(tmp_path, lambda d: d["release"].update(source=str(releases)))
    before = main_pid(lab)
    proc = lab.fab("app.setup", "--version", "1.2.0-broken", inventory=inv, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"checksum mismatch for {tarball}" in proc.stderr
    assert expected in proc.stderr and hashlib.sha256(data).hexdigest() in proc.stderr
    assert "[solo]" not in proc.stdout  # no host was contacted
    assert sh(lab, "ls", "-A", "/opt/releasy/releases").split() == ["1.0.0", "1.1.0", "1.1.1"]
    assert main_pid(lab) == before


def test_release_that_never_becomes_ready_fails_with_the_journal_tail(lab, tmp_path):
    inv = lab.inventory_variant(tmp_path, lambda d: d.update(app={"ready_timeout": 3}))
    proc = lab.fab("app.setup", "--version", "1.2.0-neverready", inventory=inv, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "solo: releasy.service did not become ready within 3 s" in err
    assert "Last 30 lines of `journalctl -u releasy.service`" in err
    assert "never-ready build" in err  # a line from the service's own journal
    # going back is one command away
    proc = lab.fab("app.setup", "--version", "1.1.0")
    assert "switched to 1.1.0" in proc.stdout
    assert http(lab, 8080, "/ready") == "200"


# ------------------------------------------------------------------------------ split topology
@pytest.mark.lab_shape("split", 2)
def test_split_topology_with_postgres_and_a_sudo_user(lab_session):
    """db.setup (the db tier) then app.setup on app1 (root) and app2 (`deploy` + sudo)."""
    split = lab_session.use("split", 2)
    split.fab("db.setup")
    split.fab("app.setup", "--version", "1.0.0")
    for host, address in (("app1", "10.77.{}.21"), ("app2", "10.77.{}.22")):
        bind = address.format(split.ident.subnet_octet) + ":8080"
        # bound on the private address: the proxy host reaches it there
        out = split.ssh("proxy1", "curl", "-fsS", f"http://{bind}/version").stdout
        assert yaml.safe_load(out)["version"] == "1.0.0" and yaml.safe_load(out)["host"] == host
    assert split.ssh("app2", "id", "-un").stdout.strip() == "deploy"
    assert split.ssh("app2", "sudo", "stat", "-c", "%U %G %a", "/etc/releasy/releasy.env"
                     ).stdout.strip() == "root releasy 640"

    def pids() -> dict[str, str]:
        return {h: split.ssh(h, "systemctl", "show", "--property=MainPID", "--value",
                             "releasy.service").stdout for h in ("app1", "app2")}

    before = pids()
    proc = split.fab("app.setup")
    assert re.search(r"^app1\s+0 changed", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^app2\s+0 changed", proc.stdout, re.MULTILINE), proc.stdout
    assert pids() == before
    # the database password (generated on db1) is in the env files, never in any output
    password = split.ssh("db1", "cat", "/etc/releasy/database-password").stdout.strip()
    assert len(password) >= 16
    url = split.ssh("app2", "sudo", "sed", "-n", "s/^RELEASY_DATABASE_URL=//p",
                    "/etc/releasy/releasy.env").stdout  # the password stays out of any argv
    assert url.startswith('"postgres') and password in url
    SEEN_SECRETS.append(password)


SEEN_SECRETS: list[str] = [WEIRD_KEY]


def test_no_secret_value_appears_in_any_output(lab, captured_outputs):
    values = yaml.safe_load((lab.state_dir / "secrets.yaml").read_text()).values()
    assert captured_outputs
    for text in captured_outputs:
        for value in [*values, *SEEN_SECRETS]:
            assert value not in text
