"""`fab site` end to end on the split and single-host topologies: Releasy answers through the
proxy over TLS, a second run changes and restarts nothing, and the firewall exposes exactly
what the topology needs (seen from the outside namespace, the operator and peer hosts)."""
from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
import yaml

from releasy_deploy.inventory import load_inventory
from tests.integration.labtools import (changed_total, current, outside_get, ready, rotation,
                                        start_fab, via_proxy)


def service_pids(lab, host: str) -> dict[str, str]:
    """Main PIDs of the services `site` manages on a host (nginx, postgres, releasy)."""
    out = lab.ssh(host, "sh", "-c",
                  "for u in nginx postgresql@15-main releasy; do "
                  "printf '%s=%s\\n' $u $(systemctl show -p MainPID --value $u 2>/dev/null); "
                  "done").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def split(lab_session, tmp_path_factory):
    # The first site on a fresh split lab (test_output looks at the same run).
    lab, first, _ = lab_session.first_site(tmp_path_factory.mktemp("site"))
    assert changed_total(first.stdout) > 0
    return lab


def test_split_site_serves_releasy_through_the_proxy(split):
    inv = load_inventory(split.inventory)
    proxy = inv.hosts_in("proxy")[0].address
    code, body = via_proxy(proxy, "/ready")
    assert code == 200 and '"ok"' in body
    versions = {via_proxy(proxy, "/version")[1] for _ in range(6)}
    assert all('"1.0.0"' in v for v in versions)
    # Plain HTTP is redirected to HTTPS.
    proc = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                           f"http://{proxy}/ready"], capture_output=True, text=True)
    assert proc.stdout in ("301", "308")


def test_download_link_is_reachable_from_the_internet(split):
    """Releasy builds download links from RELEASY_PUBLIC_BASE_URL: https:// + the served
    name, not upstream's default http://127.0.0.1:8080 (the app host's own loopback)."""
    inv = load_inventory(split.inventory)
    proxy, name = inv.hosts_in("proxy")[0].name, inv.tls.server_name
    code, body = outside_get(split, f"https://{name}/api/download-link", proxy, name)
    assert code == 200, body
    url = json.loads(body)["url"]
    assert url.startswith(f"https://{name}/"), url
    code, body = outside_get(split, url, proxy, name)
    assert code == 200 and json.loads(body)["version"] == "1.0.0", body


def test_split_second_site_changes_and_restarts_nothing(split):
    before = {h: service_pids(split, h) for h in ("proxy1", "app1", "app2", "db1")}
    second = split.fab("site")
    assert changed_total(second.stdout) == 0, second.stdout
    after = {h: service_pids(split, h) for h in ("proxy1", "app1", "app2", "db1")}
    assert before == after


def test_split_exposure_matches_the_topology(split):
    hosts = ("proxy1", "app1", "app2", "db1")
    # From the internet: only the proxy's 80 and 443.
    for host in hosts:
        for port in (22, 80, 443, 8080, 5432):
            expected = "open" if host == "proxy1" and port in (80, 443) else "filtered"
            assert split.probe(host, port) == expected, (host, port)
    # From the operator (the admin CIDR): SSH everywhere.
    for host in hosts:
        assert split.probe(host, 22, "operator") == "open", host
    # Tier to tier: the app port from the proxy only, PostgreSQL from the app hosts only.
    assert split.probe("app1", 8080, "proxy1") == "open"
    assert split.probe("app1", 8080, "db1") == "filtered"
    assert split.probe("app2", 8080, "app1") == "filtered"
    assert split.probe("db1", 5432, "app1") == "open"
    assert split.probe("db1", 5432, "app2") == "open"
    assert split.probe("db1", 5432, "proxy1") == "filtered"


def test_split_audit_agrees_then_flags_a_port_opened_by_hand(split):
    netns = split.ident.outside_ns
    assert split.fab("firewall.audit", "--netns", netns).returncode == 0
    split.ssh("app1", "ufw", "allow", "9999/tcp")
    split.ssh("app1", "systemd-run", "--unit=extra-9999", "python3", "-m", "http.server",
              "--bind", "0.0.0.0", "9999")
    try:
        proc = split.fab("firewall.audit", "--netns", netns, check=False)
        assert proc.returncode == 1
        assert "9999" in proc.stdout + proc.stderr
    finally:
        split.ssh("app1", "systemctl", "stop", "extra-9999", check=False)
        split.ssh("app1", "ufw", "delete", "allow", "9999/tcp")


def test_dry_run_on_a_provisioned_lab_reports_nothing_to_do(split):
    proc = split.fab("site", "--dry-run")
    assert "site: 0 would change" in proc.stdout


def _env_sums(lab) -> dict[str, str]:
    return {h: lab.sudo(h, "sha256sum", "/etc/releasy/releasy.env").stdout.split()[0]
            for h in ("app1", "app2")}


def test_secrets_never_drift(split, tmp_path):
    """The pepper (like every secret) stays what the hosts have: kept when the operator's
    side lacks it, a different value refused, replaced only by an explicit rotation."""
    for host in ("app1", "app2"):
        attrs = split.sudo(host, "stat", "-c", "%U:%G %a", "/etc/releasy-deploy",
                           "/etc/releasy-deploy/secrets.json").stdout.split("\n")[:2]
        assert attrs == ["root:root 700", "root:root 600"], host
    lab_secrets = yaml.safe_load((split.state_dir / "secrets.yaml").read_text())
    without = tmp_path / "secrets.yaml"
    without.write_text(yaml.safe_dump({"admin_api_key": lab_secrets["admin_api_key"]}))
    without.chmod(0o600)
    inv = split.inventory_variant(tmp_path, lambda d: d["secrets"].update(file=str(without)))
    pids, sums = {h: service_pids(split, h) for h in ("app1", "app2")}, _env_sums(split)

    # Unset on the operator's side (cron without the variable, a second operator): kept.
    kept = split.fab("site", inventory=inv)
    assert changed_total(kept.stdout) == 0, kept.stdout
    assert "api_key_pepper: not set here, keeping the app hosts' value" in kept.stdout
    assert _env_sums(split) == sums
    assert {h: service_pids(split, h) for h in ("app1", "app2")} == pids

    # A different value: refused, exit 2, naming the secret; nothing changed.
    other = "another-pepper-0123456789abcdef"
    refused = split.fab("site", inventory=inv, env={"RELEASY_API_KEY_PEPPER": other},
                        check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2, said
    assert "api_key_pepper" in said and "--rotate-secret api_key_pepper" in said
    assert other not in said and lab_secrets["api_key_pepper"] not in said
    assert _env_sums(split) == sums
    assert {h: service_pids(split, h) for h in ("app1", "app2")} == pids

    # An explicit rotation: applied, with the warning of what it breaks.
    try:
        rotated = split.fab("app.setup", "--rotate-secret", "api_key_pepper", inventory=inv,
                            env={"RELEASY_API_KEY_PEPPER": other})
        assert ("WARNING: rotating api_key_pepper: every API key issued so far stops working"
                in rotated.stdout)
        assert other not in rotated.stdout + rotated.stderr
        for host in ("app1", "app2"):
            pid = service_pids(split, host)["releasy"]
            environ = split.sudo(host, "cat", f"/proc/{pid}/environ").stdout.split("\0")
            assert f"RELEASY_API_KEY_PEPPER={other}" in environ, host
    finally:  # back to the lab's own pepper, the same way
        split.fab("app.setup", "--rotate-secret", "api_key_pepper")
    assert changed_total(split.fab("site").stdout) == 0


def test_host_secrets_are_masked_in_ad_hoc_output_and_the_json_log_is_private(split,
                                                                                tmp_path):
    password = (split.host_root("db1") / "etc/releasy/database-password").read_text().strip()
    log = tmp_path / "events.jsonl"
    env = {"RELEASY_JSON_LOG": str(log)}
    shown = split.fab("run", "--tier", "app", "--", "cat /etc/releasy/releasy.env", env=env)
    assert "RELEASY_DATABASE_URL=" in shown.stdout
    assert password not in shown.stdout + shown.stderr + log.read_text()
    on_db = split.fab("run", "--tier", "db", "--", "cat /etc/releasy/database-password")
    assert password not in on_db.stdout + on_db.stderr and "****" in on_db.stdout
    assert log.stat().st_mode & 0o777 == 0o600


def test_one_ctrl_c_ends_an_endless_ad_hoc_command(split):
    proc = start_fab(split.inventory, "run", "--tier", "app", "--",
                     "echo started; exec tail -f /dev/null", stdin=subprocess.DEVNULL,
                     stderr=subprocess.STDOUT)
    try:
        seen = []
        for line in proc.stdout:  # both hosts are running it
            seen.append(line)
            if sum("| started" in x for x in seen) == 2:
                break
        proc.send_signal(signal.SIGINT)  # once: no second press, no kill
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()  # only the process this test started
            proc.wait()


def test_an_app_host_joining_a_firewalled_fleet_reaches_the_database(split, tmp_path):
    """The fleet shrinks, then grows behind a firewall that is on. app2 leaves the
    inventory: `fab site` closes db1's PostgreSQL port to it and takes it out of pg_hba and
    of the proxy's rotation. It is stopped and wiped (a host re-imaged). Back in, `fab site`
    opens db1's rule for it before the app tier installs it (its /ready runs SELECT 1 on
    db1), not in the firewall step at the end, and puts it in rotation: a first install
    cannot have been drained by hand."""
    def without_app2(data):
        del data["hosts"]["app2"]
        data["tiers"]["app"].remove("app2")

    release = current(split, "app1")
    small = split.inventory_variant(tmp_path, without_app2)
    shrunk = split.fab("site", inventory=small).stdout
    assert "no longer app hosts in the inventory taken out of rotation" in shrunk, shrunk
    assert rotation(split) == ["app1"]
    assert "postgres from app2" not in split.sudo("db1", "ufw", "show", "added").stdout
    split.sudo("app2", "systemctl", "stop", "releasy.service")
    split.sudo("app2", "rm", "-rf", "/opt/releasy", "/etc/systemd/system/releasy.service")
    split.sudo("app2", "systemctl", "daemon-reload")
    try:
        out = split.fab("site", "--version", release).stdout
        joined = rotation(split)
    finally:  # whatever happened: the lab back to its whole inventory for the next tests
        split.fab("proxy.setup", "--reset-upstreams", check=False)
        again = split.fab("site", check=False)
    opened = re.search(r"^\[db1\] .*firewall rule added: .*postgres from app2.*$", out, re.M)
    assert opened, out
    # during the app step: after the db tier, before the proxy and the firewall steps
    assert out.index("--- app ---") < opened.start() < out.index("--- proxy ---"), out
    assert "[proxy1] first install on app2: put in rotation" in out, out
    assert joined == ["app1", "app2"] and ready(split, "app2")
    assert changed_total(again.stdout) == 0, again.stdout


def test_a_firewall_failing_beside_the_other_steps_fails_the_run_after_them(split):
    """A host whose firewall is off (here app2's, disabled by hand; on a first install,
    every host's) gets it converged beside `fab site`'s other steps. Its change failing
    (an injected fault: the first host-changing command of a run on a converged fleet is
    app2's firewall script) ends the run with exit 1 naming app2's firewall and saying
    that nothing was changed there, once the other steps finished and before the deploy
    lock is released; app2 keeps serving and a re-run turns its firewall on."""
    split.sudo("app2", "ufw", "--force", "disable")
    failed = split.fab("site", env={"RELEASY_FAULT": "1"}, check=False)
    out, err = failed.stdout, failed.stderr
    assert failed.returncode == 1, out + err
    assert "#1 failed on purpose: app2:" in err and "firewall: save, arm revert" in err, err
    assert "[site] firewall off on app2: each host's is converged once its packages are in" \
        in out, out
    # The fault took the whole script's place: it stopped before any ufw command ran.
    assert "app2: changing the firewall failed before any ufw command ran" in err, err
    assert "nothing was changed" in err and "Traceback" not in out + err
    assert out.index("[site] proxy done in") < out.index("[site] --- firewall ---") \
        < out.index("[db1] deploy lock of lab released"), out
    assert ready(split, "app2") and rotation(split) == ["app1", "app2"]
    again = split.fab("site").stdout
    assert "[app2] changed: ufw enabled" in again, again
    assert "Status: active" in split.sudo("app2", "ufw", "status").stdout


def test_a_ctrl_c_while_the_db_host_installs_begins_nothing_new(lab_session):
    """A first install (a fresh lab, so the module's own lab ends here), one Ctrl-C once
    app1's packages are in (its firewall begun beside) and while db1 still installs
    PostgreSQL: db1's install runs to its end (apt is never cut off), but nothing new
    begins after the Ctrl-C (no firewall on db1, no db step); exit 130; a re-run
    converges the rest, starting with the cluster the package was told not to make."""
    lab = lab_session.fresh("split", 2)
    proc = start_fab(lab.inventory, "site", "--version", "1.0.0", stdin=subprocess.DEVNULL,
                     stderr=subprocess.STDOUT)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[app1] changed: packages: installed"):
                break
        proc.send_signal(signal.SIGINT)  # once
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()  # only the process this test started
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "[db1] changed: packages: installed postgresql-" in out, out
    assert "[db1] changed: firewall rule added" not in out and "--- db ---" not in out, out
    assert "cluster 15/main created" not in out, out
    assert lab.ssh("db1", "ls", "/etc/postgresql/15/main").stdout.split() == ["conf.d"]
    again = lab.fab("site", "--version", "1.0.0").stdout
    assert "[db1] changed: cluster 15/main created" in again, again
    assert lab.ssh("db1", "ls", "/etc/postgresql-common/createcluster.d",
                   check=False).returncode != 0
    assert "[db1] changed: ufw enabled" in again, again
    assert "[proxy1] https /ready through the proxy: 200" in again, again


@pytest.mark.parametrize("database", [
    pytest.param(db, marks=pytest.mark.lab_shape("single", database=db))
    for db in ("postgres", "sqlite")])
def test_single_host_site(lab_session, database):
    lab = lab_session.fresh("single", database=database)
    lab.fab("site", "--version", "1.0.0")
    inv = load_inventory(lab.inventory)
    code, body = via_proxy(inv.hosts[0].address, "/version")
    assert code == 200 and '"1.0.0"' in body
    pids = service_pids(lab, "solo")
    assert changed_total(lab.fab("site").stdout) == 0
    assert service_pids(lab, "solo") == pids
    # One host: SSH from the operator, 80/443 from anywhere, nothing else.
    assert lab.probe("solo", 22, "operator") == "open"
    for port, expected in ((22, "filtered"), (80, "open"), (443, "open"), (8080, "filtered"),
                           (5432, "filtered")):
        assert lab.probe("solo", port) == expected, port
    listening = lab.ssh("solo", "ss", "-ltnH").stdout
    assert "127.0.0.1:8080" in listening
    if database == "postgres":
        assert "0.0.0.0:5432" not in listening and "127.0.0.1:5432" in listening
    else:
        assert ":5432" not in listening
        owner = lab.ssh("solo", "stat", "-c", "%U", "/var/lib/releasy/releasy.db").stdout
        assert owner.strip() == "releasy"
