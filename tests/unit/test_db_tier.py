"""The db tier's pure parts: pg_hba/listen rendering from an inventory, SQL quoting, SCRAM
verification against verifiers made by a real PostgreSQL 15, probe parsing (the probe
snippets run under a real /bin/sh), the reload/restart decision, and the SQLite branch."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from releasy_deploy.errors import BadInput
from releasy_deploy.session import Session
from releasy_deploy.commands import pg_sql
from releasy_deploy.commands import postgres as pg
from releasy_deploy.executor import Executor
from releasy_deploy.output import Reporter
from releasy_deploy.secrets import Secrets
from releasy_deploy.tiers import db as db_tier

from inventories import build

SPLIT = """
environment: production
admin_cidrs: [203.0.113.0/24]
known_hosts: known_hosts
hosts:
  proxy1: {address: 198.51.100.10, private_address: 10.0.0.10}
  app1: {address: 198.51.100.21, private_address: 10.0.0.21}
  app2: {address: 198.51.100.22, private_address: 10.0.0.22, ssh_user: deploy}
  db1: {address: 198.51.100.30, private_address: 10.0.0.30}
tiers: {proxy: [proxy1], app: [app1, app2], db: [db1]}
release: {source: releases}
tls: {mode: self-signed, server_name: releasy.example.com}
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
"""


def inventory(text: str = SPLIT, **changes):
    return build(text, "/nonexistent/hosts.yaml", **changes)


def hba_records(text: str) -> list[list[str]]:
    """Non-comment pg_hba lines, split into fields."""
    return [line.split() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# --------------------------------------------------------------------------- pg_hba, listen


def test_pg_hba_split_admits_only_the_app_hosts_to_the_app_database():
    assert hba_records(pg.render_pg_hba(inventory())) == [
        ["local", "all", "postgres", "peer"],
        ["host", '"releasy"', '"releasy"', "127.0.0.1/32", "scram-sha-256"],
        ["host", '"releasy"', '"releasy"', "::1/128", "scram-sha-256"],
        ["host", '"releasy"', '"releasy"', "10.0.0.21/32", "scram-sha-256"],
        ["host", '"releasy"', '"releasy"', "10.0.0.22/32", "scram-sha-256"],
    ]


def test_pg_hba_single_host_is_loopback_only():
    assert hba_records(pg.render_pg_hba(inventory(SINGLE))) == [
        ["local", "all", "postgres", "peer"],
        ["host", '"releasy"', '"releasy"', "127.0.0.1/32", "scram-sha-256"],
        ["host", '"releasy"', '"releasy"', "::1/128", "scram-sha-256"],
    ]


def test_pg_hba_ipv6_app_host_gets_a_128():
    inv = inventory(hosts__app1={"address": "198.51.100.21", "private_address": "FD00::21"})
    rules = pg.hba_rules(inv)
    assert [(r.address, r.comment) for r in rules if "app host" in r.comment] == [
        ("fd00::21/128", "app host app1"), ("10.0.0.22/32", "app host app2")]


def test_pg_hba_names_are_quoted_so_keywords_lose_their_meaning():
    inv = inventory(database={"name": "all", "user": "replication"})
    assert hba_records(pg.render_pg_hba(inv))[1][:3] == ["host", '"all"', '"replication"']


@pytest.mark.parametrize("bad", ['a"b', "a b", "a,b", "a#b", "", "a\x00"])
def test_pg_hba_refuses_names_it_cannot_represent(bad):
    with pytest.raises(ValueError):
        pg.quote_hba_name(bad)


def test_listen_addresses_and_dropin():
    assert pg.listen_addresses(inventory()) == "localhost,10.0.0.30"
    assert pg.listen_addresses(inventory(SINGLE)) == "localhost"
    v6 = inventory(hosts__db1={"address": "198.51.100.30", "private_address": "FD00::30"})
    assert pg.listen_addresses(v6) == "localhost,fd00::30"
    settings = [line for line in pg.render_dropin(inventory()).splitlines()
                if line and not line.startswith("#")]
    assert settings == ["listen_addresses = 'localhost,10.0.0.30'", "port = 5432",
                        "password_encryption = 'scram-sha-256'"]


@pytest.mark.parametrize("major", ["15", "17"])
def test_config_files_owner_and_mode_follow_the_major(major):
    files = {f.path: (f.owner, f.group, f.mode)
             for f in pg.config_files(inventory(), pg.Layout(major))}
    assert files == {
        f"/etc/postgresql/{major}/main/conf.d/releasy.conf": ("postgres", "postgres", 0o644),
        f"/etc/postgresql/{major}/main/pg_hba.conf": ("postgres", "postgres", 0o640),
    }


# --------------------------------------------------------------------------- quoting and SQL


@pytest.mark.parametrize("name, quoted", [
    ("releasy", '"releasy"'),
    ("Mixed Case", '"Mixed Case"'),
    ('we"ird', '"we""ird"'),
    ("select", '"select"'),
    ("bäckerei", '"bäckerei"'),
    ("a'b;--", '"a\'b;--"'),
])
def test_quote_ident(name, quoted):
    assert pg.quote_ident(name) == quoted


@pytest.mark.parametrize("value, quoted", [
    ("plain", "'plain'"),
    ("it's", "'it''s'"),
    ("back\\slash", "E'back\\\\slash'"),
    ("both\\'", "E'both\\\\'''"),
    ("with space and ünïcödé", "'with space and ünïcödé'"),
    ("'; DROP ROLE postgres; --", "'''; DROP ROLE postgres; --'"),
    ("", "''"),
])
def test_quote_literal(value, quoted):
    assert pg.quote_literal(value) == quoted


@pytest.mark.parametrize("fn", [pg.quote_ident, pg.quote_literal, pg.quote_conf])
def test_quoting_refuses_nul(fn):
    with pytest.raises(ValueError):
        fn("a\x00b")


def test_quote_conf():
    assert pg.quote_conf("localhost,10.0.0.30") == "'localhost,10.0.0.30'"
    assert pg.quote_conf("it's\\") == "'it''s\\\\'"
    with pytest.raises(ValueError):
        pg.quote_conf("two\nlines")


def test_sql_builders_quote_every_name_and_value():
    verifier = "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5"
    assert pg.create_role_sql('odd "user"', verifier) == (
        'CREATE ROLE "odd ""user""" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
        f"NOREPLICATION NOBYPASSRLS PASSWORD '{verifier}';")
    assert pg.alter_role_sql("releasy", verifier=verifier) == (
        f"ALTER ROLE \"releasy\" WITH PASSWORD '{verifier}';")
    assert pg.alter_role_sql("releasy", attributes=True) == (
        'ALTER ROLE "releasy" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
        "NOBYPASSRLS;")
    with pytest.raises(ValueError):
        pg.alter_role_sql("releasy")
    assert pg.create_database_sql("my db", "o'wner") == (
        'CREATE DATABASE "my db" WITH OWNER "o\'wner" TEMPLATE template0 ENCODING \'UTF8\';')
    assert pg.alter_database_owner_sql("releasy", "app") == (
        'ALTER DATABASE "releasy" OWNER TO "app";')


def test_server_state_sql_quotes_names_as_literals():
    sql = pg.server_state_sql("da'tabase", "us'er")
    assert "WHERE rolname = 'us''er';" in sql
    assert "WHERE datname = 'da''tabase';" in sql


def test_argv_builders():
    assert pg.psql_argv() == ["runuser", "-u", "postgres", "--", "psql", "-X", "-A", "-t",
                              "-q", "-v", "ON_ERROR_STOP=1"]
    assert pg.psql_argv("my db")[-2:] == ["-d", "my db"]
    assert pg.service_argv("reload", pg.Layout("15")) == ["systemctl", "reload",
                                                          "postgresql@15-main"]
    assert pg.service_argv("restart", pg.Layout("17")) == ["systemctl", "restart",
                                                           "postgresql@17-main"]
    with pytest.raises(ValueError):
        pg.service_argv("stop; rm -rf /", pg.Layout("15"))


@pytest.mark.parametrize("database, user", [
    ("releasy", "postgres"), ("releasy", "pg_monitor"), ("postgres", "releasy"),
    ("template0", "releasy"), ("template1", "releasy"),
])
def test_reserved_names_are_refused(database, user):
    with pytest.raises(ValueError, match="pick another name"):
        pg.check_names(database, user)


# --------------------------------------------------------------------------- SCRAM

# Made by PostgreSQL 15 on a lab host: CREATE ROLE ... PASSWORD '<password>', then
# SELECT rolpassword FROM pg_authid.
PG_VERIFIERS = {
    "correct horse battery staple":
        "SCRAM-SHA-256$4096:VY4wbCn80ooyhty13568rA==$7Gb2uHckpts050dmbIqQR33fP4SMy5fSPDsXv4fzFpU="
        ":SpvCEbZVxz5SSaYoY4Tu0gBnZ8w1R5tJUtvxf30dqqY=",
    "pässwörd-Ωmega":
        "SCRAM-SHA-256$4096:RFRyoGre44JGY1DBrDHXxA==$kvNOqptjMYWgO0kl2BQ1z49O5qqS5wEn2VOhGqwL8NU="
        ":mgzSzb12ah3RnBLEaIwgWygmZTKoYb7Sn5KbxNHKWSc=",
    # soft hyphen (mapped to nothing) and ROMAN NUMERAL NINE (NFKC: "IX"): SASLprep matters
    "I\u00adX\u2168":
        "SCRAM-SHA-256$4096:aeaX4BH/659cQECcnamfyw==$cI9+2E8DjH7b1Wx/zmgSUhtt5RnrfUIMdpfJl2Li2yY="
        ":2ilN9RuWlpHWn8dbqVlM7WVk7GHEjV8mhzsQNA0rXlY=",
}


@pytest.mark.parametrize("password", list(PG_VERIFIERS))
def test_scram_matches_verifiers_made_by_postgresql(password):
    verifier = PG_VERIFIERS[password]
    assert pg.scram_matches(password, verifier)
    assert not pg.scram_matches(password + "x", verifier)
    assert not pg.scram_matches(password[1:], verifier)


@pytest.mark.parametrize("password", list(PG_VERIFIERS))
def test_scram_verifier_reproduces_postgresql_given_the_same_salt(password):
    import base64
    verifier = PG_VERIFIERS[password]
    salt = base64.b64decode(verifier.split("$")[1].split(":")[1])
    assert pg.scram_verifier(password, salt=salt) == verifier


def test_scram_verifier_round_trip_with_random_salt():
    a = pg.scram_verifier("s3cret")
    b = pg.scram_verifier("s3cret")
    assert a != b  # fresh salt each time
    assert pg.scram_matches("s3cret", a) and pg.scram_matches("s3cret", b)
    assert a.startswith("SCRAM-SHA-256$4096:")


@pytest.mark.parametrize("stored", [
    None, "", "md5" + "0" * 32, "SCRAM-SHA-256$4096:bm90$YmFk",
    "SCRAM-SHA-256$x:c2FsdA==$a2V5:a2V5", "SCRAM-SHA-256$4096:!!!$a2V5:a2V5",
    "SCRAM-SHA-256$0:c2FsdA==$a2V5:a2V5",
])
def test_scram_matches_is_false_for_anything_but_a_matching_verifier(stored):
    assert not pg.scram_matches("password", stored)


@pytest.mark.parametrize("password, prepared", [
    ("plain ascii\t", "plain ascii\t"),        # ASCII is never touched (as in PostgreSQL)
    ("a\u00a0b", "a b"),                        # non-ASCII space -> space
    ("I\u00adX", "IX"),                          # soft hyphen -> nothing
    ("\u2168", "IX"),                            # NFKC
    ("ab\u0007\u00e9", "ab\u0007\u00e9"),        # control character: prohibited -> as given
    ("\u05d0a", "\u05d0a"),                      # RandAL mixed with L: -> as given
    ("\u05d0\u05d1", "\u05d0\u05d1"),            # pure RandAL: fine
])
def test_saslprep(password, prepared):
    assert pg.saslprep(password) == prepared


# --------------------------------------------------------------------------- probes


VERIFIER = PG_VERIFIERS["correct horse battery staple"]


def test_parse_server_state():
    out = (f"role|1|0|0|0|0|0|{VERIFIER}\n"
           "database|releasy\n"
           "setting|listen_addresses|localhost,10.0.0.30\n"
           "setting|password_encryption|scram-sha-256\n"
           "setting|port|5432\n"
           "conf_loaded|1795679434.718487\n"
           "limit|max_connections|100\n"
           "limit|superuser_reserved_connections|3\n")
    state = pg.parse_server_state(out, 0)
    assert state.role.attributes == {"LOGIN": True, "SUPERUSER": False, "CREATEDB": False,
                                     "CREATEROLE": False, "REPLICATION": False,
                                     "BYPASSRLS": False}
    assert state.role.verifier == VERIFIER
    assert VERIFIER not in repr(state)
    assert state.database_owner == "releasy"
    assert state.settings == {"listen_addresses": "localhost,10.0.0.30",
                              "password_encryption": "scram-sha-256", "port": "5432"}
    assert state.conf_loaded_at == pytest.approx(1795679434.718487)
    assert state.limits == {"max_connections": 100, "superuser_reserved_connections": 3}


def test_pool_shortfall_counts_every_pool_against_the_non_superuser_slots():
    limits = {"max_connections": 100, "superuser_reserved_connections": 3}
    assert pg.pool_shortfall(limits, 19, 5) is None  # 95 of 97
    short = pg.pool_shortfall(limits, 40, 5)
    assert "open 200 connections (40 x app.database_max_connections 5)" in short
    assert "accepts 97 from non-superusers (max_connections 100" in short
    # PostgreSQL 16's reserved_connections count too; nothing read: nothing to say
    assert pg.pool_shortfall({**limits, "reserved_connections": 5}, 19, 5) is not None
    assert pg.pool_shortfall({}, 400, 5) is None


def test_parse_server_state_absent_objects_and_no_server():
    state = pg.parse_server_state("setting|port|5432\nconf_loaded|1.5\n", 0)
    assert state.role is None and state.database_owner is None
    assert pg.parse_server_state("", 2) is None
    with pytest.raises(ValueError):
        pg.parse_server_state("role|1|0\n", 0)


def run_sh(snippet: str) -> tuple[str, int]:
    proc = subprocess.run(["sh", "-c", snippet], capture_output=True, text=True)
    return proc.stdout, proc.returncode


def test_file_and_secret_probes_run_under_sh_with_odd_paths(tmp_path: Path):
    odd = tmp_path / "it's a \"file\" $(x)"
    odd.write_text("line one\nline two\n")
    odd.chmod(0o640)
    state = pg.parse_file_state(*run_sh(pg.file_state_shell(str(odd))))
    import hashlib
    import os
    import pwd
    import grp
    st = os.stat(odd)
    assert state.sha256 == hashlib.sha256(odd.read_bytes()).hexdigest()
    assert (state.owner, state.group, state.mode) == (
        pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, 0o640)
    assert state.mtime == pytest.approx(st.st_mtime, abs=1e-3)
    secret = pg.parse_secret_file(*run_sh(pg.secret_file_shell(str(odd))))
    assert secret.content == "line one\nline two\n" and secret.mode == 0o640
    assert "line one" not in repr(secret)
    missing = str(tmp_path / "absent")
    assert pg.parse_file_state(*run_sh(pg.file_state_shell(missing))) is None
    assert pg.parse_secret_file(*run_sh(pg.secret_file_shell(missing))) is None


def test_server_state_shell_is_a_here_document_with_no_sql_in_argv():
    shell = pg.server_state_shell("releasy", "releasy")
    first, *body = shell.splitlines()
    assert "SELECT" not in first and "<<'RELEASY_SQL_END'" in first
    assert body[-1] == "RELEASY_SQL_END"


# --------------------------------------------------------------------------- decisions

WANTED = {"listen_addresses": "localhost,10.0.0.30", "port": "5432",
          "password_encryption": "scram-sha-256"}


@pytest.mark.parametrize("running, files_changed, stale, action", [
    (WANTED, False, False, None),
    (WANTED, True, False, "reload"),
    (WANTED, False, True, "reload"),
    ({**WANTED, "password_encryption": "md5"}, False, False, "reload"),
    ({**WANTED, "listen_addresses": "localhost"}, False, False, "restart"),
    ({**WANTED, "listen_addresses": "localhost"}, True, True, "restart"),
    ({**WANTED, "port": "5433"}, False, False, "restart"),
    ({}, False, False, "restart"),
])
def test_service_action(running, files_changed, stale, action):
    assert pg.service_action(running, WANTED, files_changed=files_changed,
                             config_stale=stale) == action


def test_setting_changes_and_role_drift():
    running = {**WANTED, "listen_addresses": "localhost"}
    assert pg.setting_changes(running, WANTED) == [
        "listen_addresses 'localhost' -> 'localhost,10.0.0.30'"]
    assert pg.role_attribute_drift({**pg.ROLE_ATTRIBUTES}) == []
    assert pg.role_attribute_drift({**pg.ROLE_ATTRIBUTES, "SUPERUSER": True,
                                    "LOGIN": False}) == ["LOGIN", "NOSUPERUSER"]


def test_desired_settings_on_debian_defaults_mean_restart_for_split_reload_for_single():
    split, single = pg.desired_settings(inventory()), pg.desired_settings(inventory(SINGLE))
    assert pg.service_action(pg.DEBIAN_DEFAULTS, split, files_changed=True,
                             config_stale=False) == "restart"
    assert pg.service_action(pg.DEBIAN_DEFAULTS, single, files_changed=True,
                             config_stale=False) == "reload"


# --------------------------------------------------------------------------- database URL


def test_postgres_url_split_single_ipv6_and_quoting():
    assert pg.postgres_url(inventory(), "pw") == "postgres://releasy:pw@10.0.0.30:5432/releasy"
    assert pg.postgres_url(inventory(SINGLE), "pw") == (
        "postgres://releasy:pw@127.0.0.1:5432/releasy")
    v6 = inventory(hosts__db1={"address": "198.51.100.30", "private_address": "fd00::30"})
    assert pg.postgres_url(v6, "pw") == "postgres://releasy:pw@[fd00::30]:5432/releasy"
    assert pg.postgres_url(inventory(), "p@ss/w:rd%?#é") == (
        "postgres://releasy:p%40ss%2Fw%3Ard%25%3F%23%C3%A9@10.0.0.30:5432/releasy")


# --------------------------------------------------------------------------- tier entry points


def make_session(inv, *, dry_run: bool = False) -> tuple[Session, io.StringIO]:
    out = io.StringIO()
    reporter = Reporter(out)
    executor = Executor(inv, dry_run=dry_run, reporter=reporter, secrets=Secrets())
    return Session(inv, Secrets(), executor, reporter), out


def test_sqlite_setup_reports_nothing_to_do_and_touches_no_host():
    session, out = make_session(inventory(SINGLE, database={"kind": "sqlite"}))
    db_tier.setup(session)
    assert "nothing to do" in out.getvalue() and "sqlite" in out.getvalue()
    assert session.executor.round_trips == {}
    assert session.executor.connections_opened == {}
    assert db_tier.database_url(session) == "sqlite:///var/lib/releasy/releasy.db"
    assert session.executor.round_trips == {}


def test_reserved_role_name_is_bad_input_before_any_connection():
    session, _ = make_session(inventory(database={"user": "postgres"}))
    with pytest.raises(BadInput, match="database.user 'postgres' is reserved"):
        db_tier.setup(session)
    assert session.executor.connections_opened == {}



def test_a_restart_is_asked_for_only_when_a_served_database_would_go_down():
    inv = inventory()
    wanted = pg.desired_settings(inv)

    def state(settings, database_owner="releasy", running=True):
        server = pg.ServerState(role=None, database_owner=database_owner,
                                settings=settings, conf_loaded_at=0.0) if running else None
        return db_tier.HostState(release=None, layout=None, missing_packages=(),
                                 cluster_exists=True, cluster_deferred=False, fresh=False,
                                 secrets_dir_exists=True,
                                 password_file=None, files={}, ready={}, server=server)

    narrowed = {**wanted, "listen_addresses": "localhost"}
    said = db_tier.restart_needed(inv, state(narrowed))
    assert said == f"listen_addresses 'localhost' -> {wanted['listen_addresses']!r}"
    # A reloadable change, no database yet, no server running: nothing to ask.
    assert db_tier.restart_needed(inv, state({**wanted, "password_encryption": "md5"})) == ""
    assert db_tier.restart_needed(inv, state(narrowed, database_owner=None)) == ""
    assert db_tier.restart_needed(inv, state(narrowed, running=False)) == ""


def test_the_probes_call_the_newest_majors_own_client_not_debians_perl_wrapper(tmp_path):
    for major, tools in (("9.6", ("psql",)), ("15", ("psql", "pg_isready")),
                         ("17", ("psql",)), ("old", ("psql",))):
        bin_dir = tmp_path / major / "bin"
        bin_dir.mkdir(parents=True)
        for tool in tools:
            (bin_dir / tool).write_text("#!/bin/sh\n")
            (bin_dir / tool).chmod(0o755)

    def chosen(tool, lib_dir=str(tmp_path)):
        out = subprocess.run(["sh", "-c", f'{pg_sql.pg_client_shell(tool, lib_dir)};'
                              f' echo "$pg_client"'], capture_output=True, text=True)
        return out.stdout.strip()

    assert chosen("psql") == f"{tmp_path}/17/bin/psql"  # 17 > 15 > 9.6, as numbers
    assert chosen("pg_isready") == f"{tmp_path}/15/bin/pg_isready"  # 17 lacks it
    assert chosen("psql", str(tmp_path / "none")) == "/usr/bin/psql"  # no client: the wrapper
    with pytest.raises(ValueError):
        pg_sql.pg_client_shell("psql; rm -rf /")
    assert '-- "$pg_client" -X' in pg.server_state_shell("releasy", "releasy").splitlines()[0]
    assert pg.pg_ready_shell("/var/run/postgresql").endswith(
        '"$pg_client" -q -d sslmode=disable -t 30 -h /var/run/postgresql -p 5432')


def test_seed_dropin_writes_only_where_postgresql_has_no_directory_yet(tmp_path: Path):
    argv = pg.seed_dropin_argv(pg.Layout("15"))
    assert argv[4:] == ["/etc/postgresql", "/etc/postgresql/15/main/conf.d",
                        "/etc/postgresql/15/main/conf.d/releasy.conf",
                        "/etc/postgresql-common/createcluster.d",
                        "/etc/postgresql-common/createcluster.d/zz-releasy-first-install.conf"]
    etc = tmp_path / "postgresql"
    dropin = etc / "15/main/conf.d/releasy.conf"
    defer = tmp_path / "postgresql-common/createcluster.d/zz-releasy-first-install.conf"
    local = [*argv[:4], str(etc), str(dropin.parent), str(dropin), str(defer.parent), str(defer)]
    assert subprocess.run(local, input=b"port = 5432\n").returncode == 0
    assert dropin.read_bytes() == b"port = 5432\n"
    assert [p.name for p in dropin.parent.iterdir()] == ["releasy.conf"]
    # postgresql-common's own parser (pg_conftool) reads "key = value" lines; the server
    # package's postinst creates no main cluster when this one is false.
    settings = [line for line in defer.read_text().splitlines() if not line.startswith("#")]
    assert settings == ["create_main_cluster = false"]
    assert [p.name for p in defer.parent.iterdir()] == [defer.name]
    # The directory exists now (as it would once postgresql-common is installed): untouched.
    defer.unlink()
    assert subprocess.run(local, input=b"port = 1\n").returncode == 0
    assert dropin.read_bytes() == b"port = 5432\n" and not defer.exists()


def test_the_host_probe_says_when_the_cluster_is_ours_to_create():
    assert pg.DEFER_FILE in pg.PG_HOST_SHELL and "[ -e /etc/postgresql ]" in pg.PG_HOST_SHELL
    assert pg.parse_pg_host("deferred|\ninstalled|postgresql-15\n", 0).deferred
    assert not pg.parse_pg_host("installed|postgresql-15\n", 0).deferred
    assert pg.parse_pg_host("fresh|\nlists\n", 0).fresh
    assert not pg.parse_pg_host("cluster|15|main\n", 0).fresh


def test_create_cluster_makes_it_as_debian_would_then_removes_the_deferral(tmp_path: Path):
    """The script under sh with a stand-in pg_createcluster on PATH (it records its
    arguments and LANG): Debian's call, C.UTF-8 without set_system_locale, then the
    deferral file and its then empty directory removed."""
    argv = pg.create_cluster_argv(pg.Layout("17"))
    assert argv[3:] == ["releasy-create-cluster", "17", pg.DEFER_FILE]
    bin_dir, seen = tmp_path / "bin", tmp_path / "seen"
    bin_dir.mkdir()
    fake = bin_dir / "pg_createcluster"
    fake.write_text(f'#!/bin/sh\nprintf "%s|" "$LANG" "$@" > {seen}\n')
    fake.chmod(0o755)
    defer = tmp_path / "createcluster.d/zz-releasy-first-install.conf"
    defer.parent.mkdir()
    defer.write_text("create_main_cluster = false\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    res = subprocess.run([*argv[:4], "17", str(defer)], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    lang, _, args = seen.read_text().partition("|")
    assert args == "-u|postgres|--no-status|17|main|"
    if not Path("/usr/share/postgresql-common/maintscripts-functions").exists():
        assert lang == "C.UTF-8"  # else the machine's own set_system_locale chose it
    assert not defer.exists() and not defer.parent.exists()
    # pg_createcluster failing: the deferral stays (a re-run creates the cluster then).
    fake.write_text("#!/bin/sh\nexit 1\n")
    defer.parent.mkdir()
    defer.write_text("create_main_cluster = false\n")
    res = subprocess.run([*argv[:4], "17", str(defer)], env=env, capture_output=True)
    assert res.returncode != 0 and defer.exists()


def test_waiting_for_a_new_cluster_polls_pg_isready_with_a_deadline():
    argv = pg.wait_accepting_argv(pg.Layout("15"), 60)
    assert argv[3:] == ["releasy-pg-accepting", "postgresql@15-main", "60"]
    assert '-h /var/run/postgresql -p 5432; do' in argv[2]
    assert "systemctl is-failed --quiet" in argv[2]


