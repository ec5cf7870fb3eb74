"""Production networks on one lab (`inv lab.up --bastion --acme`, both flags together):

- hosts behind a bastion: app and db hosts sit on a private network this machine has no
  route to; proxy1 keeps a public side; `bastion` is the jump host (unprivileged user `jump`,
  no tier). Every task reaches the private hosts through one SSH connection to the bastion
  per task, and their firewalls admit SSH from the bastion only;
- `tls.mode: acme` against a real ACME CA with two proxies: pebble in the outside namespace
  issues each proxy its certificate over HTTP-01 although its DNS sends the CA to proxy2
  only (proxy2 forwards proxy1's challenge), a second `fab site` requests nothing, `fab
  status` shows the issuer, and a forced renewal under load (certbot's own renew, as its
  timer runs it) drops no request; under egress.restrict a renewal still works (the CA's
  ports and the proxies' challenge relay are planned flows).
"""
from __future__ import annotations

import errno
import json
import socket
import subprocess
from pathlib import Path

import pytest

from lab import acme as lab_acme
from lab.loadgen import LoadGenerator
from releasy_deploy.inventory import load_inventory

from tests.integration.labtools import Following

pytestmark = [pytest.mark.lab,
              pytest.mark.lab_shape("split", 2, bastion=True, acme=True, proxies=2)]

PRIVATE_HOSTS = ("app1", "app2", "db1")
ARCHIVE = "/etc/letsencrypt/archive/releasy"


@pytest.fixture(scope="module")
def lab(lab_session):
    handle = lab_session.fresh("split", 2, bastion=True, acme=True, proxies=2)
    handle.fab("site", "--version", "1.0.0")
    return handle


def issued(lab, host: str = "proxy1") -> list[str]:
    return sorted(lab.sudo(host, "sh", "-c", f"ls {ARCHIVE} | grep ^cert").stdout.split())


def served_fingerprint(lab, root_pem, index: int = 0) -> str:
    """The certificate on 443 of the INDEXth proxy, fetched from the internet and verified
    against pebble's root (curl fails unless the chain leads there), as its SHA-256
    fingerprint."""
    inv = load_inventory(lab.inventory)
    name, proxy = inv.tls.server_name, inv.hosts_in("proxy")[index].address
    ns = lab.ident.outside_ns
    proc = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "10",
                           "--cacert", str(root_pem), "--resolve", f"{name}:443:{proxy}",
                           "-o", "/dev/null", "-w", "%{http_code}", f"https://{name}/ready"],
                          capture_output=True, text=True, timeout=30)
    assert proc.stdout == "200", proc.stderr
    pem = subprocess.run(["ip", "netns", "exec", ns, "openssl", "s_client", "-connect",
                          f"{proxy}:443", "-servername", name],
                         input="", capture_output=True, text=True, timeout=30).stdout
    fp = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256"], input=pem,
                        capture_output=True, text=True, check=True).stdout
    return fp.strip()


@pytest.fixture(scope="module")
def root_pem(lab, tmp_path_factory):
    path = tmp_path_factory.mktemp("pebble") / "root.pem"
    path.write_text(lab_acme.issuing_roots(lab.ident))
    return path


def test_the_certificate_on_443_is_issued_by_the_acme_ca(lab, root_pem):
    # Both proxies, though the CA only ever reached proxy2 (its DNS answer).
    assert served_fingerprint(lab, root_pem, 0) != served_fingerprint(lab, root_pem, 1)
    assert issued(lab, "proxy1") == issued(lab, "proxy2") == ["cert1.pem"]
    # Renewal is Debian's timer, trusting the inventory's CA bundle for the ACME server.
    assert lab.sudo("proxy1", "systemctl", "is-enabled", "certbot.timer").stdout.strip() == \
        "enabled"
    env = lab.sudo("proxy1", "systemctl", "show", "-p", "Environment", "certbot.service").stdout
    assert "REQUESTS_CA_BUNDLE=/etc/releasy/acme/ca.pem" in env


def test_second_site_requests_nothing_and_status_shows_the_issuer(lab):
    proc = lab.fab("site")
    assert "site: 0 changed" in proc.stdout, proc.stdout
    assert "certificate for releasy.lab.test from CN=Pebble Intermediate CA" in proc.stdout
    assert issued(lab) == ["cert1.pem"]
    status = lab.fab("status")
    assert "cert Pebble Intermediate CA" in status.stdout and "lab: healthy" in status.stdout


def test_forced_renewal_under_load_drops_no_request(lab, root_pem, tmp_path):
    before = served_fingerprint(lab, root_pem)
    inv = load_inventory(lab.inventory)
    proxy = inv.hosts_in("proxy")[0].address
    with LoadGenerator(f"https://{proxy}/", server_name=inv.tls.server_name, threads=4,
                       rate=100, duration=120, timeout=10, workdir=tmp_path) as load:
        load.wait_until(lambda p: p["ok"] >= 100, timeout=30)
        # What certbot.timer runs, forced: a new certificate, the deploy hook, a reload.
        lab.sudo("proxy1", "env", "REQUESTS_CA_BUNDLE=/etc/releasy/acme/ca.pem", "certbot",
                 "renew", "--force-renewal", "--no-random-sleep-on-renew", "-q")
        done = load.wait_until(lambda p: True, timeout=5)["ok"]
        load.wait_until(lambda p: p["ok"] >= done + 100, timeout=30)
    summary = load.summary
    assert summary["failed"] == 0, summary
    assert issued(lab) == ["cert1.pem", "cert2.pem"]
    assert served_fingerprint(lab, root_pem) != before


def events(path: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def test_a_direct_connection_to_a_private_host_fails(lab, tmp_path):
    inv = load_inventory(lab.inventory)
    with socket.socket() as s, pytest.raises(OSError) as exc:
        s.settimeout(3)
        s.connect((inv.host("app1").address, 22))
    assert exc.value.errno == errno.EHOSTUNREACH
    ping = lab.fab("inventory.ping").stdout
    assert all(f"{h}  " in ping and "(via bastion)" in ping.split(h, 1)[1].splitlines()[0]
               for h in PRIVATE_HOSTS), ping
    check = lab.fab("inventory.check").stdout
    assert "jump   bastion (jump@" in check and "for app1, app2, db1" in check, check
    # Without the jump host the tasks cannot reach them either (exit 4: unreachable).
    direct = lab.inventory_variant(tmp_path, lambda d: d["ssh"].pop("jump"))
    proc = lab.fab("inventory.ping", inventory=direct, check=False)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "app1 (root@" in proc.stderr and "Unable to connect to port 22" in proc.stderr


def test_site_again_changes_nothing_over_one_bastion_connection(lab, tmp_path):
    log = tmp_path / "site.jsonl"
    proc = lab.fab("site", env={"RELEASY_JSON_LOG": str(log)})
    assert "site: 0 changed" in proc.stdout, proc.stdout
    counts = {e["host"]: e["connections"] for e in events(log, "round_trips")}
    assert counts == {"bastion": 1, "proxy1": 1, "proxy2": 1, "app1": 1, "app2": 1, "db1": 1}


def test_firewall_admits_ssh_from_the_bastion_only(lab):
    inv = load_inventory(lab.inventory)
    bastion = inv.jump_hosts[0].private_address
    for host in PRIVATE_HOSTS:
        rules = lab.sudo(host, "ufw", "status").stdout
        ssh = [line for line in rules.splitlines() if line.startswith("22/tcp ")]
        assert len(ssh) == 1 and bastion in ssh[0], rules
    # ... and the lockout guard saw our SSH arrive from there (fab run: real SSH_CONNECTION).
    proc = lab.fab("run", "--tier", "db", "--", "echo $SSH_CONNECTION")
    assert f"[db1] | {bastion} " in proc.stdout, proc.stdout
    plan = lab.fab("firewall.plan")
    assert "would refuse" not in plan.stdout + plan.stderr


def test_rolling_deploy_status_and_db_shell_through_the_bastion(lab):
    lab.fab("deploy.rolling", "--version", "1.1.0", "--yes")  # lock tunnel to db1 included
    status = lab.fab("status", "--json")
    rows = json.loads(status.stdout)
    text = json.dumps(rows)
    assert '"1.1.0"' in text and '"1.0.0"' not in text
    psql = lab.fab("db.psql", input="SELECT 40 + 2;\n", check=False, timeout=120)
    assert psql.returncode == 0 and "42" in psql.stdout, psql.stdout + psql.stderr


def test_logs_follow_through_the_bastion(lab):
    with Following(lab.inventory, "app.logs", "--follow", "--host", "app1",
                   "--lines", "1") as logs:
        logs.wait_for(lambda lines: lines, "the first line")  # following: it is there
        lab.sudo("app1", "systemctl", "restart", "releasy.service")  # new lines arrive
        logs.wait_for(lambda lines: any("listening" in line for line in lines[1:]),
                      "a new line from the restart")
    assert logs.exit_code == 0, logs.proc.stderr.read()


def test_renewal_under_restricted_egress(lab, tmp_path):
    """egress.restrict: the proxies reach the ACME CA (80, 443 and the directory's port) and
    each other's port 80 (the challenge relay: the CA only reaches proxy2), nothing else."""
    restricted = lab.inventory_variant(tmp_path, lambda d: d.update(egress={"restrict": True}))
    try:
        lab.fab("firewall.apply", inventory=restricted)
        plan = lab.fab("firewall.plan", inventory=restricted).stdout
        assert "proxy -> proxy1:80: ACME challenge relay" in plan, plan
        ca = lab.ident.outside_address
        assert f"proxy1 -> {ca}:{lab_acme.ACME_PORT}: ACME directory" in plan, plan
        # pebble's management port is listening, but no planned flow goes there: dropped.
        assert lab.probe(ca, lab_acme.MANAGEMENT_PORT, "proxy1") == "filtered"
        lab.sudo("proxy1", "env", "REQUESTS_CA_BUNDLE=/etc/releasy/acme/ca.pem", "certbot",
                 "renew", "--force-renewal", "--no-random-sleep-on-renew", "-q")
        assert issued(lab) == ["cert1.pem", "cert2.pem", "cert3.pem"]
    finally:
        lab.fab("firewall.apply")  # outgoing allowed again for whatever runs next
