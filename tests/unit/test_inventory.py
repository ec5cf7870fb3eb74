"""Inventory parsing: a valid base plus table-driven mutations, one per kind of mistake."""
from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import shutil
from pathlib import Path

import pytest
import yaml

from releasy_deploy.inventory import (
    TIERS, Host, Inventory, InventoryError, Problem, inventory_path, load_inventory,
    parse_inventory,
)
from releasy_deploy.inventory.loading import UNREADABLE, load_yaml_file

REPO_ROOT = Path(__file__).resolve().parents[2]
INV_NAME = "prod-inventory.yaml"  # not the default name, so the file name check means something
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64

BASE_YAML = """
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
database:
  kind: postgres
release:
  source: https://example.com/releases/v{version}/releasy-server-linux-{arch}.tar.gz
  sha256:
    "1.0.0": %s
tls:
  mode: self-signed
  server_name: releasy.example.com
""" % SHA_A

SINGLE_YAML = """
environment: dev
admin_cidrs: ["2001:db8::/32", 192.0.2.0/28]
known_hosts: known_hosts
hosts:
  solo: {address: 192.0.2.5}
tiers: {proxy: [solo], app: [solo], db: [solo]}
database: {kind: sqlite}
release: {source: releases}
tls: {mode: self-signed, server_name: releasy.test}
"""

DELETE = object()


def base() -> dict:
    return yaml.safe_load(BASE_YAML)


def mutate(data: dict, changes: dict) -> dict:
    """Apply {"a.b.c": value} changes (a tuple key for keys containing dots)."""
    data = copy.deepcopy(data)
    for where, value in changes.items():
        keys = where if isinstance(where, tuple) else tuple(where.split("."))
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return data


@pytest.fixture
def inv_dir(tmp_path: Path) -> Path:
    (tmp_path / "known_hosts").write_text("# test\n")
    (tmp_path / "releases").mkdir()
    return tmp_path


def parse(data, inv_dir: Path, **kw) -> Inventory:
    return parse_inventory(data, inv_dir / INV_NAME, **kw)


def errors_of(data, inv_dir: Path) -> InventoryError:
    with pytest.raises(InventoryError) as exc:
        parse(data, inv_dir)
    return exc.value


# ---------------------------------------------------------------------------- malformed

APP_JWT = {"jwks_url": "https://id.example.com/jwks.json"}
STORAGE = {"bucket": "releasy-artifacts", "region": "eu-central-1"}

# (id, changes to the base, YAML path that must be reported, fragment of its message)
MALFORMED = [
    ("environment-missing", {"environment": DELETE}, "environment", "required"),
    ("environment-bad", {"environment": "Prod!"}, "environment", "lowercase"),
    ("unknown-top-key", {"enviroment": "x"}, "enviroment", "did you mean 'environment'"),
    ("admin-cidrs-missing", {"admin_cidrs": DELETE}, "admin_cidrs", "required"),
    ("admin-cidrs-empty", {"admin_cidrs": []}, "admin_cidrs", "non-empty"),
    ("admin-cidrs-any-v4", {"admin_cidrs": ["0.0.0.0/0"]}, "admin_cidrs[0]", "whole internet"),
    ("admin-cidrs-any-v6", {"admin_cidrs": ["203.0.113.0/24", "::/0"]}, "admin_cidrs[1]",
     "whole internet"),
    ("admin-cidrs-host-bits", {"admin_cidrs": ["203.0.113.7/24"]}, "admin_cidrs[0]",
     "did you mean 203.0.113.0/24"),
    ("admin-cidrs-garbage", {"admin_cidrs": ["10.0.0.0/8; true"]}, "admin_cidrs[0]",
     "shell metacharacters"),
    ("known-hosts-missing-key", {"known_hosts": DELETE}, "known_hosts", "required"),
    ("known-hosts-no-file", {"known_hosts": "nope/known_hosts"}, "known_hosts", "ssh-keyscan"),
    ("ssh-port-zero", {"ssh": {"port": 0}}, "ssh.port", "between 1 and 65535"),
    ("ssh-timeout-negative", {"ssh": {"connect_timeout": -1}}, "ssh.connect_timeout", "out of range"),
    ("ssh-identity-missing", {"ssh": {"identity_file": "keys/id_none"}}, "ssh.identity_file",
     "file not found"),
    ("ssh-unknown-key", {"ssh": {"usr": "root"}}, "ssh.usr", "did you mean 'user'"),
    ("hosts-missing", {"hosts": DELETE}, "hosts", "required"),
    ("host-key-typo", {"hosts.app1.adress": "198.51.100.99"}, "hosts.app1.adress",
     "did you mean 'address'"),
    ("host-address-missing", {"hosts.app1.address": DELETE}, "hosts.app1.address", "required"),
    ("host-address-shell", {"hosts.app1.address": "198.51.100.21; rm -rf /"},
     "hosts.app1.address", "shell metacharacters"),
    ("host-address-bad-ip", {"hosts.app1.address": "10.0.0.300"}, "hosts.app1.address",
     "not an IPv4/IPv6 address"),
    ("host-address-unspecified", {"hosts.app1.address": "0.0.0.0"}, "hosts.app1.address",
     "unicast"),
    ("host-private-dns", {"hosts.app1.private_address": "app1.internal"},
     "hosts.app1.private_address", "IPv4/IPv6 address literal"),
    ("host-private-needed-for-dns", {"hosts.app1": {"address": "app1.example.com"}},
     "hosts.app1.private_address", "DNS name"),
    ("host-private-loopback-multi", {"hosts.app1.private_address": "127.0.0.1"},
     "hosts.app1.private_address", "loopback"),
    ("host-ssh-user-bad", {"hosts.app1.ssh_user": "Root"}, "hosts.app1.ssh_user", "Unix user name"),
    ("host-ssh-user-shell", {"hosts.app1.ssh_user": "deploy`id`"}, "hosts.app1.ssh_user",
     "shell metacharacters"),
    ("host-ssh-port-range", {"hosts.app1.ssh_port": 70000}, "hosts.app1.ssh_port", "out of range"),
    ("host-ssh-port-quoted", {"hosts.app1.ssh_port": "22"}, "hosts.app1.ssh_port",
     "remove the quotes"),
    ("host-name-bad", {"hosts.App_1": {"address": "198.51.100.99", "private_address": "10.0.0.99"},
                       "tiers.app": ["app1", "app2", "App_1"]}, "hosts.App_1", "invalid host name"),
    ("host-null", {"hosts.app1": None}, "hosts.app1", "address"),
    ("host-in-no-tier", {"hosts.spare": {"address": "198.51.100.99", "private_address": "10.0.0.99"}},
     "hosts.spare", "not in any tier"),
    ("duplicate-address", {"hosts.app2.address": "198.51.100.21", "hosts.app2.ssh_port": 22},
     "hosts.app2.address", "also the address of host 'app1'"),
    ("duplicate-private", {"hosts.app2.private_address": "10.0.0.21"},
     "hosts.app2.private_address", "also used by host 'app1'"),
    ("tiers-missing", {"tiers": DELETE}, "tiers", "required"),
    ("tiers-unknown", {"tiers.cache": ["app1"]}, "tiers.cache", "allowed keys: proxy, app, db"),
    ("tier-undefined-host", {"tiers.app": ["app1", "app2", "app3"]}, "tiers.app[2]",
     "not defined under hosts"),
    ("tier-not-list", {"tiers.proxy": "proxy1"}, "tiers.proxy", "write [proxy1]"),
    ("tier-listed-twice", {"tiers.app": ["app1", "app2", "app1"]}, "tiers.app[2]", "listed twice"),
    ("no-app-host", {"tiers.app": DELETE, "hosts.app1": DELETE, "hosts.app2": DELETE},
     "tiers.app", "no app host"),
    ("no-db-host", {"tiers.db": [], "hosts.db1": DELETE}, "tiers.db", "no database host"),
    ("no-proxy-host", {"tiers.proxy": [], "hosts.proxy1": DELETE}, "tiers.proxy", "no proxy host"),
    ("two-db-hosts", {"tiers.db": ["db1", "app1"]}, "tiers.db", "only one database host"),
    ("sqlite-split", {"database.kind": "sqlite"}, "database.kind", "single app host"),
    ("sqlite-app-not-db", {"database.kind": "sqlite", "tiers.app": ["app1"],
                           "hosts.app2": DELETE}, "database.kind", "same host"),
    ("db-kind-bad", {"database.kind": "mysql"}, "database.kind", "postgres, sqlite"),
    ("db-name-shell", {"database.name": "releasy;drop"}, "database.name", "shell metacharacters"),
    ("db-user-bad", {"database.user": "Releasy"}, "database.user", "PostgreSQL identifier"),
    ("db-backups-keep-zero", {"database.backups_keep": 0}, "database.backups_keep", "between 1 and"),
    ("db-backup-flag", {"database.backup_before_deploy": "sure"}, "database.backup_before_deploy",
     "true or false"),
    ("app-bind-port-low", {"app": {"bind_port": 80}}, "app.bind_port", "between 1024 and 65535"),
    ("app-bluegreen-same", {"app": {"bluegreen_ports": [8080, 8080]}}, "app.bluegreen_ports[1]",
     "must differ"),
    ("app-bluegreen-one", {"app": {"bluegreen_ports": [8080]}}, "app.bluegreen_ports", "two"),
    ("app-bind-not-in-bluegreen", {"app": {"bind_port": 8080, "bluegreen_ports": [9000, 9001]}},
     "app.bind_port", "not one of"),
    ("app-service-user-root", {"app": {"service_user": "root"}}, "app.service_user", "root"),
    ("app-log-level", {"app": {"log_level": "verbose"}}, "app.log_level", "error, warn, info"),
    ("app-public-url-scheme", {"app": {"public_base_url": "ftp://releasy.example.com"}},
     "app.public_base_url", "http"),
    ("app-public-url-creds", {"app": {"public_base_url": "https://u:p@releasy.example.com"}},
     "app.public_base_url", "credentials"),
    ("app-releases-keep", {"app": {"releases_keep": 1}}, "app.releases_keep", "between 2"),
    ("app-max-conn", {"app": {"database_max_connections": 0}}, "app.database_max_connections",
     "between 1 and 1000"),
    ("app-jwt-incomplete", {"app": {"operator_jwt": APP_JWT}}, "app.operator_jwt.issuer",
     "required together"),
    ("app-jwt-issuer-shell", {"app": {"operator_jwt": {**APP_JWT, "issuer": "$(id)",
                                                       "audience": "releasy"}}},
     "app.operator_jwt.issuer", "not allowed"),
    ("app-storage-incomplete", {"app": {"artifact_storage": STORAGE}},
     "app.artifact_storage.endpoint", "required together"),
    ("app-storage-bucket", {"app": {"artifact_storage": {**STORAGE, "bucket": "B",
                                                         "endpoint": "https://s3.example.com"}}},
     "app.artifact_storage.bucket", "bucket name"),
    ("app-unknown-key", {"app": {"bind_prot": 8080}}, "app.bind_prot", "did you mean 'bind_port'"),
    ("release-missing", {"release": DELETE}, "release", "required"),
    ("release-source-missing", {"release.source": DELETE}, "release.source", "required"),
    ("release-url-no-version", {"release.source": "https://example.com/releasy.tar.gz"},
     "release.source", "{version}"),
    ("release-url-unknown-placeholder",
     {"release.source": "https://example.com/{version}/{os}.tar.gz"}, "release.source", "{os}"),
    ("release-url-scheme", {"release.source": "ftp://example.com/{version}.tar.gz"},
     "release.source", "http"),
    ("release-dir-missing", {"release.source": "no-such-dir"}, "release.source",
     "not an existing directory"),
    ("release-arch", {"release.arch": "amd64"}, "release.arch", "did you mean 'x86_64'"),
    ("release-sha-version", {("release", "sha256"): {"1.0": SHA_A}}, 'release.sha256["1.0"]',
     "invalid version"),
    ("release-sha-hex", {("release", "sha256"): {"1.0.0": "abc"}}, 'release.sha256["1.0.0"]',
     "64 lowercase hex"),
    ("release-sha-upper", {("release", "sha256"): {"1.0.0": SHA_A.upper()}},
     'release.sha256["1.0.0"]', "use lowercase"),
    ("release-url-unpinned", {"release.sha256": DELETE}, "release.sha256", "pinned checksums"),
    ("release-sha-file-missing", {"release.sha256_file": "SHA256SUMS"}, "release.sha256_file",
     "file not found"),
    ("tls-missing", {"tls": DELETE}, "tls", "required"),
    ("tls-mode-missing", {"tls.mode": DELETE}, "tls.mode", "required"),
    ("tls-files-no-cert", {"tls.mode": "files"}, "tls.certificate", "required"),
    ("tls-server-name", {"tls.server_name": "releasy example"}, "tls.server_name", "DNS name"),
    ("tls-server-name-ip", {"tls.server_name": "198.51.100.10"}, "tls.server_name", "DNS name"),
    ("tls-key-with-self-signed", {"tls.key": "tls/releasy.key"}, "tls.key", "mode: files"),
    ("secrets-unknown-key", {"secrets": {"fiel": "s.yaml"}}, "secrets.fiel", "did you mean 'file'"),
    ("acme-no-section", {"tls.mode": "acme"}, "tls.acme", "required section"),
    ("acme-bad-email", {"tls.mode": "acme", "tls.acme": {"email": "ops"}}, "tls.acme.email",
     "e-mail"),
    ("acme-http-directory", {"tls.mode": "acme", "tls.acme": {
        "email": "ops@example.com", "directory_url": "http://ca.example.com/dir"}},
     "tls.acme.directory_url", "https"),
    ("acme-staging-and-url", {"tls.mode": "acme", "tls.acme": {
        "email": "ops@example.com", "directory_url": "https://ca.example.com/dir",
        "staging": True}}, "tls.acme.staging", "leave it out"),
    ("acme-without-mode", {"tls.acme": {"email": "ops@example.com"}}, "tls.acme",
     "only used with mode: acme"),
    ("acme-ca-bundle-missing", {"tls.mode": "acme", "tls.acme": {
        "email": "ops@example.com", "ca_bundle": "nope.pem"}}, "tls.acme.ca_bundle",
     "file not found"),
    ("jump-unknown", {"ssh.jump": "bastoin", "jump_hosts": {"bastion": {"address": "192.0.2.5"}}},
     "ssh.jump", "unknown jump host"),
    ("jump-not-a-name", {"hosts.app1.jump": "x; y"}, "hosts.app1.jump", "name of a jump host"),
    ("jump-true", {"hosts.app1.jump": True}, "hosts.app1.jump", "or false"),
    ("jump-self", {"hosts.app1.jump": "app1"}, "hosts.app1.jump", "its own jump host"),
    ("jump-chain", {"ssh.jump": "proxy1", "hosts.proxy1.jump": "db1"}, "hosts.proxy1.jump",
     "chained jump hosts"),
    ("jump-host-unknown-key", {"jump_hosts": {"b": {"address": "192.0.2.5", "hostname": "x"}}},
     "jump_hosts.b.hostname", "unknown key"),
    ("jump-host-no-address", {"jump_hosts": {"b": {"user": "jump"}}}, "jump_hosts.b.address",
     "required"),
    ("jump-host-dns-no-private", {"jump_hosts": {"b": {"address": "bastion.example.com"}}},
     "jump_hosts.b.private_address", "IP literal"),
    ("jump-host-is-inventory-host", {"jump_hosts": {"app1": {"address": "192.0.2.5"}}},
     "jump_hosts.app1", "also an inventory host"),
]


@pytest.mark.parametrize("changes,ypath,fragment",
                         [pytest.param(c, p, f, id=i) for i, c, p, f in MALFORMED])
def test_malformed_inventory_is_refused(inv_dir, changes, ypath, fragment):
    err = errors_of(mutate(base(), changes), inv_dir)
    text = str(err)
    matching = [p for p in err.problems if p.path == ypath]
    assert matching, f"no problem at {ypath!r}; got:\n{text}"
    assert any(fragment in p.message for p in matching), text
    # Every line names the file and the YAML path: "FILE: YAML.PATH: message".
    assert f"{INV_NAME}: {ypath}: " in text
    assert all(line.startswith(str(inv_dir / INV_NAME) + ": ") for line in text.splitlines())


def test_there_are_enough_malformed_cases():
    assert len(MALFORMED) >= 30


def test_all_problems_are_reported_together(inv_dir):
    data = mutate(base(), {
        "environment": "BAD",
        "admin_cidrs": ["0.0.0.0/0"],
        "hosts.app1.address": "x;y",
        "tiers.app": ["app1", "app2", "ghost"],
        "database.name": "a b",
        "tls.mode": "letsencrypt",
    })
    err = errors_of(data, inv_dir)
    paths = [p.path for p in err.problems]
    for expected in ("environment", "admin_cidrs[0]", "hosts.app1.address", "tiers.app[2]",
                     "database.name", "tls.mode"):
        assert expected in paths
    assert len(str(err).splitlines()) == len(err.problems) >= 6


def test_top_level_must_be_a_mapping(inv_dir):
    err = errors_of(["not", "a", "mapping"], inv_dir)
    assert err.problems[0].path == "(top level)"


def test_problem_str_format():
    assert str(Problem("hosts.yaml", "hosts.app1.address", "bad")) == "hosts.yaml: hosts.app1.address: bad"


# ---------------------------------------------------------------------------- YAML text level


def write(inv_dir: Path, text: str, name: str = INV_NAME) -> Path:
    p = inv_dir / name
    p.write_text(text)
    return p


def test_duplicate_mapping_keys_are_refused(inv_dir):
    text = BASE_YAML.replace(
        "  db1: {address: 198.51.100.30, private_address: 10.0.0.30}",
        "  db1: {address: 198.51.100.30, private_address: 10.0.0.30}\n"
        "  app1: {address: 198.51.100.31, private_address: 10.0.0.31}")
    with pytest.raises(InventoryError) as exc:
        load_inventory(write(inv_dir, text))
    problem = next(p for p in exc.value.problems if p.path == "hosts.app1")
    assert "duplicate key" in problem.message and "line" in problem.message


def test_yaml_syntax_error_reports_line_and_column(inv_dir):
    p = write(inv_dir, "environment: production\nhosts:\n  app1: {address: [\n")
    with pytest.raises(InventoryError) as exc:
        load_inventory(p)
    (problem,) = exc.value.problems
    assert problem.file == str(p)
    assert problem.path.startswith("line ") and "column" in problem.path
    assert "YAML syntax error" in problem.message


def test_missing_file(inv_dir):
    with pytest.raises(InventoryError) as exc:
        load_inventory(inv_dir / "absent.yaml")
    assert "absent.yaml: (file): no such file" in str(exc.value)
    assert "RELEASY_INVENTORY" in str(exc.value)


def test_empty_file(inv_dir):
    with pytest.raises(InventoryError) as exc:
        load_inventory(write(inv_dir, "# nothing\n"))
    assert "empty" in str(exc.value)


def test_unquoted_date_like_value_is_explained(inv_dir):
    err = errors_of(mutate(base(), {"environment": yaml.safe_load("2024-01-01")}), inv_dir)
    assert "quote it" in str(err)


# ---------------------------------------------------------------------------- valid inventories


def test_split_topology(inv_dir):
    inv = parse(base(), inv_dir)
    assert inv.topology == "split" and not inv.is_single_host
    assert [h.name for h in inv.hosts] == ["proxy1", "app1", "app2", "db1"]
    assert [h.name for h in inv.hosts_in("app")] == ["app1", "app2"]
    assert inv.db_host.name == "db1"
    assert inv.host("app1").private_address == "10.0.0.21"
    assert inv.admin_cidrs == (ipaddress.ip_network("203.0.113.0/24"),)
    assert inv.known_hosts == inv_dir / "known_hosts"
    assert inv.path == (inv_dir / INV_NAME).absolute()
    assert inv.secrets_file == inv_dir / "secrets.yaml"
    with pytest.raises(KeyError):
        inv.host("nope")
    with pytest.raises(ValueError):
        inv.hosts_in("cache")


def test_non_root_ssh_user(inv_dir):
    inv = parse(base(), inv_dir)
    app2 = inv.host("app2")
    assert (app2.ssh_user, app2.ssh_port, app2.is_root) == ("deploy", 2222, False)
    assert inv.host("app1").is_root
    inv = parse(mutate(base(), {"ssh": {"user": "ops", "port": 2200}}), inv_dir)
    assert (inv.host("db1").ssh_user, inv.host("db1").ssh_port) == ("ops", 2200)
    assert inv.host("app2").ssh_user == "deploy"  # per-host override wins


def test_defaults_are_filled(inv_dir):
    inv = parse(base(), inv_dir)
    assert inv.ssh.identity_file is None and inv.ssh.connect_timeout == 10.0
    app = inv.app
    assert (app.bind_port, app.bluegreen_ports, app.service_user, app.log_level) == (
        8080, (8080, 8081), "releasy", "info")
    assert app.public_base_url is None and app.operator_jwt is None and app.artifact_storage is None
    assert (app.database_max_connections, app.download_token_ttl_seconds, app.releases_keep,
            app.ready_timeout) == (5, 600, 5, 60)
    assert inv.database == type(inv.database)("postgres", "releasy", "releasy", 5, True)
    assert inv.release.arch == "x86_64" and inv.release.is_url and inv.release.directory is None
    assert inv.tls.certificate is None and inv.tls.key is None


def test_database_section_is_optional(inv_dir):
    inv = parse(mutate(base(), {"database": DELETE}), inv_dir)
    assert inv.database.kind == "postgres"


def test_single_host_sqlite(inv_dir):
    inv = parse(yaml.safe_load(SINGLE_YAML), inv_dir)
    assert inv.topology == "single" and inv.is_single_host
    (solo,) = inv.hosts
    assert solo.tiers == TIERS and solo.private_address == "192.0.2.5"
    assert inv.database.kind == "sqlite"
    assert not inv.release.is_url and inv.release.directory == inv_dir / "releases"


def test_single_host_postgres_with_loopback_and_dns(inv_dir):
    data = mutate(yaml.safe_load(SINGLE_YAML), {
        "database.kind": "postgres",
        "hosts.solo": {"address": "Solo.Example.COM"},  # one host: no private address needed
    })
    inv = parse(data, inv_dir)
    assert inv.database.kind == "postgres"
    assert inv.host("solo").address == "solo.example.com"
    assert inv.host("solo").private_address == "solo.example.com"


def test_tiers_are_in_canonical_order(inv_dir):
    data = mutate(base(), {"tiers": {"db": ["db1"], "app": ["app1", "app2", "proxy1"],
                                     "proxy": ["proxy1"]}})
    assert parse(data, inv_dir).host("proxy1").tiers == ("proxy", "app")


def test_ipv6_and_port_forwarded_hosts(inv_dir):
    data = mutate(base(), {
        "hosts.proxy1.address": "2001:DB8::10",
        "hosts.app1": {"address": "127.0.0.1", "ssh_port": 2201, "private_address": "10.0.0.21"},
        "hosts.app2": {"address": "127.0.0.1", "ssh_port": 2202, "private_address": "10.0.0.22"},
    })
    inv = parse(data, inv_dir)
    assert inv.host("proxy1").address == "2001:db8::10"


def test_bluegreen_ports_set_bind_port_default(inv_dir):
    inv = parse(mutate(base(), {"app": {"bluegreen_ports": [9001, 9000]}}), inv_dir)
    assert inv.app.bind_port == 9001 and inv.app.bluegreen_ports == (9001, 9000)


def test_full_optional_sections(inv_dir):
    (inv_dir / "tls").mkdir()
    (inv_dir / "tls" / "releasy.crt").write_text("cert")
    key = inv_dir / "tls" / "releasy.key"
    key.write_text("key")
    key.chmod(0o600)
    data = mutate(base(), {
        "app": {"public_base_url": "https://releasy.example.com",
                "operator_jwt": {"jwks_url": "https://id.example.com/jwks.json",
                                 "issuer": "https://id.example.com/", "audience": "releasy"},
                "artifact_storage": {**STORAGE, "endpoint": "https://s3.example.com",
                                     "path_style": True}},
        "tls": {"mode": "files", "server_name": "releasy.example.com",
                "certificate": "tls/releasy.crt", "key": "tls/releasy.key"},
    })
    inv = parse(data, inv_dir)
    assert inv.app.operator_jwt.jwks_ttl_seconds == 300
    assert inv.app.operator_jwt.resource is None
    assert inv.app.artifact_storage.path_style is True
    assert inv.app.artifact_storage.presign_expires_seconds == 900
    assert inv.tls.key == key
    key.chmod(0o644)
    err = errors_of(data, inv_dir)
    assert "tls.key" in [p.path for p in err.problems] and "chmod 600" in str(err)


def test_jump_hosts(inv_dir):
    inv = parse(mutate(base(), {
        "ssh.jump": "bastion",
        "jump_hosts": {"bastion": {"address": "bastion.example.com",
                                   "private_address": "10.0.0.5", "user": "jump", "port": 2200}},
        "hosts.proxy1.jump": False, "hosts.db1.jump": "proxy1"}), inv_dir)
    jumps = {h.name: h.jump for h in inv.hosts}
    assert jumps["proxy1"] is None
    bastion = jumps["app1"]
    assert (bastion.name, bastion.address, bastion.private_address, bastion.ssh_user,
            bastion.ssh_port, bastion.managed) == (
        "bastion", "bastion.example.com", "10.0.0.5", "jump", 2200, False)
    assert jumps["app2"] is bastion
    # An inventory host as jump host: its own address, user and port; reached directly.
    assert (jumps["db1"].name, jumps["db1"].address, jumps["db1"].private_address,
            jumps["db1"].managed) == ("proxy1", "198.51.100.10", "10.0.0.10", True)
    assert [j.name for j in inv.jump_hosts] == ["bastion", "proxy1"]
    # The jump host named by ssh.jump is itself reached directly.
    inv = parse(mutate(base(), {"ssh.jump": "proxy1"}), inv_dir)
    assert inv.host("proxy1").jump is None and inv.host("app1").jump.name == "proxy1"


def test_acme_settings(inv_dir):
    from releasy_deploy.inventory import LETSENCRYPT, LETSENCRYPT_STAGING
    tls = parse(mutate(base(), {"tls.mode": "acme", "tls.acme": {"email": "ops@example.com"}}),
                inv_dir).tls
    assert (tls.mode, tls.acme.email, tls.acme.directory_url, tls.acme.ca_bundle) == (
        "acme", "ops@example.com", LETSENCRYPT, None)
    staging = parse(mutate(base(), {"tls.mode": "acme", "tls.acme": {
        "email": "ops@example.com", "staging": True}}), inv_dir).tls.acme
    assert staging.directory_url == LETSENCRYPT_STAGING
    (inv_dir / "ca.pem").write_text("x")
    own = parse(mutate(base(), {"tls.mode": "acme", "tls.acme": {
        "email": "ops@example.com", "directory_url": "https://ca.internal:14000/dir",
        "ca_bundle": "ca.pem"}}), inv_dir).tls.acme
    assert own.directory_url == "https://ca.internal:14000/dir"
    assert own.ca_bundle == inv_dir / "ca.pem"


def test_check_files_false_skips_filesystem_checks(tmp_path):
    data = mutate(base(), {"release.source": "missing-dir"})
    inv = parse_inventory(data, tmp_path / INV_NAME, check_files=False)
    assert inv.known_hosts == tmp_path / "known_hosts"


def test_inventory_is_frozen(inv_dir):
    inv = parse(base(), inv_dir)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inv.environment = "x"
    with pytest.raises(TypeError):
        inv.release.sha256["9.9.9"] = SHA_B
    assert isinstance(inv.hosts[0], Host) and hash(inv.hosts[0])


# ---------------------------------------------------------------------------- release source


def test_release_url_location_and_names(inv_dir):
    rel = parse(base(), inv_dir).release
    assert rel.location("1.0.0") == "https://example.com/releases/v1.0.0/releasy-server-linux-x86_64.tar.gz"
    assert rel.tarball_name("1.0.0") == "releasy-server-1.0.0-linux-x86_64.tar.gz"
    assert rel.expected_sha256("1.0.0") == SHA_A
    assert rel.expected_sha256("2.0.0") is None
    with pytest.raises(ValueError):
        rel.location("1.0.0; rm -rf /")


def test_release_checksum_precedence(inv_dir):
    releases = inv_dir / "releases"
    (inv_dir / "SHA256SUMS").write_text(
        f"{SHA_B}  releasy-server-1.0.0-linux-arm64.tar.gz\n"
        f"{SHA_B.upper()} *./releasy-server-2.0.0-linux-arm64.tar.gz\n")
    (releases / "releasy-server-1.0.0-linux-arm64.tar.gz.sha256").write_text(SHA_C + "\n")
    (releases / "releasy-server-3.0.0-linux-arm64.tar.gz.sha256").write_text(
        f"{SHA_C}  releasy-server-3.0.0-linux-arm64.tar.gz\n")
    data = mutate(base(), {"release": {"source": "releases", "arch": "arm64",
                                       "sha256": {"1.0.0": SHA_A}, "sha256_file": "SHA256SUMS"}})
    rel = parse(data, inv_dir).release
    assert rel.location("1.0.0") == str(releases / "releasy-server-1.0.0-linux-arm64.tar.gz")
    assert rel.expected_sha256("1.0.0") == SHA_A  # inventory map wins
    assert rel.expected_sha256("2.0.0") == SHA_B  # then sha256_file (case-insensitive)
    assert rel.expected_sha256("3.0.0") == SHA_C  # then the sidecar
    assert rel.expected_sha256("4.0.0") is None
    (inv_dir / "SHA256SUMS").write_text("garbage\n")  # read lazily
    with pytest.raises(InventoryError, match="SHA256SUMS: line 1"):
        rel.expected_sha256("2.0.0")


def test_malformed_sha256_file_is_reported_at_load(inv_dir):
    (inv_dir / "SHA256SUMS").write_text(f"{SHA_A}  a.tar.gz\nnot a sum\n")
    err = errors_of(mutate(base(), {"release.sha256_file": "SHA256SUMS"}), inv_dir)
    assert "SHA256SUMS: line 2:" in str(err)


# ---------------------------------------------------------------------------- entry points


def test_inventory_path_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("RELEASY_INVENTORY", raising=False)
    assert inventory_path() == Path("hosts.yaml")
    monkeypatch.setenv("RELEASY_INVENTORY", str(tmp_path / "env.yaml"))
    assert inventory_path() == tmp_path / "env.yaml"
    assert inventory_path("explicit.yaml") == Path("explicit.yaml")
    monkeypatch.setenv("RELEASY_INVENTORY", "")
    assert inventory_path() == Path("hosts.yaml")


def test_load_inventory_uses_environment_variable(monkeypatch, inv_dir):
    p = write(inv_dir, BASE_YAML, "from-env.yaml")
    monkeypatch.setenv("RELEASY_INVENTORY", str(p))
    assert load_inventory().path == p.absolute()


def test_load_inventory_defaults_to_cwd_hosts_yaml(monkeypatch, inv_dir):
    write(inv_dir, BASE_YAML, "hosts.yaml")
    monkeypatch.delenv("RELEASY_INVENTORY", raising=False)
    monkeypatch.chdir(inv_dir)
    assert load_inventory().environment == "production"


def test_example_hosts_yaml_parses_without_files():
    inv = load_inventory(REPO_ROOT / "hosts.yaml", check_files=False)
    assert inv.topology == "split"
    assert [h.name for h in inv.hosts_in("app")] == ["app1", "app2"]
    assert not inv.host("app2").is_root


def test_example_hosts_yaml_parses_with_files(tmp_path):
    shutil.copy(REPO_ROOT / "hosts.yaml", tmp_path / "hosts.yaml")
    (tmp_path / "known_hosts").write_text("")
    inv = load_inventory(tmp_path / "hosts.yaml")
    assert inv.known_hosts == tmp_path / "known_hosts"
    assert inv.database.kind == "postgres" and len(inv.hosts) == 4


def test_example_hosts_yaml_documents_every_key():
    from releasy_deploy import inventory as mod
    text = (REPO_ROOT / "hosts.yaml").read_text()
    for keys in (mod.TOP_KEYS, mod.SSH_KEYS, mod.HOST_KEYS, mod.JUMP_KEYS, mod.ACME_KEYS, mod.APP_KEYS, mod.JWT_KEYS,
                 mod.STORAGE_KEYS, mod.DB_KEYS, mod.RELEASE_KEYS, mod.TLS_KEYS, mod.SECRETS_KEYS):
        for key in keys:
            assert f"{key}:" in text, key


def test_no_environment_leaks_into_parse(monkeypatch, inv_dir):
    # parse_inventory is pure apart from file checks: RELEASY_* variables do not matter.
    monkeypatch.setenv("RELEASY_INVENTORY", os.devnull)
    assert parse(base(), inv_dir).environment == "production"


# ---------------------------------------------------------------------------- robustness

JUNK = [None, 0, -1, True, "x; y", "", [], {}, 1.5, ["a"], {"a": 1}, 2**70]


def _all_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _all_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _all_paths(v, prefix + (i,))


def test_any_junk_value_gives_inventory_error_not_a_crash(inv_dir):
    full = mutate(base(), {
        "ssh": {"user": "root", "port": 22, "connect_timeout": 5},
        "app": {"public_base_url": "https://r.example.com", "bluegreen_ports": [8080, 8081],
                "operator_jwt": {"jwks_url": "https://id.example.com/j", "issuer": "i",
                                 "audience": "a", "resource": "r"},
                "artifact_storage": {**STORAGE, "endpoint": "https://s3.example.com"}},
        "secrets": {"file": "s.yaml"},
        "jump_hosts": {"bastion": {"address": "192.0.2.5", "private_address": "10.0.0.5",
                                   "user": "jump", "port": 22}},
        "hosts.app1.jump": "bastion", "hosts.db1.jump": "proxy1",
    })
    parse(full, inv_dir)  # the starting point is valid
    for where in _all_paths(full):
        for junk in JUNK:
            data = copy.deepcopy(full)
            if not where:
                data = junk
            else:
                node = data
                for k in where[:-1]:
                    node = node[k]
                node[where[-1]] = junk
            try:
                parse(data, inv_dir)
            except InventoryError:
                pass


def test_a_tab_is_named_in_the_syntax_error_and_problems_are_reported_once(tmp_path):
    # libyaml reads the file (fast); a syntax error is read again by PyYAML's own parser,
    # whose message names the character.
    bad = tmp_path / "bad.yaml"
    bad.write_text("environment: prod\n\tadmin_cidrs: []\n")
    problems: list = []
    assert load_yaml_file(bad, problems) is UNREADABLE
    assert [(p.path, p.message) for p in problems] == [
        ("line 2, column 1", "YAML syntax error: found character '\\t' that cannot start any"
                             " token (while scanning for the next token)")]
    dup = tmp_path / "dup.yaml"
    dup.write_text("a: 1\na: 2\nb: [1, 2\n")
    problems = []
    assert load_yaml_file(dup, problems) is UNREADABLE
    assert len(problems) == 1 and "syntax error" in problems[0].message  # not twice
