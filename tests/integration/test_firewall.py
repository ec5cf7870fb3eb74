"""`fab firewall.*` on real lab hosts (split topology): dry-run touches nothing; apply installs
ufw and lets in exactly what the plan says, seen from the outside namespace, the operator
and the other hosts; a second apply changes nothing (one round trip per host); the audit
passes, then catches a port opened by hand; lockout layer 1 refuses an inventory whose
admin_cidrs exclude us and changes nothing; layer 2's revert timer restores a host whose
new rules shut out new SSH connections, by itself.

The proxy, app and db tiers are not set up here: trivial listeners started by hand
(python3 -m http.server) stand in for nginx, Releasy and PostgreSQL, so "open" can be told
from "closed". The tests share one fresh lab and run in file order."""
from __future__ import annotations

import ipaddress
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from releasy_deploy import firewall as fw
from releasy_deploy.commands import ufw
from releasy_deploy.session import Session
from releasy_deploy.executor import Executor
from releasy_deploy.inventory import load_inventory
from releasy_deploy.output import Reporter
from releasy_deploy.secrets import Secrets
from releasy_deploy.tiers import firewall as tier
from releasy_deploy.tiers import firewall_guard as fw_guard
from tests.integration.labtools import wait_until

pytestmark = pytest.mark.lab

HOSTS = ("proxy1", "app1", "app2", "db1")
# (host, port) -> listener started by hand; 9100 stands for any other service on a host.
LISTENERS = (("proxy1", 80), ("proxy1", 443), ("app1", 8080), ("app2", 8080), ("db1", 5432),
             ("app1", 9100))


@pytest.fixture(scope="module")
def lab(lab_session):
    handle = lab_session.fresh("split", 2)
    yield handle
    # Leave the lab usable by other modules: no firewall, no test listeners.
    for host in HOSTS:
        handle.sudo(host, "sh", "-c", "if command -v ufw >/dev/null; then ufw --force disable;"
                                      " fi; systemctl stop 'fwtest-*' 2>/dev/null || true",
                    check=False)


def listen(lab, host: str, port: int) -> None:
    unit = f"fwtest-{port}"
    lab.sudo(host, "sh", "-c", f"systemctl is-active --quiet {unit} || systemd-run --quiet"
                               f" --unit={unit} python3 -m http.server --bind 0.0.0.0 {port}")
    wait_until(lambda: lab.sudo(host, "sh", "-c", f"ss -Hltn 'sport = :{port}'").stdout.strip(),
               f"{host} listening on {port}", timeout=60, interval=0.2)


def probes(lab, cases: dict[tuple[str, int, str], str]) -> dict:
    """Run every (host, port, source) probe in parallel -> the observed states."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = dict(zip(cases, pool.map(lambda k: lab.probe(k[0], k[1], k[2]), cases)))
    return got


def ufw_view(lab, host: str) -> str:
    return lab.sudo(host, "sh", "-c", "if command -v ufw >/dev/null; then LANG=C ufw status"
                                      " verbose; LANG=C ufw show added; else echo no ufw; fi"
                    ).stdout


def summary(stdout: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+)\s+(\d+ changed / .*)$",
                                                        stdout, re.MULTILINE)}


def test_dry_run_changes_nothing(lab):
    before = {h: ufw_view(lab, h) for h in HOSTS}
    out = lab.fab("firewall.apply", "--dry-run").stdout
    assert "[proxy1] would add firewall rule: allow 80/tcp from anywhere" in out
    assert "[db1] would add firewall rule: allow 5432/tcp from 10.77.%s.21" % \
        lab.ident.subnet_octet in out
    assert {h: ufw_view(lab, h) for h in HOSTS} == before
    plan = lab.fab("firewall.plan").stdout
    assert "would enable ufw" in plan


def test_apply_lets_in_exactly_the_plan(lab):
    for host, port in LISTENERS:
        listen(lab, host, port)
    out = lab.fab("firewall.apply").stdout
    assert all(s.endswith("ok") for s in summary(out).values()), out
    assert out.count("revert timer disarmed") == 4
    cases = {
        # from the internet: the proxy's web ports only
        ("proxy1", 80, "outside"): "open", ("proxy1", 443, "outside"): "open",
        ("proxy1", 22, "outside"): "filtered",
        ("app1", 22, "outside"): "filtered", ("app1", 8080, "outside"): "filtered",
        ("app1", 9100, "outside"): "filtered", ("app2", 8080, "outside"): "filtered",
        ("db1", 22, "outside"): "filtered", ("db1", 5432, "outside"): "filtered",
        # from the admin address: SSH everywhere, nothing else
        **{(h, 22, "operator"): "open" for h in HOSTS},
        ("app1", 9100, "operator"): "filtered", ("db1", 5432, "operator"): "filtered",
        # tier to tier
        ("app1", 8080, "proxy1"): "open", ("app2", 8080, "proxy1"): "open",
        ("app1", 8080, "db1"): "filtered", ("app1", 9100, "proxy1"): "filtered",
        ("db1", 5432, "app1"): "open", ("db1", 5432, "app2"): "open",
        ("db1", 5432, "proxy1"): "filtered", ("db1", 22, "app1"): "filtered",
    }
    assert probes(lab, cases) == cases
    for host in HOSTS:
        assert "Status: active" in ufw_view(lab, host)


def test_second_apply_changes_nothing_in_one_round_trip_per_host(lab):
    out = lab.fab("firewall.apply").stdout
    assert set(summary(out)) == set(HOSTS)
    assert all(s.startswith("0 changed") for s in summary(out).values()), out
    assert "revert timer" not in out
    # In-process, to count round trips: one batched probe per host, and no ufw command.
    inv = load_inventory(lab.inventory)
    reporter = Reporter()
    with Executor(inv, reporter=reporter) as ex:
        tier.apply(Session(inv, Secrets({}), ex, reporter))
        assert ex.round_trips == {h: 1 for h in HOSTS}
    assert all(t.changed == 0 and t.errors == 0 for t in reporter.tally().values())


def test_audit_passes_then_flags_a_port_opened_by_hand(lab):
    netns = lab.ident.outside_ns
    ok = lab.fab("firewall.audit", "--netns", netns)
    assert "[proxy1] audit of %s from %s" % (lab.ident.address(10), lab.ident.outside_address) \
        in ok.stdout
    # IPv6 too: each host's ULA address, with the same policy
    assert "[proxy1] audit of %s from %s (netns %s): reachable 80, 443;" % (
        lab.ident.address6(10), lab.ident.outside_address6, netns) in ok.stdout
    lab.sudo("app1", "ufw", "allow", "9999/tcp")
    listen(lab, "app1", 9999)
    bad = lab.fab("firewall.audit", "--netns", netns, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(r"\[app1\] ERROR: port 9999/tcp is open on \S+ from \S+ .*ufw allow 9999/tcp",
                     bad.stdout), bad.stdout
    assert "[app1] ERROR: port 8080" not in bad.stdout  # only the difference is reported
    status = lab.fab("firewall.status").stdout
    assert re.search(r"\[app1\]\s+unexpected\s+ufw allow 9999/tcp", status), status
    assert re.search(r"\[db1\]\s+planned\s+ufw allow from \S+ to any port 5432", status)
    # apply keeps a rule it does not own, and says so; --prune-unmanaged removes it
    kept = lab.fab("firewall.apply").stdout
    assert "unexpected firewall rule, not ours, kept" in kept
    assert summary(kept)["app1"].startswith("0 changed")
    pruned = lab.fab("firewall.apply", "--prune-unmanaged").stdout
    assert "[app1] changed: firewall rule removed (not ours, --prune-unmanaged): " \
           "ufw allow 9999/tcp" in pruned
    lab.fab("firewall.audit", "--netns", netns)


def test_lockout_layer1_refuses_when_admin_cidrs_exclude_us(lab, tmp_path):
    other = lab.inventory_variant(tmp_path, lambda d: d.update(admin_cidrs=["192.0.2.0/24"]))
    lab.sudo("app2", "ufw", "allow", "7777/tcp")  # something apply would otherwise remove/keep
    before = {h: ufw_view(lab, h) for h in HOSTS}
    proc = lab.fab("firewall.apply", inventory=other, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for host in HOSTS:
        assert (f"[{host}] ERROR: refusing to change the firewall: the host sees our "
                f"SSH connection coming from {lab.ident.operator_address}, which is not inside "
                f"admin_cidrs (192.0.2.0/24)") in proc.stdout
    after = {h: ufw_view(lab, h) for h in HOSTS}  # SSH still works...
    assert after == before  # ...and nothing changed
    lab.sudo("app2", "ufw", "delete", "allow", "7777/tcp")


def test_lockout_layer2_revert_timer_restores_the_host_by_itself(lab):
    """A plan that drops our SSH access (building blocks called directly, past layer 1):
    the new connection fails, the timer stays armed, and app2 (reached via sudo) reverts."""
    inv = load_inventory(lab.inventory)
    before = ufw_view(lab, "app2")
    bad = [r if r.port != 22 else ufw.Rule(22, "tcp", ipaddress.ip_network("192.0.2.0/24"),
                                            "ssh from somewhere else")
           for r in fw.plan_rules(inv)["app2"]]
    with Executor(inv) as ex, Executor(inv) as fresh:
        with pytest.raises(fw_guard.FirewallLockout) as exc:
            tier.converge(ex.conn("app2"), bad, admin_cidrs=inv.admin_cidrs, fresh=fresh,
                          revert_after=5)
    assert "stays armed" in str(exc.value) or "fired before" in str(exc.value)

    def restored() -> bool:
        proc = lab.ssh("app2", "sudo", "sh", "-c",
                       "LANG=C ufw status verbose; LANG=C ufw show added", check=False,
                       timeout=20)
        return proc.returncode == 0 and proc.stdout == before

    wait_until(restored, "app2 to restore its previous firewall", timeout=90, interval=0.2)
    marker = lab.sudo("app2", "sh", "-c", "cat /var/lib/releasy-deploy/firewall/reverted;"
                                          " systemctl is-active releasy-firewall-revert.timer"
                                          " || true").stdout
    assert marker.split()[-1] == "inactive" and len(marker.split()) == 2
    assert lab.probe("app2", 22, "operator") == "open"
    again = lab.fab("firewall.apply").stdout
    assert summary(again)["app2"].startswith("0 changed")
