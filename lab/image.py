"""Build (once per Debian suite, cached) the base image every lab host boots, and the offline
apt repository bound into every host. Both live in CACHE_DIR, outside the work tree, keyed on
the suite and the recipe."""
from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from . import config
from .sh import log, run

STAMP = ".lab-recipe"

SSHD_DROPIN = """\
# Lab hosts: key login only, fast connects, room for parallel sessions.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
MaxStartups 100:30:200
MaxSessions 64
# No ClientAlive* here: stock sshd never drops a silent client, and the deploy lock must
# free itself without that help (its watchdog, releasy_deploy/lock/).
"""

# nspawn with --network-namespace-path mounts /proc/sys/net read-only, which breaks ufw and
# sysctl; remounting it read-write only affects this host's own network namespace.
PROC_NET_UNIT = """\
[Unit]
Description=Make /proc/sys/net writable (lab host in its own network namespace)
DefaultDependencies=no
Before=sysinit.target ufw.service systemd-sysctl.service
ConditionVirtualization=container

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount --bind /proc/sys/net /proc/sys/net
ExecStart=/bin/mount -o remount,bind,rw /proc/sys/net

[Install]
WantedBy=sysinit.target
"""

MASKED_UNITS = (
    "console-getty.service", "getty@.service", "apt-daily.timer", "apt-daily-upgrade.timer",
    "systemd-networkd-wait-online.service", "e2scrub_reap.service", "systemd-resolved.service",
    "fstrim.timer", "dpkg-db-backup.timer",
)


def debian_mirrors() -> tuple[str, str]:
    """(main mirror, security mirror) read from this machine's apt sources: never hard-coded."""
    main = security = None
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    stanzas: list[dict[str, str]] = []
    if sources.exists():
        current: dict[str, str] = {}
        for line in sources.read_text().splitlines():
            if not line.strip():
                if current:
                    stanzas.append(current)
                current = {}
                continue
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            current[key.strip()] = value.strip()
        if current:
            stanzas.append(current)
    for stanza in stanzas:
        uri = stanza.get("URIs", "").split()[0] if stanza.get("URIs") else ""
        suites = stanza.get("Suites", "").split()
        if any(s.endswith("-security") for s in suites):
            security = security or uri
        elif uri:
            main = main or uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                uri = next(p for p in parts[1:] if not p.startswith("["))
                if "security" in line:
                    security = security or uri
                else:
                    main = main or uri
    if not main:
        raise SystemExit("cannot find a Debian mirror in /etc/apt/sources.list(.d): the lab "
                         "image is built from this machine's own apt sources")
    return main, security or main.replace("/debian", "/debian-security")


def _recipe_id(suite: str) -> str:
    parts = [config.IMAGE_RECIPE_VERSION, suite, ",".join(config.BASE_PACKAGES),
             ",".join(config.REPO_PACKAGES), SSHD_DROPIN, PROC_NET_UNIT, ",".join(MASKED_UNITS)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _is_current(path: Path, suite: str) -> bool:
    stamp = path / STAMP
    return stamp.exists() and stamp.read_text().strip() == _recipe_id(suite)


def base_dir(suite: str = config.SUITE) -> Path:
    # Versioned by suite and recipe: a rebuild never pulls the lower layer from under a
    # running lab, and labs of different suites share the cache side by side.
    return config.CACHE_DIR / f"base-{suite}-{_recipe_id(suite)}"


def repo_dir(suite: str = config.SUITE) -> Path:
    return config.CACHE_DIR / f"apt-repo-{suite}-{_recipe_id(suite)}"


@contextmanager
def _build_lock():
    """Serialise image builds between labs and checkouts on this machine."""
    config.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(config.CACHE_DIR / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _in_use_by_processes() -> str:
    """Every process's command line: a running host's nspawn names the apt repository it
    binds (--bind-ro=REPO:...), which shows in no mount table of this namespace."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return "\n".join(lines)


def _prune_old_builds(keep: set[Path], suite: str) -> None:
    """Remove this suite's superseded builds (other suites' images stay cached)."""
    mounts = Path("/proc/self/mounts").read_text()
    running = None
    for old in config.CACHE_DIR.glob("*-*"):
        if old in keep or not old.is_dir() or not old.name.startswith(
                (f"base-{suite}-", f"apt-repo-{suite}-")):
            continue
        if str(old) in mounts:
            continue  # still the lower layer of a running lab
        running = _in_use_by_processes() if running is None else running
        if f"{old}:" in running or f"{old}/" in running:
            continue  # still the apt repository of a running lab (another checkout's too)
        shutil.rmtree(old, ignore_errors=True)


def ensure_images(suite: str = config.SUITE) -> tuple[Path, Path]:
    """(base image, apt repository) of ``suite``, built when missing or when the recipe
    changed."""
    config.check_suite(suite)
    with _build_lock():
        base = ensure_base(suite)
        repo = ensure_apt_repo(base, suite)
        _prune_old_builds({base, repo}, suite)
    return base, repo


def ensure_base(suite: str = config.SUITE) -> Path:
    target = base_dir(suite)
    if _is_current(target, suite):
        return target
    started = time.monotonic()
    main, security = debian_mirrors()
    config.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    building = config.CACHE_DIR / f"base-{suite}.building"
    shutil.rmtree(building, ignore_errors=True)
    log(f"lab: building the {suite} base image (once; ~20 s) from {main}")
    run(["mmdebstrap", "--quiet", "--variant=minbase",
         "--include=" + ",".join(config.BASE_PACKAGES), suite, str(building),
         *_sources(main, security, suite)])
    _customise(building)
    (building / STAMP).write_text(_recipe_id(suite) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    log(f"lab: base image ready in {time.monotonic() - started:.1f} s")
    return target


def _sources(main: str, security: str, suite: str) -> list[str]:
    return [f"deb {main} {suite} main", f"deb {main} {suite}-updates main",
            f"deb {security} {suite}-security main"]


def _customise(root: Path) -> None:
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/ssh/sshd_config.d/lab.conf").write_text(SSHD_DROPIN)
    (root / "etc/apt/sources.list").write_text("deb [trusted=yes] file:/var/local/lab-apt ./\n")
    for extra in (root / "etc/apt/sources.list.d").glob("*"):
        extra.unlink()
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("")
    (root / "etc/machine-id").write_text("")
    (root / "var/local/lab-apt").mkdir(parents=True, exist_ok=True)
    unit = root / "etc/systemd/system/lab-proc-sys-net.service"
    unit.write_text(PROC_NET_UNIT)
    wants = root / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).unlink(missing_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
    for name in MASKED_UNITS:
        target = root / "etc/systemd/system" / name
        target.unlink(missing_ok=True)
        target.symlink_to("/dev/null")
    # Hosts have no DNS and no route out: make apt fail fast instead of hanging.
    (root / "etc/apt/apt.conf.d/90lab").write_text(
        'Acquire::Retries "0";\nAPT::Install-Recommends "false";\n')


def ensure_apt_repo(base: Path, suite: str = config.SUITE) -> Path:
    repo = repo_dir(suite)
    if _is_current(repo, suite):
        return repo
    started = time.monotonic()
    main, security = debian_mirrors()
    log(f"lab: building the {suite} offline apt repository (once; ~15 s): "
        + " ".join(config.REPO_PACKAGES))
    building = config.CACHE_DIR / f"apt-repo-{suite}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="lab-repo-", dir=config.CACHE_DIR) as tmp:
        tmpdir = Path(tmp)
        upper, work, merged = tmpdir / "u", tmpdir / "w", tmpdir / "m"
        for d in (upper, work, merged):
            d.mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={base},upperdir={upper},workdir={work}", str(merged)])
        try:
            (merged / "etc/apt/sources.list").write_text(
                "\n".join(_sources(main, security, suite)) + "\n")
            (merged / "etc/resolv.conf").write_text(Path("/etc/resolv.conf").read_text())
            (merged / "etc/apt/apt.conf.d/90lab").write_text("")
            run(["chroot", str(merged), "apt-get", "-q", "update"], quiet=True)
            # Recommends included so either install style works on lab hosts.
            run(["chroot", str(merged), "env", "DEBIAN_FRONTEND=noninteractive", "apt-get",
                 "-q", "-y", "--download-only", "-o", "APT::Install-Recommends=true",
                 "install", *config.REPO_PACKAGES], quiet=True)
            for deb in (merged / "var/cache/apt/archives").glob("*.deb"):
                shutil.copy2(deb, building / deb.name)
        finally:
            run(["umount", str(merged)])
    packages = subprocess.run(["dpkg-scanpackages", "-m", ".", "/dev/null"], cwd=building,
                              check=True, capture_output=True).stdout
    (building / "Packages").write_bytes(packages)
    run(["gzip", "-9kf", str(building / "Packages")])
    lines = ["Origin: releasy-lab", "Label: releasy-lab", "Suite: ./", "SHA256:"]
    for name in ("Packages", "Packages.gz"):
        data = (building / name).read_bytes()
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}")
    (building / "Release").write_text("\n".join(lines) + "\n")
    (building / STAMP).write_text(_recipe_id(suite) + "\n")
    shutil.rmtree(repo, ignore_errors=True)
    building.rename(repo)
    count = len(list(repo.glob("*.deb")))
    log(f"lab: apt repository ready ({count} packages) in {time.monotonic() - started:.1f} s")
    return repo
