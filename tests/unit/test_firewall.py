"""Firewall planning, ufw output parsing, the diff and the commands built from it.

The canned outputs below are real: captured from ufw 0.36.2 (Debian 12) with LANG=C on a lab
host after adding the rules they show.
"""
from __future__ import annotations

import io
import ipaddress
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from releasy_deploy import firewall as fw
from releasy_deploy import firewall_diff as fw_diff
from releasy_deploy.commands import firewall_revert as revert
from releasy_deploy.commands import netprobe, ufw, ufw_state
from releasy_deploy.commands.ufw import LiveRule, Rule
from releasy_deploy.commands.ufw_state import UfwDefaults
from releasy_deploy.errors import BadInput, ConnectionDropped
from releasy_deploy.executor import Executor
from releasy_deploy.executor.faults import FaultInjection
from releasy_deploy.output import Reporter
from releasy_deploy.tiers import firewall_audit as fw_audit
from releasy_deploy.tiers import firewall_guard as fw_guard
from releasy_deploy.tiers import firewall_state as fw_state

from inventories import build

net = ipaddress.ip_network
addr = ipaddress.ip_address

SPLIT_YAML = """
environment: production
admin_cidrs: [203.0.113.0/24]
known_hosts: known_hosts
hosts:
  proxy1: {address: 198.51.100.10, private_address: 10.0.0.10}
  app1: {address: 198.51.100.21, private_address: 10.0.0.21}
  app2: {address: 198.51.100.22, private_address: 10.0.0.22, ssh_user: deploy, ssh_port: 2222}
  db1: {address: 198.51.100.30, private_address: 10.0.0.30}
tiers:
  proxy: [proxy1]
  app: [app1, app2]
  db: [db1]
database: {kind: postgres}
release: {source: releases}
tls: {mode: self-signed, server_name: releasy.example.com}
"""

SINGLE_YAML = """
environment: dev
admin_cidrs: ["2001:db8::/32", 192.0.2.0/28]
known_hosts: known_hosts
hosts:
  solo: {address: 192.0.2.5}
tiers: {proxy: [solo], app: [solo], db: [solo]}
database: {kind: postgres}
release: {source: releases}
tls: {mode: self-signed, server_name: releasy.test}
"""


def inventory(text: str, tmp_path: Path, **changes):
    return build(text, tmp_path / "hosts.yaml", **changes)


def table(rules: list[Rule]) -> list[tuple[int, str, str | None, str]]:
    return [(r.port, r.proto, None if r.source is None else str(r.source), r.comment)
            for r in rules]


# --------------------------------------------------------------------------- planning


def test_split_topology_plan(tmp_path):
    plan = fw.plan_rules(inventory(SPLIT_YAML, tmp_path))
    assert list(plan) == ["proxy1", "app1", "app2", "db1"]
    ssh = (22, "tcp", "203.0.113.0/24", "releasy: ssh from admin network")
    assert table(plan["proxy1"]) == [
        ssh,
        (80, "tcp", None, "releasy: http"),
        (443, "tcp", None, "releasy: https"),
    ]
    assert table(plan["app1"]) == [
        ssh, (8080, "tcp", "10.0.0.10/32", "releasy: app from proxy1")]
    # app2's own ssh_port; the bind port only, never the blue/green ports
    assert table(plan["app2"]) == [
        (2222, "tcp", "203.0.113.0/24", "releasy: ssh from admin network"),
        (8080, "tcp", "10.0.0.10/32", "releasy: app from proxy1")]
    assert table(plan["db1"]) == [
        ssh,
        (5432, "tcp", "10.0.0.21/32", "releasy: postgres from app1"),
        (5432, "tcp", "10.0.0.22/32", "releasy: postgres from app2")]


def test_custom_ports_and_several_proxies(tmp_path):
    data = yaml.safe_load(SPLIT_YAML)
    data["hosts"]["proxy2"] = {"address": "198.51.100.11", "private_address": "10.0.0.11"}
    data["tiers"]["proxy"] = ["proxy1", "proxy2"]
    data["ssh"] = {"port": 2200}
    data["app"] = {"bind_port": 9000}
    plan = fw.plan_rules(build(data, tmp_path / "hosts.yaml"))
    assert table(plan["app1"]) == [
        (2200, "tcp", "203.0.113.0/24", "releasy: ssh from admin network"),
        (9000, "tcp", "10.0.0.10/32", "releasy: app from proxy1"),
        (9000, "tcp", "10.0.0.11/32", "releasy: app from proxy2")]
    assert [r.port for r in plan["app2"]] == [2222, 9000, 9000]  # per-host port wins
    assert [r.port for r in plan["proxy2"]] == [2200, 80, 443]


def test_single_host_gets_ssh_and_web_only(tmp_path):
    for kind in ("postgres", "sqlite"):
        plan = fw.plan_rules(inventory(SINGLE_YAML, tmp_path, **{"database.kind": kind}))
        assert table(plan["solo"]) == [
            (22, "tcp", "2001:db8::/32", "releasy: ssh from admin network"),
            (22, "tcp", "192.0.2.0/28", "releasy: ssh from admin network"),
            (80, "tcp", None, "releasy: http"),
            (443, "tcp", None, "releasy: https"),
        ]


def test_ipv6_admin_network_becomes_an_ipv6_rule(tmp_path):
    inv = inventory(SPLIT_YAML, tmp_path, admin_cidrs=["2001:db8:100::/48", "203.0.113.7"])
    rules = fw.plan_rules(inv)["db1"]
    assert [str(r.source) for r in rules[:2]] == ["2001:db8:100::/48", "203.0.113.7/32"]
    assert ufw.add_argv(rules[0]) == [
        "ufw", "allow", "proto", "tcp", "from", "2001:db8:100::/48", "to", "any",
        "port", "22", "comment", "releasy: ssh from admin network"]
    assert rules[1].describe() == "allow 22/tcp from 203.0.113.7"


def test_tiers_sharing_a_host_need_no_rule_for_themselves(tmp_path):
    data = yaml.safe_load(SPLIT_YAML)
    data["tiers"] = {"proxy": ["proxy1"], "app": ["proxy1", "app1"], "db": ["app1"]}
    del data["hosts"]["app2"], data["hosts"]["db1"]
    plan = fw.plan_rules(build(data, tmp_path / "hosts.yaml"))
    assert table(plan["proxy1"])[1:] == [
        (80, "tcp", None, "releasy: http"), (443, "tcp", None, "releasy: https")]
    assert table(plan["app1"])[1:] == [
        (8080, "tcp", "10.0.0.10/32", "releasy: app from proxy1"),
        (5432, "tcp", "10.0.0.10/32", "releasy: postgres from proxy1")]


# --------------------------------------------------------------------------- ufw show added

SHOW_ADDED = """\
Added user rules (see 'ufw status' for running firewall):
ufw allow from 10.77.4.1 to any port 22 proto tcp comment 'releasy: ssh from admin'
ufw allow 80/tcp comment 'other comment'
ufw allow from 10.0.0.5 to any port 5432 proto tcp
ufw deny 23
ufw limit 2222/tcp
ufw allow in on eth0 to any port 7000 proto udp
ufw allow 60000:61000/udp
ufw allow OpenSSH
ufw allow from 10.1.0.0/16
ufw allow out 53
ufw route allow from 10.0.0.0/8 to 10.1.0.0/16
ufw allow log 25/tcp
ufw allow 80,443/tcp
ufw allow to 10.77.4.21 port 8080 proto tcp
ufw reject 26/tcp
ufw allow from 10.1.2.3 port 1000 to any port 2000 proto udp
ufw allow from 2001:db8::/32 to any port 22 proto tcp comment 'releasy: ssh v6'
"""


def test_show_added_is_parsed_rule_by_rule():
    rules = ufw.parse_show_added(SHOW_ADDED)
    assert len(rules) == 17
    got = [(r.action, r.direction, r.port, r.proto, r.source, r.comment) for r in rules]
    assert got[0] == ("allow", "in", "22", "tcp", net("10.77.4.1/32"), "releasy: ssh from admin")
    assert got[1] == ("allow", "in", "80", "tcp", None, "other comment")
    assert got[3] == ("deny", "in", "23", None, None, None)
    assert got[4][:2] == ("limit", "in")
    assert got[16] == ("allow", "in", "22", "tcp", net("2001:db8::/32"), "releasy: ssh v6")
    assert rules[5].interface == "eth0" and rules[5].proto == "udp"
    assert rules[7].app == "OpenSSH" and rules[7].port is None
    assert rules[8].source == net("10.1.0.0/16") and rules[8].port is None
    assert rules[9].direction == "out"
    assert rules[10].direction == "route" and rules[10].destination == net("10.1.0.0/16")
    assert rules[11].log == "log"
    assert rules[12].port == "80,443"
    assert rules[13].destination == net("10.77.4.21/32")
    assert rules[15].source_port == "1000" and rules[15].port == "2000"
    assert all(r.parsed for r in rules)
    assert [r.managed for r in rules].count(True) == 2


def test_only_plain_allow_rules_can_match_a_planned_rule():
    rules = ufw.parse_show_added(SHOW_ADDED)
    keys = [r.key for r in rules]
    assert keys[0] == ("in", 22, "tcp", net("10.77.4.1/32"), None)
    assert keys[1] == ("in", 80, "tcp", None, None)
    assert keys[2] == ("in", 5432, "tcp", net("10.0.0.5/32"), None)
    # deny, limit, interface, range, app, any-port, out without proto, route, log,
    # multiport, in with a destination, reject, sport
    assert keys[3:16] == [None] * 13
    assert keys[16] == ("in", 22, "tcp", net("2001:db8::/32"), None)
    out = ufw.parse_added_line(
        "ufw allow out to 10.77.16.100 port 5432 proto tcp comment 'releasy: x'")
    assert out.key == ("out", 5432, "tcp", None, net("10.77.16.100/32"))
    assert ufw.parse_added_line("ufw allow out 123/udp comment 'releasy: ntp'").key == \
        ("out", 123, "udp", None, None)


def test_tcp_ports_of_live_rules_for_the_audit():
    rules = ufw.parse_show_added(SHOW_ADDED)
    assert rules[3].tcp_ports() == [23]  # no proto: tcp and udp
    assert rules[6].tcp_ports() == []  # udp
    assert rules[12].tcp_ports() == [80, 443]
    assert rules[9].tcp_ports() == []  # outgoing
    assert ufw.parse_added_line("ufw allow 8000:8010/tcp").tcp_ports() == [8000, 8010]


def test_show_added_without_rules_and_odd_lines():
    assert ufw.parse_show_added(
        "Added user rules (see 'ufw status' for running firewall):\n(None)\n") == []
    odd = ufw.parse_added_line("ufw allow from 10.0.0.1 frobnicate 7")
    assert odd is not None and not odd.parsed and odd.key is None
    assert odd.words == ("allow", "from", "10.0.0.1", "frobnicate", "7")
    unbalanced = ufw.parse_added_line("ufw allow 80/tcp comment 'oops")
    assert unbalanced is not None and not unbalanced.parsed


def test_a_rule_prints_back_as_the_ufw_command():
    line = "ufw allow from 10.77.4.1 to any port 22 proto tcp comment 'releasy: ssh from admin'"
    assert str(ufw.parse_added_line(line)) == line


# --------------------------------------------------------------------------- ufw status

STATUS_NUMBERED = """\
Status: active

     To                         Action      From
     --                         ------      ----
[ 1] 22/tcp                     ALLOW IN    10.77.4.1                  # releasy: ssh from admin
[ 2] 80/tcp                     ALLOW IN    Anywhere                   # other comment
[ 3] 9999/tcp                   ALLOW IN    Anywhere                  
[ 4] 23                         DENY IN     Anywhere                  
[ 5] 7000/udp on eth0           ALLOW IN    Anywhere                  
[ 6] OpenSSH                    ALLOW IN    Anywhere                  
[ 7] Anywhere                   ALLOW IN    10.1.0.0/16               
[ 8] 53                         ALLOW OUT   Anywhere                   (out)
[ 9] 10.1.0.0/16                ALLOW FWD   10.0.0.0/8                
[10] 25/tcp                     ALLOW IN    Anywhere                   (log)
[11] 2000/udp                   ALLOW IN    10.1.2.3 1000/udp         
[12] 22/tcp                     ALLOW IN    2001:db8::/32              # releasy: ssh v6
[13] 80/tcp (v6)                ALLOW IN    Anywhere (v6)              # other comment
[14] 9999/tcp (v6)              ALLOW IN    Anywhere (v6)             
[15] 23 (v6)                    DENY IN     Anywhere (v6)             
[16] 7000/udp (v6) on eth0      ALLOW IN    Anywhere (v6)             
[17] OpenSSH (v6)               ALLOW IN    Anywhere (v6)             
[18] 53 (v6)                    ALLOW OUT   Anywhere (v6)              (out)
[19] 25/tcp (v6)                ALLOW IN    Anywhere (v6)              (log)

"""

STATUS_VERBOSE = """\
Status: active
Logging: on (low)
Default: deny (incoming), allow (outgoing), disabled (routed)
New profiles: skip

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW IN    10.77.4.1                  # releasy: ssh from admin
80/tcp                     ALLOW IN    Anywhere                   # other comment
22/tcp (OpenSSH)           ALLOW IN    Anywhere                  
80/tcp (v6)                ALLOW IN    Anywhere (v6)              # other comment
22/tcp (OpenSSH (v6))      ALLOW IN    Anywhere (v6)             

"""


def test_status_numbered_folds_ipv6_twins():
    st = ufw_state.parse_status(STATUS_NUMBERED)
    assert st.active
    rows = [(r.number, r.to, r.action, r.source, r.comment, r.flags, sorted(r.families))
            for r in st.rows]
    both, v4, v6 = ["v4", "v6"], ["v4"], ["v6"]
    assert rows == [
        (1, "22/tcp", "ALLOW IN", "10.77.4.1", "releasy: ssh from admin", (), v4),
        (2, "80/tcp", "ALLOW IN", "Anywhere", "other comment", (), both),
        (3, "9999/tcp", "ALLOW IN", "Anywhere", None, (), both),
        (4, "23", "DENY IN", "Anywhere", None, (), both),
        (5, "7000/udp on eth0", "ALLOW IN", "Anywhere", None, (), both),
        (6, "OpenSSH", "ALLOW IN", "Anywhere", None, (), both),
        (7, "Anywhere", "ALLOW IN", "10.1.0.0/16", None, (), v4),
        (8, "53", "ALLOW OUT", "Anywhere", None, ("out",), both),
        (9, "10.1.0.0/16", "ALLOW FWD", "10.0.0.0/8", None, (), v4),
        (10, "25/tcp", "ALLOW IN", "Anywhere", None, ("log",), both),
        (11, "2000/udp", "ALLOW IN", "10.1.2.3 1000/udp", None, (), v4),
        (12, "22/tcp", "ALLOW IN", "2001:db8::/32", "releasy: ssh v6", (), v6),
    ]


def test_status_verbose_gives_defaults_and_logging():
    st = ufw_state.parse_status(STATUS_VERBOSE)
    assert st.active and st.logging == "on (low)"
    assert st.defaults == {"incoming": "deny", "outgoing": "allow", "routed": "disabled"}
    assert [(r.to, sorted(r.families)) for r in st.rows] == [
        ("22/tcp", ["v4"]), ("80/tcp", ["v4", "v6"]), ("22/tcp (OpenSSH)", ["v4", "v6"])]


def test_inactive_status():
    st = ufw_state.parse_status("Status: inactive\n")
    assert not st.active and st.rows == () and st.defaults == {}


def test_defaults_file():
    text = ('# /etc/default/ufw\nIPV6=yes\nDEFAULT_INPUT_POLICY="DROP"\n'
            'DEFAULT_OUTPUT_POLICY="ACCEPT"\nDEFAULT_FORWARD_POLICY="DROP"\n')
    assert ufw_state.parse_defaults(text) == UfwDefaults("deny", "allow", True)
    assert ufw_state.parse_defaults('IPV6=no\nDEFAULT_INPUT_POLICY="REJECT"\n') == \
        UfwDefaults("reject", None, False)


def test_listeners():
    text = ("LISTEN 0      128    0.0.0.0:22 0.0.0.0:*\n"
            "LISTEN 0      128       [::]:22    [::]:*\n"
            "LISTEN 0      4096 127.0.0.53%lo:53 0.0.0.0:*\n"
            "LISTEN 0      511          *:80       *:*\n"
            "garbage\n")
    assert netprobe.parse_listeners(text) == [("0.0.0.0", 22), ("::", 22), ("127.0.0.53", 53),
                                              ("*", 80)]


@pytest.mark.parametrize("value, expected", [
    ("10.77.4.1 53964 10.77.4.21 22", (addr("10.77.4.1"), 22)),
    ("2001:db8::7 40000 2001:db8::1 2222", (addr("2001:db8::7"), 2222)),
    ("::ffff:203.0.113.9 40000 ::ffff:10.0.0.1 22", (addr("203.0.113.9"), 22)),
    ("fe80::1%eth0 40000 fe80::2%eth0 22", (addr("fe80::1"), 22)),
    ("", None),
    ("10.0.0.1 1 10.0.0.2", None),
    ("not-an-ip 1 10.0.0.2 22", None),
])
def test_ssh_connection(value, expected):
    assert netprobe.parse_ssh_connection(value) == expected


# --------------------------------------------------------------------------- the diff

SSH = Rule(22, "tcp", net("10.77.4.1/32"), "ssh from admin network")
HTTP = Rule(80, "tcp", None, "http")
APP = Rule(8080, "tcp", net("10.77.4.10/32"), "app from proxy1")
GOOD = UfwDefaults("deny", "allow", True)


def live(*lines: str) -> list[LiveRule]:
    return [ufw.parse_added_line(line) for line in lines]


def ours(rule: Rule) -> str:
    """What `ufw show added` prints for a rule we added with add_argv."""
    if rule.source is None:
        return f"ufw allow {rule.port}/{rule.proto} comment '{rule.comment}'"
    return (f"ufw allow from {ufw.format_source(rule.source)} to any port {rule.port} "
            f"proto {rule.proto} comment '{rule.comment}'")


def test_fresh_host_gets_everything():
    d = fw_diff.diff_host("h", [SSH, HTTP], [], active=False, defaults=None)
    assert d.add == (SSH, HTTP) and d.enable and d.changes
    assert d.defaults == (("incoming", None, "deny"), ("outgoing", None, "allow"))
    assert fw_diff.ufw_commands(d) == [
        ["ufw", "allow", "proto", "tcp", "from", "10.77.4.1/32", "to", "any", "port", "22",
         "comment", "releasy: ssh from admin network"],
        ["ufw", "allow", "proto", "tcp", "from", "any", "to", "any", "port", "80",
         "comment", "releasy: http"],
        ["ufw", "default", "deny", "incoming"],
        ["ufw", "default", "allow", "outgoing"],
        ["ufw", "--force", "enable"],
    ]


def test_converged_host_has_nothing_to_do():
    d = fw_diff.diff_host("h", [SSH, HTTP, APP], live(ours(SSH), ours(HTTP), ours(APP)),
                          active=True, defaults=GOOD)
    assert not d.changes and fw_diff.ufw_commands(d) == []
    assert d.satisfied == (SSH, HTTP, APP)


def test_stale_managed_rules_go_unmanaged_ones_stay():
    stale = "ufw allow from 10.77.4.9 to any port 8080 proto tcp comment 'releasy: app from old'"
    hand = "ufw allow 9999/tcp"
    d = fw_diff.diff_host("h", [SSH], live(ours(SSH), stale, hand), active=True, defaults=GOOD)
    assert [str(r) for r in d.remove] == [stale]
    assert [str(r) for r in d.unexpected] == [hand]
    assert fw_diff.ufw_commands(d) == [
        ["ufw", "--force", "delete", "allow", "from", "10.77.4.9", "to", "any", "port", "8080",
         "proto", "tcp", "comment", "releasy: app from old"]]
    pruned = fw_diff.diff_host("h", [SSH], live(ours(SSH), stale, hand), active=True,
                               defaults=GOOD, prune_unmanaged=True)
    assert [str(r) for r in pruned.remove] == [stale, hand] and pruned.unexpected == ()


def test_additions_only_opens_and_leaves_closing_for_the_full_apply():
    """`fab site` before its app tier: a new peer's rule on a running ufw is added; the stale
    rule, the policy and the re-comment wait for the firewall step at the end."""
    stale = "ufw allow from 10.77.4.9 to any port 8080 proto tcp comment 'releasy: app from old'"
    d = fw_diff.diff_host("h", [SSH, HTTP, APP], live(ours(SSH), "ufw allow 80/tcp", stale),
                          active=True, defaults=UfwDefaults("allow", "allow", True))
    assert d.remove and d.defaults and d.recomment == (HTTP,)
    opening = fw_diff.additions_only(d)
    assert opening.changes and opening.opening_only
    assert fw_diff.ufw_commands(opening) == [ufw.add_argv(APP)]
    # ufw off (it filters nothing yet) or IPv6 filtering to turn on: nothing ahead of time
    assert not fw_diff.additions_only(fw_diff.diff_host("h", [SSH, APP], [], active=False,
                                                   defaults=GOOD)).changes
    no_v6 = UfwDefaults("deny", "allow", False)
    assert not fw_diff.additions_only(fw_diff.diff_host("h", [SSH, APP], live(ours(SSH)),
                                                   active=True, defaults=no_v6)).changes


def test_a_planned_rule_with_another_comment_is_adopted():
    d = fw_diff.diff_host("h", [HTTP], live("ufw allow 80/tcp", "ufw allow 80/tcp comment 'x'"),
                          active=True, defaults=GOOD)
    # first match taken and re-commented; the duplicate is someone else's: kept, reported
    assert d.recomment == (HTTP,) and d.add == ()
    assert [str(r) for r in d.unexpected] == ["ufw allow 80/tcp comment x"]
    assert fw_diff.ufw_commands(d) == [ufw.add_argv(HTTP)]


def test_policy_drift_is_fixed_without_touching_rules():
    d = fw_diff.diff_host("h", [SSH], live(ours(SSH)), active=True,
                          defaults=UfwDefaults("allow", "allow", True))
    assert fw_diff.ufw_commands(d) == [["ufw", "default", "deny", "incoming"]]


def test_command_order_is_lockout_safe():
    stale = "ufw allow from 10.0.0.9 to any port 22 proto tcp comment 'releasy: old admin'"
    d = fw_diff.diff_host("h", [SSH], live(stale, "ufw route allow from 10.0.0.0/8"),
                          active=False, defaults=UfwDefaults("allow", "allow", True),
                          prune_unmanaged=True)
    verbs = [argv[1:4] for argv in fw_diff.ufw_commands(d)]
    assert verbs == [["allow", "proto", "tcp"], ["--force", "delete", "allow"],
                     ["--force", "route", "delete"], ["default", "deny", "incoming"],
                     ["--force", "enable"]]


def test_argv_keeps_awkward_comments_as_one_word():
    rule = Rule(8443, "tcp", None, "caf\u00e9 \"quoted\" it's; $(rm -rf /)")
    argv = ufw.add_argv(rule)
    assert argv[-1] == "releasy: caf\u00e9 \"quoted\" it's; $(rm -rf /)"
    assert shlex.split(shlex.join(argv)) == argv
    gone = LiveRule(("allow", "80/tcp", "comment", "with space"))
    assert ufw.delete_argv(gone) == ["ufw", "--force", "delete", "allow", "80/tcp",
                                     "comment", "with space"]


# --------------------------------------------------------------------------- audit logic


def test_reachability_expected_by_the_plan():
    rules = [SSH, HTTP, Rule(22, "tcp", net("2001:db8::/32"), "v6 admin")]
    assert fw.reachable_by_plan(rules, 22, addr("10.77.4.1"))
    assert not fw.reachable_by_plan(rules, 22, addr("10.77.4.254"))
    assert fw.reachable_by_plan(rules, 22, addr("2001:db8::5"))
    assert fw.reachable_by_plan(rules, 80, addr("198.51.100.1"))
    assert not fw.reachable_by_plan(rules, 443, addr("10.77.4.1"))


def test_audit_ports_cover_plan_live_rules_and_listeners():
    plan = {"a": [SSH, HTTP], "b": [APP]}
    ports = fw.audit_ports(plan, live("ufw allow 9999/tcp", "ufw allow 53/udp"),
                           [("127.0.0.1", 6379), ("0.0.0.0", 22)])
    assert ports == [22, 80, 6379, 8080, 9999]


def test_probe_program_tells_open_from_closed(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connecting gets a RST
    try:
        open_port, closed_port = listener.getsockname()[1], closed.getsockname()[1]
        sources, results = fw_audit.probe_reachability(
            [("127.0.0.1", open_port), ("127.0.0.1", closed_port)], None, timeout=2)
    finally:
        listener.close()
        closed.close()
    assert sources == {"127.0.0.1": "127.0.0.1"}
    assert results == {("127.0.0.1", open_port): "open", ("127.0.0.1", closed_port): "closed"}


def test_probe_refuses_a_bad_namespace_name():
    with pytest.raises(BadInput):
        fw_audit.probe_reachability([("127.0.0.1", 1)], "x; rm -rf /")


# --------------------------------------------------------------------------- lockout layer 1


def state(ssh_client) -> fw_state.HostState:
    return fw_state.HostState(ssh_client, True, None, (), None)


def test_ssh_source_inside_admin_networks_is_accepted(tmp_path):
    inv = inventory(SPLIT_YAML, tmp_path, admin_cidrs=["203.0.113.0/24", "2001:db8::/32"])
    host = inv.host("app2")
    fw_guard.check_ssh_source(host, state((addr("203.0.113.9"), 2222)), inv.admin_cidrs)
    fw_guard.check_ssh_source(host, state((addr("2001:db8::9"), 2222)), inv.admin_cidrs)


@pytest.mark.parametrize("seen, words", [
    ((addr("10.77.4.1"), 2222), ["10.77.4.1", "203.0.113.0/24", "Nothing was changed on app2"]),
    ((addr("203.0.113.9"), 22), ["port 22", "ssh_port for app2 is 2222"]),
    (None, ["$SSH_CONNECTION"]),
])
def test_ssh_source_outside_the_plan_is_refused(tmp_path, seen, words):
    inv = inventory(SPLIT_YAML, tmp_path)
    with pytest.raises(fw_guard.FirewallRefused) as exc:
        fw_guard.check_ssh_source(inv.host("app2"), state(seen), inv.admin_cidrs)
    for word in words:
        assert word in str(exc.value)
    assert exc.value.host == "app2"


def jumped(tmp_path):
    """SPLIT_YAML with app and db hosts behind a bastion; proxy1 direct."""
    return inventory(SPLIT_YAML, tmp_path, **{
        "ssh.jump": "bastion",
        "jump_hosts": {"bastion": {"address": "203.0.113.5", "private_address": "10.0.0.5"}},
        "hosts.proxy1.jump": False})


def test_hosts_behind_a_jump_host_allow_ssh_from_its_private_address_only(tmp_path):
    plan = fw.plan_rules(jumped(tmp_path))
    ssh = {name: [r for r in rules if r.port in (22, 2222)] for name, rules in plan.items()}
    assert table(ssh["proxy1"]) == [(22, "tcp", "203.0.113.0/24",
                                     "releasy: ssh from admin network")]
    via = "releasy: ssh from jump host bastion"
    assert table(ssh["app2"]) == [(2222, "tcp", "10.0.0.5/32", via)]
    assert table(ssh["db1"]) == [(22, "tcp", "10.0.0.5/32", via)]


def test_lockout_guard_behind_a_jump_host_wants_the_jump_hosts_address(tmp_path):
    inv = jumped(tmp_path)
    app2 = inv.host("app2")
    fw_guard.check_ssh_source(app2, state((addr("10.0.0.5"), 2222)), inv.admin_cidrs)
    # Our own admin address is not enough behind a bastion: the plan does not allow it.
    with pytest.raises(fw_guard.FirewallRefused) as exc:
        fw_guard.check_ssh_source(app2, state((addr("203.0.113.9"), 2222)), inv.admin_cidrs)
    assert "jump host bastion's private_address (10.0.0.5)" in str(exc.value)
    assert "Set private_address of jump host bastion to 203.0.113.9" in str(exc.value)


# --------------------------------------------------------------------------- scripts


def test_apply_script_saves_and_arms_before_any_ufw_command():
    d = fw_diff.diff_host("h", [SSH], live("ufw allow 9999/tcp comment 'releasy: x y'"),
                          active=True, defaults=GOOD)
    script = revert.apply_script(fw_diff.ufw_commands(d), token="abc123", revert_after=42)
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    lines = script.splitlines()
    arm = next(i for i, ln in enumerate(lines) if ln.startswith("systemd-run"))
    save = lines.index('mv "$saved.new" "$saved"')
    first_ufw = next(i for i, ln in enumerate(lines) if ln.startswith("ufw_do "))
    assert save < arm < first_ufw
    assert shlex.split(lines[arm]) == [
        "systemd-run", "--quiet", "--unit=releasy-firewall-revert",
        "--description=releasy: restore the previous firewall unless disarmed",
        "--on-active=42s", "--timer-property=AccuracySec=1s",
        "--timer-property=RemainAfterElapse=no", "--",
        "/usr/local/sbin/releasy-firewall-revert", "abc123"]
    # root's own 0700 state directory, outside the service's /var/lib/releasy
    assert "state=/var/lib/releasy-deploy/firewall" in lines
    assert not any("/var/lib/releasy/" in ln for ln in lines)
    assert [shlex.split(ln) for ln in lines[first_ufw:]] == [
        ["ufw_do", *ufw.add_argv(SSH)],
        ["ufw_do", "ufw", "--force", "delete", "allow", "9999/tcp", "comment", "releasy: x y"]]


def test_revert_script_is_valid_shell():
    assert subprocess.run(["sh", "-n", str(revert.REVERT_SOURCE)]).returncode == 0
    assert subprocess.run(["sh", "-n"], input=revert.disarm_script("t0k"), text=True,
                          ).returncode == 0


def test_revert_after_is_bounded():
    for bad in (0, 4, 3601, "60"):
        with pytest.raises(BadInput):
            fw_guard.check_revert_after(bad)
    assert fw_guard.check_revert_after(60) == 60


# user.rules then user6.rules as ufw 0.36 wrote them on a lab host (their iptables lines
# left out: only the `### tuple ###` lines matter), and what `ufw show added` said.
USER_RULES = """\
*filter
:ufw-user-input - [0:0]
### RULES ###

### tuple ### allow tcp 22 0.0.0.0/0 any 10.77.14.1 in comment=72656c656173793a207373682066726f6d2061646d696e206e6574776f726b
### tuple ### allow tcp 8080 0.0.0.0/0 any 10.77.14.10 in comment=72656c656173793a206170702066726f6d2070726f787931
### tuple ### allow tcp 8080 0.0.0.0/0 any 0.0.0.0/0 in
### tuple ### deny any 25 0.0.0.0/0 any 0.0.0.0/0 out
### tuple ### allow tcp 22 0.0.0.0/0 any 0.0.0.0/0 OpenSSH - in
### tuple ### limit tcp 2222 0.0.0.0/0 any 0.0.0.0/0 in_eth0
### tuple ### allow_log any 9999 0.0.0.0/0 any 0.0.0.0/0 in
### tuple ### reject udp 53 1.2.3.4 any 0.0.0.0/0 out_eth0 comment=782d79
### tuple ### allow udp any 0.0.0.0/0 1000:2000 10.1.0.0/16 in
### tuple ### deny any any 0.0.0.0/0 any 10.9.9.9 in
### tuple ### allow tcp 80,443 0.0.0.0/0 any 0.0.0.0/0 in
### tuple ### route:allow tcp 80 0.0.0.0/0 any 10.0.0.0/8 in
### tuple ### allow tcp 8080 ::/0 any ::/0 in
### tuple ### deny any 25 ::/0 any ::/0 out
### tuple ### allow tcp 22 ::/0 any fd77::5 in
### tuple ### allow tcp 22 ::/0 any ::/0 OpenSSH - in
### tuple ### limit tcp 2222 ::/0 any ::/0 in_eth0
### tuple ### allow_log any 9999 ::/0 any ::/0 in
### tuple ### allow tcp 80,443 ::/0 any ::/0 in
### END RULES ###
COMMIT
"""
USER_RULES_SHOW_ADDED = """\
Added user rules (see 'ufw status' for running firewall):
ufw allow from 10.77.14.1 to any port 22 proto tcp comment 'releasy: ssh from admin network'
ufw allow from 10.77.14.10 to any port 8080 proto tcp comment 'releasy: app from proxy1'
ufw allow 8080/tcp
ufw deny out 25
ufw allow OpenSSH
ufw limit in on eth0 to any port 2222 proto tcp
ufw allow log 9999
ufw reject out on eth0 to 1.2.3.4 port 53 proto udp comment 'x-y'
ufw allow from 10.1.0.0/16 port 1000:2000 proto udp
ufw deny from 10.9.9.9
ufw allow 80,443/tcp
ufw route allow from 10.0.0.0/8 to any port 80 proto tcp
ufw allow from fd77::5 to any port 22 proto tcp
"""


def test_rules_read_from_ufws_files_are_what_show_added_lists():
    from_files = ufw.parse_user_rules(USER_RULES)
    assert [r.words for r in from_files] == \
        [r.words for r in ufw.parse_show_added(USER_RULES_SHOW_ADDED)]
    assert from_files[0].managed and from_files[0].key == (
        "in", 22, "tcp", ipaddress.ip_network("10.77.14.1/32"), None)
    # the IPv6 twin of "allow 8080/tcp" is folded in; a v6-only rule stays, listed last
    assert [r.describe() for r in from_files].count("ufw allow 8080/tcp") == 1
    assert from_files[-1].words[:3] == ("allow", "from", "fd77::5")


def test_a_malformed_tuple_is_skipped():
    assert ufw.tuple_command("### tuple ### allow tcp 22") is None
    assert ufw.parse_user_rules("### tuple ### allow tcp\n### tuple ### deny any 25 0.0.0.0/0"
                                " any 0.0.0.0/0 out\n") [0].words == ("deny", "out", "25")


def test_ufw_conf_gives_enabled_logging_and_policies():
    st = ufw_state.parse_ufw_conf("# comment\nENABLED=yes\nLOGLEVEL=low\n",
                                  'DEFAULT_INPUT_POLICY="DROP"\nDEFAULT_OUTPUT_POLICY="ACCEPT"\n'
                                  'DEFAULT_FORWARD_POLICY="DROP"\n')
    assert st.active and st.logging == "on (low)"
    assert st.defaults == {"incoming": "deny", "outgoing": "allow", "routed": "deny"}
    assert not ufw_state.parse_ufw_conf("ENABLED=no\nLOGLEVEL=off\n", "").active
    assert ufw_state.parse_ufw_conf("ENABLED=no\nLOGLEVEL=off\n", "").logging == "off"


# ============================================================ the fresh-connection check
def _dropping_executor(sshd) -> Executor:
    """An Executor over the loopback sshd whose first host-changing command loses its
    connection (the fault injection's drop: the command does not run)."""
    return Executor(sshd.inventory(), reporter=Reporter(io.StringIO()),
                    faults=FaultInjection(1, drop=True))


def test_the_fresh_check_tries_a_new_connection_once_more_after_a_dropped_one(sshd):
    with _dropping_executor(sshd) as fresh:
        res = fw_guard._disarm(fresh, fresh.host("loop"), "token-1")
    assert res.stdout.strip() == "@disarmed"
    assert fresh.faults.count == 2


def test_a_second_dropped_connection_reaches_the_caller(sshd):
    with _dropping_executor(sshd) as fresh:
        with pytest.raises(ConnectionDropped, match="lost the SSH connection"):
            fw_guard._disarm(fresh, fresh.host("loop"), "token-1", again=False)
