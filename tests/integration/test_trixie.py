"""Debian 13 (trixie) hosts, and a fleet mid-upgrade (Debian 13 app/proxy hosts, a Debian 12
db host): the main path through the real CLI, the PostgreSQL major read from each host, and
the refusals (a pin the host contradicts, an unsupported release) that touch nothing.

Named to run after the modules that share the default (bookworm) split lab. One trixie
split lab is shared by the first tests (in order: they build on each other);
the blue/green and mixed-fleet tests each replace it with the lab they need."""
from __future__ import annotations

import json
import re

import pytest

from tests.integration.labtools import NO_OP_SITE_ROUND_TRIPS, psql, site_round_trips

APPS = ("app1", "app2")
DUMP_RE = re.compile(r"lab_\d{8}T\d{6}Z_manual_at-1\.1\.0_m3\.dump")
DEBIAN_11 = ('PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nNAME="Debian GNU/Linux"\n'
             'VERSION_ID="11"\nVERSION_CODENAME=bullseye\nID=debian\n')


pytestmark = pytest.mark.lab_shape("split", 2, suite="trixie")


@pytest.fixture(scope="module")
def trixie(lab_session):
    return lab_session.fresh("split", 2, suite="trixie")


def installed_postgres(lab, host: str = "db1") -> list[str]:
    out = lab.ssh(host, "dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\\n",
                  "postgresql-[0-9]*", check=False).stdout
    return sorted(line.split()[1] for line in out.splitlines() if line.startswith("ii"))


def status_doc(lab) -> dict:
    doc = json.loads(lab.fab("status", "--json").stdout)
    return {h["name"]: h for h in doc["hosts"]} | {"healthy": doc["healthy"]}


def round_trips(lab, tmp_path) -> tuple[str, dict[str, int]]:
    out, counted = site_round_trips(lab, tmp_path / "site.jsonl")
    return out, {host: trips for host, (trips, _) in counted.items()}


# ------------------------------------------------------------------------------ Debian 13
def test_site_installs_debian_13s_default_postgresql_17_and_converges(trixie, tmp_path):
    lab = trixie
    out = lab.fab("site", "--version", "1.0.0").stdout
    assert "[db1] Debian 13 (trixie): PostgreSQL 17 (the default of Debian 13)" in out, out
    assert "[db1] changed: packages: installed postgresql-17 postgresql-client-17" in out
    assert "[db1] postgresql@17-main accepting connections on" in out
    assert installed_postgres(lab) == ["postgresql-17"]
    assert lab.sudo("db1", "test", "-f", "/etc/postgresql/17/main/conf.d/releasy.conf",
                    check=False).returncode == 0
    # Again: nothing changes, and the major costs no round trip of its own.
    out, counted = round_trips(lab, tmp_path)
    assert re.search(r"^site: 0 changed", out, re.M), out
    assert "[db1] Debian 13 (trixie): PostgreSQL 17 (its cluster 17/main exists)" in out
    assert counted and max(counted.values()) <= NO_OP_SITE_ROUND_TRIPS, counted


def test_rolling_deploy_and_status_show_debian_13_and_postgresql_17(trixie):
    lab = trixie
    out = lab.fab("deploy.rolling", "--version", "1.1.0", "--yes").stdout
    assert re.search(r"^4 hosts, 0 failed", out, re.M), out
    table = lab.fab("status").stdout
    assert re.search(r"^db1\s+db\s+ok\s+Debian 13\s.*postgres 17 up", table, re.M), table
    hosts = status_doc(lab)
    assert hosts["healthy"] is True
    assert {h: hosts[h]["os"] for h in ("proxy1", *APPS, "db1")} == dict.fromkeys(
        ("proxy1", *APPS, "db1"), "Debian 13")
    assert hosts["db1"]["db"]["major"] == "17"
    assert {hosts[h]["app"]["running"] for h in APPS} == {"1.1.0"}


def test_firewall_audit_from_outside_matches_the_plan(trixie):
    lab = trixie
    proc = lab.fab("firewall.audit", "--netns", lab.ident.outside_ns)
    # Exit 0 means every port answered as the plan says; db1's line names 5432 filtered.
    assert re.search(rf"^\[db1\] audit .*from {re.escape(lab.ident.outside_address)} .*"
                     r"filtered .*5432", proc.stdout, re.M), proc.stdout
    assert lab.probe("db1", 5432) == "filtered" and lab.probe("proxy1", 443) == "open"


def test_backup_and_restore_on_postgresql_17(trixie):
    lab = trixie
    psql(lab, "INSERT INTO standin_m1 (id, label) VALUES (4217, 'kept by the dump')")
    names = set(DUMP_RE.findall(lab.fab("db.backup").stdout))
    assert len(names) == 1, names
    psql(lab, "DELETE FROM standin_m1 WHERE id = 4217")
    proc = lab.fab("db.restore", "--file", names.pop(), "--yes")
    assert psql(lab, "SELECT label FROM standin_m1 WHERE id = 4217") == [["kept by the dump"]]
    for host in APPS:
        assert f"[{host}] changed: stopped releasy.service (database restore)" in proc.stdout


def test_a_pin_beside_the_running_cluster_is_refused_and_nothing_changes(trixie, tmp_path):
    lab = trixie
    pinned = lab.inventory_variant(
        tmp_path, lambda d: d["database"].update(postgres_version=15))
    before = lab.sudo("db1", "sha256sum", "/etc/postgresql/17/main/pg_hba.conf").stdout
    proc = lab.fab("site", inventory=pinned, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("db1: runs PostgreSQL 17 on Debian 13 (trixie) (cluster 17/main), but "
            "database.postgres_version pins 15") in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert installed_postgres(lab) == ["postgresql-17"]
    assert lab.sudo("db1", "sha256sum", "/etc/postgresql/17/main/pg_hba.conf").stdout == before


def test_an_unsupported_release_is_refused_before_anything_changes(trixie):
    lab = trixie
    unit = "/etc/systemd/system/releasy.service"
    lab.sudo("app1", "sh", "-c", f'cp --remove-destination /usr/lib/os-release /etc/os-release'
                                 f' && printf %s "$1" > /etc/os-release && chmod 0600 {unit}',
             "sh", DEBIAN_11)
    try:
        proc = lab.fab("app.setup", check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert ("app1: runs Debian GNU/Linux 11 (bullseye), which this tool does not support "
                "(supported: Debian 12 (bookworm), Debian 13 (trixie))") in proc.stderr
        assert lab.sudo("app1", "stat", "-c", "%a", unit).stdout.strip() == "600"  # untouched
        table = lab.fab("status", check=False).stdout
        assert "app1: runs Debian GNU/Linux 11 (bullseye): not supported" in table, table
        # A rollout reads the release in its preflight facts: refused before any change.
        rolling = lab.fab("deploy.rolling", "--version", "1.0.0", "--yes", check=False)
        assert rolling.returncode == 2, rolling.stdout + rolling.stderr
        assert "app1: runs Debian GNU/Linux 11 (bullseye)" in rolling.stderr
    finally:
        lab.sudo("app1", "sh", "-c", "ln -sf ../usr/lib/os-release /etc/os-release")
    fixed = lab.fab("app.setup").stdout
    assert re.search(r"^\[app1\] changed: unit /etc/systemd/system/releasy\.service \(owner/mode fixed", fixed,
                     re.M), fixed


# ------------------------------------------------------------------------------ single host
@pytest.mark.lab_shape("single", suite="trixie")
def test_single_host_blue_green_on_debian_13(lab_session):
    lab = lab_session.fresh("single", suite="trixie")
    out = lab.fab("site", "--version", "1.0.0").stdout
    assert "[solo] Debian 13 (trixie): PostgreSQL 17 (the default of Debian 13)" in out, out
    proc = lab.fab("deploy.bluegreen", "--yes", "--version", "1.1.0")
    assert "deploy.bluegreen: 1.0.0 -> 1.1.0 live on solo as releasy@8081.service" in proc.stdout
    hosts = status_doc(lab)
    assert hosts["healthy"] is True and hosts["solo"]["os"] == "Debian 13"
    assert hosts["solo"]["db"]["major"] == "17" and hosts["solo"]["app"]["running"] == "1.1.0"


# ------------------------------------------------------------------------------ mixed fleet
@pytest.mark.lab_shape("split", 2, suite="trixie", db_suite="bookworm")
def test_a_mixed_fleet_debian_13_apps_and_a_debian_12_db(lab_session, tmp_path):
    lab = lab_session.fresh("split", 2, suite="trixie", db_suite="bookworm")
    # A pin the db host's release does not offer: refused, nothing installed.
    pinned = lab.inventory_variant(
        tmp_path, lambda d: d["database"].update(postgres_version=17))
    proc = lab.fab("db.setup", inventory=pinned, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("db1: database.postgres_version pins 17, but Debian 12 (bookworm) here offers "
            "PostgreSQL 15") in proc.stderr, proc.stderr
    assert installed_postgres(lab) == []

    out = lab.fab("site", "--version", "1.0.0").stdout
    assert "[db1] Debian 12 (bookworm): PostgreSQL 15 (the default of Debian 12)" in out, out
    assert installed_postgres(lab) == ["postgresql-15"]
    out, counted = round_trips(lab, tmp_path)
    assert re.search(r"^site: 0 changed", out, re.M), out
    assert counted and max(counted.values()) <= NO_OP_SITE_ROUND_TRIPS, counted
    lab.fab("deploy.rolling", "--version", "1.1.0", "--yes")
    hosts = status_doc(lab)
    assert hosts["healthy"] is True
    assert [hosts[h]["os"] for h in ("proxy1", *APPS, "db1")] == [
        "Debian 13", "Debian 13", "Debian 13", "Debian 12"]
    assert hosts["db1"]["db"]["major"] == "15"
    assert {hosts[h]["app"]["running"] for h in APPS} == {"1.1.0"}
