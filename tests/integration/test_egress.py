"""Egress, IPv6 and the firewall's own state on the split lab, through `fab` as an operator
runs it.

- egress.restrict with one extra allow entry (app tier -> a listener in the outside
  namespace): after `fab site` the app hosts reach the listener, db1 and proxy1 do not
  (dropped: a timeout, not a refusal); the site answers /ready through the proxy from
  outside; `deploy.rolling` works; a second `fab site` changes nothing; `firewall.audit`
  agrees, egress probes included.
- IPv6: every lab host has a ULA address; ufw filters it with the same policy, and a host
  whose IPV6=no was set by hand is caught by the audit and fixed by apply.
- State: the earlier version's state dir under /var/lib/releasy is migrated away; symlinks
  the service account plants there never make root write through them, even during a
  forced revert; the revert script refuses a state file that is a symlink.
- restrict: false again -> allow outgoing is back (db1 reaches the listener).

One lab for the module, tests in file order."""
from __future__ import annotations

import ipaddress
import re
import subprocess

import pytest

from lab import lab as lab_ops
from releasy_deploy import firewall_diff as fw_diff
from releasy_deploy.commands import firewall_revert as revert
from releasy_deploy.commands import ufw
from releasy_deploy.errors import DeployError
from releasy_deploy.executor import Executor
from releasy_deploy.inventory import load_inventory
from releasy_deploy.tiers import firewall as tier
from releasy_deploy.tiers import firewall_state as fw_state
from tests.integration.labtools import changed_total

pytestmark = pytest.mark.lab

LISTENER_PORT = 9443
CANARY = "/etc/releasy-canary"


@pytest.fixture(scope="module")
def lab(split_lab):
    return split_lab


@pytest.fixture(scope="module")
def listener(lab):
    proc = lab_ops.start_listener(LISTENER_PORT)
    yield f"{lab.ident.outside_address}:{LISTENER_PORT}"
    lab_ops.stop_listener(proc)


@pytest.fixture(scope="module")
def restricted(lab, tmp_path_factory):
    """The lab inventory with egress.restrict and the app tier allowed to the listener."""
    def change(data):
        data["egress"] = {"restrict": True, "allow": [
            {"to": f"{lab.ident.outside_address}/32", "port": LISTENER_PORT, "tiers": ["app"]}]}
    return lab.inventory_variant(tmp_path_factory.mktemp("egress"), change)


def reaches(lab, host: str) -> str:
    return lab.probe(lab.ident.outside_address, LISTENER_PORT, host)


def test_restricted_egress_after_site(lab, listener, restricted):
    lab.reset("1.0.0", inventory=restricted)
    assert {h: reaches(lab, h) for h in ("app1", "app2", "db1", "proxy1")} == {
        "app1": "open", "app2": "open", "db1": "filtered", "proxy1": "filtered"}
    # The public side still works: /ready through the proxy, from the internet.
    ready = subprocess.run(
        ["ip", "netns", "exec", lab.ident.outside_ns, "curl", "-ksS", "--max-time", "10",
         "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
         f"releasy.lab.test:443:{lab.ident.address(10)}", "https://releasy.lab.test/ready"],
        capture_output=True, text=True)
    assert ready.stdout == "200", ready.stderr
    second = lab.fab("site", inventory=restricted)
    assert changed_total(second.stdout) == 0, second.stdout
    plan = lab.fab("firewall.plan", inventory=restricted).stdout
    for line in ("[proxy1]   allow out 8080/tcp to %s   (proxy -> app1:8080: upstream)"
                 % lab.ident.address(21),
                 "[app2]   allow out 5432/tcp to %s   (app -> db1:5432: the database)"
                 % lab.ident.address(100),
                 "[db1]   allow out 123/udp to anywhere   (ntp: time sync)",
                 "[app1]   allow out %d/tcp to %s   (egress.allow[0])"
                 % (LISTENER_PORT, lab.ident.outside_address)):
        assert line in plan, plan
    assert "[db1] egress: default deny outgoing" in plan
    audit = lab.fab("firewall.audit", "--netns", lab.ident.outside_ns, "--listener",
                    listener, inventory=restricted)
    assert f"[db1] egress to {listener}/tcp: filtered, as planned" in audit.stdout
    assert f"[app1] egress to {listener}/tcp: open, as planned" in audit.stdout
    assert "[db1] egress as planned: default deny outgoing, 1 allow rule(s)" in audit.stdout
    # An outgoing rule removed by hand: the audit compares the applied rules with the plan.
    lab.sudo("db1", "ufw", "delete", "allow", "out", "123/udp")
    drifted = lab.fab("firewall.audit", "--netns", lab.ident.outside_ns, inventory=restricted,
                      check=False)
    assert drifted.returncode == 1
    assert "[db1] ERROR: egress: outgoing rule missing: allow out 123/udp to anywhere" in \
        drifted.stdout, drifted.stdout
    lab.fab("firewall.apply", inventory=restricted)


def test_rolling_deploy_under_restricted_egress(lab, restricted):
    proc = lab.fab("deploy.rolling", "--version", "1.1.0", "--yes", inventory=restricted)
    assert "rolling deploy to 1.1.0 done: app1, app2" in proc.stdout, proc.stdout


def test_ipv6_addresses_get_the_same_policy(lab, listener, restricted):
    six = {h: lab.ident.address6(n) for h, n in (("proxy1", 10), ("app1", 21), ("db1", 100))}
    # sshd listens on [::]:22 everywhere; only admin_cidrs (IPv4 here) may reach it.
    assert "[::]:22" in lab.ssh("db1", "ss", "-ltnH", "sport = :22").stdout
    assert lab.probe(six["db1"], 22) == "filtered"
    assert lab.probe(six["app1"], 22, "operator") == "filtered"
    assert lab.probe(six["proxy1"], 443) == "open"
    # IPV6=no set by hand: ufw stops applying the plan to IPv6 (0.36 drops it all, the
    # public 443 included); the audit, probing IPv6 too, catches it...
    lab.sudo("proxy1", "sh", "-c", "sed -i 's/^IPV6=.*/IPV6=no/' /etc/default/ufw && "
                                   "ufw --force disable && ufw --force enable")
    assert lab.probe(six["proxy1"], 443) == "filtered"
    bad = lab.fab("firewall.audit", "--netns", lab.ident.outside_ns, inventory=restricted,
                  check=False)
    assert bad.returncode == 1
    assert f"[proxy1] ERROR: port 443/tcp is filtered on {six['proxy1']}" in bad.stdout, \
        bad.stdout
    assert "[proxy1] ERROR: ufw's IPv6 support is off (IPV6=no" in bad.stdout
    # ...and apply turns it back on, with every rule and the egress policy for IPv6.
    fixed = lab.fab("firewall.apply", inventory=restricted).stdout
    assert "[proxy1] changed: ufw IPv6 filtering turned on" in fixed, fixed
    assert lab.probe(six["proxy1"], 443) == "open"
    assert lab.probe(six["proxy1"], 22) == "filtered"
    assert lab.probe(lab.ident.outside_address6, LISTENER_PORT, "proxy1") == "filtered"
    lab.fab("firewall.audit", "--netns", lab.ident.outside_ns, "--listener", listener,
            inventory=restricted)


def stat(lab, host: str, path: str) -> str:
    return lab.sudo(host, "stat", "-c", "%U:%G %a %F", path, check=False).stdout.strip()


def test_state_moves_out_of_the_service_directory_and_symlinks_are_never_followed(
        lab, restricted):
    old = "/var/lib/releasy/firewall"
    # A host set up by the earlier version: its state in the service-owned directory.
    lab.sudo("app1", "sh", "-c", f"mkdir -p {old}/previous && cp -p /etc/ufw/user.rules "
                                 f"{old}/previous/ && echo t0k > {old}/reverted")
    out = lab.fab("firewall.apply", inventory=restricted).stdout
    assert f"[app1] changed: removed the earlier version's firewall state {old}" in out, out
    assert stat(lab, "app1", old) == ""
    assert stat(lab, "app1", "/var/lib/releasy-deploy") == "root:root 700 directory"
    assert stat(lab, "app1", "/var/lib/releasy-deploy/firewall") == "root:root 700 directory"
    again = lab.fab("firewall.apply", inventory=restricted).stdout
    assert re.search(r"^app1\s+0 changed", again, re.MULTILINE), again

    # The service account plants symlinks to a root-owned canary at every old path.
    lab.sudo("app1", "sh", "-c", f"printf 'canary\\n' > {CANARY} && chmod 0640 {CANARY}")
    canary_before = (stat(lab, "app1", CANARY), lab.sudo("app1", "cat", CANARY).stdout)
    lab.sudo("app1", "runuser", "-u", "releasy", "--", "sh", "-c",
             f"mkdir {old} && ln -s {CANARY} {old}/reverted && "
             f"ln -s {CANARY} {old}/previous.new && ln -s /etc/ufw {old}/previous")
    # firewall.apply with a forced revert: a ufw command fails half-way, the revert runs.
    inv = load_inventory(restricted)
    with Executor(inv) as ex, Executor(inv) as fresh:
        conn = ex.conn("app1")
        good = fw_state.host_rules(inv, inv.host("app1"), fw_state.read_state(conn))
        broken = [*good, ufw.Rule(0, "tcp", None, "a port ufw refuses")]
        with pytest.raises(DeployError) as exc:
            tier.converge(conn, broken, admin_cidrs=inv.admin_cidrs, fresh=fresh,
                          policies=fw_diff.wanted_defaults(True), revert_after=30)
    assert "the previous firewall was restored" in str(exc.value)
    marker = lab.sudo("app1", "cat", "/var/lib/releasy-deploy/firewall/reverted").stdout
    assert re.fullmatch(r"[0-9a-f]{16}\n", marker)  # the revert ran, in root's own dir
    assert (stat(lab, "app1", CANARY), lab.sudo("app1", "cat", CANARY).stdout) == canary_before
    planted = lab.sudo("app1", "find", old, "-printf", "%y %p -> %l\n").stdout
    assert sorted(planted.splitlines()) == sorted([
        f"d {old} -> ", f"l {old}/reverted -> {CANARY}", f"l {old}/previous.new -> {CANARY}",
        f"l {old}/previous -> /etc/ufw"])  # left alone, never followed
    # The revert script refuses state it did not make (a symlink in its own directory).
    saved = "/var/lib/releasy-deploy/firewall/previous"
    lab.sudo("app1", "sh", "-c", f"mv {saved}/user.rules {saved}/user.rules.bak && "
                                 f"ln -s {CANARY} {saved}/user.rules")
    refused = lab.sudo("app1", revert.REVERT_SCRIPT, "t0k", check=False)
    assert refused.returncode == 2 and "is not a regular file owned by root" in refused.stderr
    lab.sudo("app1", "sh", "-c", f"rm {saved}/user.rules && "
                                 f"mv {saved}/user.rules.bak {saved}/user.rules")
    assert (stat(lab, "app1", CANARY), lab.sudo("app1", "cat", CANARY).stdout) == canary_before
    lab.sudo("app1", "rm", "-rf", old, CANARY)


def test_restrict_off_restores_allow_outgoing(lab, listener):
    out = lab.fab("site").stdout
    assert "[db1] changed: ufw default outgoing: deny -> allow" in out, out
    assert reaches(lab, "db1") == "open"
    assert reaches(lab, "proxy1") == "open"
    assert changed_total(lab.fab("site").stdout) == 0
    status = lab.ssh("db1", "sudo", "ufw", "show", "added").stdout
    assert " out " not in status  # our outgoing rules went with the restriction
    assert ipaddress.ip_address(lab.ident.address6(100))  # still addressed, still filtered
    assert lab.probe(lab.ident.address6(100), 22) == "filtered"
