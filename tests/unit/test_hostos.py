"""Host releases and the PostgreSQL major: the OS check, the probe's parser, the choice of
the major (existing cluster > installed server > pin > release default) and its refusals,
the layout that follows the major, and the inventory pin. Pure logic, no host."""
from __future__ import annotations

import subprocess

import pytest

from releasy_deploy import hostos
from releasy_deploy.cli import exit_code_for
from releasy_deploy.commands import postgres as pg
from releasy_deploy.errors import ParallelError
from releasy_deploy.inventory import InventoryError, parse_inventory
from releasy_deploy.packages import REPO_PACKAGES, db_packages
from releasy_deploy.facts import OsRelease

BOOKWORM = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
            'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n')
TRIXIE = ('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\n'
          'VERSION_ID="13"\nVERSION="13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n')
BULLSEYE = BOOKWORM.replace("12", "11").replace("bookworm", "bullseye")
UBUNTU = ('PRETTY_NAME="Ubuntu 24.04.1 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\n'
          'ID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n')
SID = 'PRETTY_NAME="Debian GNU/Linux forky/sid"\nNAME="Debian GNU/Linux"\nID=debian\n'


def release(text: str) -> dict[str, str]:
    return OsRelease().parse(text, 0)


# ------------------------------------------------------------------------------ the OS
@pytest.mark.parametrize("text, label, short", [
    (BOOKWORM, "Debian 12 (bookworm)", "Debian 12"),
    (TRIXIE, "Debian 13 (trixie)", "Debian 13"),
])
def test_debian_12_and_13_are_supported(text, label, short):
    got = hostos.check_release("db1", release(text))
    assert (got.label, got.short) == (label, short)


@pytest.mark.parametrize("text, runs", [
    (BULLSEYE, "Debian GNU/Linux 11 (bullseye)"),
    (UBUNTU, "Ubuntu 24.04.1 LTS"),  # ID_LIKE=debian is not Debian
    (SID, "Debian GNU/Linux forky/sid"),  # testing/unstable have no VERSION_ID
    ("", "no readable /etc/os-release"),
])
def test_other_systems_are_refused_naming_host_and_release(text, runs):
    with pytest.raises(hostos.UnsupportedHostError) as err:
        hostos.check_release("app3", release(text))
    assert str(err.value) == (
        f"app3: runs {runs}, which this tool does not support (supported: Debian 12 "
        "(bookworm), Debian 13 (trixie)). Nothing was changed on app3: provision it with a "
        "supported release, or take it out of the inventory.")
    assert exit_code_for(err.value) == 2
    # Raised inside Executor.each on every host: still exit 2 (bad input, nothing touched).
    assert exit_code_for(ParallelError({"app3": err.value}, {})) == 2


# ------------------------------------------------------------------------------ the layout
def test_paths_service_log_and_packages_follow_the_major():
    for major in ("15", "17"):
        lay = pg.Layout(major)
        assert lay.conf_dir == f"/etc/postgresql/{major}/main"
        assert lay.main_conf == f"/etc/postgresql/{major}/main/postgresql.conf"
        assert lay.hba_path == f"/etc/postgresql/{major}/main/pg_hba.conf"
        assert lay.dropin_path == f"/etc/postgresql/{major}/main/conf.d/releasy.conf"
        assert lay.service == f"postgresql@{major}-main"
        assert lay.log_file == f"/var/log/postgresql/postgresql-{major}-main.log"
        assert lay.packages == (f"postgresql-{major}", f"postgresql-client-{major}")


@pytest.mark.parametrize("bad", ["", "017", "1.5", "15; rm -rf /", "x", "100"])
def test_a_major_that_is_not_a_number_never_reaches_a_path(bad):
    with pytest.raises(ValueError):
        pg.Layout(bad)
    with pytest.raises(ValueError):
        db_packages(bad)


def test_the_lab_repository_holds_the_metapackages_not_a_fixed_major():
    assert {"postgresql", "postgresql-client"} <= set(REPO_PACKAGES)
    assert not any(p.startswith("postgresql-1") for p in REPO_PACKAGES)


# ------------------------------------------------------------------------------ the probe
def test_parse_pg_host_reads_clusters_files_packages_and_what_apt_offers():
    sha = "a" * 64
    out = ("cluster|15|main\ncluster|15|other\n"
           f"file|15|conf.d/releasy.conf|{sha} postgres postgres 644 1700000000.5\n"
           f"file|15|pg_hba.conf|{sha} postgres postgres 640 1700000001.0\n"
           f"file|15|../../shadow|{sha} root root 600 1\n"  # not a file we manage: ignored
           "cluster|../x|main\n"  # not a major: ignored
           "installed|postgresql-15\ninstalled|postgresql-client-15\n"
           "installed|postgresql-15-postgis-3\n")
    got = pg.parse_pg_host(out, 0)
    assert got.clusters == (("15", "main"), ("15", "other"))
    assert got.cluster_majors == ["15"] and got.server_majors == ["15"]
    assert set(got.files) == {("15", "conf.d/releasy.conf"), ("15", "pg_hba.conf")}
    assert got.files[("15", "pg_hba.conf")] == pg.FileState(sha, "postgres", "postgres",
                                                            0o640, 1700000001.0)
    assert (got.lists, got.default, got.offered) == (False, None, ())


def test_parse_pg_host_on_a_fresh_host_reads_the_default_and_the_offer():
    out = ("lists\ndefault|postgresql-17\n"
           "offered|postgresql-17\noffered|postgresql-16\noffered|postgresql-9\n")
    got = pg.parse_pg_host(out, 0)
    assert (got.clusters, got.installed, got.lists) == ((), frozenset(), True)
    assert got.default == "17" and got.offered == ("9", "16", "17")
    # Debian 12's metapackage, as apt-cache show prints it.
    assert pg.parse_pg_host("lists\ndefault|postgresql-15\n", 0).default == "15"
    assert pg.parse_pg_host("lists\ndefault|postgresql-common (>= 241)\n", 0).default is None


def test_the_probe_script_is_valid_shell_and_quotes_what_it_names():
    assert subprocess.run(["sh", "-n", "-c", pg.PG_HOST_SHELL]).returncode == 0
    assert "for rel in conf.d/releasy.conf pg_hba.conf; do" in pg.PG_HOST_SHELL


def host(clusters=(), installed=(), lists=True, default="17", offered=("17",)) -> pg.PgHost:
    return pg.PgHost(tuple(clusters), frozenset(installed), lists, default, tuple(offered))


# ------------------------------------------------------------------------------ the choice
def test_a_fresh_host_gets_its_releases_default_or_the_pin():
    assert pg.select_major("db1", "Debian 13 (trixie)", host(), None) == "17"
    bookworm = host(default="15", offered=("15",))
    assert pg.select_major("db1", "Debian 12 (bookworm)", bookworm, None) == "15"
    pgdg = host(default="17", offered=("15", "16", "17"))  # e.g. apt.postgresql.org added
    assert pg.select_major("db1", "Debian 13 (trixie)", pgdg, "16") == "16"


def test_a_fresh_host_without_package_lists_is_undecided():
    assert pg.select_major("db1", "Debian 13 (trixie)", host(lists=False, default=None,
                                                             offered=()), "17") is None


def test_a_pin_the_release_does_not_offer_is_refused_naming_host_release_and_versions():
    bookworm = host(default="15", offered=("15",))
    with pytest.raises(pg.PgMajorRefused) as err:
        pg.select_major("db1", "Debian 12 (bookworm)", bookworm, "17")
    assert str(err.value).startswith(
        "db1: database.postgres_version pins 17, but Debian 12 (bookworm) here offers "
        "PostgreSQL 15 (its apt sources). Nothing was installed.")
    assert "the release's default is 15" in str(err.value)
    assert exit_code_for(err.value) == 2


def test_no_postgresql_metapackage_is_refused_unless_pinned():
    bare = host(default=None, offered=())
    with pytest.raises(pg.PgMajorRefused, match="db1: apt offers no `postgresql` package"):
        pg.select_major("db1", "Debian 13 (trixie)", bare, None)
    with pytest.raises(pg.PgMajorRefused, match="offers no PostgreSQL server package"):
        pg.select_major("db1", "Debian 13 (trixie)", bare, "17")


def test_an_existing_cluster_wins_and_never_gets_a_second_major_beside_it():
    upgraded = host(clusters=[("15", "main")], installed=["postgresql-15"])
    # A Debian 12 host upgraded to 13: apt's default is now 17, the cluster stays 15.
    assert pg.select_major("db1", "Debian 13 (trixie)", upgraded, None) == "15"
    assert pg.select_major("db1", "Debian 13 (trixie)", upgraded, "15") == "15"
    with pytest.raises(pg.PgMajorRefused) as err:
        pg.select_major("db1", "Debian 13 (trixie)", upgraded, "17")
    assert str(err.value).startswith(
        "db1: runs PostgreSQL 15 on Debian 13 (trixie) (cluster 15/main), but "
        "database.postgres_version pins 17. This tool never installs a second major")


def test_clusters_of_two_majors_need_the_pin_to_say_which():
    both = host(clusters=[("15", "main"), ("17", "main")],
                installed=["postgresql-15", "postgresql-17"])
    with pytest.raises(pg.PgMajorRefused, match=r"several PostgreSQL majors .*15/main, 17/main"):
        pg.select_major("db1", "Debian 13 (trixie)", both, None)
    assert pg.select_major("db1", "Debian 13 (trixie)", both, "17") == "17"


def test_an_installed_server_without_cluster_keeps_its_major():
    orphan = host(installed=["postgresql-15", "postgresql-client-15"])
    assert pg.select_major("db1", "Debian 12 (bookworm)", orphan, None) == "15"
    with pytest.raises(pg.PgMajorRefused, match="has postgresql-15 installed"):
        pg.select_major("db1", "Debian 12 (bookworm)", orphan, "17")


# ------------------------------------------------------------------------------ the pin
INVENTORY = {
    "environment": "prod", "admin_cidrs": ["10.0.0.0/24"], "known_hosts": "known_hosts",
    "hosts": {"solo": {"address": "10.0.0.10"}},
    "tiers": {"proxy": ["solo"], "app": ["solo"], "db": ["solo"]},
    "release": {"source": "releases"}, "tls": {"mode": "self-signed", "server_name": "x.test"},
}


@pytest.mark.parametrize("value, want", [(17, "17"), ("15", "15"), (None, None)])
def test_the_inventory_pin(value, want):
    data = {**INVENTORY, "database": {} if value is None else {"postgres_version": value}}
    assert parse_inventory(data, "hosts.yaml", check_files=False).database.postgres_version == want


@pytest.mark.parametrize("value", [9.6, "17.2", True, 7, "latest"])
def test_a_pin_that_is_no_major_is_refused_with_its_yaml_path(value):
    with pytest.raises(InventoryError, match="database.postgres_version: must be a PostgreSQL "
                                             "major version such as 15 or 17"):
        parse_inventory({**INVENTORY, "database": {"postgres_version": value}}, "hosts.yaml",
                        check_files=False)
