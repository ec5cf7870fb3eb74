"""The stand-in releasy-server: build, configuration, migrations, HTTP, signals.

The executables are run as built (extracted from the tarball, `#!/usr/bin/python3`). SQLite
tests need only the host's python3; PostgreSQL tests start a throwaway cluster (skipped
when `initdb` or python3-psycopg is missing). Only 127.0.0.1 and free ports are used, every
wait has a deadline, and only processes started here are stopped (by their Popen handle).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from lab.standin import build
from lab.standin import releasy_server as rs
from releasy_deploy import schema

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"



# --------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """version -> extracted executable path, for the default set plus a slow variant."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs /usr/bin/python3 (the executable's interpreter)")
    out = tmp_path_factory.mktemp("releases")
    tarballs = build.default_releases(out)
    tarballs.append(build.build_release("1.1.0-slow", out, migrations=3,
                                       migration_seconds=0.4))
    exes = {}
    for tarball in tarballs:
        version = tarball.name[len("releasy-server-"):-len("-linux-x86_64.tar.gz")]
        dest = out / f"x-{version}"
        dest.mkdir()
        with tarfile.open(tarball) as tar:
            tar.extractall(dest)
        exes[version] = dest / "releasy-server"
    return exes


class Proc:
    """One stand-in process; output goes to files (no pipes to fill)."""

    def __init__(self, exe: Path, env: dict, workdir: Path, interpreter: str | None = None):
        self.port = None
        bind = env.get("RELEASY_BIND_ADDR", "")
        if bind.startswith("127.0.0.1:"):
            self.port = int(bind.rsplit(":", 1)[1])
        self.out = tempfile.NamedTemporaryFile(dir=workdir, prefix="out-", delete=False)
        self.err = tempfile.NamedTemporaryFile(dir=workdir, prefix="err-", delete=False)
        full_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env}
        argv = [interpreter, str(exe)] if interpreter else [str(exe)]
        self.popen = subprocess.Popen(argv, env=full_env, stdout=self.out, stderr=self.err,
                                      stdin=subprocess.DEVNULL, cwd=workdir)

    @property
    def stderr(self) -> str:
        return Path(self.err.name).read_text(errors="replace")

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout=timeout)

    def get(self, path: str, method: str = "GET", body: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, (json.loads(data) if data else None), resp
        finally:
            conn.close()

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"exited {self.popen.returncode}: {self.stderr}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            time.sleep(0.03)
        raise AssertionError(f"not listening after {timeout}s: {self.stderr}")

    def wait_ready(self, timeout: float = 15.0) -> None:
        self.wait_listening(timeout)
        assert self.get("/ready")[0] == 200

    def terminate(self, timeout: float = 5.0) -> tuple[int, float]:
        started = time.monotonic()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        rc = self.popen.wait(timeout=timeout)
        return rc, time.monotonic() - started

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=5)


@pytest.fixture
def procs(tmp_path):
    started: list[Proc] = []

    def start(exe, env, interpreter=None):
        proc = Proc(exe, env, tmp_path, interpreter)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def sqlite_env(db: Path, port: int | None = None, rwc: bool = True, **extra) -> dict:
    url = f"sqlite://{db}" + ("?mode=rwc" if rwc else "")
    return {"RELEASY_DATABASE_URL": url,
            "RELEASY_BIND_ADDR": f"127.0.0.1:{port or free_port()}", **extra}


def rows(db: Path, sql: str):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


# --------------------------------------------------------------------------- build

def test_build_is_reproducible_and_laid_out_like_upstream(tmp_path):
    a = build.build_release("1.0.0", tmp_path / "a")
    b = build.build_release("1.0.0", tmp_path / "b")
    assert a.name == "releasy-server-1.0.0-linux-x86_64.tar.gz"
    assert a.read_bytes() == b.read_bytes()
    data = a.read_bytes()
    assert data[4:8] == b"\0\0\0\0"                       # gzip mtime 0
    sha = (a.parent / (a.name + ".sha256")).read_text()
    assert sha == f"{hashlib.sha256(data).hexdigest()}  {a.name}\n"
    with tarfile.open(a) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["releasy-server"]
        m = members[0]
        assert m.isreg() and m.mode == 0o755 and (m.uid, m.gid) == (0, 0)
        assert (m.uname, m.gname) == ("root", "root")
        text = tar.extractfile(m).read().decode()
    assert text.startswith("#!/usr/bin/python3\n")
    assert "VERSION = '1.0.0'" in text
    assert "from lab" not in text and "import lab" not in text
    arm = build.build_release("1.0.0", tmp_path / "a", arch="arm64")
    assert arm.name == "releasy-server-1.0.0-linux-arm64.tar.gz"


def test_build_cli_prints_path(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lab.standin.build", "--version", "2.0.0-rc.1",
                           "--out", str(tmp_path), "--migrations", "3", "--never-ready"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path == tmp_path / "releasy-server-2.0.0-rc.1-linux-x86_64.tar.gz"
    assert path.exists() and Path(str(path) + ".sha256").exists()
    bad = subprocess.run([sys.executable, "-m", "lab.standin.build", "--version", "v1",
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0


def test_default_releases_and_migration_specs(releases):
    assert {"1.0.0", "1.1.0", "1.1.1", "1.2.0-broken", "1.2.0-neverready"} <= set(releases)
    for version in releases:
        assert build.VERSION_RE.match(version)
    two, three = build.migration_specs(2), build.migration_specs(3)
    assert three[:2] == two                                # newer is a superset
    broken = build.migration_specs(4, broken=True)
    assert broken[:3] == three and broken[3][2] != build.migration_specs(4)[3][2]
    with pytest.raises(ValueError):
        build.build_release("1.0", Path(tempfile.gettempdir()))


def test_lock_key_matches_upstream():
    assert build.migration_lock_key("releasy") == 2381881093274812060
    assert rs.migration_lock_key("releasy") == 2381881093274812060
    for name in ("releasy", "postgres", "x" * 63, "ümlaut"):
        key = rs.migration_lock_key(name)
        assert key % 2 == 0 and -(2 ** 63) <= key < 2 ** 63


# --------------------------------------------------------------------------- pure helpers

def test_bind_addr_parsing():
    assert rs.parse_bind_addr("0.0.0.0:8080") == (socket.AF_INET, "0.0.0.0", 8080)
    assert rs.parse_bind_addr("[::1]:80") == (socket.AF_INET6, "::1", 80)
    for bad in ("localhost:8080", "8080", "0.0.0.0", "1.2.3.4:65536", "01.2.3.4:80",
                ":8080", "0.0.0.0:http", "[::1]", "::1:80", " 0.0.0.0:80"):
        with pytest.raises(ValueError):
            rs.parse_bind_addr(bad)


def test_sqlite_url_forms():
    assert rs.parse_sqlite_url("sqlite:///var/lib/r.db")["path"] == "/var/lib/r.db"
    assert rs.parse_sqlite_url("sqlite:///var/lib/r.db")["mode"] == "rw"   # no create
    assert rs.parse_sqlite_url("sqlite:///var/lib/r.db?mode=rwc")["mode"] == "rwc"
    assert rs.parse_sqlite_url("sqlite://rel.db")["path"] == "rel.db"
    assert rs.parse_sqlite_url("sqlite:rel.db")["path"] == "rel.db"
    assert rs.parse_sqlite_url("sqlite::memory:")["memory"]
    with pytest.raises(rs.Fatal, match="unknown query parameter"):
        rs.parse_sqlite_url("sqlite:///x.db?foo=1")


def test_postgres_url_and_masking():
    url = "postgres://releasy:p%40ss@db.internal:6432/releasy?sslmode=require"
    kw = rs.parse_postgres_url(url, {})
    assert kw == {"user": "releasy", "password": "p@ss", "host": "db.internal",
                  "port": "6432", "dbname": "releasy", "sslmode": "require"}
    assert rs.parse_postgres_url("postgresql:///releasy", {})["host"] == "localhost"
    masked = rs.mask_database_url(url)
    assert "p%40ss" not in masked and "p@ss" not in masked and "releasy:***@" in masked
    assert rs.postgres_password(url) == ["p@ss"]


def test_rust_debug_formatting():
    assert rs.rust_debug_str('a "b"\\\n') == '"a \\"b\\"\\\\\\n"'


@pytest.mark.parametrize("env,message", [
    ({"RELEASY_DATABASE_MAX_CONNECTIONS": "five"},
     "RELEASY_DATABASE_MAX_CONNECTIONS must be an integer"),
    ({"RELEASY_ARTIFACT_BUCKET": "b", "RELEASY_ARTIFACT_REGION": "r"},
     "artifact storage config requires bucket, region, access key, and secret key"),
    ({"RELEASY_ARTIFACT_ENDPOINT": "https://s3.example"}, "artifact storage config requires"),
    ({"RELEASY_OPERATOR_JWKS_URL": "https://idp.example/jwks"}, "operator JWT config requires"),
    ({"RELEASY_PUBLIC_BASE_URL": "releasy.example.com"}, "invalid RELEASY_PUBLIC_BASE_URL"),
    ({"RELEASY_PUBLIC_BASE_URL": "https://"}, "invalid RELEASY_PUBLIC_BASE_URL"),
])
def test_settings_validation(env, message):
    with pytest.raises(rs.Fatal, match=message):
        rs.load_settings({"RELEASY_DATABASE_URL": "sqlite::memory:", **env})


def test_settings_accept_complete_groups():
    s = rs.load_settings({
        "RELEASY_DATABASE_URL": "sqlite::memory:",
        "RELEASY_PUBLIC_BASE_URL": "https://releasy.example.com",
        "RELEASY_OPERATOR_JWKS_URL": "https://idp.example/jwks",
        "RELEASY_OPERATOR_ISSUER": "https://idp.example", "RELEASY_OPERATOR_AUDIENCE": "r",
        "RELEASY_ARTIFACT_BUCKET": "b", "RELEASY_ARTIFACT_REGION": "r",
        "RELEASY_ARTIFACT_ACCESS_KEY": "a", "RELEASY_ARTIFACT_SECRET_KEY": "s",
    })
    assert s.bind_addr == "0.0.0.0:8080" and s.database_max_connections == 5
    assert s.artifact["bucket"] == "b"


# --------------------------------------------------------------------------- process: config errors

def test_missing_database_url(releases, procs):
    p = procs(releases["1.0.0"], {"RELEASY_BIND_ADDR": "127.0.0.1:1"})
    assert p.wait_exit() == 1
    assert 'Error: "missing required env var: RELEASY_DATABASE_URL"' in p.stderr


def test_invalid_bind_addr(releases, procs, tmp_path):
    p = procs(releases["1.0.0"], sqlite_env(tmp_path / "db", RELEASY_BIND_ADDR="localhost:80"))
    assert p.wait_exit() == 1
    assert "invalid RELEASY_BIND_ADDR: localhost:80" in p.stderr
    assert not (tmp_path / "db").exists()                  # checked before connecting


def test_invalid_database_url(releases, procs):
    p = procs(releases["1.0.0"], {"RELEASY_DATABASE_URL": "mysql://x/y",
                                  "RELEASY_BIND_ADDR": f"127.0.0.1:{free_port()}"})
    assert p.wait_exit() == 1
    assert "invalid RELEASY_DATABASE_URL" in p.stderr


def test_sqlite_file_not_created_without_mode_rwc(releases, procs, tmp_path):
    p = procs(releases["1.0.0"], sqlite_env(tmp_path / "db", rwc=False))
    assert p.wait_exit() == 1
    assert "database connect failed: error returned from database: (code: 14)" in p.stderr
    assert not (tmp_path / "db").exists()


# ------------------------------------------------------------------ process: SQLite life cycle

def test_sqlite_start_serve_and_sigterm(releases, procs, tmp_path):
    db = tmp_path / "releasy.db"
    secret = "adm1n-super-secret-value"
    p = procs(releases["1.1.0"], sqlite_env(db, RELEASY_ADMIN_API_KEY=secret,
                                            RELEASY_API_KEY_PEPPER="pepper-secret-value",
                                            RELEASY_LOG_LEVEL="debug"))
    p.wait_ready()
    assert p.get("/ready")[:2] == (200, {"status": "ok"})
    assert p.get("/health")[:2] == (200, {"status": "ok"})
    assert p.get("/live")[:2] == (200, {"status": "ok"})
    status, body, resp = p.get("/version")
    assert status == 200 and body["version"] == "1.1.0" and body["pid"] == p.popen.pid
    assert body["host"] == socket.gethostname()
    assert resp.getheader("X-Standin-Version") == "1.1.0"
    assert p.get("/")[1]["service"] == "releasy-standin"
    assert p.get("/echo", "POST", b"x" * 1000)[:2] == (
        200, {"length": 1000, "version": "1.1.0", "host": socket.gethostname()})
    assert p.get("/api/echo", "POST", b"abc")[1]["length"] == 3
    assert p.get("/nope")[0] == 404
    assert p.get("/ready", "POST", b"")[0] == 405

    # HTTP/1.1 keep-alive: several requests on one connection, Content-Length always set
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=3)
    for path in ("/ready", "/live", "/version", "/nope"):
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") is not None
        resp.read()
    conn.request("POST", "/echo", body=b"hello")
    assert json.loads(conn.getresponse().read())["length"] == 5

    versions = rows(db, "SELECT version, description, success, checksum, execution_time "
                        "FROM _sqlx_migrations ORDER BY version")
    assert [(v, d, s) for v, d, s, _, _ in versions] == [
        (1, "create standin m1", 1), (2, "create standin m2", 1), (3, "create standin m3", 1)]
    for (v, _, _, checksum, elapsed), (_, _, sql) in zip(versions, build.migration_specs(3)):
        assert checksum == build.migration_checksum(sql) and elapsed > 0
    log = rows(db, "SELECT migration, host, binary_version, pid FROM standin_migration_log")
    assert log == [(k, socket.gethostname(), "1.1.0", p.popen.pid) for k in (1, 2, 3)]

    # exits promptly on SIGTERM even with an idle keep-alive connection open
    rc, took = p.terminate()
    conn.close()
    assert rc == 0 and took < 2.0
    (start,) = rows(db, "SELECT binary_version, pid, started_at, lock_acquired_at, migrated_at, "
                        "ready_at, stopped_at, migrations_applied, error FROM standin_start_log")
    assert start[:2] == ("1.1.0", p.popen.pid)
    assert start[2] <= start[3] <= start[4] <= start[5] <= start[6]
    assert start[7] == 3 and start[8] is None
    assert secret not in p.stderr and "pepper-secret-value" not in p.stderr
    assert "releasy-server listening on 127.0.0.1:" in p.stderr


def test_download_links_follow_public_base_url(releases, procs, tmp_path):
    # Unset: upstream's default, the app host's own loopback.
    p = procs(releases["1.1.0"], sqlite_env(tmp_path / "a.db"))
    p.wait_ready()
    status, body, _ = p.get("/api/download-link")
    assert status == 200
    assert body["url"] == "http://127.0.0.1:8080/api/downloads/releasy-standin-1.1.0.txt"
    p2 = procs(releases["1.1.0"], sqlite_env(
        tmp_path / "b.db", RELEASY_PUBLIC_BASE_URL="https://releasy.example.com/"))
    p2.wait_ready()
    url = p2.get("/api/download-link")[1]["url"]
    assert url == "https://releasy.example.com/api/downloads/releasy-standin-1.1.0.txt"
    path = url.removeprefix("https://releasy.example.com")
    assert p2.get(path)[:2] == (200, {"download": "releasy-standin-1.1.0.txt",
                                      "version": "1.1.0", "host": socket.gethostname()})
    assert p2.get("/api/download-link", "POST", b"")[0] == 405


def test_upgrade_then_old_binary_refuses(releases, procs, tmp_path):
    db = tmp_path / "releasy.db"
    p = procs(releases["1.0.0"], sqlite_env(db))
    p.wait_ready()
    assert p.terminate()[0] == 0
    p = procs(releases["1.1.0"], sqlite_env(db))
    p.wait_ready()
    assert p.terminate()[0] == 0
    assert rows(db, "SELECT migration, binary_version FROM standin_migration_log "
                    "ORDER BY id") == [(1, "1.0.0"), (2, "1.0.0"), (3, "1.1.0")]

    port = free_port()
    old = procs(releases["1.0.0"], sqlite_env(db, port))
    assert old.wait_exit() == 1
    assert ('Error: "database migration failed: migration 3 was previously applied but is '
            'missing in the resolved migrations"') in old.stderr
    with pytest.raises(OSError):                            # it never bound the port
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    errors = rows(db, "SELECT binary_version, error FROM standin_start_log "
                      "WHERE error IS NOT NULL")
    assert errors[0][0] == "1.0.0" and "missing in the resolved migrations" in errors[0][1]

    # a patch release with the same migrations starts fine and applies nothing
    p = procs(releases["1.1.1"], sqlite_env(db))
    p.wait_ready()
    assert p.terminate()[0] == 0
    assert rows(db, "SELECT count(*) FROM standin_migration_log")[0][0] == 3


def test_modified_migration_refused(releases, procs, tmp_path):
    db = tmp_path / "releasy.db"
    p = procs(releases["1.0.0"], sqlite_env(db))
    p.wait_ready()
    p.terminate()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = 2")
        conn.commit()
    p = procs(releases["1.0.0"], sqlite_env(db))
    assert p.wait_exit() == 1
    assert "migration 2 was previously applied but has been modified" in p.stderr


def test_broken_migration(releases, procs, tmp_path):
    db = tmp_path / "releasy.db"
    p = procs(releases["1.2.0-broken"], sqlite_env(db))
    assert p.wait_exit() == 1
    assert "database migration failed: while executing migration 4: error returned from " \
           "database: (code: 1) no such table: standin_no_such_table" in p.stderr
    assert rows(db, "SELECT version FROM _sqlx_migrations ORDER BY version") == [(1,), (2,), (3,)]
    tables = {r[0] for r in rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"standin_m1", "standin_m2", "standin_m3"} <= tables
    assert "standin_m4" not in tables                       # rolled back
    # the previous release still starts on that database
    p = procs(releases["1.1.1"], sqlite_env(db))
    p.wait_ready()


def test_never_ready(releases, procs, tmp_path):
    db = tmp_path / "releasy.db"
    p = procs(releases["1.2.0-neverready"], sqlite_env(db))
    p.wait_listening()
    assert p.get("/ready")[0] == 503
    assert p.get("/health")[:2][0] == 503
    assert p.get("/ready")[1]["status"] == "unavailable"
    assert p.get("/live")[0] == 200
    assert p.get("/version")[1]["never_ready"] is True
    assert rows(db, "SELECT count(*) FROM _sqlx_migrations")[0][0] == 3
    assert p.terminate()[0] == 0


def test_bind_failure_comes_after_migrations(releases, procs, tmp_path):
    db = tmp_path / "releasy.db"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        p = procs(releases["1.0.0"], sqlite_env(db, port))
        assert p.wait_exit() == 1
    assert 'Error: "bind failed: Address already in use (os error 98)"' in p.stderr
    assert rows(db, "SELECT count(*) FROM _sqlx_migrations")[0][0] == 2


def test_sigterm_during_slow_migration(releases, procs, tmp_path):
    db = tmp_path / "releasy.db"
    p = procs(releases["1.1.0-slow"], sqlite_env(db))
    deadline = time.monotonic() + 10
    while "applying migration 1" not in p.stderr:
        assert time.monotonic() < deadline and p.popen.poll() is None, p.stderr
        time.sleep(0.02)
    rc, took = p.terminate()
    assert rc == 0 and took < 2.0
    assert rows(db, "SELECT count(*) FROM _sqlx_migrations")[0][0] == 0   # rolled back


# --------------------------------------------------------------------------- PostgreSQL

def _psycopg_python() -> str | None:
    for candidate in (SYSTEM_PYTHON, sys.executable):
        ok = subprocess.run([candidate, "-c", "import psycopg"], capture_output=True,
                            timeout=30).returncode == 0
        if ok:
            return candidate
    return None


@pytest.fixture(scope="module")
def pg():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (yields a dict with port + helpers)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg not importable in the test environment")
    interpreter = _psycopg_python()
    if interpreter is None:
        pytest.skip("no python with psycopg to run the stand-in with")
    prefix = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user for initdb")
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser")
        prefix = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="standin-pg-"))
    if prefix:
        shutil.chown(base, "postgres")
    data, port = base / "data", free_port()
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True,
                       timeout=120, cwd=base)
        opts = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"),
                        "-w", "-t", "60", "start"], check=True, capture_output=True,
                       timeout=90, cwd=base)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"could not start a throwaway PostgreSQL: {exc}")

    counter = iter(range(1000))

    def admin(dbname="postgres"):
        return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname,
                               autocommit=True)

    def new_db() -> str:
        name = f"releasy_t{next(counter)}"
        with admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def env(dbname: str, port_: int | None = None, **extra) -> dict:
        return {"RELEASY_DATABASE_URL":
                f"postgres://postgres:pw-never-logged@127.0.0.1:{port}/{dbname}",
                "RELEASY_BIND_ADDR": f"127.0.0.1:{port_ or free_port()}", **extra}

    try:
        yield {"port": port, "admin": admin, "new_db": new_db, "env": env,
               "python": interpreter}
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


def test_the_migration_level_script_under_real_psql(pg):
    # What `schema.postgres_level_shell` feeds psql (here for this module's throwaway
    # cluster): 0 without the table, else the highest successful version (a failed
    # non-transactional migration does not count).
    psql = shutil.which("psql")
    if not psql:
        pytest.skip("psql not installed")
    db = pg["new_db"]()

    def level() -> tuple[int, str]:
        res = subprocess.run([psql, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h",
                              "127.0.0.1", "-p", str(pg["port"]), "-U", "postgres", "-d", db],
                             input=schema.LEVEL_SCRIPT + "\n", capture_output=True,
                             text=True, timeout=30)
        return res.returncode, res.stdout

    assert schema.parse_level(*reversed(level())) == 0
    with pg["admin"](db) as conn:
        conn.execute("CREATE TABLE _sqlx_migrations (version bigint, success boolean)")
        conn.execute("INSERT INTO _sqlx_migrations VALUES (1, true), (2, true), (3, false)")
    assert schema.parse_level(*reversed(level())) == 2


def test_pg_start_migrate_refuse_and_broken(pg, releases, procs):
    db = pg["new_db"]()
    p = procs(releases["1.1.0"], pg["env"](db), pg["python"])
    p.wait_ready()
    assert "pw-never-logged" not in p.stderr and "postgres:***@" in p.stderr
    assert p.terminate()[0] == 0
    with pg["admin"](db) as conn:
        got = conn.execute("SELECT version, checksum, success FROM _sqlx_migrations "
                           "ORDER BY version").fetchall()
        assert [(v, bytes(c), s) for v, c, s in got] == [
            (v, build.migration_checksum(sql), True) for v, _, sql in build.migration_specs(3)]
        start = conn.execute("SELECT started_at <= lock_acquired_at AND "
                             "lock_acquired_at <= migrated_at AND migrated_at <= ready_at AND "
                             "ready_at <= stopped_at FROM standin_start_log").fetchone()
        assert start == (True,)

    old = procs(releases["1.0.0"], pg["env"](db), pg["python"])
    assert old.wait_exit() == 1
    assert "migration 3 was previously applied but is missing in the resolved migrations" \
        in old.stderr

    broken = procs(releases["1.2.0-broken"], pg["env"](db), pg["python"])
    assert broken.wait_exit() == 1
    assert ('while executing migration 4: error returned from database: relation '
            '\\"standin_no_such_table\\" does not exist') in broken.stderr
    with pg["admin"](db) as conn:
        assert conn.execute("SELECT max(version) FROM _sqlx_migrations").fetchone() == (3,)
        assert conn.execute("SELECT to_regclass('standin_m4')").fetchone() == (None,)


def test_pg_waits_on_upstreams_advisory_lock(pg, releases, procs):
    db = pg["new_db"]()
    key = rs.migration_lock_key(db)
    with pg["admin"](db) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        p = procs(releases["1.0.0"], pg["env"](db), pg["python"])
        deadline = time.monotonic() + 10
        while "waiting for the migration lock" not in p.stderr:
            assert time.monotonic() < deadline and p.popen.poll() is None, p.stderr
            time.sleep(0.02)
        time.sleep(0.5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p.port), timeout=0.5).close()
        waiting = holder.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND ((classid::bigint << 32) | objid::bigint) = %s AND objsubid = 1",
            (key,)).fetchone()[0]
        assert waiting == 1
        holder.execute("SELECT pg_advisory_unlock(%s)", (key,))
        p.wait_ready()
    assert p.terminate()[0] == 0


def test_pg_concurrent_starts_migrate_once(pg, releases, procs):
    db = pg["new_db"]()
    a = procs(releases["1.1.0-slow"], pg["env"](db), pg["python"])
    b = procs(releases["1.1.0-slow"], pg["env"](db), pg["python"])
    a.wait_ready(timeout=20)
    b.wait_ready(timeout=20)
    with pg["admin"](db) as conn:
        log = conn.execute("SELECT migration, pid FROM standin_migration_log "
                           "ORDER BY migration").fetchall()
        assert [m for m, _ in log] == [1, 2, 3]
        assert len({pid for _, pid in log}) == 1           # one process applied all three
        first, second = conn.execute(
            "SELECT lock_acquired_at, migrated_at, migrations_applied FROM standin_start_log "
            "ORDER BY lock_acquired_at").fetchall()
        assert first[2] == 3 and second[2] == 0
        assert second[0] >= first[1]                       # serialized by the lock
    assert a.terminate()[0] == 0 and b.terminate()[0] == 0
