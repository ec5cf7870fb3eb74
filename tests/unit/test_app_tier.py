"""App tier builders: table-driven data tests, and the remote shell scripts run for real with
the local `sh` against temp directories (same scripts, paths substituted)."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import shlex
import subprocess
import tarfile
import threading
from pathlib import Path
from types import MappingProxyType

import pytest

from releasy_deploy.commands import app as cmd
from releasy_deploy.commands import systemd
from releasy_deploy.inventory import parse_inventory
from releasy_deploy.secrets import Secrets

SECRET_KEY = "adm 'in' \"key\" $HOME `id` \\x é"
PEPPER = "pepper-Zq9-secret"
SQLITE_URL = "sqlite:///var/lib/releasy/releasy.db"


# ------------------------------------------------------------------------------ inventories
def make_inventory(tmp: Path, *, single: bool = True, app: dict | None = None,
                   private: str = "10.0.0.21"):
    (tmp / "known_hosts").write_text("# test\n")
    (tmp / "releases").mkdir(exist_ok=True)
    if single:
        hosts = {"solo": {"address": "192.0.2.5"}}
        tiers = {"proxy": ["solo"], "app": ["solo"], "db": ["solo"]}
        database = {"kind": "sqlite"}
    else:
        hosts = {"proxy1": {"address": "198.51.100.10", "private_address": "10.0.0.10"},
                 "app1": {"address": "198.51.100.21", "private_address": private},
                 "db1": {"address": "198.51.100.30", "private_address": "10.0.0.30"}}
        tiers = {"proxy": ["proxy1"], "app": ["app1"], "db": ["db1"]}
        database = {"kind": "postgres"}
    data = {
        "environment": "test", "admin_cidrs": ["192.0.2.0/28"], "known_hosts": "known_hosts",
        "hosts": hosts, "tiers": tiers, "database": database,
        "release": {"source": "releases"},
        "tls": {"mode": "self-signed", "server_name": "releasy.test"},
    }
    if app:
        data["app"] = app
    return parse_inventory(data, tmp / "hosts.yaml")


def secrets(**values: str) -> Secrets:
    return Secrets(MappingProxyType(values))


# ------------------------------------------------------------------------------ env quoting
@pytest.mark.parametrize("value, quoted", [
    ("plain", '"plain"'),
    ("", '""'),
    ("with spaces  inside", '"with spaces  inside"'),
    (" lead and trail ", '" lead and trail "'),
    ('say "hi"', r'"say \"hi\""'),
    ("it's", '"it\'s"'),
    ("$HOME ${X}", r'"\$HOME \${X}"'),
    ("`id`", r'"\`id\`"'),
    ("back\\slash\\", r'"back\\slash\\"'),
    ("# not a comment ; nor this", '"# not a comment ; nor this"'),
    ("héllo wörld €", '"héllo wörld €"'),
    ("postgres://u:p%40ss@10.0.0.30:5432/releasy?sslmode=disable",
     '"postgres://u:p%40ss@10.0.0.30:5432/releasy?sslmode=disable"'),
])
def test_env_values_are_double_quoted_with_four_escapes(value, quoted):
    assert systemd.quote_env_value(value) == quoted


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b", "\ufeffbom", "x\uffff"])
def test_env_values_that_systemd_cannot_hold_are_refused_without_echoing(value):
    with pytest.raises(ValueError) as exc:
        systemd.env_assignment("RELEASY_ADMIN_API_KEY", value)
    assert "RELEASY_ADMIN_API_KEY" in str(exc.value)
    assert value not in str(exc.value)


@pytest.mark.parametrize("name", ["1X", "A-B", "A B", "", "A=B"])
def test_env_names_are_checked(name):
    with pytest.raises(ValueError, match="invalid environment variable name"):
        systemd.env_assignment(name, "v")


# ------------------------------------------------------------------------------ env file
def test_env_variables_single_host_sqlite(tmp_path):
    inv = make_inventory(tmp_path)
    host = inv.host("solo")
    got = cmd.env_variables(inv, host, secrets(admin_api_key=SECRET_KEY, api_key_pepper=PEPPER),
                            SQLITE_URL)
    assert got == [
        ("RELEASY_BIND_ADDR", "127.0.0.1:8080"),
        ("RELEASY_DATABASE_URL", "sqlite:///var/lib/releasy/releasy.db"),
        ("RELEASY_DATABASE_MAX_CONNECTIONS", "5"),
        ("RELEASY_LOG_LEVEL", "info"),
        ("RELEASY_DOWNLOAD_TOKEN_TTL_SECONDS", "600"),
        # Not upstream's loopback default: links must work for clients of the proxy.
        ("RELEASY_PUBLIC_BASE_URL", "https://releasy.test"),
        ("RELEASY_ADMIN_API_KEY", SECRET_KEY),
        ("RELEASY_API_KEY_PEPPER", PEPPER),
    ]


def test_env_variables_split_with_every_optional_setting(tmp_path):
    inv = make_inventory(tmp_path, single=False, app={
        "bind_port": 9000, "log_level": "debug", "public_base_url": "https://releasy.example.com",
        "database_max_connections": 20, "download_token_ttl_seconds": 120,
        "operator_jwt": {"jwks_url": "https://id.example.com/jwks.json", "issuer": "https://id.example.com/",
                         "audience": "releasy", "resource": "https://releasy.example.com"},
        "artifact_storage": {"bucket": "artifacts", "region": "eu-central-1",
                             "endpoint": "https://s3.example.com", "path_style": True},
    })
    got = dict(cmd.env_variables(inv, inv.host("app1"), secrets(
        artifact_access_key="AKIA", artifact_secret_key="s3cr3t/key+"), "postgres://x"))
    assert got == {
        "RELEASY_BIND_ADDR": "10.0.0.21:9000",
        "RELEASY_DATABASE_URL": "postgres://x",
        "RELEASY_DATABASE_MAX_CONNECTIONS": "20",
        "RELEASY_LOG_LEVEL": "debug",
        "RELEASY_DOWNLOAD_TOKEN_TTL_SECONDS": "120",
        "RELEASY_PUBLIC_BASE_URL": "https://releasy.example.com",
        "RELEASY_OPERATOR_JWKS_URL": "https://id.example.com/jwks.json",
        "RELEASY_OPERATOR_ISSUER": "https://id.example.com/",
        "RELEASY_OPERATOR_AUDIENCE": "releasy",
        "RELEASY_OPERATOR_RESOURCE": "https://releasy.example.com",
        "RELEASY_OPERATOR_JWKS_TTL_SECONDS": "300",
        "RELEASY_OPERATOR_JWT_LEEWAY_SECONDS": "0",
        "RELEASY_ARTIFACT_BUCKET": "artifacts",
        "RELEASY_ARTIFACT_REGION": "eu-central-1",
        "RELEASY_ARTIFACT_ENDPOINT": "https://s3.example.com",
        "RELEASY_ARTIFACT_PATH_STYLE": "true",
        "RELEASY_ARTIFACT_PRESIGN_EXPIRES_SECONDS": "900",
        "RELEASY_ARTIFACT_ACCESS_KEY": "AKIA",
        "RELEASY_ARTIFACT_SECRET_KEY": "s3cr3t/key+",
    }


def test_rendered_env_file(tmp_path):
    inv = make_inventory(tmp_path)
    text = cmd.render_env_file(cmd.env_variables(
        inv, inv.host("solo"), secrets(admin_api_key=SECRET_KEY), SQLITE_URL), "releasy")
    lines = text.splitlines()
    assert all(line.startswith("# ") for line in lines[:3])
    assert "root:releasy 0640" in lines[2]
    assert lines[3:] == [
        'RELEASY_BIND_ADDR="127.0.0.1:8080"',
        'RELEASY_DATABASE_URL="sqlite:///var/lib/releasy/releasy.db"',
        'RELEASY_DATABASE_MAX_CONNECTIONS="5"',
        'RELEASY_LOG_LEVEL="info"',
        'RELEASY_DOWNLOAD_TOKEN_TTL_SECONDS="600"',
        'RELEASY_PUBLIC_BASE_URL="https://releasy.test"',
        'RELEASY_ADMIN_API_KEY="adm \'in\' \\"key\\" \\$HOME \\`id\\` \\\\x é"',
    ]
    assert text.endswith('é"\n') and "\n\n" not in text


def test_env_file_refuses_a_variable_twice():
    with pytest.raises(ValueError, match="RELEASY_LOG_LEVEL is set twice"):
        cmd.render_env_file([("RELEASY_LOG_LEVEL", "info"), ("RELEASY_LOG_LEVEL", "debug")], "g")


# ------------------------------------------------------------------------------ masked diffs
OLD_ENV = """# header
RELEASY_BIND_ADDR="127.0.0.1:8080"
RELEASY_DATABASE_URL="postgres://releasy:OldPw%21@10.0.0.30:5432/releasy"
RELEASY_LOG_LEVEL="info"
RELEASY_ADMIN_API_KEY="old-admin-key-value"
RELEASY_API_KEY_PEPPER="same-pepper-value"
stray line from a hand edit
"""
NEW_ENV = """# header
RELEASY_BIND_ADDR="127.0.0.1:8080"
RELEASY_DATABASE_URL="postgres://releasy:NewPw%21@10.0.0.30:5432/releasy"
RELEASY_LOG_LEVEL="debug"
RELEASY_ADMIN_API_KEY="new-admin-key-value"
RELEASY_API_KEY_PEPPER="same-pepper-value"
"""


def test_redacted_env_texts_hide_secrets_by_name_but_show_that_they_changed():
    old, new = cmd.redact_env_texts(OLD_ENV, NEW_ENV)
    for text in (old, new):
        for secret in ("old-admin-key-value", "new-admin-key-value", "same-pepper-value",
                       "OldPw", "NewPw", "hand edit"):
            assert secret not in text
    assert old.splitlines() == [
        "# header",
        'RELEASY_BIND_ADDR="127.0.0.1:8080"',
        'RELEASY_DATABASE_URL="postgres://releasy:****@10.0.0.30:5432/releasy"  (old value, not shown)',
        'RELEASY_LOG_LEVEL="info"',
        "RELEASY_ADMIN_API_KEY=****  (old value, not shown)",
        "RELEASY_API_KEY_PEPPER=****",
        "(line not shown)",
    ]
    assert new.splitlines()[2:6] == [
        'RELEASY_DATABASE_URL="postgres://releasy:****@10.0.0.30:5432/releasy"  (new value, not shown)',
        'RELEASY_LOG_LEVEL="debug"',
        "RELEASY_ADMIN_API_KEY=****  (new value, not shown)",
        "RELEASY_API_KEY_PEPPER=****",
    ]


def test_redacted_env_texts_of_a_new_file_and_password_query_parameter():
    old, new = cmd.redact_env_texts("", 'RELEASY_DATABASE_URL="postgres://h/db?user=u&password=pw1"\n')
    assert old == ""
    assert new == 'RELEASY_DATABASE_URL="postgres://h/db?user=u&password=****"\n'


# ------------------------------------------------------------------------------ addresses
def test_bind_address_single_host_is_loopback(tmp_path):
    inv = make_inventory(tmp_path, app={"bind_port": 9090})
    assert cmd.bind_address(inv, inv.host("solo")) == "127.0.0.1:9090"
    assert cmd.ready_url("127.0.0.1:9090") == "http://127.0.0.1:9090/ready"


def test_bind_address_split_is_the_private_address(tmp_path):
    inv = make_inventory(tmp_path, single=False)
    assert cmd.bind_address(inv, inv.host("app1")) == "10.0.0.21:8080"


def test_bind_address_ipv6_is_bracketed(tmp_path):
    inv = make_inventory(tmp_path, single=False, private="fd00::21")
    assert cmd.bind_address(inv, inv.host("app1")) == "[fd00::21]:8080"


# ------------------------------------------------------------------------------ account
@pytest.mark.parametrize("account, expected", [
    (cmd.Account(uid=10001, group="releasy", shell="/usr/sbin/nologin"), []),
    (cmd.Account(), [
        ["groupadd", "--system", "--gid", "10001", "releasy"],
        ["useradd", "--system", "--uid", "10001", "--gid", "releasy", "--no-create-home",
         "--home-dir", "/var/lib/releasy", "--shell", "/usr/sbin/nologin", "--comment",
         "Releasy server", "releasy"]]),
    (cmd.Account(uid_taken=True, gid_taken=True), [
        ["groupadd", "--system", "releasy"],
        ["useradd", "--system", "--gid", "releasy", "--no-create-home", "--home-dir",
         "/var/lib/releasy", "--shell", "/usr/sbin/nologin", "--comment", "Releasy server",
         "releasy"]]),
    (cmd.Account(group_exists=True), [
        ["useradd", "--system", "--uid", "10001", "--gid", "releasy", "--no-create-home",
         "--home-dir", "/var/lib/releasy", "--shell", "/usr/sbin/nologin", "--comment",
         "Releasy server", "releasy"]]),
])
def test_account_commands(account, expected):
    assert cmd.account_commands("releasy", account) == expected


@pytest.mark.parametrize("out, expected", [
    # the account exists with upstream's uid/gid: getent prints its entries once per key
    ("releasy:x:10001:10001:Releasy server:/var/lib/releasy:/usr/sbin/nologin\n" * 2
     + "@group\n" + "releasy:x:10001:\n" * 3,
     cmd.Account(10001, "releasy", "/usr/sbin/nologin", True, True, True)),
    # another user holds 10001; the group of that name exists with another gid
    ("releasy:x:998:996::/var/lib/releasy:/bin/false\nother:x:10001:10001::/:/bin/sh\n"
     "@group\nreleasy:x:995:\nother:x:10001:\nsvc:x:996:\n",
     cmd.Account(998, "svc", "/bin/false", True, True, True)),
    # the user's primary gid has no group entry: no group name (as `id -gn` fails)
    ("releasy:x:998:4242::/:/bin/false\n@group\n",
     cmd.Account(998, None, "/bin/false", False, False, False)),
    ("\n@group\n", cmd.Account()),
    ("", cmd.Account()),
])
def test_parse_account(out, expected):
    assert cmd.parse_account(out, "releasy") == expected


def test_the_account_probe_runs_in_a_real_shell():
    """The probe itself, under sh, for this machine's root (it exists, group root) and a
    name nobody has; a name with a space stays one word."""
    def probe(name: str) -> cmd.Account:
        res = subprocess.run(["sh", "-c", cmd.account_probe(name)], capture_output=True,
                             text=True, check=False)
        return cmd.parse_account(res.stdout, name)
    root = probe("root")
    assert (root.uid, root.group, root.group_exists) == (0, "root", True)
    assert not probe("no-such-user-releasy").exists
    assert not probe("a b").exists
    assert "'a b'" in cmd.account_probe("a b")


# ------------------------------------------------------------------------------ units
def test_rendered_units(tmp_path):
    units = cmd.render_units("svc", "svcgroup")
    service, template = units["releasy.service"], units["releasy@.service"]
    for text in (service, template):
        lines = text.splitlines()
        for directive in ("User=svc", "Group=svcgroup", "NoNewPrivileges=yes",
                          "ProtectSystem=strict", "ReadWritePaths=/var/lib/releasy",
                          "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
                          "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
                          "RestrictSUIDSGID=yes", "LockPersonality=yes", "CapabilityBoundingSet=",
                          "Restart=on-failure", "RestartSec=2", "TimeoutStopSec=30",
                          "LimitNOFILE=65536", "WantedBy=multi-user.target",
                          "EnvironmentFile=/etc/releasy/releasy.env"):
            assert directive in lines, directive
        assert "{{" not in text and "{%" not in text and "\n\n\n" not in text
    assert "ExecStart=/opt/releasy/current/releasy-server" in service.splitlines()
    tlines = template.splitlines()
    assert "ExecStart=/opt/releasy/instances/%i/releasy-server" in tlines
    # the instance file comes after the shared one, so its RELEASY_BIND_ADDR wins
    assert tlines.index("EnvironmentFile=/etc/releasy/instance-%i.env") > tlines.index(
        "EnvironmentFile=/etc/releasy/releasy.env")


def _unit(exec_start: str, extra: str = "") -> str:
    return f"[Unit]\nDescription=t\n[Service]\nExecStart={exec_start}\n{extra}"


def _install(tmp_path: Path, units: dict[str, str]) -> subprocess.CompletedProcess:
    dirs = {k: tmp_path / k for k in ("system", "staging", "instances")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    script = cmd.install_units_script(
        units, probe_target="/bin", unit_dir=str(dirs["system"]),
        staging_parent=str(dirs["staging"]), instances_dir=str(dirs["instances"]))
    return subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the script chowns to root:root")
def test_install_units_script_verifies_then_installs(tmp_path):
    units = {"t.service": _unit("/bin/true"), "t@.service": _unit(f"{tmp_path}/instances/%i/true")}
    proc = _install(tmp_path, units)
    assert proc.returncode == 0, proc.stderr
    for name, content in units.items():
        installed = tmp_path / "system" / name
        assert installed.read_text() == content
        assert oct(installed.stat().st_mode & 0o777) == "0o644"
    # no leftovers: staging dir and the throwaway verify instance are gone
    assert list((tmp_path / "staging").iterdir()) == []
    assert list((tmp_path / "instances").iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the script chowns to root:root")
@pytest.mark.parametrize("bad, fragment", [
    (_unit("/bin/true", "Bogus=1\n"), "Unknown key 'Bogus'"),  # systemd only warns: exit 0
    (_unit("/bin/true", "ProtectSystem=sideways\n"), "protect system value"),
    (_unit("/nonexistent/releasy-server"), "is not executable"),
])
def test_install_units_script_refuses_a_unit_that_does_not_verify(tmp_path, bad, fragment):
    proc = _install(tmp_path, {"t.service": _unit("/bin/true"), "u.service": bad})
    assert proc.returncode == 3
    assert fragment in proc.stderr
    assert list((tmp_path / "system").iterdir()) == []  # nothing installed, not even t.service
    assert list((tmp_path / "staging").iterdir()) == []


# ------------------------------------------------------------------------------ releases
def test_version_ordering():
    versions = ["1.10.0", "1.2.0", "1.2.0-rc.1", "1.2.0-rc.10", "1.2.0-rc.2", "0.9.9",
                "1.2.0-broken"]
    assert sorted(versions, key=cmd.version_key) == [
        "0.9.9", "1.2.0-broken", "1.2.0-rc.1", "1.2.0-rc.2", "1.2.0-rc.10", "1.2.0", "1.10.0"]


SUM_A, SUM_B = "a" * 64, "b" * 64


def test_parse_releases_and_state():
    state = cmd.parse_releases(
        f"current releases/1.1.0\nrelease 1.0.0 {SUM_A} yes\nrelease 1.1.0 {SUM_B} yes\n"
        f"release 1.2.0 - yes\nrelease 1.3.0 {SUM_A} no\nrelease junk {SUM_A} yes\n")
    assert state.current == "1.1.0"
    assert state.installed() == ["1.0.0", "1.1.0"]
    assert state.holds("1.0.0", SUM_A) and not state.holds("1.0.0", SUM_B)
    assert not state.holds("1.2.0", SUM_A) and not state.holds("1.3.0", SUM_A)
    assert cmd.parse_releases("").current is None
    assert cmd.ReleaseState("/opt/releasy/releases/2.0.0").current == "2.0.0"
    assert cmd.ReleaseState("/somewhere/else").current is None


def _tarball(data: bytes) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("releasy-server")
        info.size, info.mode = len(data), 0o600
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _sh(script: str, root: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Run one of the remote scripts locally, with /opt/releasy moved under ``root``."""
    return subprocess.run(["sh", "-c", script.replace("/opt/releasy", str(root)), "test", *args],
                          input=stdin, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the stage script chowns to root:root")
def test_stage_activate_and_probe_scripts_against_a_real_tree(tmp_path):
    root = tmp_path / "opt-releasy"
    (root / "releases").mkdir(parents=True)
    assert cmd.parse_releases(_sh(cmd.RELEASES_PROBE, root).stdout.decode()) == cmd.ReleaseState()

    good = _tarball(b"#!/bin/sh\necho releasy\n")
    digest = hashlib.sha256(good).hexdigest()
    # a corrupted transfer is refused and leaves nothing behind
    bad = _sh(cmd.STAGE_SCRIPT, root, "1.0.0", digest, stdin=good[:-3])
    assert bad.returncode == 3 and b"expected " + digest.encode() in bad.stderr
    assert list((root / "releases").iterdir()) == []

    ok = _sh(cmd.STAGE_SCRIPT, root, "1.0.0", digest, stdin=good)
    assert ok.returncode == 0, ok.stderr
    release = root / "releases" / "1.0.0"
    assert sorted(p.name for p in release.iterdir()) == [".sha256", "releasy-server"]
    assert (release / ".sha256").read_text() == digest + "\n"
    assert oct((release / "releasy-server").stat().st_mode & 0o777) == "0o755"
    assert list((root / "releases").iterdir()) == [release]  # no staging dir left

    # a half-written copy (no marker) is replaced whole
    (root / "releases" / "1.1.0").mkdir()
    (root / "releases" / "1.1.0" / "junk").write_text("x")
    assert _sh(cmd.STAGE_SCRIPT, root, "1.1.0", digest, stdin=good).returncode == 0
    assert sorted(p.name for p in (root / "releases" / "1.1.0").iterdir()) == [
        ".sha256", "releasy-server"]

    # activation refuses what is not staged, then switches atomically with a relative link
    nope = _sh(cmd.ACTIVATE_SCRIPT, root, "9.9.9")
    assert nope.returncode == 3 and b"not installed" in nope.stderr
    assert not (root / "current").exists()
    assert _sh(cmd.ACTIVATE_SCRIPT, root, "1.0.0").returncode == 0
    assert os.readlink(root / "current") == "releases/1.0.0"
    assert _sh(cmd.ACTIVATE_SCRIPT, root, "1.1.0").returncode == 0
    assert os.readlink(root / "current") == "releases/1.1.0"
    assert not (root / "current.tmp").exists()

    state = cmd.parse_releases(_sh(cmd.RELEASES_PROBE, root).stdout.decode())
    assert state.current == "1.1.0" and state.installed() == ["1.0.0", "1.1.0"]
    assert state.holds("1.0.0", digest)


def test_release_argv_builders_validate_their_input():
    assert cmd.stage_argv("1.2.3-rc.1", SUM_A)[3:] == ["releasy-stage", "1.2.3-rc.1", SUM_A]
    assert cmd.activate_argv("1.2.3")[3:] == ["releasy-activate", "1.2.3"]
    for bad in ("1.2", "1.2.3; rm -rf /", "../x"):
        with pytest.raises(ValueError):
            cmd.stage_argv(bad, SUM_A)
        with pytest.raises(ValueError):
            cmd.activate_argv(bad)
    with pytest.raises(ValueError):
        cmd.stage_argv("1.2.3", "A" * 64)


# ------------------------------------------------------------------------------ readiness
class _Ready:
    def __init__(self, status: int) -> None:
        outer = self
        self.status = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(outer.status if self.path == "/ready" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.bind = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status, code, said", [(200, 0, ""), (503, 3, "503")])
def test_ready_script_against_a_real_http_server(status, code, said):
    server = _Ready(status)
    try:
        proc = subprocess.run(cmd.wait_ready_argv(server.bind, "releasy.service", 1),
                              capture_output=True, text=True, timeout=30)
    finally:
        server.close()
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert said in proc.stdout


def test_wait_ready_argv():
    argv = cmd.wait_ready_argv("[fd00::1]:8080", "releasy@8081.service", 60)
    assert argv[3:] == ["releasy-ready", "http://[fd00::1]:8080/ready", "releasy@8081.service", "60"]
    with pytest.raises(ValueError):
        cmd.wait_ready_argv("127.0.0.1:8080", "releasy.service", 0)
    with pytest.raises(ValueError):
        cmd.wait_ready_argv("127.0.0.1:8080", "releasy.service; reboot", 5)


# ------------------------------------------------------------------------------ service plan
def show(**props: str) -> dict[str, str]:
    base = {"LoadState": "loaded", "ActiveState": "active", "UnitFileState": "enabled",
            "NeedDaemonReload": "no", "MainPID": "42"}
    return {**base, **props}


RELOAD = ("systemctl", "daemon-reload")
ENABLE = ("systemctl", "enable", "releasy.service")
RESET = ("systemctl", "reset-failed", "releasy.service")
RESTART = ("systemctl", "restart", "releasy.service")


@pytest.mark.parametrize("props, units_changed, reasons, commands, start", [
    (show(), False, [], (), None),  # converged: nothing at all
    # every deliberate (re)start resets the start-rate counter first
    (show(), False, ["env file changed"], (RESET, RESTART), "restarted (env file changed)"),
    (show(), True, [], (RELOAD,), None),  # template changed only: reload, no restart
    (show(NeedDaemonReload="yes"), False, [], (RELOAD,), None),
    ({"LoadState": "not-found", "ActiveState": "inactive", "UnitFileState": ""}, True,
     ["switched to 1.0.0"], (RELOAD, ENABLE, RESET, RESTART),
     "started (was inactive; switched to 1.0.0)"),
    (show(ActiveState="failed"), False, [], (RESET, RESTART), "started (was failed)"),
    (show(ActiveState="activating"), False, [], (RESET, RESTART), "restarted (was activating)"),
    (show(UnitFileState="disabled"), False, [], (ENABLE,), None),
])
def test_service_plan(props, units_changed, reasons, commands, start):
    plan = cmd.service_plan(props, units_changed=units_changed, reasons=reasons)
    assert plan.commands == commands
    assert plan.start == start


# ------------------------------------------------------------------------------ misc builders
def test_script_of_quotes_every_word():
    script = cmd.script_of([["useradd", "--comment", "Releasy server", "r"],
                            ["echo", "it's \"x\" $HOME é"]])
    lines = script.splitlines()
    assert lines[0] == "set -e"
    assert shlex.split(lines[1]) == ["useradd", "--comment", "Releasy server", "r"]
    assert shlex.split(lines[2]) == ["echo", "it's \"x\" $HOME é"]
    out = subprocess.run(["sh", "-c", lines[2]], capture_output=True, text=True).stdout
    assert out == "it's \"x\" $HOME é\n"


@pytest.mark.parametrize("url, path", [
    ("sqlite:///var/lib/releasy/releasy.db", "/var/lib/releasy/releasy.db"),
    ("sqlite:/var/lib/releasy/x.db?mode=rwc", "/var/lib/releasy/x.db"),
    ("sqlite::memory:", None),
    ("postgres://u:p@h/db", None),
])
def test_sqlite_path(url, path):
    assert cmd.sqlite_path(url) == path


def test_sqlite_location_agrees_with_the_db_tier():
    from releasy_deploy.commands import postgres as pg
    assert cmd.SQLITE_URL == pg.SQLITE_URL == SQLITE_URL
    assert cmd.sqlite_path(cmd.SQLITE_URL).startswith(cmd.DATA_DIR + "/")


def test_database_password_is_found_for_masking():
    assert cmd.database_password("postgres://releasy:p%40ss%20w@10.0.0.30:5432/releasy") == "p@ss w"
    assert cmd.database_password("sqlite:///var/lib/releasy/releasy.db") is None


def test_systemd_argv_builders():
    assert systemd.journal_argv("releasy.service") == [
        "journalctl", "--unit", "releasy.service", "--lines", "30", "--no-pager", "--output",
        "short-iso", "--quiet"]
    assert systemd.systemctl("restart", "releasy@8081.service") == [
        "systemctl", "restart", "releasy@8081.service"]
    assert systemd.show_argv("releasy.service")[:3] == [
        "systemctl", "show", "--property=LoadState,ActiveState,SubState,UnitFileState,MainPID,"
        "NeedDaemonReload,Result"]
    for bad in ("releasy", "a b.service", "x.service;reboot", "-x.service"[1:] + " "):
        with pytest.raises(ValueError):
            systemd.check_unit(bad)
    with pytest.raises(ValueError):
        systemd.systemctl("mask", "releasy.service")
    with pytest.raises(ValueError):
        systemd.journal_argv("releasy.service", 0)
    assert systemd.parse_show("ActiveState=active\nMainPID=12\nbogus\n") == {
        "ActiveState": "active", "MainPID": "12"}
