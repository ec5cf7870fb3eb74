"""Egress planning (egress.restrict): one test per derived flow, the operator's extras and
pins, the inventory's bad-input cases, and the host facts the plan is fed with. The
probe outputs below are the formats of Debian 12's resolv.conf, getent and iproute2."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from releasy_deploy import firewall_diff as fw_diff
from releasy_deploy import firewall_egress as fw_egress
from releasy_deploy.commands import apt_proxy, netprobe, ufw
from releasy_deploy.commands.ufw_state import UfwDefaults
from releasy_deploy.errors import BadInput
from releasy_deploy.firewall_egress import HostNet
from releasy_deploy.inventory import InventoryError
from releasy_deploy.tiers import firewall_audit as fw_audit

from inventories import build

net = ipaddress.ip_network
addr = ipaddress.ip_address

SPLIT = """
environment: production
admin_cidrs: [203.0.113.0/24]
known_hosts: known_hosts
hosts:
  proxy1: {address: 198.51.100.10, private_address: 10.0.0.10}
  app1: {address: 198.51.100.21, private_address: 10.0.0.21}
  app2: {address: 198.51.100.22, private_address: 10.0.0.22}
  db1: {address: 198.51.100.30, private_address: 10.0.0.30}
tiers: {proxy: [proxy1], app: [app1, app2], db: [db1]}
database: {kind: postgres}
release: {source: releases}
tls: {mode: self-signed, server_name: releasy.example.com}
egress: {restrict: true}
"""

SINGLE = """
environment: dev
admin_cidrs: [192.0.2.0/28]
known_hosts: known_hosts
hosts:
  solo: {address: 192.0.2.5}
tiers: {proxy: [solo], app: [solo], db: [solo]}
database: {kind: postgres}
release: {source: releases}
tls: {mode: self-signed, server_name: releasy.test}
egress: {restrict: true}
"""

JWT = {"jwks_url": "https://login.example.com/.well-known/jwks.json",
       "issuer": "https://login.example.com/", "audience": "releasy"}
STORAGE = {"bucket": "releases", "region": "eu-central-1",
           "endpoint": "https://s3.example.com:9000"}


def load(text: str | dict, tmp_path: Path, **changes):
    return build(text, tmp_path / "hosts.yaml", **changes)


def out_rules(inv, host: str, facts: HostNet = HostNet()) -> list[tuple[str, str, str]]:
    """(port/proto, destination, reason) of a host's egress rules."""
    return [(f"{r.port}/{r.proto}", ufw.format_source(r.dest), r.reason)
            for r in fw_egress.egress_rules(inv, inv.host(host), facts)]


NTP = ("123/udp", "anywhere", "ntp: time sync")


# --------------------------------------------------------------------------- derived flows


def test_off_by_default_nothing_is_derived_and_outgoing_stays_allowed(tmp_path):
    inv = load(SPLIT, tmp_path, egress=None)
    assert not inv.egress.restrict
    assert all(fw_egress.egress_rules(inv, h, HostNet()) == [] for h in inv.hosts)
    assert fw_egress.names_to_resolve(load(SPLIT, tmp_path, **{"egress.restrict": False},
                                           app={"operator_jwt": JWT}), inv.host("app1")) == []
    assert fw_diff.wanted_defaults(False) == (("incoming", "deny"), ("outgoing", "allow"))
    assert fw_diff.wanted_defaults(True) == (("incoming", "deny"), ("outgoing", "deny"))


def test_proxy_reaches_each_app_host_on_the_bind_port(tmp_path):
    inv = load(SPLIT, tmp_path, app={"bind_port": 9000})
    assert out_rules(inv, "proxy1") == [
        ("9000/tcp", "10.0.0.21", "proxy -> app1:9000: upstream"),
        ("9000/tcp", "10.0.0.22", "proxy -> app2:9000: upstream"),
        NTP]


def test_app_reaches_the_database_and_the_database_reaches_nothing(tmp_path):
    inv = load(SPLIT, tmp_path)
    assert out_rules(inv, "app1") == [
        ("5432/tcp", "10.0.0.30", "app -> db1:5432: the database"), NTP]
    assert out_rules(inv, "db1") == [NTP]


def test_app_reaches_storage_and_jwks_at_the_addresses_the_host_resolved(tmp_path):
    inv = load(SPLIT, tmp_path, app={"operator_jwt": JWT, "artifact_storage": STORAGE})
    assert fw_egress.names_to_resolve(inv, inv.host("app1")) == ["s3.example.com",
                                                                 "login.example.com"]
    assert fw_egress.names_to_resolve(inv, inv.host("proxy1")) == []
    facts = HostNet((), {"s3.example.com": (addr("192.0.2.80"), addr("2001:db8::80")),
                         "login.example.com": (addr("192.0.2.90"),)})
    assert out_rules(inv, "app2", facts) == [
        ("5432/tcp", "10.0.0.30", "app -> db1:5432: the database"),
        ("9000/tcp", "192.0.2.80", "app -> s3.example.com:9000: artifact storage (192.0.2.80)"),
        ("9000/tcp", "2001:db8::80",
         "app -> s3.example.com:9000: artifact storage (2001:db8::80)"),
        ("443/tcp", "192.0.2.90", "app -> login.example.com:443: JWKS URL (192.0.2.90)"),
        NTP]


def test_a_name_that_does_not_resolve_names_the_host_and_the_pin(tmp_path):
    inv = load(SPLIT, tmp_path, app={"operator_jwt": JWT})
    with pytest.raises(fw_egress.EgressError) as exc:
        fw_egress.egress_rules(inv, inv.host("app1"), HostNet((), {"login.example.com": ()}))
    assert exc.value.host == "app1"
    assert "login.example.com (JWKS URL)" in str(exc.value)
    assert "pin: operator_jwt" in str(exc.value)


def test_an_ip_literal_endpoint_needs_no_resolution(tmp_path):
    storage = {**STORAGE, "endpoint": "http://192.0.2.7:9000"}
    inv = load(SPLIT, tmp_path, app={"artifact_storage": storage})
    assert fw_egress.names_to_resolve(inv, inv.host("app1")) == []
    assert ("9000/tcp", "192.0.2.7", "app -> 192.0.2.7:9000: artifact storage") in \
        out_rules(inv, "app1")


def test_a_pin_replaces_resolution_with_the_operators_networks(tmp_path):
    inv = load(SPLIT, tmp_path, app={"artifact_storage": STORAGE}, egress={
        "restrict": True, "allow": [{"to": "192.0.2.0/24", "port": 9000, "tiers": ["app"],
                                     "pin": "artifact_storage"}]})
    assert fw_egress.names_to_resolve(inv, inv.host("app1")) == []
    assert out_rules(inv, "app1") == [
        ("5432/tcp", "10.0.0.30", "app -> db1:5432: the database"), NTP,
        ("9000/tcp", "192.0.2.0/24", "egress.allow[0]: artifact_storage")]


def test_every_host_reaches_its_own_resolvers_on_udp_and_tcp(tmp_path):
    inv = load(SPLIT, tmp_path)
    facts = HostNet((addr("10.0.0.2"), addr("2001:db8::53")))
    assert out_rules(inv, "db1", facts) == [
        ("53/udp", "10.0.0.2", "dns -> 10.0.0.2: resolver of this host"),
        ("53/tcp", "10.0.0.2", "dns -> 10.0.0.2: resolver of this host"),
        ("53/udp", "2001:db8::53", "dns -> 2001:db8::53: resolver of this host"),
        ("53/tcp", "2001:db8::53", "dns -> 2001:db8::53: resolver of this host"),
        NTP]


def test_single_host_needs_only_dns_ntp_and_its_configured_endpoints(tmp_path):
    # proxy -> app and app -> db go over loopback, which ufw always accepts
    inv = load(SINGLE, tmp_path)
    assert out_rules(inv, "solo", HostNet((addr("192.0.2.1"),))) == [
        ("53/udp", "192.0.2.1", "dns -> 192.0.2.1: resolver of this host"),
        ("53/tcp", "192.0.2.1", "dns -> 192.0.2.1: resolver of this host"), NTP]
    inv = load(SINGLE, tmp_path, app={"operator_jwt": JWT})
    assert out_rules(inv, "solo", HostNet((), {"login.example.com": (addr("192.0.2.90"),)}))[0] \
        == ("443/tcp", "192.0.2.90", "app -> login.example.com:443: JWKS URL (192.0.2.90)")


def test_operator_extras_go_to_the_listed_tiers_only(tmp_path):
    inv = load(SPLIT, tmp_path, egress={"restrict": True, "allow": [
        {"to": "192.0.2.10", "port": 514, "proto": "udp"},
        {"to": "2001:db8:5::/48", "port": 9443, "tiers": ["app", "db"]}]})
    syslog = ("514/udp", "192.0.2.10", "egress.allow[0]")
    extra = ("9443/tcp", "2001:db8:5::/48", "egress.allow[1]")
    assert out_rules(inv, "proxy1")[-2:] == [NTP, syslog]
    assert out_rules(inv, "db1") == [NTP, syslog, extra]
    assert extra in out_rules(inv, "app2")


def test_apt_proxy_is_reached_by_every_host_and_configured_for_apt(tmp_path):
    inv = load(SPLIT, tmp_path, egress={"restrict": True,
                                        "apt_proxy": "http://10.0.0.3:3142"})
    assert ("3142/tcp", "10.0.0.3", "db1 -> 10.0.0.3:3142: apt proxy") in out_rules(inv, "db1")
    conf = apt_proxy.apt_proxy_conf(inv.egress.apt_proxy).decode()
    assert 'Acquire::http::Proxy "http://10.0.0.3:3142/";' in conf
    assert 'Acquire::https::Proxy "http://10.0.0.3:3142/";' in conf
    assert apt_proxy.apt_proxy_conf(None) is None


def test_egress_rules_become_ufw_allow_out_commands(tmp_path):
    inv = load(SPLIT, tmp_path)
    db, ntp = fw_egress.egress_rules(inv, inv.host("app1"), HostNet())
    assert ufw.add_argv(db) == ["ufw", "allow", "out", "proto", "tcp", "to", "10.0.0.30/32",
                                "port", "5432", "comment", "releasy: app -> db1:5432: the database"]
    assert ufw.add_argv(ntp)[:7] == ["ufw", "allow", "out", "proto", "udp", "to", "any"]
    # what ufw 0.36.2 prints back for them matches the plan: nothing to do the second time
    live = [ufw.parse_added_line(
                "ufw allow out to 10.0.0.30 port 5432 proto tcp "
                "comment 'releasy: app -> db1:5432: the database'"),
            ufw.parse_added_line("ufw allow out 123/udp comment 'releasy: ntp: time sync'")]
    d = fw_diff.diff_host("app1", [db, ntp], live, active=True,
                          defaults=UfwDefaults("deny", "deny", True),
                          policies=fw_diff.wanted_defaults(True))
    assert not d.changes


def test_turning_restrict_off_removes_our_out_rules_and_allows_outgoing(tmp_path):
    live = [ufw.parse_added_line("ufw allow out 123/udp comment 'releasy: ntp: time sync'"),
            ufw.parse_added_line("ufw allow out 25/tcp")]  # someone else's: kept
    d = fw_diff.diff_host("db1", [], live, active=True, defaults=UfwDefaults("deny", "deny", True),
                          policies=fw_diff.wanted_defaults(False))
    assert fw_diff.ufw_commands(d) == [
        ["ufw", "--force", "delete", "allow", "out", "123/udp", "comment", "releasy: ntp: time sync"],
        ["ufw", "default", "allow", "outgoing"]]
    assert [str(r) for r in d.unexpected] == ["ufw allow out 25/tcp"]


def test_egress_allowed_for_the_audit(tmp_path):
    inv = load(SPLIT, tmp_path, egress={"restrict": True, "allow": [
        {"to": "192.0.2.0/24", "port": 9443, "tiers": ["app"]}]})
    app = fw_egress.egress_rules(inv, inv.host("app1"), HostNet())
    db = fw_egress.egress_rules(inv, inv.host("db1"), HostNet())
    assert fw_egress.egress_allowed(app, addr("192.0.2.254"), 9443, restrict=True)
    assert not fw_egress.egress_allowed(app, addr("192.0.2.254"), 9444, restrict=True)
    assert not fw_egress.egress_allowed(db, addr("192.0.2.254"), 9443, restrict=True)
    assert fw_egress.egress_allowed(db, addr("192.0.2.254"), 9443, restrict=False)


# --------------------------------------------------------------------------- IPv6 policy


def test_ipv6_off_turns_it_on_and_re_adds_every_rule_first():
    ssh = ufw.Rule(22, "tcp", net("203.0.113.0/24"), "ssh from admin network")
    live = [ufw.parse_added_line(
        "ufw allow from 203.0.113.0/24 to any port 22 proto tcp "
        "comment 'releasy: ssh from admin network'")]
    d = fw_diff.diff_host("h", [ssh], live, active=True,
                          defaults=UfwDefaults("deny", "allow", False))
    assert d.changes and d.ipv6 and d.add == (ssh,)
    assert fw_diff.ufw_commands(d) == [
        ["sed", "-i", "s/^IPV6=.*/IPV6=yes/", "/etc/default/ufw"], ["ufw", "reload"],
        ufw.add_argv(ssh)]
    on = fw_diff.diff_host("h", [ssh], live, active=True,
                           defaults=UfwDefaults("deny", "allow", True))
    assert not on.changes


# --------------------------------------------------------------------------- host facts


def test_resolvers_from_resolv_conf_and_resolveds_upstreams():
    plain = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n"
    assert netprobe.parse_resolvers(plain + "\n@resolved\n") == (addr("10.0.0.2"), addr("fe80::1"))
    stub = "nameserver 127.0.0.53\noptions edns0 trust-ad\n"
    upstream = "nameserver 192.0.2.53\nnameserver 2001:db8::53\n"
    assert netprobe.parse_resolvers(f"{stub}\n@resolved\n{upstream}") == (
        addr("192.0.2.53"), addr("2001:db8::53"))
    # no stub: resolved's file is not what this host uses
    assert netprobe.parse_resolvers(f"nameserver 10.0.0.2\n\n@resolved\n{upstream}") == (
        addr("10.0.0.2"),)
    assert netprobe.parse_resolvers("\n@resolved\n") == ()


def test_getent_and_ip_outputs():
    getent = ("192.0.2.80      STREAM s3.example.com\n192.0.2.80      DGRAM  \n"
              "192.0.2.80      RAW    \n2001:db8::80    STREAM \n")
    assert netprobe.parse_getent_hosts(getent) == (addr("192.0.2.80"), addr("2001:db8::80"))
    if_inet6 = ("fe8000000000000000770afffe4d2a15 1c50 40 20 80     eth0\n"
                "00000000000000000000000000000001 01 80 10 80       lo\n"
                "fd770000001600000000000000000021 1c50 40 00 82     eth0\n"
                "20010db8000000000000000000000001 1c50 40 00 80     eth0\n"
                "fd770000001600000000000000000021 1c51 40 00 82     eth1\n"
                "not a line\n")
    assert netprobe.parse_ipv6_addresses(if_inet6) == (addr("fd77:0:16::21"),
                                                       addr("2001:db8::1"))
    assert netprobe.parse_ipv6_addresses("") == ()


def test_listener_argument():
    assert fw_audit.parse_listener("10.77.16.254:9443") == (addr("10.77.16.254"), 9443)
    assert fw_audit.parse_listener("[fd77::fe]:80") == (addr("fd77::fe"), 80)
    for bad in ("10.77.16.254", "host:80", "10.0.0.1:0", "10.0.0.1:99999", "1.2.3.4:8a"):
        with pytest.raises(BadInput):
            fw_audit.parse_listener(bad)


# --------------------------------------------------------------------------- bad input


def problems(tmp_path: Path, egress) -> list[str]:
    with pytest.raises(InventoryError) as exc:
        load(SPLIT, tmp_path, egress=egress)
    return [f"{p.path}: {p.message}" for p in exc.value.problems]


@pytest.mark.parametrize("egress, expected", [
    ({"restrict": "yes"}, "egress.restrict: must be true or false"),
    ({"restict": True}, "egress.restict: unknown key (did you mean 'restrict'?)"),
    ({"allow": {"to": "10.0.0.0/8"}}, "egress.allow: must be a list"),
    ({"allow": [{"to": "10.0.0.300/32", "port": 80}]},
     "egress.allow[0].to: '10.0.0.300/32' is not a network in CIDR form"),
    ({"allow": [{"to": "10.0.0.1/8", "port": 80}]},
     "egress.allow[0].to: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"),
    ({"allow": [{"to": "0.0.0.0/0", "port": 80}]}, "egress.allow[0].to: 0.0.0.0/0 is the whole"),
    ({"allow": [{"to": "10.0.0.0/8; rm -rf /", "port": 80}]},
     "egress.allow[0].to: '10.0.0.0/8; rm -rf /' (contains shell metacharacters"),
    ({"allow": [{"to": "10.0.0.0/8"}]}, "egress.allow[0].port: required key is missing"),
    ({"allow": [{"to": "10.0.0.0/8", "port": 70000}]},
     "egress.allow[0].port: 70000 is out of range"),
    ({"allow": [{"to": "10.0.0.0/8", "port": "443"}]}, "egress.allow[0].port: must be an integer"),
    ({"allow": [{"to": "10.0.0.0/8", "port": 53, "proto": "icmp"}]},
     "egress.allow[0].proto: got the string 'icmp'; must be one of: tcp, udp"),
    ({"allow": [{"to": "10.0.0.0/8", "port": 53, "tiers": ["apps"]}]},
     "egress.allow[0].tiers: unknown tier 'apps' (did you mean 'app'?)"),
    ({"allow": [{"to": "10.0.0.0/8", "port": 53, "tiers": []}]},
     "egress.allow[0].tiers: must be a non-empty list"),
    ({"allow": [{"to": "10.0.0.0/8", "port": 53, "pin": "operator_jwt"}]},
     "egress.allow[0].pin: pins operator_jwt, but app.operator_jwt is not configured"),
    ({"allow": [{"to": "10.0.0.0/8", "port": 53, "from": "x"}]},
     "egress.allow[0].from: unknown key"),
    ({"allow": [{"to": "10.0.0.0/8", "port": 53}, {"to": "10.0.0.0/8", "port": 53}]},
     "egress.allow[1]: is listed twice"),
    ({"apt_proxy": "https://10.0.0.3:3142"}, "egress.apt_proxy: 'https://10.0.0.3:3142': apt"),
    ({"apt_proxy": "http://u:p@10.0.0.3:3142"}, "egress.apt_proxy: must not contain credentials"),
])
def test_bad_egress_sections_name_the_file_and_path(tmp_path, egress, expected):
    found = problems(tmp_path, egress)
    assert any(expected in p for p in found), found
    with pytest.raises(InventoryError) as exc:
        load(SPLIT, tmp_path, egress=egress)
    assert str(tmp_path / "hosts.yaml") in str(exc.value)


def test_a_pin_outside_the_app_tier_is_refused(tmp_path):
    with pytest.raises(InventoryError) as exc:
        load(SPLIT, tmp_path, app={"operator_jwt": JWT}, egress={"allow": [
            {"to": "192.0.2.0/24", "port": 443, "tiers": ["db"], "pin": "operator_jwt"}]})
    assert "egress.allow[0].tiers: pins operator_jwt, which the app tier reaches" in str(exc.value)


# --------------------------------------------------------------------------- ACME (tls.mode: acme)
ACME_TLS = {"mode": "acme", "server_name": "releasy.example.com",
            "acme": {"email": "ops@example.com"}}  # Let's Encrypt production by default


def two_proxies(tmp_path, **changes):
    data = yaml.safe_load(SPLIT)
    data["hosts"]["proxy2"] = {"address": "198.51.100.11", "private_address": "10.0.0.11"}
    data["tiers"]["proxy"] = ["proxy1", "proxy2"]
    data["tls"] = ACME_TLS  # `build` changes a copy
    return load(data, tmp_path, **changes)


def test_acme_proxies_reach_the_ca_as_resolved_on_the_host_and_each_other_on_80(tmp_path):
    inv = two_proxies(tmp_path)
    ca = "acme-v02.api.letsencrypt.org"
    assert fw_egress.names_to_resolve(inv, inv.host("proxy1")) == [ca]
    assert fw_egress.names_to_resolve(inv, inv.host("app1")) == []
    facts = HostNet((), {ca: (addr("192.0.2.44"), addr("2001:db8::44"))})
    rules = out_rules(inv, "proxy2", facts)
    assert ("80/tcp", "10.0.0.10", "proxy -> proxy1:80: ACME challenge relay") in rules
    assert not any("proxy2:80" in why for _, _, why in rules)  # not to itself
    for port in (80, 443):
        for ip in ("192.0.2.44", "2001:db8::44"):
            assert (f"{port}/tcp", ip, f"proxy2 -> {ca}:{port}: ACME directory ({ip})") in rules
    assert not any(dest == "anywhere" and port in ("80/tcp", "443/tcp")
                   for port, dest, _ in rules)  # the CA only, not the internet
    # The app hosts reach nothing of it; without restrict nothing is planned at all.
    assert not any("ACME" in why for _, _, why in out_rules(inv, "app1"))
    assert fw_egress.egress_rules(two_proxies(tmp_path, egress=None), inv.host("proxy1"),
                                  facts) == []


def test_acme_directory_on_its_own_port_and_an_ip_literal(tmp_path):
    inv = two_proxies(tmp_path, **{"tls.acme.directory_url": "https://192.0.2.9:14000/dir"})
    assert fw_egress.names_to_resolve(inv, inv.host("proxy1")) == []
    rules = out_rules(inv, "proxy1")
    assert [(p, d) for p, d, why in rules if "ACME directory" in why] == [
        ("80/tcp", "192.0.2.9"), ("443/tcp", "192.0.2.9"), ("14000/tcp", "192.0.2.9")]


def test_acme_directory_that_does_not_resolve_or_is_pinned(tmp_path):
    inv = two_proxies(tmp_path)
    with pytest.raises(fw_egress.EgressError) as exc:
        fw_egress.egress_rules(inv, inv.host("proxy1"), HostNet())
    assert exc.value.host == "proxy1" and "pin: acme_directory" in str(exc.value)
    pinned = two_proxies(tmp_path, egress={"restrict": True, "allow": [
        {"to": "192.0.2.0/24", "port": 443, "tiers": ["proxy"], "pin": "acme_directory"}]})
    assert fw_egress.names_to_resolve(pinned, pinned.host("proxy1")) == []
    assert ("443/tcp", "192.0.2.0/24", "egress.allow[0]: acme_directory") in \
        out_rules(pinned, "proxy1")
    assert not any("ACME directory" in why for _, _, why in out_rules(pinned, "proxy1"))


def test_an_acme_pin_needs_acme_mode_and_the_proxy_tier(tmp_path):
    pin = {"to": "192.0.2.0/24", "port": 443, "pin": "acme_directory"}
    assert any("pins acme_directory, but tls.mode: acme is not configured" in p
               for p in problems(tmp_path, {"allow": [pin]}))
    with pytest.raises(InventoryError) as exc:
        two_proxies(tmp_path, egress={"allow": [{**pin, "tiers": ["app"]}]})
    assert "pins acme_directory, which the proxy tier reaches" in str(exc.value)
