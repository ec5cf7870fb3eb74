"""`fab status` without SSH: the probes' parsers, which facts each host gets, and the report
(rows, problems, table, JSON) built from facts shaped exactly as the real probes return
them (the real parsers are fed the hosts' real output formats)."""
from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from releasy_deploy import firewall as fw
from releasy_deploy.backups import BackupListing
from releasy_deploy.bluegreen import Listening
from releasy_deploy.facts import LinkTarget
from releasy_deploy.commands import acme as acmecmd
from releasy_deploy.commands import app as appcmd
from releasy_deploy.commands import postgres as pg
from releasy_deploy.commands import probes
from releasy_deploy.commands import ufw, ufw_state
from releasy_deploy.errors import HostKeyError, RemoteCommandError, UnreachableError
from releasy_deploy.facts import (FileSha256, FileStat, OsRelease, PackageVersion, ServiceActive,
                                  build_facts_script, parse_facts_output)
from releasy_deploy.fleet import FleetFile, FleetRecord
from releasy_deploy.inventory import parse_inventory
from releasy_deploy.schema import RecordedLevels, SchemaLevel
from releasy_deploy.status.assess import build_report
from releasy_deploy.status.model import AppStatus, DbStatus, LockStatus
from releasy_deploy.status.probes import (FIREWALL_FACTS, StatusDisk, StatusExe, StatusPg,
                                          StatusVersion, fact_names, parse_disk,
                                          parse_exe_release, parse_pg)
from releasy_deploy.status.render import HEADERS, _size, render_table, to_json_text
from releasy_deploy.tiers.acme import CertInfo
from releasy_deploy.tiers.app_facts import ReleasyReady, ReleasyReleases, ReleasyUnit
from releasy_deploy.tiers.db import PgInstallation
from releasy_deploy.tiers.firewall_state import UfwConf, UfwDefaultsFile, UfwUserRules
from releasy_deploy.tiers.proxy_state import ProxyText

SPLIT = parse_inventory({
    "environment": "prod", "admin_cidrs": ["10.9.0.1/32"], "known_hosts": "known_hosts",
    "hosts": {"proxy1": {"address": "10.9.0.10"}, "app1": {"address": "10.9.0.21"},
              "app2": {"address": "10.9.0.22", "ssh_user": "deploy"},
              "db1": {"address": "10.9.0.100"}},
    "tiers": {"proxy": ["proxy1"], "app": ["app1", "app2"], "db": ["db1"]},
    "release": {"source": "releases"},
    "tls": {"mode": "self-signed", "server_name": "releasy.example.test"}},
    "/nonexistent/hosts.yaml", check_files=False)
SINGLE = parse_inventory({
    "environment": "solo", "admin_cidrs": ["10.9.0.1/32"], "known_hosts": "known_hosts",
    "hosts": {"solo": {"address": "10.9.0.5"}},
    "tiers": {"proxy": ["solo"], "app": ["solo"], "db": ["solo"]},
    "database": {"kind": "sqlite"}, "release": {"source": "releases"},
    "tls": {"mode": "self-signed", "server_name": "releasy.example.test"}},
    "/nonexistent/hosts.yaml", check_files=False)
ROOT = Path(__file__).resolve().parents[2]
SELF_CERT = CertInfo("/etc/nginx/releasy/tls/self-signed.crt")


def cert(days: float, issuer: str = "CN=releasy.example.test", self_signed: bool = True):
    """What the certificate probe returns (parsed from openssl's real output)."""
    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)
    out = (f"issuer={issuer}\nsubject={'CN=releasy.example.test' if self_signed else ''}\n"
           f"notAfter={end.strftime('%b %d %H:%M:%S %Y GMT')}\n"
           "X509v3 Subject Alternative Name: \n    DNS:releasy.example.test\n")
    return acmecmd.parse_cert_probe(out, 0)


UPSTREAM = "upstream releasy_app {\n%s    keepalive 32;\n}\n"
FREE = LockStatus(None)


def upstream(*servers: str) -> str:
    return UPSTREAM % "".join(f"    server {s} max_fails=0;\n" for s in servers)


# ------------------------------------------------------------------------------ parsers
@pytest.mark.parametrize("out,code,expected", [
    ("68 23%\n", 0, (68 * 1024, 23)),
    ("0 100%", 0, (0, 100)),
    ("? 5%", 0, (None, 5)),
    ("12 ?", 0, (12 * 1024, None)),
    ("", 3, None),
])
def test_parse_disk(out, code, expected):
    assert parse_disk(out, code) == expected


@pytest.mark.parametrize("out,code,expected", [
    ("/opt/releasy/releases/1.2.3/releasy-server\n", 0, "1.2.3"),
    ("/opt/releasy/releases/1.2.0-rc.1/releasy-server", 0, "1.2.0-rc.1"),
    ("/opt/releasy/releases/1.2.3/releasy-server (deleted)", 0, "1.2.3"),  # pruned since
    ("/usr/bin/python3.11", 0, None),  # a script: the interpreter, not the release
    ("/opt/releasy/releases/../../etc/releasy-server", 0, None),
    ("", 3, None),
])
def test_parse_exe_release(out, code, expected):
    assert parse_exe_release(out, code) == expected


@pytest.mark.parametrize("out,code,expected", [
    ("up 7969251\n", 0, (True, 7969251)),
    ("up ?\n", 0, (True, None)),
    ("down\n", 0, (False, None)),
    ("", 127, None),
    ("garbage", 0, None),
])
def test_parse_pg(out, code, expected):
    assert parse_pg(out, code) == expected


def test_the_disk_probe_runs_in_a_real_shell(tmp_path):
    """The probe itself (one frame: a du per directory, one df) under sh, against real
    directories (one with a space in its name) and one that does not exist."""
    d, other = tmp_path / "data dir", tmp_path / "other"
    for x in (d, other):
        x.mkdir()
    (d / "f").write_bytes(b"x" * 40000)
    facts = [StatusDisk(str(d)), StatusDisk(f"{d}-missing"), StatusDisk(str(other))]
    script = build_facts_script(facts, "n0nce")
    assert script.count("df -Pk") == 1
    res = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True)
    found = parse_facts_output(facts, "n0nce", res.stdout)
    used, pct = found[facts[0]]
    assert used >= 40000 and 0 <= pct <= 100
    assert found[facts[1]] is None
    assert found[facts[2]][0] < used and found[facts[2]][1] == pct


@pytest.fixture()
def http_app():
    """A local HTTP server standing in for Releasy: /ready answers 200 or 503 as
    ``state["ready"]`` says, /version a JSON body; its ``bind`` is ``127.0.0.1:PORT``."""
    import http.server
    import threading

    state = {"ready": True}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            if self.path == "/ready":
                code, body = (200, b'{"status":"ok"}') if state["ready"] else (503, b"no")
            elif self.path == "/version":
                code, body = 200, b'{"version": "1.2.3"}'
            else:
                code, body = 404, b"nothing here"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["bind"] = f"127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _read_in_sh(facts, env=None):
    script = build_facts_script(facts, "n0nce")
    res = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True, env=env,
                         timeout=30)
    return script, parse_facts_output(facts, "n0nce", res.stdout)


def test_readiness_and_version_are_one_curl_of_real_transfers(http_app):
    """/ready and /version of one address: ONE curl (``--next``), read by real curl from
    a real server; readiness follows the HTTP status, the version the body."""
    bind = http_app["bind"]
    facts = [StatusVersion(bind), ReleasyReady(appcmd.ready_url(bind))]
    script, found = _read_in_sh(facts)
    assert script.count("curl ") == 1 and "--next" in script
    assert found == {facts[0]: "1.2.3", facts[1]: True}
    http_app["ready"] = False  # 503: curl -f fails that transfer, the next one still runs
    assert _read_in_sh(facts)[1] == {facts[0]: "1.2.3", facts[1]: False}
    # Nothing listening: neither; alone, readiness reads the same as before.
    gone = "127.0.0.1:9"
    assert _read_in_sh([StatusVersion(gone), ReleasyReady(appcmd.ready_url(gone))])[1] == {
        StatusVersion(gone): None, ReleasyReady(appcmd.ready_url(gone)): False}
    http_app["ready"] = True
    assert _read_in_sh([ReleasyReady(appcmd.ready_url(bind))])[1] == {
        ReleasyReady(appcmd.ready_url(bind)): True}


def test_http_probes_of_different_addresses_are_separate_curls():
    """Each address has its own curl: only one transfer per curl prints a body."""
    facts = [ReleasyReady("http://127.0.0.1:8080/ready"), StatusVersion("127.0.0.1:8080"),
             ReleasyReady("http://127.0.0.1:8081/ready"), StatusVersion("127.0.0.1:8081")]
    assert build_facts_script(facts, "n0nce").count("curl ") == 2


@pytest.mark.parametrize("out, code, expected", [
    ("ready 0\n{\"version\": \"1.0.0\"}\n@status 200\n", 0, (True, "1.0.0")),
    ("ready 22\n{\"version\": \"1.0.0\"}\n@status 200\n", 0, (False, "1.0.0")),
    ("ready 7\n\n@status 000\n", 7, (False, None)),
    ("", 127, (False, None)),  # no curl on the host
    ("ready x\n", 0, (False, None)),  # not curl's line: not ready
])
def test_split_of_the_http_probes(out, code, expected):
    ready, version = ReleasyReady("http://h:1/ready"), StatusVersion("h:1")
    parts = ready.batch.split([version, ready], out, code)
    assert (ready.parse(*parts[1]), version.parse(*parts[0])) == expected


def test_the_main_process_executable_is_read_in_the_systemctl_frame(tmp_path):
    """StatusExe joins the one ``systemctl show`` (no second systemctl): the real snippet
    under sh, a stand-in systemctl printing a running and a stopped unit."""
    fake = tmp_path / "systemctl"
    blocks = r"LoadState=loaded\nMainPID=%s\n\nLoadState=loaded\nMainPID=0\n"
    fake.write_text(f"#!/bin/sh\nprintf '{blocks}' {os.getpid()}\n"
                    f"echo called >> {tmp_path}/calls\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    facts = [ReleasyUnit("releasy.service"), StatusExe("releasy.service"),
             StatusExe("releasy@8081.service")]
    script, found = _read_in_sh(facts, env=env)
    assert (tmp_path / "calls").read_text() == "called\n"
    assert found[facts[0]]["MainPID"] == str(os.getpid())
    assert found[facts[1]] is None  # python, not a release's releasy-server
    assert found[facts[2]] is None
    exe = os.path.realpath(f"/proc/{os.getpid()}/exe")
    parts = facts[1].batch.split(facts, f"MainPID={os.getpid()}\n\nMainPID=0\n@exe\n"
                                 f"{os.getpid()} {exe}\n", 0)
    assert parts[1:] == [(exe, 0), ("", 3)]


DF_HEAD = "Filesystem 1024-blocks Used Available Capacity Mounted on\n"


@pytest.mark.parametrize("out, expected", [
    ("y\n68\t/a\nn\ny\n4\t/c d\n@df\n" + DF_HEAD
     + "/dev/vda 100 50 50 23% /\n/dev/vdb 100 9 91 9% /srv\n", ["68 23", None, "4 9"]),
    # du failed on /a (no line): its size is unknown, the rest still lines up
    ("y\ny\n1\t/b\nn\n@df\n" + DF_HEAD + "x 1 1 1 5% /\nx 1 1 1 6% /b\n",
     ["? 5", "1 6", None]),
    # df printed one line for two directories: which is which is unknown
    ("y\n1\t/a\ny\n2\t/b\nn\n@df\n" + DF_HEAD + "x 1 1 1 5% /\n",
     ["1 ?", "2 ?", None]),
    ("n\nn\nn\n@df\n", [None, None, None]),
])
def test_split_disk_output(out, expected):
    assert probes.split_disk_output(["/a", "/b", "/c d"], out) == expected


@pytest.mark.parametrize("out", ["y\n1\t/a\n", "y\n1\t/a\n@df\n", "z\n@df\n",
                                 "n\nn\nn\nn\n@df\n"])
def test_split_disk_output_refuses_what_does_not_fit(out):
    with pytest.raises(ValueError):
        probes.split_disk_output(["/a", "/b", "/c"], out)


def test_a_disk_path_must_be_absolute_and_on_one_line():
    for bad in ("relative", "/a\nb"):
        with pytest.raises(ValueError):
            StatusDisk(bad)


def test_every_fact_has_a_probe_and_values_are_quoted():
    for inv in (SPLIT, SINGLE):
        for host in inv.hosts:
            names = fact_names(inv, host)
            assert len(names) == len(set(names))
            script = build_facts_script(names, "n0nce")
            assert "n0nce" in script
    assert shlex.quote("/var/lib/releasy") in StatusDisk("/var/lib/releasy").shell()
    weird = "releasy@it's.service"
    assert shlex.quote(weird) in StatusExe(weird).shell()


def test_which_facts_each_host_gets():
    by = {h.name: fact_names(SPLIT, h) for h in SPLIT.hosts}
    assert ReleasyUnit("releasy.service") in by["app1"]
    assert ReleasyReady("http://10.9.0.21:8080/ready") in by["app1"]
    assert StatusVersion("10.9.0.22:8080") in by["app2"]
    assert StatusDisk("/opt/releasy") in by["app1"]
    assert ProxyText("/etc/nginx/releasy/upstream.conf") in by["proxy1"]
    assert StatusPg("releasy") in by["db1"]
    assert StatusDisk("/var/lib/postgresql") in by["db1"]
    assert not any(isinstance(f, (ReleasyUnit, ReleasyReady, ReleasyReleases, StatusPg))
                   for f in by["proxy1"])
    for names in by.values():
        assert set(FIREWALL_FACTS) <= set(names)
    solo = fact_names(SINGLE, SINGLE.hosts[0])
    # One host, every tier: the blue/green instances, the proxy and the SQLite file.
    assert {ReleasyUnit("releasy@8080.service"), ReleasyUnit("releasy@8081.service"),
            StatusVersion("127.0.0.1:8081"), LinkTarget("/opt/releasy/instances/8081"),
            FileStat("/var/lib/releasy/releasy.db"), ServiceActive("nginx")} <= set(solo)


def test_facts_output_round_trip_of_the_status_probes():
    """The parsers get what the facts framework frames: stdout and exit code."""
    names = [StatusPg("releasy"), StatusExe("releasy.service")]
    out = ("@@releasy:n:0:begin@@\nup 123\n\n@@releasy:n:0:end:0@@\n"
           "@@releasy:n:1:begin@@\nLoadState=loaded\nMainPID=812\n@exe\n"
           "812 /opt/releasy/releases/1.1.0/releasy-server\n\n@@releasy:n:1:end:0@@\n")
    assert parse_facts_output(names, "n", out) == {
        StatusPg("releasy"): (True, 123), StatusExe("releasy.service"): "1.1.0"}


# ------------------------------------------------------------------------------ facts as found
DEBIAN_12 = {"ID": "debian", "VERSION_ID": "12", "VERSION_CODENAME": "bookworm",
             "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"}
PG_15 = pg.parse_pg_host("cluster|15|main\ninstalled|postgresql-15\n", 0)


def ufw_facts(inv, host, *, active=True, rules=None, extra=()):
    planned = fw.plan_rules(inv)[host] if rules is None else rules
    added = "Added user rules (see 'ufw status' for running firewall):\n" + "\n".join(
        [shlex.join(ufw.add_argv(r)) for r in planned] + list(extra))
    return {
        OsRelease(): DEBIAN_12,
        PackageVersion("ufw"): "0.36.2-1",
        UfwConf(): ufw_state.parse_ufw_conf("ENABLED=yes\n" if active else "ENABLED=no\n", ""),
        UfwUserRules(): ufw.parse_show_added(added),
        UfwDefaultsFile(): ufw_state.parse_defaults('DEFAULT_INPUT_POLICY="DROP"\n'
                                                    'DEFAULT_OUTPUT_POLICY="ACCEPT"\nIPV6=yes\n'),
    }


def unit(state="active", pid=200, sub=None):
    return {"ActiveState": state, "SubState": sub or ("running" if state == "active" else "dead"),
            "MainPID": str(pid if state == "active" else 0), "UnitFileState": "enabled"}


def releases(current="1.1.0", *installed):
    lines = [f"current releases/{current}"] if current else []
    lines += [f"release {v} {'a' * 64} yes" for v in (installed or [current])]
    return appcmd.parse_releases("\n".join(lines) + "\n")


def app_facts(bind, *, state="active", ready=True, running="1.1.0", current="1.1.0"):
    return {
        ReleasyReleases(): releases(current),
        ReleasyUnit("releasy.service"): unit(state),
        ReleasyReady(f"http://{bind}/ready"): ready,
        StatusVersion(bind): running if state == "active" else None,
        StatusExe("releasy.service"): None,  # a script: no release in /proc/PID/exe
        StatusDisk("/opt/releasy"): (70 * 1024, 23),
        StatusDisk("/var/lib/releasy"): (28 * 1024, 23),
    }


def split_facts(**over):
    found = {
        "proxy1": {**ufw_facts(SPLIT, "proxy1"), ServiceActive("nginx"): True,
                   SELF_CERT: cert(300),
                   ProxyText("/etc/nginx/releasy/upstream.conf"):
                       upstream("10.9.0.21:8080", "10.9.0.22:8080")},
        "app1": {**ufw_facts(SPLIT, "app1"), **app_facts("10.9.0.21:8080")},
        "app2": {**ufw_facts(SPLIT, "app2"), **app_facts("10.9.0.22:8080")},
        "db1": {**ufw_facts(SPLIT, "db1"), StatusPg("releasy"): (True, 8_000_000),
                PgInstallation(): PG_15, FleetFile(): None,
                StatusDisk("/var/lib/postgresql"): (42 * 2**20, 23)},
    }
    for host, changes in over.items():
        if isinstance(changes, BaseException):
            found[host] = changes
        else:
            found[host] = {**found[host], **changes}
    # Every fact status reads is there (no more, no fewer).
    for h in SPLIT.hosts:
        if isinstance(found[h.name], dict):
            assert set(found[h.name]) == set(fact_names(SPLIT, h)), h.name
    return found


# ------------------------------------------------------------------------------ the report
def test_a_healthy_split_environment():
    report = build_report(SPLIT, split_facts(), FREE)
    assert report.healthy and report.problems == []
    assert [h.name for h in report.hosts] == ["proxy1", "app1", "app2", "db1"]
    app1 = report.hosts[1]
    assert app1.app == AppStatus("releasy.service", "active", "running", 200, "1.1.0",
                                    "1.1.0", True, True)
    assert app1.firewall.matches_plan and report.hosts[3].db == DbStatus("postgres", True,
                                                                            8_000_000, "15")
    table = render_table(report)
    lines = table.splitlines()
    assert lines[0].split() == HEADERS
    assert [ln.split()[0] for ln in lines[1:5]] == ["proxy1", "app1", "app2", "db1"]
    assert "deploy lock: free" in table and table.endswith("prod: healthy")
    row = lines[2]
    for cell in ("1.1.0", "releasy active pid 200", "yes", "in", "ok", "releasy 70K data 28K",
                 "(fs 23%)"):
        assert cell in row
    assert "postgres 15 up 7.6M" in lines[4] and "Debian 12" in lines[4] and "2 server(s)" in lines[1]
    # Columns line up: every row starts its RELEASE cell at the same place.
    col = lines[0].index("RELEASE")
    assert lines[2][col:].startswith("1.1.0") and lines[1][col:].startswith("-")


def test_a_stopped_service_marks_its_host_and_makes_it_unhealthy():
    report = build_report(SPLIT, split_facts(app1=app_facts(
        "10.9.0.21:8080", state="inactive", ready=False)), FREE)
    assert not report.healthy
    assert report.problems == ["app1: the proxies route requests to it but it does not"
                               " answer /ready; fix it (`fab app.restart --host app1`) or"
                               " `fab app.drain --host app1`",
                               "app1: releasy.service is inactive (dead), not active",
                               "app1: /ready does not answer 200"]
    assert "  ! app1: the proxies route requests to it" in render_table(report)
    row = render_table(report).splitlines()[2]
    assert "stopped (current 1.1.0)" in row and "INACTIVE" in row and " NO " in row
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["healthy"] is False and doc["hosts"][1]["name"] == "app1"
    assert doc["hosts"][1]["healthy"] is False and doc["hosts"][2]["healthy"] is True
    assert doc["hosts"][1]["app"]["active_state"] == "inactive"


def test_an_unreachable_host_is_a_row_not_a_crash():
    down = UnreachableError("app2 (deploy@10.9.0.22:22): cannot connect: [Errno 111]"
                            " Connection refused. Is the host up?", host="app2")
    report = build_report(SPLIT, split_facts(app2=down), FREE)
    app2 = report.hosts[2]
    assert not app2.reachable and app2.app is None
    assert report.problems == [
        "app2: unreachable, and the proxies still route requests to it; `fab app.drain --host"
        " app2` takes it out (it does not need app2)",
        "app2: unreachable: app2 (deploy@10.9.0.22:22): cannot connect: [Errno 111] Connection"
        " refused. Is the host up?"]
    assert "UNREACHABLE" in render_table(report).splitlines()[3]
    assert json.loads(to_json_text(report))["hosts"][2]["reachable"] is False
    keys = build_report(SPLIT, split_facts(app2=HostKeyError("HOST KEY CHANGED for app2")),
                           FREE)
    assert not keys.hosts[2].reachable
    # A host that answered but whose probe failed is reachable, and still a problem.
    failed = RemoteCommandError("app1", "sudo -n -- sh -s", 1, "sudo: oops")
    other = build_report(SPLIT, split_facts(app1=failed), FREE)
    assert other.hosts[1].reachable and other.hosts[1].error.startswith("remote command failed")
    assert other.problems[0].startswith("app1: could not be read: ")


def test_a_host_behind_the_fleet_is_headlined_reachable_or_not():
    drained = {ProxyText("/etc/nginx/releasy/upstream.conf"): upstream("10.9.0.21:8080")}
    old = app_facts("10.9.0.22:8080")
    old[ReleasyReleases()] = releases("1.0.0", "1.0.0", "1.1.0")
    report = build_report(SPLIT, split_facts(proxy1=drained, app2=old), FREE)
    assert report.headlines == (
        "app2: behind the fleet's release (it runs 1.0.0, but the hosts in rotation (app1) run"
        " 1.1.0); `fab deploy.rolling --version 1.1.0 --yes` brings it up to date, then `fab"
        " app.undrain --host app2`",)
    # Unreachable: only the record on the db host can say it.
    record = FleetRecord("1.1.0", 3, {"app2": "1.0.0"}, "deploy.rolling", "2026-12-06T16:00Z")
    down = UnreachableError("app2: cannot connect", host="app2")
    gone = build_report(SPLIT, split_facts(proxy1=drained, app2=down,
                                              db1={FleetFile(): record}), FREE)
    assert gone.headlines == (
        "app2: behind the fleet's release (last known on 1.0.0; deploy.rolling left the fleet"
        " on 1.1.0); `fab deploy.rolling --version 1.1.0 --yes` brings it up to date, then"
        " `fab app.undrain --host app2`",)
    # Drained and on the fleet's release: only "out of rotation", no headline.
    assert build_report(SPLIT, split_facts(proxy1=drained), FREE).headlines == ()


def test_rotation_comes_from_every_proxy():
    drained = split_facts(proxy1={ProxyText("/etc/nginx/releasy/upstream.conf"):
                                  upstream("10.9.0.22:8080")})
    report = build_report(SPLIT, drained, FREE)
    assert [h.app.in_rotation for h in report.hosts[1:3]] == [False, True]
    assert report.problems == ["app1: out of rotation (`fab app.undrain --host app1` puts it"
                               " back)"]
    assert " OUT " in render_table(report).splitlines()[2]
    # No proxy answer: unknown, not "out".
    blind = build_report(SPLIT, split_facts(proxy1=UnreachableError("proxy1: down")), FREE)
    assert [h.app.in_rotation for h in blind.hosts[1:3]] == [None, None]
    stranger = split_facts(proxy1={ProxyText("/etc/nginx/releasy/upstream.conf"):
                                   upstream("10.9.0.21:8080", "10.9.0.22:8080", "10.9.9.9:80")})
    assert build_report(SPLIT, stranger, FREE).problems == [
        "proxy1: the upstream lists servers that are no app host of the inventory: 10.9.9.9:80"
        " (`fab proxy.setup` takes them out)"]


def test_release_drift_nginx_database_firewall_and_disk_problems():
    found = split_facts(
        app1={StatusVersion("10.9.0.21:8080"): "1.0.0"},  # current says 1.1.0
        proxy1={ServiceActive("nginx"): False},
        db1={StatusPg("releasy"): (False, None), StatusDisk("/var/lib/postgresql"): (1, 95)},
        app2=ufw_facts(SPLIT, "app2", rules=fw.plan_rules(SPLIT)["app2"][:1]),
    )
    report = build_report(SPLIT, found, FREE)
    assert report.problems == [
        "proxy1: nginx is not running",
        "app1: runs 1.0.0 but current points at 1.1.0 (not restarted since the switch?)",
        "app2: the firewall differs from the plan: 1 planned rule(s) missing (`fab"
        " firewall.status` shows them, `fab firewall.apply` fixes them)",
        "db1: PostgreSQL does not answer",
        "db1: the file system of /var/lib/postgresql is 95% full",
    ]
    table = render_table(report)
    assert "1.0.0 (current 1.1.0)" in table and "postgres 15 DOWN" in table
    assert "DIFFERS" in table and "nginx INACTIVE" in table
    inactive = build_report(SPLIT, split_facts(db1=ufw_facts(SPLIT, "db1", active=False)),
                               FREE)
    assert inactive.problems == ["db1: the firewall is not active (run `fab firewall.apply`)"]


def test_a_rule_added_by_hand_is_shown_but_not_a_problem():
    facts = ufw_facts(SPLIT, "app1", extra=["ufw allow 8443/tcp comment 'by hand'"])
    report = build_report(SPLIT, split_facts(app1=facts), FREE)
    assert report.healthy, report.problems
    assert report.hosts[1].firewall.unmanaged == 1
    assert "ok (+1 by hand)" in render_table(report)
    # One of ours that the plan no longer has: apply would remove it, so it differs.
    stale = ufw_facts(SPLIT, "app1", extra=["ufw allow 9999/tcp comment 'releasy: old'"])
    report = build_report(SPLIT, split_facts(app1=stale), FREE)
    assert report.problems == ["app1: the firewall differs from the plan: 1 stale rule(s) of"
                               " ours (`fab firewall.status` shows them, `fab firewall.apply`"
                               " fixes them)"]


def test_the_lock_line():
    held = LockStatus("ana@laptop pid=4242 version=1.2.0 since 2026-11-26T08:00:00Z")
    text = render_table(build_report(SPLIT, split_facts(), held))
    assert "deploy lock: held by ana@laptop pid=4242 version=1.2.0" in text
    unknown = LockStatus(None, "db1: cannot connect")
    report = build_report(SPLIT, split_facts(), unknown)
    assert "deploy lock: unknown (db1: cannot connect)" in render_table(report)
    assert report.healthy  # the lock state itself is never a health problem
    assert report.to_json()["lock"] == {"held": False, "holder": None,
                                        "error": "db1: cannot connect"}


# ------------------------------------------------------------------------------ single host
def single_facts(live_port=8081, *, live_state="active", ready=True):
    found = {**ufw_facts(SINGLE, "solo"),
             ReleasyReleases(): releases("1.1.0", "1.0.0", "1.1.0"),
             ProxyText("/etc/nginx/releasy/upstream.conf"): upstream(f"127.0.0.1:{live_port}"),
             ServiceActive("nginx"): True, SELF_CERT: cert(300),
             FileStat("/etc/systemd/system/releasy@.service"): {"type": "regular file",
                                                                "owner": "root", "group": "root",
                                                                "mode": 0o644, "size": 900},
             FileStat("/var/lib/releasy/releasy.db"): {"type": "regular file", "owner": "releasy",
                                                       "group": "releasy", "mode": 0o600,
                                                       "size": 20480},
             SchemaLevel("sqlite", "/var/lib/releasy/releasy.db", "releasy"): 3,
             RecordedLevels(): {}, BackupListing(): [], FleetFile(): None,
             ReleasyUnit("releasy.service"): unit("inactive"),
             StatusExe("releasy.service"): None,
             StatusDisk("/opt/releasy"): (140 * 1024, 40),
             StatusDisk("/var/lib/releasy"): (60 * 1024, 40)}
    for port, version in ((8080, "1.0.0"), (8081, "1.1.0")):
        live = port == live_port
        bind = f"127.0.0.1:{port}"
        found.update({
            ReleasyUnit(f"releasy@{port}.service"): unit(live_state if live else "inactive",
                                                        pid=300 + port % 10),
            LinkTarget(f"/opt/releasy/instances/{port}"): f"/opt/releasy/releases/{version}",
            FileSha256(f"/etc/releasy/instance-{port}.env"): "b" * 64,
            Listening(port): live and live_state == "active",
            ReleasyReady(f"http://{bind}/ready"): live and ready,
            StatusVersion(bind): None,  # no /version: the link says which release
            StatusExe(f"releasy@{port}.service"): None,
        })
    assert set(found) == set(fact_names(SINGLE, SINGLE.hosts[0]))
    return {"solo": found}


def test_single_host_shows_the_live_blue_green_instance():
    report = build_report(SINGLE, single_facts(8081), FREE)
    assert report.healthy, report.problems
    solo = report.hosts[0]
    assert solo.app.unit == "releasy@8081.service" and solo.app.running == "1.1.0"
    assert solo.app.in_rotation is True and solo.app.main_pid == 301
    assert solo.db == DbStatus("sqlite", True, 20480)
    row = render_table(report).splitlines()[1]
    assert "in (releasy@8081)" in row and "releasy@8081 active pid 301" in row
    assert "nginx active" in row and "sqlite 20K" in row
    # The other instance live: it runs the release its link names (1.0.0), not `current`.
    other = build_report(SINGLE, single_facts(8080), FREE)
    assert other.hosts[0].app.unit == "releasy@8080.service"
    assert other.problems == ["solo: runs 1.0.0 but current points at 1.1.0 (not restarted"
                              " since the switch?)"]


def test_single_host_with_the_live_instance_down():
    report = build_report(SINGLE, single_facts(8081, live_state="failed", ready=False), FREE)
    assert report.problems[:2] == ["solo: releasy@8081.service is failed (dead), not active",
                                   "solo: /ready does not answer 200"]
    lost = single_facts()
    lost["solo"][ProxyText("/etc/nginx/releasy/upstream.conf")] = upstream("10.1.1.1:80")
    problems = build_report(SINGLE, lost, FREE).problems
    assert any("a blue/green deploy needs exactly one server" in p for p in problems)


def test_sizes_are_short():
    assert [_size(n) for n in (None, 0, 900, 2048, 70 * 1024, 8_000_000, 3 * 2**40)] == [
        "?", "0B", "900B", "2.0K", "70K", "7.6M", "3.0T"]


# ------------------------------------------------------------------------------ for real
def test_status_of_a_bare_machine_through_the_cli(sshd, tmp_path):
    """`fab status` against the loopback sshd (this machine: no Releasy, no nginx, no ufw
    as set up by us): every probe runs for real, nothing crashes, the row lists what is
    missing, the exit code is 1; `--json` is a parsable document."""
    if sshd.user != "root":
        pytest.skip("the probes need root (sudo is not installed here)")
    (tmp_path / "releases").mkdir()
    inv = tmp_path / "hosts.yaml"
    inv.write_text(f"""environment: unit
admin_cidrs: [127.0.0.1/32]
known_hosts: {sshd.known_hosts}
ssh: {{user: root, port: {sshd.port}, identity_file: {sshd.client_key}}}
hosts:
  solo: {{address: 127.0.0.1}}
tiers: {{proxy: [solo], app: [solo], db: [solo]}}
database: {{kind: sqlite}}
release: {{source: releases}}
tls: {{mode: self-signed, server_name: releasy.unit.test}}
""")
    env = {**os.environ, "RELEASY_INVENTORY": str(inv), "RELEASY_PROGRESS": "plain"}
    fab = [str(Path(sys.executable).parent / "fab"), "-r", str(ROOT / "fabfile"), "status"]
    proc = subprocess.run(fab, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0].split() == HEADERS and lines[1].split()[:3] == ["solo",
                                                                     "proxy,app,db", "ok"]
    assert "unit: UNHEALTHY" in lines and "  - solo: /ready does not answer 200" in lines
    doc = json.loads(subprocess.run([*fab, "--json"], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=60).stdout)
    assert doc["healthy"] is False and doc["hosts"][0]["reachable"] is True
    assert doc["hosts"][0]["app"]["ready"] is False


# ------------------------------------------------------------------------------ certificate
def test_certificate_issuer_and_days_show_and_under_14_days_is_unhealthy():
    report = build_report(SPLIT, split_facts(), FREE)
    proxy = report.hosts[0].proxy
    assert (proxy.cert_issuer, proxy.cert_days) == ("releasy.example.test", 299)
    assert "nginx active, cert releasy.example.test, 299 days" in render_table(report)
    soon = build_report(SPLIT, split_facts(proxy1={SELF_CERT: cert(13.5, "CN=Pebble CA 1a",
                                                                      False)}), FREE)
    assert soon.problems == ["proxy1: the TLS certificate expires in 13.5 days (from Pebble"
                             " CA 1a); renewal is not working"]
    gone = build_report(SPLIT, split_facts(proxy1={SELF_CERT: None}), FREE)
    assert gone.problems == ["proxy1: nginx has no TLS certificate (run `fab proxy.setup`)"]


def test_acme_mode_flags_the_bootstrap_certificate():
    import dataclasses
    acme = dataclasses.replace(SPLIT, tls=dataclasses.replace(SPLIT.tls, mode="acme"))
    facts = split_facts()
    facts["proxy1"] = {k: v for k, v in facts["proxy1"].items() if k != SELF_CERT}
    facts["proxy1"][CertInfo("/etc/nginx/releasy/tls/acme.crt")] = cert(300)
    report = build_report(acme, facts, FREE)
    assert report.problems == ["proxy1: still the bootstrap self-signed certificate: the ACME"
                               " CA has not issued one (run `fab proxy.setup`)"]


def test_each_hosts_release_and_postgresql_major_are_shown_and_an_unsupported_one_flagged():
    trixie = {"ID": "debian", "VERSION_ID": "13", "VERSION_CODENAME": "trixie"}
    found = split_facts(
        app1={OsRelease(): trixie},
        app2={OsRelease(): {"ID": "ubuntu", "VERSION_ID": "24.04",
                            "PRETTY_NAME": "Ubuntu 24.04.1 LTS"}},
        db1={OsRelease(): trixie, PgInstallation(): pg.parse_pg_host("cluster|17|main\n", 0)})
    report = build_report(SPLIT, found, FREE)
    assert [h.os for h in report.hosts] == ["Debian 12", "Debian 13", "Ubuntu 24.04.1 LTS",
                                            "Debian 13"]
    assert report.hosts[3].db.major == "17"
    assert report.problems == ["app2: runs Ubuntu 24.04.1 LTS: not supported (Debian 12 "
                               "(bookworm), Debian 13 (trixie))"]
    lines = render_table(report).splitlines()
    assert "postgres 17 up" in lines[4] and "Ubuntu 24.04.1 LTS" in lines[3]
    doc = report.to_json()
    assert doc["hosts"][3]["os"] == "Debian 13" and doc["hosts"][3]["db"]["major"] == "17"
