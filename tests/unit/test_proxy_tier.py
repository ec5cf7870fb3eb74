"""Proxy tier, pure parts: upstream/site rendering, server lists, TLS argv, planning, and the
remote scripts themselves, run for real with the local `sh` on a scratch directory (the
swap/restore logic under test is shell; only `nginx` is stood in by a tiny script)."""
from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from releasy_deploy.cli import BadInput
from releasy_deploy.commands import nginx as cmd
from releasy_deploy.facts import LinkTarget, build_facts_script, parse_facts_output
from releasy_deploy.remote import FILES_DIR
from releasy_deploy.tiers import proxy_render, proxy_setup, proxy_state

from inventories import build

SPLIT = """
environment: production
admin_cidrs: [203.0.113.0/24]
known_hosts: known_hosts
hosts:
  proxy1: {address: 198.51.100.10, private_address: 10.0.0.10}
  app1: {address: 198.51.100.21, private_address: 10.0.0.21}
  app2: {address: 198.51.100.22, private_address: "2001:db8:0:0::22"}
  db1: {address: 198.51.100.30, private_address: 10.0.0.30}
tiers: {proxy: [proxy1], app: [app1, app2], db: [db1]}
app: {bind_port: 8080}
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
app: {bind_port: 9090}
database: {kind: sqlite}
release: {source: releases}
tls: {mode: self-signed, server_name: releasy.test}
"""

NO_OVERRIDE: dict[str, str] = {}


def inventory(text: str = SPLIT, **changes):
    return build(text, **changes)


def files_mode(**extra):
    return inventory(tls={"mode": "files", "server_name": "releasy.example.com",
                          "certificate": "tls/site.crt", "key": "tls/site.key", **extra})


# --------------------------------------------------------------------------------------
# Upstream servers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("address, port, expected", [
    ("10.0.0.21", 8080, "10.0.0.21:8080"),
    ("2001:db8:0:0::22", 8081, "[2001:db8::22]:8081"),
    ("app1.internal", 80, "app1.internal:80"),
])
def test_format_server(address, port, expected):
    assert cmd.format_server(address, port) == expected


def test_check_servers_normalizes_and_keeps_order():
    assert cmd.check_servers([("10.0.0.22", 8080), ("2001:DB8::1", 8081), ("App1.Internal", 1)]) \
        == [("10.0.0.22", 8080), ("2001:db8::1", 8081), ("app1.internal", 1)]


@pytest.mark.parametrize("servers, message", [
    ([], "empty upstream list"),
    ([("10.0.0.1", 8080), ("10.0.0.1", 8080)], "listed twice"),
    ([("2001:db8::1", 80), ("2001:DB8:0::1", 80)], "listed twice"),
    ([("10.0.0.1", 0)], "1..65535"),
    ([("10.0.0.1", 65536)], "1..65535"),
    ([("10.0.0.1", True)], "1..65535"),
    ([("10.0.0.1", "8080")], "1..65535"),
    ([("app 1", 8080)], "neither an IP"),
    ([("app1;evil", 8080)], "neither an IP"),
    ([("'app1'", 8080)], "neither an IP"),
    (["äpp.example"], "not an (address, port) pair"),
    ([("äpp.example", 8080)], "neither an IP"),
    ([("0.0.0.0", 8080)], "not a unicast"),
    ([("10.0.0.1",)], "not an (address, port) pair"),
])
def test_check_servers_refuses(servers, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cmd.check_servers(servers)


def test_parse_upstream_servers_ignores_comments_and_options():
    text = ("# server 10.9.9.9:1 max_fails=0;\n"
            "upstream x {\n    server 10.0.0.21:8080 max_fails=0;  # app1\n"
            "    server [2001:db8::22]:8081 max_fails=0 weight=2;\n"
            "    server app3.internal;\n    keepalive 32;\n}\n")
    assert cmd.parse_upstream_servers(text) == [
        ("10.0.0.21", 8080), ("2001:db8::22", 8081), ("app3.internal", 80)]


def test_upstreams_for_split_uses_private_addresses_and_bind_port():
    assert proxy_render.upstreams_for(inventory()) == [("10.0.0.21", 8080), ("2001:db8::22", 8080)]


def test_upstreams_for_single_host_is_loopback():
    assert proxy_render.upstreams_for(inventory(SINGLE)) == [("127.0.0.1", 9090)]


def test_split_by_inventory_takes_out_servers_of_hosts_no_longer_in_the_inventory():
    live = cmd.check_servers([("10.0.0.21", 8081), ("10.0.0.31", 8080),
                              ("2001:db8:0:0::22", 8080)])
    kept, gone = proxy_render.split_by_inventory(inventory(), live)
    # matched by address (the port a rollout chose stays), IPv6 in any spelling
    assert kept == [("10.0.0.21", 8081), ("2001:db8::22", 8080)]
    assert gone == [("10.0.0.31", 8080)]
    assert proxy_render.split_by_inventory(inventory(), [("10.0.0.31", 8080)]) == (
        [], [("10.0.0.31", 8080)])


def test_with_joining_adds_first_installs_once_at_the_end():
    inv = inventory()
    names = [h.name for h in inv.hosts_in("app")]
    live = [("2001:db8::22", 8080)]
    assert proxy_render.with_joining(inv, live, names) == (
        [("2001:db8::22", 8080), ("10.0.0.21", 8080)], [names[0]])
    # listed already (a rollout's port kept), or nobody joining: unchanged
    assert proxy_render.with_joining(inv, [("10.0.0.21", 8081)], names[:1]) == (
        [("10.0.0.21", 8081)], [])
    assert proxy_render.with_joining(inv, live, ()) == (live, [])
    assert proxy_render.with_joining(inventory(SINGLE), [("127.0.0.1", 9091)], ["solo"]) == (
        [("127.0.0.1", 9091)], [])


def test_split_by_inventory_keeps_everything_on_a_single_host():
    servers = [("127.0.0.1", 9091)]
    assert proxy_render.split_by_inventory(inventory(SINGLE), servers) == (servers, [])


@pytest.mark.parametrize("text", [SPLIT, SINGLE])
def test_render_upstream_round_trips_through_the_parser(text):
    servers = proxy_render.upstreams_for(inventory(text))
    rendered = proxy_render.render_upstream(servers, environ=NO_OVERRIDE)
    assert cmd.parse_upstream_servers(rendered) == servers


def test_render_upstream_split_with_ipv6_exact_block():
    rendered = proxy_render.render_upstream(proxy_render.upstreams_for(inventory()), environ=NO_OVERRIDE)
    block = rendered[rendered.index("upstream "):]
    assert block == ("upstream releasy_app {\n"
                     "    zone releasy_app 64k;\n"
                     "    server 10.0.0.21:8080 max_fails=1 fail_timeout=10s;\n"
                     "    server [2001:db8::22]:8080 max_fails=1 fail_timeout=10s;\n"
                     "    keepalive 32;\n"
                     "}\n")


def test_the_site_gives_up_on_a_dead_app_host_within_a_lan_sized_connect_timeout():
    site = proxy_render.render_site(inventory(), environ=NO_OVERRIDE)
    assert "proxy_connect_timeout 1s;" in site
    # a failed try goes to another host; a drained host is not listed at all
    assert "proxy_next_upstream error timeout http_502 http_503;" in site


def test_render_upstream_refuses_empty():
    with pytest.raises(ValueError, match="empty"):
        proxy_render.render_upstream([], environ=NO_OVERRIDE)


# --------------------------------------------------------------------------------------
# Site
# --------------------------------------------------------------------------------------
def directives(text: str) -> list[str]:
    """Non-comment lines, stripped: what nginx reads."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_site_redirects_http_to_https_and_terminates_tls():
    site = directives(proxy_render.render_site(inventory(), environ=NO_OVERRIDE))
    http = site[site.index("listen 80 default_server;"):site.index("listen 443 ssl default_server;")]
    assert "return 308 https://$host$request_uri;" in http
    assert "proxy_pass http://releasy_app;" not in http
    assert site.count("server_tokens off;") == 2
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in site
    assert f"include {cmd.UPSTREAM_FILE};" == site[0]


def test_site_self_signed_tls_paths():
    site = directives(proxy_render.render_site(inventory(), environ=NO_OVERRIDE))
    assert "ssl_certificate /etc/nginx/releasy/tls/self-signed.crt;" in site
    assert "ssl_certificate_key /etc/nginx/releasy/tls/self-signed.key;" in site
    assert "server_name releasy.example.com;" in site


def test_site_files_mode_tls_paths():
    inv = files_mode()
    assert proxy_render.tls_paths(inv) == ("/etc/nginx/releasy/tls/releasy.crt",
                                    "/etc/nginx/releasy/tls/releasy.key")
    site = directives(proxy_render.render_site(inv, environ=NO_OVERRIDE))
    assert "ssl_certificate /etc/nginx/releasy/tls/releasy.crt;" in site
    assert "ssl_certificate_key /etc/nginx/releasy/tls/releasy.key;" in site


def test_site_proxy_settings_keepalive_retries_headers():
    site = directives(proxy_render.render_site(inventory(), environ=NO_OVERRIDE))
    for line in ("proxy_pass http://releasy_app;", "proxy_http_version 1.1;",
                 'proxy_set_header Connection "";', "proxy_set_header Host $host;",
                 "proxy_set_header X-Real-IP $remote_addr;",
                 "proxy_set_header X-Forwarded-For $remote_addr;",
                 "proxy_set_header X-Forwarded-Proto $scheme;",
                 "proxy_set_header X-Forwarded-Host $host;",
                 "proxy_next_upstream error timeout http_502 http_503;",
                 "proxy_next_upstream_tries 3;"):
        assert line in site, line
    assert not any("non_idempotent" in ln for ln in site)


def test_site_listens_on_ipv6_only_when_the_host_has_it():
    with_v6 = directives(proxy_render.render_site(inventory(), ipv6=True, environ=NO_OVERRIDE))
    without = directives(proxy_render.render_site(inventory(), ipv6=False, environ=NO_OVERRIDE))
    assert "listen [::]:443 ssl default_server;" in with_v6
    assert "listen [::]:80 default_server;" in with_v6
    assert not any("[::]" in ln for ln in without)


# --------------------------------------------------------------------------------------
# Template override directory
# --------------------------------------------------------------------------------------
def test_override_dir_wins_per_template_and_falls_back(tmp_path):
    (tmp_path / "nginx").mkdir()
    site = (FILES_DIR / proxy_render.SITE_TEMPLATE).read_text()
    (tmp_path / proxy_render.SITE_TEMPLATE).write_text(site.replace("server_tokens off;",
                                                             "server_tokens off; # overridden"))
    env = {proxy_render.FILES_DIR_ENV: str(tmp_path)}
    assert proxy_render.templates_dir(proxy_render.SITE_TEMPLATE, env) == tmp_path
    assert proxy_render.templates_dir(proxy_render.UPSTREAM_TEMPLATE, env) == FILES_DIR
    assert "# overridden" in proxy_render.render_site(inventory(), environ=env)
    assert "keepalive 32;" in proxy_render.render_upstream([("10.0.0.1", 80)], environ=env)


def test_override_dir_that_does_not_exist_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="RELEASY_FILES_DIR"):
        proxy_render.templates_dir(proxy_render.SITE_TEMPLATE, {proxy_render.FILES_DIR_ENV: str(tmp_path / "nope")})


# --------------------------------------------------------------------------------------
# TLS: the openssl argv and the certificate probe, run locally for real
# --------------------------------------------------------------------------------------
def test_self_signed_argv_is_a_list_with_values_as_single_words():
    argv = cmd.self_signed_argv("/d ir/c'rt.pem", "/d ir/kéy.pem", "releasy.example.com",
                                days=30)
    assert argv[:3] == ["openssl", "req", "-x509"]
    assert argv[argv.index("-subj") + 1] == "/CN=releasy.example.com"
    assert argv[argv.index("-addext") + 1] == "subjectAltName=DNS:releasy.example.com"
    assert argv[argv.index("-keyout") + 1] == "/d ir/kéy.pem"
    assert argv[argv.index("-out") + 1] == "/d ir/c'rt.pem"
    assert argv[argv.index("-days") + 1] == "30"


@pytest.mark.parametrize("name", ["bad name", "x/CN=evil", "a;b", ""])
def test_self_signed_argv_refuses_odd_names(name):
    with pytest.raises(ValueError):
        cmd.self_signed_argv("/c", "/k", name)


def test_generated_certificate_is_seen_by_the_probe(tmp_path):
    d = tmp_path / "dir with 'quote' ü"
    d.mkdir()
    cert, key = str(d / "c.crt"), str(d / "k.key")
    subprocess.run(cmd.self_signed_argv(cert, key, "releasy.example.com"), check=True,
                   capture_output=True)
    probe = subprocess.run(["sh", "-c", cmd.cert_probe_shell(cert)], capture_output=True,
                           text=True)
    info = cmd.parse_cert_probe(probe.stdout, probe.returncode)
    assert info is not None and info.covers("releasy.example.com") and info.valid_long_enough
    assert not info.covers("other.example.com")

    short = str(d / "short.crt")
    subprocess.run(cmd.self_signed_argv(short, key + "2", "releasy.example.com", days=1),
                   check=True, capture_output=True)
    probe = subprocess.run(["sh", "-c", cmd.cert_probe_shell(short)], capture_output=True,
                           text=True)
    assert cmd.parse_cert_probe(probe.stdout, probe.returncode).valid_long_enough is False

    missing = subprocess.run(["sh", "-c", cmd.cert_probe_shell(str(d / "none.crt"))],
                             capture_output=True, text=True)
    assert cmd.parse_cert_probe(missing.stdout, missing.returncode) is None

    (d / "junk.crt").write_text("not a certificate\n")
    junk = subprocess.run(["sh", "-c", cmd.cert_probe_shell(str(d / "junk.crt"))],
                          capture_output=True, text=True)
    info = cmd.parse_cert_probe(junk.stdout, junk.returncode)
    assert info is not None and not info.valid_long_enough and not info.dns_names


# --------------------------------------------------------------------------------------
# The proxy facts, run locally through the real facts script
# --------------------------------------------------------------------------------------
def test_proxy_facts_on_real_files(tmp_path):
    d = tmp_path / "a b'c"
    d.mkdir()
    (d / "site.conf").write_text("server {}\n")
    os.symlink(str(d / "site.conf"), d / "enabled")
    os.symlink(str(d / "gone"), d / "dangling")
    names = [proxy_state.ProxyText(f"{d}/site.conf"), proxy_state.ProxyText(f"{d}/absent"),
             LinkTarget(f"{d}/enabled"), LinkTarget(f"{d}/site.conf"),
             proxy_state.ProxyPresent(f"{d}/dangling"), proxy_state.ProxyPresent(f"{d}/absent"),
             proxy_state.ProxyIpv6()]
    script = build_facts_script(names, "n0nce")
    out = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True).stdout
    got = parse_facts_output(names, "n0nce", out)
    assert got[proxy_state.ProxyText(f"{d}/site.conf")] == "server {}\n"
    assert got[proxy_state.ProxyText(f"{d}/absent")] is None
    assert got[LinkTarget(f"{d}/enabled")] == str(d / "site.conf")
    assert got[LinkTarget(f"{d}/site.conf")] is None
    assert got[proxy_state.ProxyPresent(f"{d}/dangling")] is True
    assert got[proxy_state.ProxyPresent(f"{d}/absent")] is False
    assert got[proxy_state.ProxyIpv6()] == os.path.exists("/proc/net/if_inet6")


# --------------------------------------------------------------------------------------
# Planning: facts in, items/operations out
# --------------------------------------------------------------------------------------
def stat(mode: int, kind: str = "regular file") -> dict:
    return {"type": kind, "owner": "root", "group": "root", "mode": mode, "size": 1}


def test_file_item_unchanged_created_content_and_mode():
    same = proxy_setup._file_item("/etc/x.conf", b"a\n", "a\n", stat(0o644), 0o644, "t")
    assert not same.changed and not same.ops and not same.uploads
    created = proxy_setup._file_item("/etc/x.conf", b"a\n", None, None, 0o644, "t")
    assert created.changed and created.ops == [cmd.Install("/etc/x.conf", "/etc/.x.conf.releasy-new-t")]
    assert created.uploads[0].path == "/etc/.x.conf.releasy-new-t"
    assert created.diff.startswith("--- /dev/null")
    content = proxy_setup._file_item("/etc/x.conf", b"b\n", "a\n", stat(0o644), 0o644, "t")
    assert "(content)" in content.what and "-a" in content.diff and "+b" in content.diff
    mode = proxy_setup._file_item("/etc/x.conf", b"a\n", "a\n", stat(0o666), 0o644, "t")
    assert mode.changed and mode.diff is None and "owner/mode" in mode.what


def test_key_item_never_shows_content_and_fixes_mode_without_upload():
    import hashlib
    key = b"-----BEGIN PRIVATE KEY-----\nsecretsecret\n"
    sha = hashlib.sha256(key).hexdigest()
    fix = proxy_setup._blob_item("/k", key, sha, stat(0o644), 0o600, "t", secret=True)
    assert fix.ops == [cmd.SetAttrs("/k", "root", "root", 0o600)] and not fix.uploads
    new = proxy_setup._blob_item("/k", key, "0" * 64, stat(0o600), 0o600, "t", secret=True)
    assert new.uploads[0].secret and new.uploads[0].mode == 0o600 and new.diff is None
    assert "secret content" in new.what


def _state(**kw) -> proxy_state.HostState:
    cert, key = "/etc/nginx/releasy/tls/self-signed.crt", "/etc/nginx/releasy/tls/self-signed.key"
    base = dict(packages={"nginx": "1", "openssl": "1"},
                stats={cert: stat(0o644), key: stat(0o600)}, texts={}, sha256={},
                cert=cmd.CertInfo(("releasy.example.com",), True), site_link=None,
                default_site=False, ipv6=True, active=True, enabled=True)
    base.update(kw)
    return proxy_state.HostState(**base)


@pytest.mark.parametrize("changes, generated", [
    ({}, False),
    ({"cert": None}, True),
    ({"cert": cmd.CertInfo(("old.example.com",), True)}, True),
    ({"cert": cmd.CertInfo(("releasy.example.com",), False)}, True),
    ({"stats": {"/etc/nginx/releasy/tls/self-signed.crt": stat(0o644)}}, True),  # no key
])
def test_self_signed_regenerated_only_when_needed(changes, generated):
    items = proxy_setup._tls_items(inventory(), _state(**changes), "t", None)
    gens = [op for it in items for op in it.ops if isinstance(op, cmd.Generate)]
    assert bool(gens) == generated
    if generated:
        assert "/CN=releasy.example.com" in gens[0].argv


def test_self_signed_key_with_loose_mode_is_chmodded_not_regenerated():
    key = "/etc/nginx/releasy/tls/self-signed.key"
    st = _state()
    st.stats[key] = stat(0o644)
    ops = [op for it in proxy_setup._tls_items(inventory(), st, "t", None) for op in it.ops]
    assert ops == [cmd.SetAttrs(key, "root", "root", 0o600)]


# --------------------------------------------------------------------------------------
# The apply script, run for real with sh (manage_service=False, a stand-in `nginx -t`)
# --------------------------------------------------------------------------------------
FAKE_NGINX = """#!/bin/sh
# stand-in for `nginx -t`: rejects any file under $CHECK_DIR containing "bogus"
if grep -rl bogus "$CHECK_DIR" >/dev/null 2>&1; then
  echo 'nginx: [emerg] unknown directive "bogus" in /etc/nginx/sites-enabled/x:3' >&2
  echo 'nginx: configuration file /etc/nginx/nginx.conf test failed' >&2
  exit 1
fi
echo 'nginx: configuration file /etc/nginx/nginx.conf test is successful' >&2
"""


@pytest.fixture
def scratch(tmp_path):
    live = tmp_path / "etc nginx 'ü'"
    live.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nginx").write_text(FAKE_NGINX)
    (bindir / "nginx").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "CHECK_DIR": str(live)}
    return live, env, str(tmp_path / "lock")


def run_script(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True,
                          env=env, timeout=60)


def snapshot(d: Path) -> dict:
    out = {}
    for p in sorted(d.iterdir()):
        if p.is_symlink():
            out[p.name] = ("link", os.readlink(p))
        elif p.is_file():
            out[p.name] = ("file", p.read_text(), oct(p.stat().st_mode & 0o7777))
        else:
            out[p.name] = ("dir",)
    return out


def _ops(live: Path, payload: str):
    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    (live / "site.conf").write_text("old site\n")
    (live / "site.conf").chmod(0o644)
    (live / "default").write_text("debian default\n")
    (live / "key.pem").write_text("key\n")
    (live / "key.pem").chmod(0o644)
    os.symlink("site.conf", live / "enabled 'x'")
    staged_site = live / ".site.conf.releasy-new-t"
    staged_site.write_text(payload)
    staged_up = live / ".up stream.conf.releasy-new-t"
    staged_up.write_text("upstream ü {}\n")
    return [
        cmd.Install(str(live / "site.conf"), str(staged_site)),
        cmd.Install(str(live / "up stream.conf"), str(staged_up)),  # new file
        cmd.Link(str(live / "enabled 'x'"), str(live / "site.conf")),
        cmd.Remove(str(live / "default")),
        cmd.SetAttrs(str(live / "key.pem"), me, group, 0o600),
    ]


def test_apply_script_swaps_everything_and_cleans_up(scratch):
    live, env, lock = scratch
    ops = _ops(live, "new site\n")
    res = run_script(cmd.apply_script(ops, backup_parent=str(live), manage_service=False,
                                      lock_path=lock), env)
    assert res.returncode == 0, res.stderr
    snap = snapshot(live)
    assert snap["site.conf"][:2] == ("file", "new site\n")
    assert snap["up stream.conf"][:2] == ("file", "upstream ü {}\n")
    assert snap["enabled 'x'"] == ("link", str(live / "site.conf"))
    assert "default" not in snap
    assert snap["key.pem"][2] == "0o600"
    leftovers = [n for n in snap if n.startswith(".")]
    assert leftovers == [], leftovers  # no staged file, link temp or backup dir left


def test_apply_script_restores_everything_when_nginx_t_fails(scratch):
    live, env, lock = scratch
    ops = _ops(live, "new site with bogus directive\n")
    before = {k: v for k, v in snapshot(live).items() if not k.startswith(".")}
    res = run_script(cmd.apply_script(ops, backup_parent=str(live), manage_service=False,
                                      lock_path=lock), env)
    assert res.returncode == cmd.EXIT_CONFIG_REJECTED
    assert 'unknown directive "bogus"' in res.stderr
    assert "@restored" in res.stdout
    assert snapshot(live) == before  # content, modes, symlink, removed and new files


def test_apply_script_step_failure_restores_and_exits_11(scratch):
    live, env, lock = scratch
    ops = _ops(live, "new site\n")
    before = {k: v for k, v in snapshot(live).items() if not k.startswith(".")}
    # The second install's staged file is missing: the first swap must be undone.
    os.unlink(ops[1].staged)
    res = run_script(cmd.apply_script(ops, backup_parent=str(live), manage_service=False,
                                      lock_path=lock), env)
    assert res.returncode == cmd.EXIT_STEP_FAILED
    assert "cannot install" in res.stderr
    assert snapshot(live) == before


def test_apply_script_generate_failure_touches_nothing(scratch):
    live, env, lock = scratch
    ops = _ops(live, "new site\n")
    before = {k: v for k, v in snapshot(live).items() if not k.startswith(".")}
    gen = cmd.Generate(("sh", "-c", "echo 'no entropy' >&2; exit 1"), (str(live / ".gen"),),
                       what="openssl")
    res = run_script(cmd.apply_script([gen, *ops], backup_parent=str(live),
                                      manage_service=False, lock_path=lock), env)
    assert res.returncode == cmd.EXIT_STEP_FAILED
    assert "openssl failed: no entropy" in res.stderr
    assert snapshot(live) == before


def test_apply_script_gives_up_when_the_lock_stays_busy(scratch):
    live, env, lock = scratch
    holder = subprocess.Popen(["flock", lock, "sh", "-c", "echo locked; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # blocks until it holds the lock
        res = run_script(cmd.apply_script([], backup_parent=str(live), manage_service=False,
                                          lock_path=lock, lock_timeout=0), env)
        assert res.returncode == cmd.EXIT_LOCKED
        assert "another releasy change" in res.stderr
    finally:
        holder.kill()
        holder.wait()


def test_apply_script_refuses_relative_paths_and_bad_accounts():
    with pytest.raises(ValueError):
        cmd.apply_script([cmd.Remove("etc/x")], backup_parent="/etc")
    with pytest.raises(ValueError):
        cmd.apply_script([cmd.SetAttrs("/etc/x", "root;rm", "root", 0o600)], backup_parent="/etc")
    with pytest.raises(ValueError):
        cmd.apply_script([], backup_parent="/etc\nx")


def test_apply_script_is_one_function_called_on_the_last_line():
    script = cmd.apply_script([cmd.Remove("/etc/nginx/sites-enabled/default")],
                              backup_parent="/etc/nginx/releasy", enable=True)
    assert script.rstrip().splitlines()[-1] == 'main "$@"; exit $?'
    assert "nginx -t" in script and "systemctl enable nginx" in script
    assert script.index("nginx -t") < script.index("reload_nginx; then")


# --------------------------------------------------------------------------------------
# Old workers: the title nginx gives them, detected for real with a renamed process
# --------------------------------------------------------------------------------------
def test_wait_old_workers_script_sees_a_shutting_down_worker():
    title = "nginx: worker process is shutting down"
    worker = subprocess.Popen(["bash", "-c", f"exec -a {shlex.quote(title)} sleep 60"])
    try:
        res = subprocess.run(["sh", "-s"], input=cmd.wait_old_workers_script(0),
                             capture_output=True, text=True, timeout=30)
        markers = cmd.parse_markers(res.stdout)
        assert str(worker.pid) in markers["pending"]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    res = subprocess.run(["sh", "-s"], input=cmd.wait_old_workers_script(5),
                         capture_output=True, text=True, timeout=30)
    assert "gone" in cmd.parse_markers(res.stdout)


def test_markers_and_nginx_message_tidying():
    assert cmd.parse_markers("x\n@reloaded\n@pending 1 2\n@\n") == {
        "reloaded": [], "pending": ["1", "2"]}
    assert cmd.tidy_nginx_messages(
        '2026/11/26 07:55:33 [emerg] 422#422: unknown directive "x" in /e:1\nnginx: test failed'
    ) == 'nginx: [emerg] unknown directive "x" in /e:1\nnginx: test failed'


# --------------------------------------------------------------------------------------
# tls.mode: acme
# --------------------------------------------------------------------------------------
def acme_inventory(proxies=("proxy1",)):
    data = yaml.safe_load(SPLIT)
    data["hosts"]["proxy2"] = {"address": "198.51.100.11", "private_address": "10.0.0.11"}
    data["tiers"]["proxy"] = list(proxies)
    if "proxy2" not in proxies:
        del data["hosts"]["proxy2"]
    data["tls"] = {"mode": "acme", "server_name": "releasy.example.com",
                   "acme": {"email": "ops@example.com"}}
    return build(data)


def test_acme_site_answers_challenges_on_port_80_and_redirects_the_rest():
    inv = acme_inventory()
    assert proxy_render.tls_paths(inv) == ("/etc/nginx/releasy/tls/acme.crt",
                                    "/etc/nginx/releasy/tls/acme.key")
    site = directives(proxy_render.render_site(inv, host="proxy1", environ=NO_OVERRIDE))
    http = site[site.index("listen 80 default_server;"):site.index("listen 443 ssl default_server;")]
    start = http.index("location ^~ /.well-known/acme-challenge/ {")
    assert http[start + 1:start + 3] == ["root /var/lib/releasy/acme;", "default_type text/plain;"]
    assert "return 308 https://$host$request_uri;" in http
    assert not any("acme_peers" in line for line in site)  # one proxy: nobody to ask
    plain = directives(proxy_render.render_site(inventory(), host="proxy1", environ=NO_OVERRIDE))
    assert not any("acme-challenge" in line for line in plain)


def test_acme_with_several_proxies_asks_the_others_once():
    inv = acme_inventory(("proxy1", "proxy2"))
    site = directives(proxy_render.render_site(inv, host="proxy1", environ=NO_OVERRIDE))
    peers = site[site.index("upstream releasy_acme_peers {"):]
    assert peers[1] == "server 10.0.0.11:80 max_fails=0;"  # the other proxy, not itself
    assert "10.0.0.10:80" not in " ".join(site)
    assert "try_files $uri @acme_peers;" in site
    named = site[site.index("location @acme_peers {"):]
    assert named[1:4] == ["if ($http_x_releasy_acme_peer) {", "return 404;", "}"]
    assert "proxy_set_header X-Releasy-Acme-Peer 1;" in named
    assert "proxy_next_upstream_tries 1;" in named


def test_ready_through_proxy_says_maintenance_while_the_page_is_on(tmp_path):
    """Run here with the real sh and curl: with the flag file present it answers
    MAINTENANCE_ON without asking nginx; without it, the status curl gets from this
    machine's port 443 (000 when nothing listens there), never the flag's word."""
    flag = tmp_path / "maintenance.on"
    argv = cmd.ready_through_proxy_argv("releasy.invalid", flag=str(flag))
    assert argv[-1] == "https://releasy.invalid/ready"
    flag.write_text("on\n")
    on = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert (on.returncode, on.stdout.strip()) == (0, cmd.MAINTENANCE_ON)
    flag.unlink()
    off = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert off.stdout.strip().isdigit(), (off.stdout, off.stderr)
