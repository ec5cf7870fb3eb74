"""One lab host: an overlay root over the shared base image, booted by systemd-nspawn (real
systemd as PID 1) inside the host's network namespace, in a cgroup of its own."""
from __future__ import annotations

import os
import shlex
import signal
import shutil
import subprocess
import time
from pathlib import Path

from .config import HostSpec, LabIdentity
from .sh import run

CGROUP_ROOT = Path("/sys/fs/cgroup")
# With --keep-unit nspawn uses the caller's cgroup: each host's launcher gets its own, or all
# hosts would manage one shared tree.
CGROUP_HIERARCHIES = ("systemd", "unified", "memory")


# What each host writes (its overlay's upper layer) lives in RAM, in one tmpfs per lab. On
# the machine's ext4, after thousands of labs made and removed, creating a file cost dpkg a
# scan of recently deleted inodes: installing PostgreSQL took 19.7 s there, 13.4 s in RAM.
# The cap bounds a runaway test, not what a lab uses (about 30 MB per app host, 310 MB for
# a db host after the first install).
HOSTS_TMPFS_SIZE = "25%"


def hosts_dir(ident: LabIdentity) -> Path:
    return ident.run_dir / "hosts"


def host_dir(ident: LabIdentity, name: str) -> Path:
    return hosts_dir(ident) / name


def mount_hosts_dir(ident: LabIdentity) -> None:
    """A fresh tmpfs for the lab's hosts; what an earlier lab left on disk is removed
    first. `unmount_all` takes it down with the hosts' overlays."""
    top = hosts_dir(ident)
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    run(["mount", "-t", "tmpfs", "-o", f"mode=0755,size={HOSTS_TMPFS_SIZE}",
         f"{ident.prefix}-hosts", str(top)])


def cgroup_dirs(ident: LabIdentity, name: str | None = None) -> list[Path]:
    dirs = []
    for hierarchy in CGROUP_HIERARCHIES:
        base = CGROUP_ROOT / hierarchy
        if base.is_dir():
            d = base / ident.cgroup_name
            dirs.append(d / name if name else d)
    return dirs


def prepare_root(ident: LabIdentity, spec: HostSpec, base: Path, address: str,
                 authorized_key: str) -> Path:
    hdir = host_dir(ident, spec.name)
    shutil.rmtree(hdir, ignore_errors=True)
    upper, work, root = hdir / "upper", hdir / "work", hdir / "root"
    for d in (upper, work, root):
        d.mkdir(parents=True)
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={base},upperdir={upper},workdir={work}", str(root)])
    (root / "etc/hostname").write_text(spec.name + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {spec.name}\n")
    # Host keys of its own: ed25519 (what the lab's known_hosts lists) and ECDSA, both made in
    # milliseconds; no RSA key, whose generation took about a second per host and boot.
    for kind in ("ed25519", "ecdsa"):
        run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{spec.name}",
             "-f", str(root / f"etc/ssh/ssh_host_{kind}_key")])
    (root / "etc/ssh/sshd_config.d/lab-host-keys.conf").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n")
    if spec.ssh_user == "root":
        _authorize(root / "root", authorized_key, 0, 0)
    else:
        # A sudo user instead of root: exercises the executor's sudo path on every run.
        (root / "etc/ssh/sshd_config.d/lab-user.conf").write_text("PermitRootLogin no\n")
        run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash",
             spec.ssh_user])
        if spec.tiers:  # a jump host's user only forwards: no sudo
            sudoers = root / "etc/sudoers.d" / spec.ssh_user
            sudoers.write_text(f"{spec.ssh_user} ALL=(ALL) NOPASSWD: ALL\n")
            sudoers.chmod(0o440)
        uid = int(run(["chroot", str(root), "id", "-u", spec.ssh_user]).stdout)
        _authorize(root / "home" / spec.ssh_user, authorized_key, uid, uid)
    return root


def _authorize(home: Path, key: str, uid: int, gid: int) -> None:
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(key.strip() + "\n")
    keys.chmod(0o600)
    for p in (ssh_dir, keys):
        os.chown(p, uid, gid)


def launch(ident: LabIdentity, spec: HostSpec, root: Path, apt_repo: Path) -> int:
    """Start the host; returns the launcher's PID (a shell that re-runs nspawn when the
    guest reboots: nspawn exits 133 on `systemctl reboot`)."""
    hdir = host_dir(ident, spec.name)
    cgroups = cgroup_dirs(ident, spec.name)
    for d in cgroups:
        d.mkdir(parents=True, exist_ok=True)
    nspawn = [
        "systemd-nspawn", "-q", "-D", str(root), "--boot", "--register=no", "--keep-unit",
        f"--network-namespace-path=/run/netns/{ident.netns(spec.name)}",
        f"--machine={ident.prefix}-{spec.name}", f"--hostname={spec.name}",
        "--console=read-only", "--capability=CAP_NET_ADMIN", "--resolv-conf=off",
        "--timezone=off", "--link-journal=no", f"--bind-ro={apt_repo}:/var/local/lab-apt",
    ]
    join = " ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))};" for d in cgroups)
    script = (f"{join} while :; do {shlex.join(nspawn)}; rc=$?; "
              f"[ $rc -eq 133 ] || exit $rc; done")
    logf = open(hdir / "console.log", "ab")
    proc = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=logf,
                            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    logf.close()
    return proc.pid


def cgroup_pids(ident: LabIdentity, name: str | None = None) -> set[int]:
    """Every process in this lab's cgroups (one host, or all), found by walking the tree."""
    pids: set[int] = set()
    for top in cgroup_dirs(ident, name):
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                pass
    return pids


def pid_alive(pid: int) -> bool:
    """True while the process runs. Reaps it when it is our own exited child (a launcher
    started by this process), since a zombie still answers kill(pid, 0)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def nspawn_pids(launcher_pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{launcher_pid}/task").glob("*/children"):
        try:
            children += [int(p) for p in task.read_text().split()]
        except OSError:
            pass
    return children


def stop_all(ident: LabIdentity, launchers: dict[str, int], timeout: float = 15.0) -> None:
    """Orderly poweroff of every host at once (SIGTERM to nspawn), then SIGKILL whatever is
    still in the lab's cgroups. Processes are found by PID and cgroup, never by name."""
    for name, pid in launchers.items():
        for child in nspawn_pids(pid):
            _signal(child, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in launchers.values()) and not cgroup_pids(ident):
            break
        time.sleep(0.1)
    for _ in range(50):
        left = cgroup_pids(ident) | {p for p in launchers.values() if pid_alive(p)}
        if not left:
            break
        for pid in left:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def remove_cgroups(ident: LabIdentity) -> None:
    for top in cgroup_dirs(ident):
        if not top.is_dir():
            continue
        # Deepest first: a cgroup can only be removed once it has no children.
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
        except OSError:
            pass


def lab_mounts(ident: LabIdentity) -> list[str]:
    prefix = str(ident.run_dir) + "/"
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")
        if target.startswith(prefix):
            mounts.append(target)
    return mounts


def unmount_all(ident: LabIdentity) -> None:
    for _ in range(5):
        mounts = lab_mounts(ident)
        if not mounts:
            return
        # Nested mounts first.
        for target in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)


def remove_nspawn_leftovers(ident: LabIdentity, names: list[str]) -> None:
    # nspawn cannot remove this itself when /run is not a tmpfs.
    for name in names:
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / f"{ident.prefix}-{name}",
                      ignore_errors=True)
