"""The deploy lock on the lab: PostgreSQL (split topology) first, then flock (single host,
SQLite). Holders are real separate processes taking the lock through the public API; the
CLI is the real `fab deploy.lock`; hosts are inspected with plain OpenSSH."""
from __future__ import annotations

import getpass
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

import fabfile
from lab.standin.build import build_release
from releasy_deploy import lock
from releasy_deploy.commands import lock as lockcmd
from releasy_deploy.tiers import app_setup
from releasy_deploy.cli import exit_code_for, session
from releasy_deploy.inventory import load_inventory
from tests.integration.labtools import FAB, ROOT, fab_env, psql, start_fab

FREE_WITHIN_S = 15.0

# Takes the lock through the public API in its own process, prints "held ...", then holds
# it until its stdin closes (a clean release) or it is killed. Errors: the CLI's exit code.
HOLDER_CODE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from releasy_deploy.cli import exit_code_for, session
from releasy_deploy.errors import DeployError
from releasy_deploy.lock import deploy_lock
version, wait = sys.argv[1], float(sys.argv[2])
try:
    with session() as s, deploy_lock(s, version=version, wait=wait) as info:
        print("held", info.describe(), flush=True)
        sys.stdin.read()
except DeployError as exc:
    print(f"error: {{exc}}", flush=True)
    sys.exit(exit_code_for(exc))
"""

SCRATCH_FABFILE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from invoke import Collection
from fabfile import deploy
ns = Collection()
ns.add_collection(Collection.from_module(deploy))
"""


class Holder:
    """A separate process that takes (or tries to take) the deploy lock."""

    def __init__(self, inventory: Path, version: str, wait: float = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER_CODE, version, str(wait)], env=fab_env(inventory),
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"holder {self.pid}: no {prefix!r} line within"
                                     f" {timeout} s; got {self.output}") from None
            if line is None:
                raise AssertionError(f"holder {self.pid} exited ({self.proc.wait()}) without"
                                     f" a {prefix!r} line: {self.output}")
            self.output.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=5)) is not None:
            self.output.append(line)
        return code

    def release(self) -> int:
        self.proc.stdin.close()
        return self.finish()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # only the process this test started
        self.proc.wait(timeout=30)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


def fab_lock(lab, tmp_path_factory) -> subprocess.CompletedProcess:
    """`fab deploy.lock` through the real fabfile once `deploy` is registered there, else
    through a scratch collection holding only fabfile/deploy.py."""
    env = fab_env(lab.inventory)
    if "deploy" in fabfile.ns.collections:
        argv = [FAB, "-r", str(ROOT / "fabfile"), "deploy.lock"]
    else:
        scratch = tmp_path_factory.mktemp("fab")
        (scratch / "lockfab.py").write_text(SCRATCH_FABFILE)
        argv = [FAB, "-r", str(scratch), "-c", "lockfab", "deploy.lock"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def holder_now(inventory: Path) -> str | None:
    os.environ["RELEASY_INVENTORY"] = str(inventory)
    with session() as s:
        return lock.lock_holder(s)


def wait_free(inventory: Path, within: float) -> float:
    """Poll `lock_holder` until the lock is free; return how long it took."""
    started = time.monotonic()
    while True:
        holder = holder_now(inventory)
        if holder is None:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"still held after {within} s by {holder}")
        time.sleep(0.3)


def who(pid: int, version: str) -> str:
    return f"{getpass.getuser()}@{socket.gethostname().split('.')[0]} pid={pid} version={version}"


@pytest.fixture(autouse=True)
def _restore_inventory_env():
    before = os.environ.get("RELEASY_INVENTORY")
    yield
    if before is None:
        os.environ.pop("RELEASY_INVENTORY", None)
    else:
        os.environ["RELEASY_INVENTORY"] = before


# ======================================================================================
# PostgreSQL (split topology)
# ======================================================================================
@pytest.fixture(scope="module")
def pg_lab(lab_session):
    lab = lab_session.use("split", 2)
    lab.fab("db.setup")
    # The lock's tunnel arrives on db1's loopback: the db tier's pg_hba must admit it.
    assert holder_now(lab.inventory) is None
    return lab


def test_postgres_lock_busy_wait_and_release(pg_lab, tmp_path_factory):
    assert fab_lock(pg_lab, tmp_path_factory).stdout.strip() == "deploy lock of lab: free"

    first = Holder(pg_lab.inventory, "1.1.0")
    waiter = None
    try:
        held = first.expect("held ")
        assert held.startswith(f"held {who(first.pid, '1.1.0')} since 20")

        shown = fab_lock(pg_lab, tmp_path_factory)
        assert shown.returncode == 0
        assert shown.stdout.startswith(
            f"deploy lock of lab: held by {who(first.pid, '1.1.0')} since 20")
        assert "(PostgreSQL on db1)" in shown.stdout

        # A second deploy fails at once, exit code 3, naming the holder.
        second = Holder(pg_lab.inventory, "1.2.0")
        assert second.finish() == 3
        error = "\n".join(second.output)
        assert error.startswith(f"error: deploy of lab held by {who(first.pid, '1.1.0')} since")
        assert "--wait SECONDS" in error

        # ... and through the API in this process, with the holder attached.
        os.environ["RELEASY_INVENTORY"] = str(pg_lab.inventory)
        with session() as s:
            with pytest.raises(lock.LockBusy) as busy:
                with lock.deploy_lock(s, version="1.2.0"):
                    pytest.fail("took a lock that another process holds")
        assert exit_code_for(busy.value) == 3
        assert busy.value.holder.pid == first.pid

        # In pg_locks: our two-int key space (objsubid 2), class 'RLSY', objid crc32(env).
        rows = psql(pg_lab, "SELECT l.classid, l.objid, l.objsubid, a.application_name"
                            " FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                            " WHERE l.locktype = 'advisory' AND l.granted;")
        assert len(rows) == 1, rows
        [[classid, objid, objsubid, app_name]] = rows
        assert (int(classid), int(objid), int(objsubid)) == (
            lock.LOCK_CLASSID, zlib.crc32(b"lab"), 2)
        assert app_name.startswith("releasy-deploy ") and f" {first.pid} 1.1.0 " in app_name

        # Upstream's migration key (a bigint) is not blocked by ours.
        key = lock.upstream_migration_key("releasy")
        assert psql(pg_lab, f"SELECT pg_try_advisory_lock({key});") == [["t"]]

        # --wait queues behind the holder and gets the lock once it is released.
        waiter = Holder(pg_lab.inventory, "1.1.1", wait=60)
        assert waiter.running
        assert first.release() == 0
        assert waiter.expect("held ").startswith(f"held {who(waiter.pid, '1.1.1')} since 20")
        assert f"pid={waiter.pid}" in fab_lock(pg_lab, tmp_path_factory).stdout
    finally:
        first.kill()
        if waiter is not None:
            waiter.kill()
    assert wait_free(pg_lab.inventory, FREE_WITHIN_S) >= 0
    assert fab_lock(pg_lab, tmp_path_factory).stdout.strip() == "deploy lock of lab: free"


def test_postgres_lock_freed_when_the_holder_is_killed(pg_lab):
    holder = Holder(pg_lab.inventory, "1.1.0")
    try:
        holder.expect("held ")
        assert f"pid={holder.pid}" in holder_now(pg_lab.inventory)
        holder.kill()  # SIGKILL: no unlock, no clean disconnect from our side
        wait_free(pg_lab.inventory, FREE_WITHIN_S)
    finally:
        holder.kill()


def test_postgres_lock_loss_is_detected_and_dry_run_only_reports(pg_lab, capsys):
    os.environ["RELEASY_INVENTORY"] = str(pg_lab.inventory)
    with session() as s, lock.deploy_lock(s, version="1.1.0") as info:
        info.ensure_held()
        assert info.pid == os.getpid() and info.where == "PostgreSQL on db1"
        # Dry run while held: reports the holder, neither waits nor fails nor takes it.
        with session(dry_run=True) as dry, lock.deploy_lock(dry, version="1.2.0") as seen:
            assert seen.note == "dry run: lock not taken"
        assert (f"[db1] would take the deploy lock of lab (now held by"
                f" {who(os.getpid(), '1.1.0')} since") in capsys.readouterr().out
        # The session behind the lock ends (a DBA, a db restart...): the holder must notice.
        killed = psql(pg_lab, "SELECT count(pg_terminate_backend(pid)) FROM"
                              " pg_stat_activity WHERE application_name LIKE"
                              " 'releasy-deploy %';")
        assert killed == [["1"]]
        with pytest.raises(lock.LockLost, match="deploy lock of lab was lost"):
            info.ensure_held()
    out = capsys.readouterr().out
    assert "[db1] ERROR: releasing the deploy lock of lab" in out
    assert holder_now(pg_lab.inventory) is None


def test_releasy_migrates_and_starts_while_the_deploy_lock_is_held(pg_lab):
    """Releasy takes upstream's blocking migration lock at start-up: it must not hang while
    a deploy holds ours. The app tier's setup (what `fab app.setup` runs once it holds the
    lock itself) starts it on both app hosts at once, here while another process holds it."""
    holder = Holder(pg_lab.inventory, "1.0.0")
    try:
        holder.expect("held ")
        os.environ["RELEASY_INVENTORY"] = str(pg_lab.inventory)
        with session() as s:
            app_setup.setup(s, "1.0.0")
            started = {h.name for h in s.inventory.hosts_in("app")}
        assert started == {"app1", "app2"}
        inv = load_inventory(pg_lab.inventory)
        for host in ("app1", "app2"):  # /ready answers only after migrations are done
            url = f"http://{inv.host(host).private_address}:{inv.app.bind_port}/ready"
            assert '"ok"' in pg_lab.ssh(host, "curl", "-fsS", url).stdout
        [[applied]] = psql(pg_lab, "SELECT count(*) FROM _sqlx_migrations WHERE success;")
        assert int(applied) >= 1
        assert f"pid={holder.pid}" in holder_now(pg_lab.inventory)  # still ours throughout
    finally:
        holder.kill()


def test_freeze_refuses_every_deploy_with_exit_3_until_unfrozen(pg_lab):
    frozen = pg_lab.fab("deploy.freeze", "--reason", "quarter-end books close")
    assert "deploys of lab frozen: quarter-end books close" in frozen.stdout
    assert "unchanged" in pg_lab.fab("deploy.freeze", "--reason", "again").stdout
    assert pg_lab.sudo("db1", "stat", "-c", "%U:%G %a", "/etc/releasy-deploy",
                       lockcmd.FREEZE_FILE).stdout.split("\n")[:2] == ["root:root 700",
                                                                  "root:root 600"]
    try:
        holder = Holder(pg_lab.inventory, "1.1.0")  # what every deploy does first
        assert holder.finish() == 3
        assert "frozen" in "\n".join(holder.output)
        rolling = pg_lab.fab("deploy.rolling", "--version", "1.0.0", "--yes", check=False)
        assert rolling.returncode == 3
        assert "quarter-end books close" in rolling.stderr + rolling.stdout
        assert holder_now(pg_lab.inventory) is None  # refused, and the lock let go
    finally:
        lifted = pg_lab.fab("deploy.unfreeze")
    assert "unfrozen" in lifted.stdout and "quarter-end books close" in lifted.stdout
    assert "were not frozen" in pg_lab.fab("deploy.unfreeze").stdout
    holder = Holder(pg_lab.inventory, "1.1.0")
    try:
        holder.expect("held ")
    finally:
        holder.kill()
    wait_free(pg_lab.inventory, FREE_WITHIN_S)


def test_unlock_ends_the_holders_session_naming_it(pg_lab):
    holder = Holder(pg_lab.inventory, "1.1.0")
    try:
        holder.expect("held ")
        refused = pg_lab.fab("deploy.unlock", check=False)  # no terminal, no --yes
        assert refused.returncode == 2 and holder_now(pg_lab.inventory) is not None
        ended = pg_lab.fab("deploy.unlock", "--yes")
        assert f"ended the session of {who(holder.pid, '1.1.0')}" in ended.stdout
        assert holder_now(pg_lab.inventory) is None
    finally:
        holder.kill()
    assert "free; nothing to end" in pg_lab.fab("deploy.unlock", "--yes").stdout


def _ssh_ports_of(pid: int, address: str) -> list[int]:
    """Local ports of the established SSH connections process ``pid`` has to ``address``."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", "dst", f"{address}:22"],
                         capture_output=True, text=True, check=True).stdout
    return [int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines()
            if f"pid={pid}," in line]


def test_lock_frees_itself_when_the_operators_network_vanishes(pg_lab):
    """Stock sshd (no ClientAlive in the lab image): a rolling deploy holds the lock in a
    slow migration; every packet between it and db1 is dropped (in db1's own netfilter,
    for its connection only); a second deploy gets the lock within 30 s."""
    sshd_settings = pg_lab.sudo("db1", "sshd", "-T").stdout
    assert "clientaliveinterval 0" in sshd_settings  # what real hosts have
    pg_lab.reset_to("1.0.0", ["app1", "app2"])
    build_release("1.3.0", pg_lab.releases, migrations=4, migration_seconds=30)
    first = start_fab(pg_lab.inventory, "deploy.rolling", "--version", "1.3.0", "--yes",
                      stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    db1 = load_inventory(pg_lab.inventory).host("db1").address
    operator = pg_lab.ident.address(1)
    rules: list[list[str]] = []
    second = None
    try:
        seen = []
        for line in first.stdout:  # until it is migrating on app1, holding the lock
            seen.append(line)
            locked = any("deploy lock of lab taken" in x for x in seen)
            if locked and line.startswith("[app1] migrate"):
                break
        else:
            raise AssertionError("".join(seen))
        ports = _ssh_ports_of(first.pid, db1)
        assert ports, "no SSH connection from the deploy to db1"
        for port in ports:
            rules += [["INPUT", "-p", "tcp", "-s", operator, "--sport", str(port), "--dport",
                       "22", "-j", "DROP"],
                      ["OUTPUT", "-p", "tcp", "-d", operator, "--dport", str(port), "--sport",
                       "22", "-j", "DROP"]]
        for rule in rules:
            pg_lab.sudo("db1", "iptables", "-I", *rule)
        dropped = time.monotonic()
        second = Holder(pg_lab.inventory, "1.3.0", wait=60)
        second.expect("held ", timeout=60)
        took = time.monotonic() - dropped
        print(f"lock taken by the second deploy {took:.1f} s after the network vanished")
        assert took < 30
    finally:
        for rule in rules:
            pg_lab.sudo("db1", "iptables", "-D", *rule, check=False)
        if first.poll() is None:
            first.kill()  # only the process this test started
        first.wait(timeout=30)
        if second is not None:
            second.kill()


# ======================================================================================
# flock (single host, SQLite) -- last in this module: it replaces the split lab
# ======================================================================================
@pytest.fixture(scope="module")
def sqlite_lab(lab_session):
    return lab_session.use("single", database="sqlite")


@pytest.mark.lab_shape("single", database="sqlite")
def test_flock_lock_busy_wait_and_release(sqlite_lab, tmp_path_factory):
    assert fab_lock(sqlite_lab, tmp_path_factory).stdout.strip() == "deploy lock of lab: free"
    first = Holder(sqlite_lab.inventory, "1.1.0")
    waiter = None
    try:
        first.expect("held ")
        shown = fab_lock(sqlite_lab, tmp_path_factory).stdout
        assert shown.startswith(f"deploy lock of lab: held by {who(first.pid, '1.1.0')} since 20")
        assert "(flock on solo)" in shown
        on_host = sqlite_lab.ssh("solo", "cat", "/run/releasy-deploy.holder").stdout
        assert on_host.startswith("releasy-deploy ") and f" {first.pid} 1.1.0 " in on_host

        second = Holder(sqlite_lab.inventory, "1.2.0")
        assert second.finish() == 3
        assert "\n".join(second.output).startswith(
            f"error: deploy of lab held by {who(first.pid, '1.1.0')} since")

        waiter = Holder(sqlite_lab.inventory, "1.1.1", wait=60)
        assert waiter.running
        assert first.release() == 0
        waiter.expect("held ")
        assert f"pid={waiter.pid}" in fab_lock(sqlite_lab, tmp_path_factory).stdout
        assert waiter.release() == 0
    finally:
        first.kill()
        if waiter is not None:
            waiter.kill()
    assert fab_lock(sqlite_lab, tmp_path_factory).stdout.strip() == "deploy lock of lab: free"
    # A clean release removes the holder file.
    assert sqlite_lab.ssh("solo", "test", "-e", "/run/releasy-deploy.holder",
                          check=False).returncode == 1


@pytest.mark.lab_shape("single", database="sqlite")
def test_flock_lock_freed_when_the_holder_is_killed(sqlite_lab):
    holder = Holder(sqlite_lab.inventory, "1.1.0")
    try:
        holder.expect("held ")
        assert f"pid={holder.pid}" in holder_now(sqlite_lab.inventory)
        holder.kill()
        wait_free(sqlite_lab.inventory, FREE_WITHIN_S)
    finally:
        holder.kill()


@pytest.mark.lab_shape("single", database="sqlite")
def test_flock_lock_loss_is_detected(sqlite_lab):
    os.environ["RELEASY_INVENTORY"] = str(sqlite_lab.inventory)
    with session() as s, lock.deploy_lock(s, version="1.1.0") as info:
        info.ensure_held()
        status = s.executor.conn("solo").run(lockcmd.flock_status_argv(), mutates=False).stdout
        flock_pid = status.split()[1]  # the flock process our lock command started
        sqlite_lab.ssh("solo", "kill", "-9", str(int(flock_pid)))
        deadline = time.monotonic() + 10
        while True:  # the exit status travels back asynchronously
            try:
                info.ensure_held()
            except lock.LockLost:
                break
            assert time.monotonic() < deadline, "lock loss not noticed"
            time.sleep(0.1)
    assert holder_now(sqlite_lab.inventory) is None
