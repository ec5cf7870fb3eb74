"""`fab site` end to end on the split and single-host topologies: Releasy answers through the
proxy over TLS, a second run changes and restarts nothing, and the firewall exposes exactly
what the topology needs (seen from the outside namespace, the operator and peer hosts)."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from releasy_deploy.inventory import load_inventory


def service_pids(lab, host: str) -> dict[str, str]:
    """Main PIDs of the services `site` manages on a host (nginx, postgres, releasy)."""
    out = lab.ssh(host, "sh", "-c",
                  "for u in nginx postgresql@15-main releasy; do "
                  "printf '%s=%s\\n' $u $(systemctl show -p MainPID --value $u 2>/dev/null); "
                  "done").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def via_proxy(address: str, path: str) -> tuple[int, str]:
    proc = subprocess.run(["curl", "-ksS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}",
                           f"https://{address}{path}"], capture_output=True, text=True)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def changed_total(output: str) -> int:
    match = re.search(r"^site: (\d+) changed", output, re.MULTILINE)
    assert match, output
    return int(match.group(1))


@pytest.fixture(scope="module")
def split(lab_session):
    lab = lab_session.fresh("split", 2)
    first = lab.fab("site", "--version", "1.0.0")
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
    proxy = inv.hosts_in("proxy")[0].address
    name = inv.tls.server_name

    def outside_get(url: str) -> tuple[int, str]:
        proc = subprocess.run(
            ["ip", "netns", "exec", split.ident.outside_ns, "curl", "-ksS", "--max-time", "10",
             "--resolve", f"{name}:443:{proxy}", "-o", "-", "-w", "\n%{http_code}", url],
            capture_output=True, text=True, timeout=30)
        body, _, code = proc.stdout.rpartition("\n")
        return int(code or 0), body

    code, body = outside_get(f"https://{name}/api/download-link")
    assert code == 200, body
    url = json.loads(body)["url"]
    assert url.startswith(f"https://{name}/"), url
    code, body = outside_get(url)
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


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
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
