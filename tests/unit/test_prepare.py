"""`fab site`'s first moves (tiers/prepare.py), the pure parts: which packages each host
gets in its one apt call, and that the one prefetch read of a host covers every tier's
first look at it (otherwise that tier would pay its own round trip)."""
from __future__ import annotations

from releasy_deploy.commands.ufw_state import UfwStatus
from releasy_deploy.executor import Executor
from releasy_deploy.facts import OsRelease, PackageVersion
from releasy_deploy.inventory import parse_inventory
from releasy_deploy.output import Reporter
from releasy_deploy.packages import APP_PACKAGES, FIREWALL_PACKAGES, PROXY_PACKAGES
from releasy_deploy.secrets import Secrets
from releasy_deploy.session import Session
from releasy_deploy.tiers import app_facts, db, firewall, firewall_state, prepare, proxy_state

BASE = {"admin_cidrs": ["10.9.0.1/32"], "known_hosts": "known_hosts",
        "release": {"source": "releases"},
        "tls": {"mode": "self-signed", "server_name": "releasy.example.test"}}
SPLIT = parse_inventory({
    **BASE, "environment": "prod",
    "hosts": {"proxy1": {"address": "10.9.0.10"}, "app1": {"address": "10.9.0.21"},
              "db1": {"address": "10.9.0.100"}},
    "tiers": {"proxy": ["proxy1"], "app": ["app1"], "db": ["db1"]}},
    "/nonexistent/hosts.yaml", check_files=False)
SINGLE = parse_inventory({
    **BASE, "environment": "solo", "hosts": {"solo": {"address": "10.9.0.5"}},
    "tiers": {"proxy": ["solo"], "app": ["solo"], "db": ["solo"]},
    "database": {"kind": "sqlite"}},
    "/nonexistent/hosts.yaml", check_files=False)


def host(inv, name):
    return next(h for h in inv.hosts if h.name == name)


def test_each_host_gets_its_tiers_packages_and_the_firewall_once():
    assert prepare.host_packages(SPLIT, host(SPLIT, "proxy1")) == (
        *PROXY_PACKAGES, *FIREWALL_PACKAGES)
    assert prepare.host_packages(SPLIT, host(SPLIT, "app1")) == (
        *APP_PACKAGES, *FIREWALL_PACKAGES)
    # PostgreSQL's packages depend on the host's release and cluster: read from it later
    assert prepare.host_packages(SPLIT, host(SPLIT, "db1")) == tuple(FIREWALL_PACKAGES)
    both = prepare.host_packages(SINGLE, host(SINGLE, "solo"))
    assert len(both) == len(set(both)) and set(both) >= {*APP_PACKAGES, *PROXY_PACKAGES}


def test_the_prefetch_covers_every_tiers_first_look():
    looks = {"db1": db.state_facts(SPLIT), "app1": app_facts.state_facts(SPLIT, host(SPLIT, "app1")),
             "proxy1": proxy_state.state_facts(SPLIT)}
    for h in SPLIT.hosts:
        facts = prepare.host_facts(SPLIT, h)
        assert facts[0] == OsRelease() and len(facts) == len(set(facts)), h.name
        assert set(looks[h.name]) <= set(facts), h.name
        assert set(firewall_state.state_facts(SPLIT, h)) <= set(facts), h.name
        assert {PackageVersion(p) for p in prepare.host_packages(SPLIT, h)} <= set(facts)
    # sqlite: no PostgreSQL facts on the single host
    solo = prepare.host_facts(SINGLE, host(SINGLE, "solo"))
    assert not set(db.state_facts(SPLIT)) - {OsRelease()} & set(solo)


def test_hosts_whose_firewall_is_off_are_told_apart_from_those_where_it_is_on():
    """`fab site` converges the firewall of the hosts where it was off beside its other
    steps; absent ufw (None) counts as off. --limit narrows both."""
    reporter = Reporter()
    session = Session(SPLIT, Secrets(), Executor(SPLIT, reporter=reporter), reporter)
    seen = {"proxy1": {firewall_state.UfwConf(): UfwStatus(active=True)},
            "app1": {firewall_state.UfwConf(): UfwStatus(active=False)},
            "db1": {firewall_state.UfwConf(): None}}
    on, off = firewall.split_by_seen(session, seen)
    assert [h.name for h in on] == ["proxy1"] and [h.name for h in off] == ["app1", "db1"]
    session.limit_to("db1")
    on, off = firewall.split_by_seen(session, seen)
    assert on == [] and [h.name for h in off] == ["db1"]
