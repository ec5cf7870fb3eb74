"""Test helpers: a real sshd on 127.0.0.1 with throwaway keys, and small fake inventories.

The sshd runs as the current user from a temp dir (own host key, authorized_keys,
PidFile), listens on loopback only, and is killed by its PID at the end of the session.
It never touches the system ssh service. If /usr/sbin/sshd is missing we try
`apt-get install openssh-server` (with a temporary policy-rc.d so the package's service is
not started); if that is impossible the SSH tests are skipped with the reason.
"""
from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")


# --------------------------------------------------------------------------------------
# Fake inventory (duck-typed like releasy_deploy.inventory; not imported on purpose)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeHost:
    name: str
    address: str = "127.0.0.1"
    private_address: str = "127.0.0.1"
    ssh_user: str = "root"
    ssh_port: int = 22
    tiers: tuple[str, ...] = ("app",)

    @property
    def is_root(self) -> bool:
        return self.ssh_user == "root"


@dataclass(frozen=True)
class FakeSSH:
    identity_file: Path | None = None
    connect_timeout: float = 5.0


@dataclass(frozen=True)
class FakeInventory:
    path: Path
    known_hosts: Path
    ssh: FakeSSH
    hosts: tuple[FakeHost, ...] = field(default_factory=tuple)

    def hosts_in(self, tier: str) -> tuple[FakeHost, ...]:
        return tuple(h for h in self.hosts if tier in h.tiers)


@dataclass(frozen=True)
class FakeSecrets:
    values: dict[str, str]


# --------------------------------------------------------------------------------------
# sshd
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    dir: Path
    client_key: Path
    known_hosts: Path  # the correct host key line
    host_key_pub: str  # "ssh-ed25519 AAAA..."
    fakebin: Path  # first in the sessions' PATH (see fake sudo in test_executor)

    def host(self, name: str = "loop", **kw) -> FakeHost:
        return FakeHost(name=name, address="127.0.0.1", ssh_user=self.user, ssh_port=self.port, **kw)

    def inventory(self, *names: str, known_hosts: Path | None = None, **host_kw) -> FakeInventory:
        hosts = tuple(self.host(n, **host_kw) for n in (names or ("loop",)))
        return FakeInventory(
            path=self.dir / "hosts.yaml",
            known_hosts=known_hosts or self.known_hosts,
            ssh=FakeSSH(identity_file=self.client_key, connect_timeout=5.0),
            hosts=hosts,
        )


def _install_openssh_server() -> str | None:
    """Install openssh-server without starting its service; return a skip reason on failure."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "/usr/sbin/sshd is missing and apt-get cannot be used (not root or no apt)"
    policy = Path("/usr/sbin/policy-rc.d")
    created = False
    if not policy.exists():
        # Debian's documented switch: exit 101 = "do not start services from maintainer scripts".
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        created = True
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not SSHD.exists():
            return f"installing openssh-server failed: {r.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"installing openssh-server failed: {exc}"
    finally:
        if created:
            policy.unlink()
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_banner(port: int, proc: subprocess.Popen, deadline: float) -> bool:
    """Readiness probe: the SSH banner, not a fixed sleep."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return True
        except OSError:
            time.sleep(0.02)
    return False


def keygen(path: Path, comment: str = "releasy-test") -> str:
    """Make an ed25519 key pair at PATH / PATH.pub; return "ssh-ed25519 AAAA..."."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


@contextlib.contextmanager
def running_sshd(d: Path) -> Iterator[Sshd]:
    """Start sshd in directory D (keys, config, log live there); kill it on exit."""
    if not SSHD.exists():
        reason = _install_openssh_server()
        if reason:
            pytest.skip(reason)
    if not shutil.which("ssh-keygen"):
        pytest.skip("ssh-keygen is missing (apt-get install openssh-client)")
    # sshd refuses to start without its privilege separation directory (normally made
    # by the service unit, which we do not start).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_pub = keygen(d / "host_ed25519.key", "releasy-test-host")
    client_pub = keygen(d / "client_ed25519.key", "releasy-test-client")
    (d / "authorized_keys").write_text(client_pub + "\n")
    fakebin = d / "fakebin"
    fakebin.mkdir()
    fakebin.chmod(0o755)
    user = getpass.getuser()
    log = d / "sshd.log"
    proc = port = None
    for _ in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        config = d / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {d / 'host_ed25519.key'}",
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "StrictModes no",
                    "UsePAM no",
                    "UseDNS no",
                    "MaxStartups 100:30:200",
                    "MaxSessions 100",
                    "Subsystem sftp internal-sftp",
                    # Lets a test put a fake `sudo` first in PATH (sudo is not installed here).
                    f"SetEnv PATH={fakebin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        with log.open("ab") as log_fh:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
            )
        if _wait_for_banner(port, proc, time.monotonic() + 10):
            break
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc = None
    if proc is None:
        pytest.skip(f"sshd did not start: {log.read_text()[-500:]}")
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    known.chmod(stat.S_IRUSR | stat.S_IWUSR)
    try:
        yield Sshd(
            port=port,
            user=user,
            dir=d,
            client_key=d / "client_ed25519.key",
            known_hosts=known,
            host_key_pub=host_pub,
            fakebin=fakebin,
        )
    finally:
        proc.terminate()  # the sshd we started, by its Popen handle (its PID)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
