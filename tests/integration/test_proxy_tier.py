"""`fab proxy.setup` on the real lab (split topology): nginx serves HTTPS and redirects HTTP,
a second run changes and reloads nothing, a broken template is refused by nginx -t while
the old configuration keeps serving, and the rollout API (set_upstreams, wait for old
workers) moves real traffic.

The app tier is not this module's: stand-in Releasy servers (SQLite) are started on app1
and app2 by hand with `systemd-run`, and a tiny "hold" server on app1 keeps one request in
flight for the old-workers test.
"""
from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import tarfile
from contextlib import contextmanager

import pytest

from lab import lab as lab_ops
from releasy_deploy.cli import BadInput, session
from releasy_deploy.commands.nginx import self_signed_argv
from releasy_deploy.tiers import proxy, proxy_render, proxy_setup
from tests.integration.labtools import ROOT, via_proxy, wait_until

pytestmark = pytest.mark.lab

PORT = 8080
HOLD_PORT = 9000
SITE = "/etc/nginx/sites-available/releasy.conf"
UPSTREAM = "/etc/nginx/releasy/upstream.conf"

HOLD_SERVER = r'''
import http.server, os, sys, time
class Hold(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        open("/run/hold-arrived", "w").close()
        while not os.path.exists("/run/hold-release"):
            time.sleep(0.05)
        body = b"released\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Hold).serve_forever()
'''


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def address(lab, host: str) -> str:
    return lab.ident.address({"proxy1": 10, "app1": 21, "app2": 22}[host])


def ssh(lab, host: str, command: str, *, input: bytes | None = None, check: bool = True,
        sudo: bool = False) -> subprocess.CompletedProcess:
    """One shell command line on a lab host (app2 logs in as `deploy`: sudo for root)."""
    if sudo:
        command = f"sudo -n sh -c {shlex.quote(command)}"
    proc = subprocess.run([*lab_ops.ssh_base(lab.ident), host, command], input=input,
                          capture_output=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"ssh {host} {command!r}: exit {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def out(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.decode(errors="replace").strip()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          text=True, timeout=60)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def nginx_processes(lab) -> tuple[str, set[str]]:
    """(master PID, PIDs of workers serving new connections)."""
    text = out(ssh(lab, "proxy1", 'm=$(systemctl show -p MainPID --value nginx); echo "$m";'
                                  ' ps -o pid=,args= --ppid "$m"'))
    master, *rows = text.splitlines()
    workers = {r.split(None, 1)[0] for r in rows if r.split(None, 1)[1].strip()
               == "nginx: worker process"}
    return master, workers


def sha(lab, path: str) -> str:
    return out(ssh(lab, "proxy1", f"sha256sum {shlex.quote(path)}")).split()[0]


def standin_binary(lab) -> bytes:
    tarball = lab.releases / "releasy-server-1.0.0-linux-x86_64.tar.gz"
    with tarfile.open(tarball) as tf:
        return tf.extractfile("releasy-server").read()


def start_standin(lab, host: str, binary: bytes) -> None:
    sudo = host == "app2"
    ssh(lab, host, "cat > /usr/local/bin/releasy-standin && chmod 755 /usr/local/bin/releasy-standin",
        input=binary, sudo=sudo)
    argv = ["systemd-run", "--unit", "proxytest-standin", "--collect",
            "--setenv", f"RELEASY_BIND_ADDR={address(lab, host)}:{PORT}",
            "--setenv", "RELEASY_DATABASE_URL=sqlite:///var/tmp/proxytest.db?mode=rwc",
            "/usr/local/bin/releasy-standin"]
    ssh(lab, host, shlex.join(argv), sudo=sudo)


@contextmanager
def lab_session_env(lab):
    """An in-process operator session against the lab (for the rollout API)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RELEASY_INVENTORY", str(lab.inventory))
    try:
        with session() as s:
            yield s
    finally:
        mp.undo()


def hosts_answering(lab, requests: int = 8) -> set[str]:
    seen = set()
    for _ in range(requests):
        code, body = via_proxy(address(lab, "proxy1"), "/version", timeout=20)
        assert code == 200, (code, body)
        seen.add(json.loads(body)["host"])
    return seen


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(lab_session):
    # The dry-run test needs a proxy that was never provisioned, and the stand-ins need
    # port 8080 free on the app hosts: a fresh lab only if an earlier module set them up.
    return lab_session.pristine("split", 2, untouched={
        "proxy1": ("/etc/nginx",), "app1": ("/opt/releasy",), "app2": ("/opt/releasy",)})


@pytest.fixture(scope="module")
def apps_running(lab):
    binary = standin_binary(lab)
    for host in ("app1", "app2"):
        start_standin(lab, host, binary)
    for host in ("app1", "app2"):
        wait_until(lambda h=host: port_open(address(lab, h), PORT), f"stand-in on {host}")
    yield
    for host in ("app1", "app2"):
        ssh(lab, host, "systemctl stop proxytest-standin", check=False, sudo=host == "app2")


# --------------------------------------------------------------------------------------
# tests (in order: they share the module's lab)
# --------------------------------------------------------------------------------------
def test_dry_run_on_a_fresh_lab_shows_diffs_and_touches_nothing(lab):
    proc = lab.fab("proxy.setup", "--dry-run")
    text = proc.stdout
    assert "would change: packages: install nginx" in text
    assert f"+++ {SITE} (new)" in text
    assert "+        return 308 https://$host$request_uri;" in text
    assert f"+    server {address(lab, 'app1')}:{PORT} max_fails=1 fail_timeout=10s;" in text
    assert f"+    server {address(lab, 'app2')}:{PORT} max_fails=1 fail_timeout=10s;" in text
    assert " 0 changed / " in text
    state = out(ssh(lab, "proxy1", "dpkg-query -W -f='${db:Status-Abbrev}' nginx 2>/dev/null;"
                                   " ls /etc/nginx 2>&1; ls /etc/nginx/releasy 2>&1",
                    check=False))
    assert "ii" not in state
    assert "No such file" in state  # neither /etc/nginx nor our directory exists


def test_setup_serves_https_redirects_http_and_disables_the_default_site(lab, apps_running,
                                                                         tmp_path):
    proc = lab.fab("proxy.setup")
    assert "changed: nginx reloaded" in proc.stdout or "changed: nginx started" in proc.stdout

    assert hosts_answering(lab) == {"app1", "app2"}  # round robin over both app hosts

    redirect = curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                    f"http://{address(lab, 'proxy1')}/api/x?y=1")
    assert redirect.stdout == f"308 https://{address(lab, 'proxy1')}/api/x?y=1"

    # The self-signed certificate verifies for the inventory's server name.
    cert = tmp_path / "served.crt"
    cert.write_bytes(ssh(lab, "proxy1", "cat /etc/nginx/releasy/tls/self-signed.crt").stdout)
    verified = curl("--cacert", str(cert), "--resolve",
                    f"releasy.lab.test:443:{address(lab, 'proxy1')}", "-D", "-",
                    "-o", "/dev/null", "https://releasy.lab.test/live")
    assert verified.returncode == 0, verified.stderr
    assert "Server: nginx\n" in verified.stdout  # server_tokens off: no version

    files = out(ssh(lab, "proxy1", "stat -c '%n %a %U' /etc/nginx/releasy/tls/self-signed.key;"
                                   " ls /etc/nginx/sites-enabled; systemctl is-enabled nginx"))
    assert files.splitlines() == ["/etc/nginx/releasy/tls/self-signed.key 600 root",
                                  "releasy.conf", "enabled"]


def test_second_run_changes_nothing_and_does_not_reload(lab, apps_running):
    before = nginx_processes(lab)
    proc = lab.fab("proxy.setup")
    assert "proxy1  0 changed / " in proc.stdout
    assert "changed:" not in proc.stdout
    assert nginx_processes(lab) == before  # same master, same workers: no reload

    with lab_session_env(lab) as s:
        proxy_setup.setup(s)
        assert s.executor.round_trips["proxy1"] == 1  # one facts probe, nothing else
    assert nginx_processes(lab) == before


def test_broken_template_is_refused_and_the_old_config_keeps_serving(lab, apps_running, tmp_path):
    shutil.copytree(ROOT / "files" / "nginx", tmp_path / "nginx")
    site = tmp_path / "nginx" / "releasy-site.conf.j2"
    site.write_text(site.read_text().replace("server_tokens off;",
                                             "server_tokens off;\n    bogus_directive on;", 1))
    before = nginx_processes(lab), sha(lab, SITE)

    proc = lab.fab("proxy.setup", check=False, env={"RELEASY_FILES_DIR": str(tmp_path)})
    assert proc.returncode == 1
    assert 'unknown directive "bogus_directive"' in proc.stdout + proc.stderr
    assert "proxy1" in proc.stderr and "restored" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr

    assert (nginx_processes(lab), sha(lab, SITE)) == before
    assert hosts_answering(lab) == {"app1", "app2"}
    leftovers = out(ssh(lab, "proxy1", "ls -A /etc/nginx/sites-available /etc/nginx/releasy"))
    assert ".releasy" not in leftovers  # no staged copy or backup directory left behind


def test_set_upstreams_to_one_server_and_back(lab, apps_running):
    app1, app2 = (address(lab, "app1"), PORT), (address(lab, "app2"), PORT)
    with lab_session_env(lab) as s:
        conn = s.executor.conn("proxy1")
        master, workers = nginx_processes(lab)

        proxy.set_upstreams(s, [app1])
        assert proxy.current_upstreams(conn) == [app1]
        live = out(ssh(lab, "proxy1", f"cat {UPSTREAM}"))
        assert f"server {app1[0]}:{PORT} max_fails=1 fail_timeout=10s;" in live
        assert app2[0] not in live
        master_after, workers_after = nginx_processes(lab)
        assert master_after == master and workers_after.isdisjoint(workers)  # reloaded
        assert hosts_answering(lab) == {"app1"}

        proxy.set_upstreams(s, [app1])  # same list: no reload
        assert nginx_processes(lab) == (master_after, workers_after)

        with pytest.raises(BadInput, match="empty upstream list"):
            proxy.set_upstreams(s, [])
        assert proxy.current_upstreams(conn) == [app1]

    # setup leaves the rotation to rollouts: it keeps app1 alone and says so...
    kept = lab.fab("proxy.setup").stdout
    assert "proxy1  0 changed / " in kept and "upstream servers kept" in kept
    assert hosts_answering(lab) == {"app1"}
    # ...unless asked to restore the inventory's default rotation.
    reset = lab.fab("proxy.setup", "--reset-upstreams").stdout
    assert "changed: nginx reloaded" in reset
    assert hosts_answering(lab) == {"app1", "app2"}

    with lab_session_env(lab) as s:
        assert proxy.current_upstreams(s.executor.conn("proxy1")) == [app1, app2]
        proxy.set_upstreams(s, [app2])
        assert hosts_answering(lab) == {"app2"}
        proxy.set_upstreams(s, proxy_render.upstreams_for(s.inventory))
        assert hosts_answering(lab) == {"app1", "app2"}


def test_setup_takes_a_host_no_longer_in_the_inventory_out_of_rotation(lab, apps_running):
    # A host removed from hosts.yaml: this run's pg_hba and firewall shut it out of the
    # database, so the proxies must stop sending it requests (the rest of the rotation
    # a rollout left stays as it is).
    app1 = (address(lab, "app1"), PORT)
    removed = (lab.ident.address(99), PORT)  # no lab host has it
    with lab_session_env(lab) as s:
        proxy.set_upstreams(s, [app1, removed])
    run = lab.fab("proxy.setup").stdout
    assert ("inventory taken out of rotation: " + proxy_render.describe([removed])) in run
    assert "upstream servers kept as the last rollout left them: " + proxy_render.describe(
        [app1]) in run
    with lab_session_env(lab) as s:
        assert proxy.current_upstreams(s.executor.conn("proxy1")) == [app1]
        assert hosts_answering(lab) == {"app1"}
        # Only removed hosts listed: the inventory's app hosts instead.
        proxy.set_upstreams(s, [removed])
    lab.fab("proxy.setup")
    with lab_session_env(lab) as s:
        assert proxy.current_upstreams(s.executor.conn("proxy1")) == proxy_render.upstreams_for(
            s.inventory)
    assert hosts_answering(lab) == {"app1", "app2"}


def test_a_config_the_master_cannot_load_is_rolled_back_too(lab, apps_running, tmp_path):
    # nginx -t does not bind ports: port 22 (sshd) passes the test, then fails the reload.
    shutil.copytree(ROOT / "files" / "nginx", tmp_path / "nginx")
    site = tmp_path / "nginx" / "releasy-site.conf.j2"
    site.write_text(site.read_text().replace("listen 80 default_server;",
                                             "listen 80 default_server;\n    listen 22;", 1))
    before = nginx_processes(lab), sha(lab, SITE)
    proc = lab.fab("proxy.setup", check=False, env={"RELEASY_FILES_DIR": str(tmp_path)})
    assert proc.returncode == 1
    assert "bind() to 0.0.0.0:22 failed" in proc.stderr
    assert "previous files were restored" in proc.stderr
    assert (nginx_processes(lab), sha(lab, SITE)) == before
    assert "proxy1  0 changed / " in lab.fab("proxy.setup").stdout


def test_wait_old_workers_gone_waits_for_an_in_flight_request(lab, apps_running):
    app1 = address(lab, "app1")
    ssh(lab, "app1", "rm -f /run/hold-arrived /run/hold-release;"
                     " cat > /usr/local/bin/proxytest-hold.py", input=HOLD_SERVER.encode())
    ssh(lab, "app1", shlex.join(["systemd-run", "--unit", "proxytest-hold", "--collect",
                                 "python3", "/usr/local/bin/proxytest-hold.py", app1,
                                 str(HOLD_PORT)]))
    wait_until(lambda: port_open(app1, HOLD_PORT), "the hold server on app1")
    client = None
    try:
        with lab_session_env(lab) as s:
            conn = s.executor.conn("proxy1")
            proxy.set_upstreams(s, [(app1, HOLD_PORT)])
            client = subprocess.Popen(
                ["curl", "-sSk", "--max-time", "120", f"https://{address(lab, 'proxy1')}/hold"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: ssh(lab, "app1", "test -e /run/hold-arrived",
                                   check=False).returncode == 0, "the request to reach app1")

            # Take the hold server out of the rotation: the old worker keeps the request.
            proxy.set_upstreams(s, proxy_render.upstreams_for(s.inventory))
            assert proxy.wait_old_workers_gone(conn, 1) is False
            assert client.poll() is None

            ssh(lab, "app1", "touch /run/hold-release")
            assert proxy.wait_old_workers_gone(conn, 60) is True
            stdout, stderr = client.communicate(timeout=60)
            assert client.returncode == 0, stderr
            assert stdout == "released\n"  # the in-flight request finished, not cut
            assert hosts_answering(lab, 4) <= {"app1", "app2"}
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        ssh(lab, "app1", "touch /run/hold-release; systemctl stop proxytest-hold", check=False)


def test_files_mode_uploads_the_pair_and_refuses_a_key_that_does_not_match(lab, apps_running,
                                                                            tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    for stem in ("site", "other"):
        subprocess.run(self_signed_argv(str(tls / f"{stem}.crt"), str(tls / f"{stem}.key"),
                                        "releasy.lab.test"), check=True, capture_output=True)
        (tls / f"{stem}.key").chmod(0o600)
    # The lab's inventory in files mode, beside the TLS files; the lab's own files by
    # absolute path.
    inventory = lab.inventory_variant(tmp_path, lambda d: d.update(tls={
        "mode": "files", "server_name": "releasy.lab.test",
        "certificate": "tls/site.crt", "key": "tls/site.key"}))
    key_lines = [ln for ln in (tls / "site.key").read_text().splitlines() if "-----" not in ln]

    first = lab.fab("proxy.setup", inventory=inventory)
    assert not any(ln in first.stdout + first.stderr for ln in key_lines)
    modes = out(ssh(lab, "proxy1", "stat -c '%n %a %U' /etc/nginx/releasy/tls/releasy.crt"
                                   " /etc/nginx/releasy/tls/releasy.key"))
    assert modes.splitlines() == ["/etc/nginx/releasy/tls/releasy.crt 644 root",
                                  "/etc/nginx/releasy/tls/releasy.key 600 root"]

    def verifies() -> bool:
        proc = curl("--cacert", str(tls / "site.crt"), "--resolve",
                    f"releasy.lab.test:443:{address(lab, 'proxy1')}", "-o", "/dev/null",
                    "https://releasy.lab.test/live")
        return proc.returncode == 0

    assert verifies()  # nginx serves the uploaded certificate
    assert "proxy1  0 changed / " in lab.fab("proxy.setup", inventory=inventory).stdout

    # A key that is not the certificate's: nginx -t refuses, the good pair keeps serving.
    good_key = sha(lab, "/etc/nginx/releasy/tls/releasy.key")
    shutil.copyfile(tls / "other.key", tls / "site.key")
    bad = lab.fab("proxy.setup", inventory=inventory, check=False)
    assert bad.returncode == 1
    assert "key values mismatch" in bad.stderr
    assert str(tls / "site.key") in bad.stderr  # the hint names the inventory's files
    assert sha(lab, "/etc/nginx/releasy/tls/releasy.key") == good_key
    assert verifies()
