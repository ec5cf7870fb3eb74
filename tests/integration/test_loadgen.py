"""The load generator (lab/loadgen.py): its safety checks and summary (pure), then for real
in the lab's outside namespace: plain HTTP against a stand-in started by hand on app1
(stopped mid-run to prove failures are counted), and HTTPS with SNI/Host checks against a
small TLS server in the outside namespace itself."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lab import lab as lab_ops
from lab.loadgen import LoadGenerator, UnsafeTarget, failure_kind, parse_target, summarize


# --------------------------------------------------------------------------------------
# Pure
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("url,expected", [
    ("http://10.77.5.21:8080/", ("http", "10.77.5.21", 8080)),
    ("https://10.77.5.10/", ("https", "10.77.5.10", 443)),
    ("https://10.77.0.10", ("https", "10.77.0.10", 443)),
    ("http://10.77.200.254", ("http", "10.77.200.254", 80)),
])
def test_parse_target_accepts_lab_addresses(url, expected):
    assert parse_target(url) == expected


@pytest.mark.parametrize("url,why", [
    ("https://8.8.8.8/", "only the lab's 10.77.0.0/16"),
    ("https://127.0.0.1/", "only the lab's 10.77.0.0/16"),
    ("https://10.78.5.10/", "only the lab's 10.77.0.0/16"),
    ("https://releasy.lab.test/", "must be a lab IP address"),
    ("https://example.com/", "must be a lab IP address"),
    ("ftp://10.77.5.10/", "only http:// and https://"),
    ("https://10.77.5.10/version", "base URL only"),
    ("https://10.77.5.10:99999/", "invalid port"),
])
def test_parse_target_refuses_anything_else(url, why):
    with pytest.raises(UnsafeTarget, match=why):
        parse_target(url)


def test_load_generator_refuses_before_starting_anything(tmp_path):
    with pytest.raises(UnsafeTarget):
        LoadGenerator("https://1.1.1.1/", workdir=tmp_path, netns="unused")
    assert not any(tmp_path.iterdir())


def test_refused_on_the_command_line_too():
    proc = subprocess.run([sys.executable, "lab/loadgen.py", "http://192.168.1.1/"],
                          capture_output=True, text=True, timeout=30,
                          cwd=lab_ops.current_identity().state_dir.parent)
    assert proc.returncode == 2
    assert "refusing to load 192.168.1.1" in proc.stderr


def _rec(t, status=200, error=None, version="1.0.0", method="GET"):
    return {"t": t, "method": method, "path": "/version", "status": status, "error": error,
            "version": version if status == 200 else None, "ms": 1.0}


@pytest.mark.parametrize("record,kind", [
    (_rec(0, 200), None), (_rec(0, 204), None), (_rec(0, 502), "HTTP 502"),
    (_rec(0, 404), "HTTP 404"), (_rec(0, None, "timeout"), "timeout"),
    (_rec(0, None, "ConnectionRefusedError: [Errno 111] Connection refused"),
     "ConnectionRefusedError"),
])
def test_failure_kind(record, kind):
    assert failure_kind(record) == kind


def test_summarize_counts_and_splits_versions_per_second():
    records = [
        _rec(0.1), _rec(0.5, version="1.0.0"), _rec(1.2, version="1.1.0"),
        _rec(1.3, status=502, method="POST"), _rec(1.9, version="1.0.0"),
        _rec(2.05, None, "RemoteDisconnected: closed", method="POST"),
        _rec(2.5, version="1.1.0"), _rec(2.6, version=None),  # /ready: no version
    ]
    s = summarize(records, started=10.0, ended=14.0, stopped_by="stop-file", config={})
    assert (s["total"], s["ok"], s["failed"]) == (8, 6, 2)
    assert s["requests_per_s"] == 2.0
    assert s["per_second"] == {"0": {"1.0.0": 2}, "1": {"1.1.0": 1, "1.0.0": 1},
                               "2": {"1.1.0": 1}}
    assert s["failed_per_second"] == {"1": 1, "2": 1}
    assert s["failure_kinds"] == {"HTTP 502": 1, "RemoteDisconnected": 1}
    assert s["failed_by_method"] == {"POST": 2}
    assert s["versions"] == {"1.0.0": 3, "1.1.0": 2}
    assert [f["t"] for f in s["first_failures"]] == [1.3, 2.05]
    assert s["stopped_by"] == "stop-file"


# --------------------------------------------------------------------------------------
# On the lab
# --------------------------------------------------------------------------------------
STANDIN_UNIT = "loadgen-test-standin"


@pytest.fixture(scope="module")
def split_lab(lab_session):
    """The stand-in below listens on app1:8080: no Releasy set up there yet."""
    return lab_session.pristine("split", 2, untouched={"app1": ("/opt/releasy",)})


@pytest.fixture
def standin_on_app1(split_lab):
    """The 1.0.0 stand-in on app1:8080 with SQLite, by hand (systemd-run), not the app tier."""
    tarball = split_lab.releases / "releasy-server-1.0.0-linux-x86_64.tar.gz"
    binary = subprocess.run(["tar", "-xzOf", str(tarball), "releasy-server"],
                            capture_output=True, check=True).stdout
    subprocess.run([*lab_ops.ssh_base(split_lab.ident), "app1",
                    "cat > /usr/local/bin/loadgen-standin"
                    " && chmod 0755 /usr/local/bin/loadgen-standin"],
                   input=binary, check=True, timeout=60)
    split_lab.ssh("app1", "sh", "-c", f"systemctl stop {STANDIN_UNIT} 2>/dev/null;"
                                      " rm -f /tmp/loadgen.db")
    split_lab.ssh("app1", "systemd-run", f"--unit={STANDIN_UNIT}", "--collect",
                  "--setenv=RELEASY_DATABASE_URL=sqlite:///tmp/loadgen.db?mode=rwc",
                  "--setenv=RELEASY_BIND_ADDR=0.0.0.0:8080", "/usr/local/bin/loadgen-standin")
    ready = split_lab.ssh("app1", "sh", "-c", "for i in $(seq 100); do"
                                              " curl -fsS http://127.0.0.1:8080/ready && exit 0;"
                                              " sleep 0.1; done; exit 1", check=False)
    assert ready.returncode == 0, ready.stderr
    yield "http://" + lab_ops.read_state(split_lab.ident)["hosts"]["app1"]["address"] + ":8080/"
    split_lab.ssh("app1", "systemctl", "stop", STANDIN_UNIT, check=False)


def test_counts_ok_requests_and_versions_then_failures_when_the_server_stops(
        split_lab, standin_on_app1, tmp_path):
    with LoadGenerator(standin_on_app1, threads=2, rate=100, duration=60,
                       workdir=tmp_path, timeout=2) as load:
        before = load.wait_until(lambda p: p["ok"] >= 60, timeout=20)
        assert before["failed"] == 0, load.stop()["first_failures"]
        assert before["last_version"] == "1.0.0"
        split_lab.ssh("app1", "systemctl", "stop", STANDIN_UNIT)
        load.wait_until(lambda p: p["failed"] >= 10, timeout=20)
    summary = load.summary
    assert summary["stopped_by"] == "stop-file"
    assert summary["ok"] >= 60 and summary["failed"] >= 10
    assert summary["total"] == summary["ok"] + summary["failed"]
    assert set(summary["versions"]) == {"1.0.0"}
    assert all(set(split) == {"1.0.0"} for split in summary["per_second"].values())
    # Everything after the stop failed at the connection level (refused/reset), not HTTP.
    assert summary["failure_kinds"], summary
    assert not any(k.startswith("HTTP ") for k in summary["failure_kinds"]), summary
    assert summary["first_failures"][0]["error"]
    records = load.records()
    assert len(records) == summary["total"]
    assert {(r["method"], r["path"]) for r in records if r["status"] == 200} == {
        ("GET", "/version"), ("GET", "/ready"), ("POST", "/api/echo")}
    first_failure = min(r["t"] for r in records if r["status"] != 200)
    assert all(r["status"] != 200 for r in records if r["t"] > first_failure + 0.5)


# A TLS server for the HTTPS path: answers 200 with a version only when the client sent the
# expected SNI *and* Host header, 421 otherwise. It runs in the outside namespace on the
# outside address, so the generator's lab-only check still applies.
TLS_SERVER = r"""
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
cert, key, address, name = sys.argv[1:5]
seen = {}
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
def remember(sock, server_name, _ctx):
    seen[id(sock)] = server_name
ctx.sni_callback = remember
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        ok = seen.get(id(self.connection)) == name and self.headers.get("Host") == name
        body = json.dumps({"version": "9.9.9"} if ok else {"error": "wrong name"}).encode()
        self.send_response(200 if ok else 421)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = answer
srv = ThreadingHTTPServer((address, 8443), H)
srv.daemon_threads = True
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"""


def test_https_with_sni_and_host_header(split_lab, tmp_path):
    ident = split_lab.ident
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=releasy.lab.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = subprocess.Popen(
        ["ip", "netns", "exec", ident.outside_ns, sys.executable, "-c", TLS_SERVER, str(cert),
         str(key), ident.outside_address, "releasy.lab.test"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        url = f"https://{ident.outside_address}:8443/"
        with LoadGenerator(url, server_name="releasy.lab.test", threads=2, rate=100,
                           duration=60, workdir=tmp_path / "good", timeout=2) as load:
            load.wait_until(lambda p: p["total"] >= 40, timeout=20)
        good = load.summary
        assert good["failed"] == 0, good["first_failures"]
        assert good["versions"] == {"9.9.9": good["ok"]}
        # Without --server-name, SNI/Host are the bare address: the server says 421.
        with LoadGenerator(url, threads=1, rate=50, duration=60, workdir=tmp_path / "bad",
                           timeout=2) as load:
            load.wait_until(lambda p: p["total"] >= 5, timeout=20)
        bad = load.summary
        assert bad["ok"] == 0 and bad["failure_kinds"] == {"HTTP 421": bad["failed"]}
    finally:
        server.terminate()  # the server this test started, by its PID
        server.wait(timeout=30)
