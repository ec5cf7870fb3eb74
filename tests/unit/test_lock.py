"""Deploy lock: keys, labels, messages and URL parsing (pure); the flock scripts run for
real in a local shell; the SSH tunnel runs for real through the loopback sshd (conftest)."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import threading
import zlib
from datetime import datetime, timezone

import pytest

from releasy_deploy import channels
from releasy_deploy.cli import EXIT_LOCK_BUSY, exit_code_for
from releasy_deploy.commands import lock as lockcmd
from releasy_deploy.errors import DeployError
from releasy_deploy.executor import Executor
from releasy_deploy.lock import info as lockinfo
from releasy_deploy.output import Reporter

SINCE = datetime(2026, 11, 26, 7, 50, 1, tzinfo=timezone.utc)


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------
def test_classid_is_rlsy_as_int4():
    assert lockinfo.LOCK_CLASSID == int.from_bytes(b"RLSY", "big") == 1380733785


@pytest.mark.parametrize("environment", ["lab", "production", "staging-2", "a", "x" * 32])
def test_lock_key_is_two_signed_int4_with_crc32_objid(environment):
    classid, objid = lockinfo.lock_key(environment)
    assert classid == lockinfo.LOCK_CLASSID
    assert -(2 ** 31) <= objid < 2 ** 31
    assert objid & 0xFFFFFFFF == zlib.crc32(environment.encode())
    # pg_locks shows both halves as unsigned oids.
    assert lockinfo.pg_locks_ids((classid, objid)) == (classid, zlib.crc32(environment.encode()))


def test_lock_key_objid_wraps_to_negative_when_crc32_has_the_top_bit():
    env = next(e for e in (f"env{i}" for i in range(100)) if zlib.crc32(e.encode()) >= 2 ** 31)
    _, objid = lockinfo.lock_key(env)
    assert objid < 0
    assert lockinfo.pg_locks_ids(lockinfo.lock_key(env))[1] == zlib.crc32(env.encode())


def test_different_environments_get_different_keys():
    assert lockinfo.lock_key("production") != lockinfo.lock_key("staging")


def test_upstream_migration_key_matches_the_documented_value():
    # Upstream sqlx: 0x3d32ad9e * crc32(b"releasy") as a signed bigint = 2381881093274812060.
    assert lockinfo.upstream_migration_key("releasy") == 2381881093274812060


# --------------------------------------------------------------------------------------
# Holder labels
# --------------------------------------------------------------------------------------
def test_holder_label_format_and_round_trip():
    label = lockinfo.holder_label(user="alice", machine="laptop", pid=4242, version="1.2.3",
                              since=SINCE)
    assert label == "releasy-deploy 20261126T075001Z 4242 1.2.3 alice@laptop"
    info = lockinfo.parse_label(label, environment="lab", where="PostgreSQL on db1")
    assert info is not None
    assert (info.user, info.machine, info.pid, info.version, info.since) == (
        "alice", "laptop", 4242, "1.2.3", SINCE)
    assert info.describe() == "alice@laptop pid=4242 version=1.2.3 since 2026-11-26T07:50:01Z"


def test_holder_label_without_version():
    label = lockinfo.holder_label(user="bob", machine="ci", pid=1, version=None, since=SINCE)
    assert label.split()[3] == "-"
    info = lockinfo.parse_label(label, environment="lab", where="x")
    assert info.version is None
    assert info.describe() == "bob@ci pid=1 since 2026-11-26T07:50:01Z"


def test_holder_label_fits_application_name_and_cuts_the_free_form_part_first():
    label = lockinfo.holder_label(user="a-very-long-user-name", machine="m" * 80, pid=4194304,
                              version="1.20.30", since=SINCE)
    assert len(label.encode()) == lockinfo.MAX_LABEL_BYTES
    info = lockinfo.parse_label(label, environment="lab", where="x")
    assert (info.pid, info.version, info.since) == (4194304, "1.20.30", SINCE)
    assert (info.user, info.machine) == ("a-very-", "mmmmmmm")  # what is left, cut in half


def test_holder_label_cuts_a_very_long_version_but_keeps_the_holder():
    label = lockinfo.holder_label(user="root", machine="ci-runner", pid=4194304,
                              version="1.2.3-rc.1.build.20261126.abcdef", since=SINCE)
    assert len(label.encode()) <= lockinfo.MAX_LABEL_BYTES
    info = lockinfo.parse_label(label, environment="lab", where="x")
    assert info.version == "1.2.3-rc.~"
    assert (info.user, info.machine) == ("root", "ci-runn")


@pytest.mark.parametrize("user,machine,expected", [
    ("jérôme", "büro", "j?r?me@b?ro"),        # PostgreSQL would turn non-ASCII into '?'
    ("ann smith", "lap top", "ann?smith@lap?top"),  # spaces would break the parse
    ("x'y", 'm"$(id)', "x?y@m???id?"),
])
def test_holder_label_sanitizes_user_and_machine(user, machine, expected):
    label = lockinfo.holder_label(user=user, machine=machine, pid=7, version=None, since=SINCE)
    assert label.endswith(" " + expected)
    assert label.isascii()


def test_holder_label_refuses_an_invalid_version():
    with pytest.raises(ValueError, match="invalid release version"):
        lockinfo.holder_label(user="a", machine="b", pid=1, version="1.0; rm -rf /", since=SINCE)


@pytest.mark.parametrize("text", [
    "", "psql", "releasy-deploy waiting 123", "releasy-deploy notadate 1 - a@b",
    "releasy-deploy 20261126T075001Z pid 1.0.0 a@b", "other 20261126T075001Z 1 - a@b",
])
def test_parse_label_rejects_foreign_text(text):
    assert lockinfo.parse_label(text, environment="lab", where="x") is None


def test_busy_message_names_environment_holder_and_time_and_maps_to_exit_3():
    holder = lockinfo.parse_label("releasy-deploy 20261126T075001Z 99 1.1.0 carol@desk",
                              environment="prod", where="PostgreSQL on db1")
    err = lockinfo.LockBusy(lockinfo.busy_message("prod", holder), holder=holder)
    first = str(err).splitlines()[0]
    assert first.startswith("deploy of prod held by carol@desk pid=99 version=1.1.0"
                            " since 2026-11-26T07:50:01Z (PostgreSQL on db1)")
    assert "--wait SECONDS" in str(err)
    assert isinstance(err, DeployError)
    assert exit_code_for(err) == EXIT_LOCK_BUSY
    assert exit_code_for(err) == EXIT_LOCK_BUSY == 3
    waited = lockinfo.busy_message("prod", holder, waited=30)
    assert "(waited 30 s)" in waited.splitlines()[0]


def test_foreign_holder_is_described_by_its_note():
    info = lockinfo.LockInfo("lab", "PostgreSQL on db1", note="PostgreSQL backend pid 7 (psql)")
    assert info.describe() == "PostgreSQL backend pid 7 (psql) since an unknown time"


# --------------------------------------------------------------------------------------
# Database URL
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("url,user,password,dbname", [
    ("postgres://releasy:s3cret@10.0.0.30:5432/releasy", "releasy", "s3cret", "releasy"),
    ("postgresql://app:p%40ss%3Aw%2Fo%20rd%27%22@db:5432/app_db", "app", "p@ss:w/o rd'\"",
     "app_db"),
    ("postgres://u:%C3%A9t%C3%A9@127.0.0.1:5432/d", "u", "été", "d"),
    ("postgres://u@127.0.0.1/d", "u", "", "d"),
])
def test_database_credentials(url, user, password, dbname):
    creds = lockinfo.database_credentials(url)
    assert (creds.user, creds.password, creds.dbname) == (user, password, dbname)
    assert password not in repr(creds) or not password


@pytest.mark.parametrize("url", ["sqlite:///var/lib/releasy/releasy.db", "postgres://db/x",
                                 "postgres://u:p@db:5432/"])
def test_database_credentials_rejects(url):
    with pytest.raises(ValueError):
        lockinfo.database_credentials(url)


def test_keepalive_statements():
    assert lockcmd.keepalive_statements() == [
        "SET tcp_keepalives_idle = 5", "SET tcp_keepalives_interval = 2",
        "SET tcp_keepalives_count = 3"]


# --------------------------------------------------------------------------------------
# flock scripts: argv as data, then the scripts themselves in a real local shell
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("wait,seconds", [(0, "0"), (0.2, "1"), (5, "5"), (5.5, "6")])
def test_flock_hold_argv(wait, seconds):
    assert lockcmd.flock_hold_argv(wait) == [
        "sh", "-c", lockcmd.FLOCK_HOLD_SCRIPT, "releasy-deploy-lock", "/run/releasy-deploy.lock",
        "/run/releasy-deploy.holder", seconds, str(lockcmd.WATCHDOG_QUIET_S),
        "/etc/releasy-deploy/frozen"]


def test_flock_status_argv():
    assert lockcmd.flock_status_argv() == [
        "sh", "-c", lockcmd.FLOCK_STATUS_SCRIPT, "releasy-deploy-lock", "/run/releasy-deploy.lock",
        "/run/releasy-deploy.holder"]


@pytest.mark.parametrize("stdout,expected", [
    ("FREE\n", None),
    ("", None),
    ("HELD 321\nreleasy-deploy 20261126T075001Z 55 - dan@pc\n",
     "dan@pc pid=55 since 2026-11-26T07:50:01Z"),
    ("HELD 321\n", "an unknown process (flock taken by pid 321; no holder file"
                   " /run/releasy-deploy.holder) since an unknown time"),
])
def test_parse_flock_status(stdout, expected):
    info = lockinfo.parse_flock_status(stdout, environment="lab", where="flock on solo")
    assert (None if info is None else info.describe()) == expected


def test_parse_flock_status_rejects_garbage():
    with pytest.raises(ValueError):
        lockinfo.parse_flock_status("what\n", environment="lab", where="x")


def _local(argv: list[str], lockfile, holder) -> list[str]:
    """Point the scripts' path arguments at temp files (same positions as on a host)."""
    return [*argv[:4], str(lockfile), str(holder), *argv[6:]]


def _status(lockfile, holder) -> str:
    argv = _local(lockcmd.flock_status_argv(), lockfile, holder)
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout


def _hold(lockfile, holder, wait=0) -> subprocess.Popen:
    argv = _local(lockcmd.flock_hold_argv(wait), lockfile, holder)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_flock_scripts_hold_report_and_release(tmp_path):
    lockfile, holder = tmp_path / "deploy.lock", tmp_path / "deploy.holder"
    assert _status(lockfile, holder) == "FREE\n"  # no lock file yet
    label = lockinfo.holder_label(user="eve", machine="box", pid=12, version="2.0.0", since=SINCE)
    first = _hold(lockfile, holder)
    try:
        assert first.stdout.readline() == "ACQUIRED\n"
        first.stdin.write(label + "\n")
        first.stdin.flush()
        assert first.stdout.readline() == "LOCKED\n"
        assert first.stdout.readline() == "THAWED\n"  # the freeze marker, read while held
        status = _status(lockfile, holder)
        # From /proc/locks: the pid is the `flock` child that took it for the shell.
        assert status.splitlines()[0].startswith("HELD ")
        assert status.splitlines()[1] == label

        second = _hold(lockfile, holder)
        out, _ = second.communicate(timeout=10)
        assert second.returncode == 3
        assert out.splitlines() == ["BUSY", label]
    finally:
        first.stdin.close()  # what our SSH channel closing looks like to the remote shell
        first.wait(timeout=10)
    assert first.returncode == 0
    assert not holder.exists()
    assert _status(lockfile, holder) == "FREE\n"


def test_flock_hold_frees_itself_when_the_heartbeat_stops(tmp_path):
    """A holder whose client went silent (network gone, channel still open) lets go."""
    lockfile, holder = tmp_path / "deploy.lock", tmp_path / "deploy.holder"
    argv = _local(lockcmd.flock_hold_argv(0), lockfile, holder)
    argv[-2] = "1"  # quiet seconds
    first = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "ACQUIRED\n"
        first.stdin.write("label\n")
        first.stdin.flush()
        assert first.stdout.readline() == "LOCKED\n"
        first.stdin.write(".\n")  # one heartbeat, then silence with stdin still open
        first.stdin.flush()
        first.wait(timeout=5)
        assert _status(lockfile, holder) == "FREE\n"
    finally:
        first.stdin.close()
        first.kill()


def test_flock_hold_waits_for_the_holder_when_asked(tmp_path):
    lockfile, holder = tmp_path / "deploy.lock", tmp_path / "deploy.holder"
    first = _hold(lockfile, holder)
    assert first.stdout.readline() == "ACQUIRED\n"
    waiter = _hold(lockfile, holder, wait=20)
    try:
        first.stdin.write("first\n")
        first.stdin.flush()
        assert first.stdout.readline() == "LOCKED\n"
        first.stdin.close()  # release: the waiter gets it (flock --wait, no polling)
        assert waiter.stdout.readline() == "ACQUIRED\n"
    finally:
        waiter.stdin.close()
        waiter.wait(timeout=10)
        first.wait(timeout=10)
    assert waiter.returncode == 5  # stdin closed before a label was sent: gave up at once


def test_flock_lock_ends_with_the_flock_process(tmp_path):
    """--close: the shell under flock does not keep the lock alive on its own."""
    import os
    import signal

    lockfile, holder = tmp_path / "deploy.lock", tmp_path / "deploy.holder"
    proc = _hold(lockfile, holder)
    try:
        assert proc.stdout.readline() == "ACQUIRED\n"
        proc.stdin.write("x\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "LOCKED\n"
        flock_pid = int(_status(lockfile, holder).split()[1])
        os.kill(flock_pid, signal.SIGKILL)  # a child of the script this test started
        assert proc.wait(timeout=10) == 128 + signal.SIGKILL
        assert _status(lockfile, holder) == "FREE\n"
    finally:
        proc.stdin.close()  # lets the orphaned inner shell finish too
        proc.wait(timeout=10)


def test_flock_status_ignores_a_stale_holder_file(tmp_path):
    lockfile, holder = tmp_path / "deploy.lock", tmp_path / "deploy.holder"
    lockfile.touch()
    holder.write_text("releasy-deploy 20261126T075001Z 55 - crashed@pc\n")
    assert _status(lockfile, holder) == "FREE\n"


def test_flock_status_sees_a_lock_taken_by_another_program(tmp_path):
    """The device:inode matching works for any flock on the file, not only ours."""
    lockfile, holder = tmp_path / "deploy.lock", tmp_path / "deploy.holder"
    proc = subprocess.Popen(["flock", str(lockfile), "sh", "-c", "echo go; read x"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "go\n"
        first = _status(lockfile, holder).splitlines()[0]
        assert first.startswith("HELD ")
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------------------
# The SSH tunnel, through the real loopback sshd
# --------------------------------------------------------------------------------------
class _EchoServer:
    """A TCP server on 127.0.0.1 that upper-cases what it gets; counts its clients."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.sock.accept()
        with client:
            while data := client.recv(65536):
                client.sendall(data.upper())
        self.closed.set()  # the client side of the tunnel went away

    def close(self) -> None:
        self.sock.close()


def test_tunnel_bridges_one_client_and_closes_the_remote_side(sshd):
    echo = _EchoServer()
    try:
        with Executor(sshd.inventory(), reporter=Reporter(io.StringIO())) as ex:
            tunnel = channels.SshTunnel(ex.conn("loop"), ("127.0.0.1", echo.port))
            assert tunnel.alive
            # A unix socket in a directory only we can enter: no other local user gets in.
            assert os.stat(tunnel.directory).st_mode & 0o777 == 0o700
            assert tunnel.path.endswith(f"/.s.PGSQL.{echo.port}")
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(5)
                client.connect(tunnel.path)
                payload = b"hello through ssh " * 5000  # several SSH packets each way
                client.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    got += client.recv(65536)
                assert got == payload.upper()
                # Only one client: the listener is closed (and removed) after the first accept.
                with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as second:
                    second.connect(tunnel.path)
                assert not os.path.exists(tunnel.directory)
            tunnel.close()
            assert echo.closed.wait(5)
            assert not tunnel.alive
    finally:
        echo.close()


def test_tunnel_to_a_closed_port_is_a_clear_error(sshd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with Executor(sshd.inventory(), reporter=Reporter(io.StringIO())) as ex:
        with pytest.raises(channels.TunnelRefused) as info:
            channels.SshTunnel(ex.conn("loop"), ("127.0.0.1", closed_port))
    msg = str(info.value)
    assert msg.startswith(f"loop: cannot open an SSH tunnel to 127.0.0.1:{closed_port}")
    assert f"nothing accepts connections on 127.0.0.1:{closed_port}" in msg


def test_tunnel_socket_is_out_of_reach_of_other_local_users(sshd):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    import pwd
    nobody = pwd.getpwnam("nobody")
    echo = _EchoServer()
    try:
        with Executor(sshd.inventory(), reporter=Reporter(io.StringIO())) as ex:
            tunnel = channels.SshTunnel(ex.conn("loop"), ("127.0.0.1", echo.port))
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child: another local user tries the tunnel
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                try:
                    with socket.socket(socket.AF_UNIX) as other:
                        other.connect(tunnel.path)
                    os._exit(1)  # got in: the bug
                except PermissionError:
                    os._exit(0)
                except BaseException:
                    os._exit(2)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert tunnel.alive  # still waiting for its one legitimate client
            tunnel.close()
    finally:
        echo.close()


def test_watchdog_argv_validates_what_reaches_the_sql():
    argv = lockcmd.watchdog_argv(4242, "1764990000.123456")
    assert argv[0] == "bash" and argv[3:] == ["releasy-deploy-watchdog", "4242",
                                              "1764990000.123456", str(lockcmd.WATCHDOG_QUIET_S),
                                              "/etc/releasy-deploy/frozen"]
    for bad in ("1' OR true --", "", "1e9"):
        with pytest.raises(ValueError):
            lockcmd.watchdog_argv(1, bad)
    assert lockcmd.WATCHDOG_QUIET_S + channels.HEARTBEAT_S < 30


def test_watchdog_script_ends_on_silence_and_not_on_release(tmp_path):
    """The script itself, on a real bash, with psql/runuser replaced by a recorder."""
    import shutil
    import subprocess
    import time
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "terminated"
    (bin_dir / "runuser").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "runuser").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    argv = lockcmd.watchdog_argv(77, "1.5", quiet=1)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"WATCHING\n"
    started = time.monotonic()
    for _ in range(3):  # heartbeats keep it quiet
        proc.stdin.write(b".\n")
        proc.stdin.flush()
        time.sleep(0.5)
    assert proc.poll() is None and not log.exists()
    proc.wait(timeout=5)  # then silence: it acts within ~1 s
    assert time.monotonic() - started < 4
    assert "pid = 77 AND" in log.read_text() and "'1.5'" in log.read_text()
    log.unlink()
    frozen = tmp_path / "frozen"
    argv[-1] = str(frozen)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"WATCHING\n"
    proc.stdin.write(b"frozen?\n")
    proc.stdin.flush()
    assert lockinfo.parse_freeze_line(proc.stdout.readline().decode().rstrip("\n")) is None
    frozen.write_bytes(lockinfo.freeze_record("books close"))
    proc.stdin.write(b"frozen?\n")
    proc.stdin.flush()
    seen = lockinfo.parse_freeze_line(proc.stdout.readline().decode().rstrip("\n"))
    assert seen["reason"] == "books close"
    proc.communicate(b"release\n", timeout=5)
    assert proc.returncode == 0 and not log.exists()
    assert shutil.which("bash")


def test_freeze_record_round_trip_and_reason_checks():
    record = lockinfo.parse_freeze(lockinfo.freeze_record("  release  party\tfriday "))
    assert record["reason"] == "release party friday" and "@" in record["by"]
    assert lockinfo.parse_freeze(None) is None
    assert lockinfo.parse_freeze(b"garbage")["reason"] == "(unreadable marker)"
    for bad in ("", "   ", "x" * 400):
        with pytest.raises(ValueError):
            lockinfo.check_reason(bad)
    text = lockinfo.frozen_message("prod", record)
    assert "frozen" in text and "release party friday" in text and "unfreeze" in text
