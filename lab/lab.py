"""Bring the lab up, down, report on it and probe it. The developer tasks in tasks.py and the
pytest fixture both call these functions."""
from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from releasy_deploy.inventory.model import DEFAULT_DATABASE_MAX_CONNECTIONS

from . import acme, image, machine, net
from .config import (BASTION, PRIVATE, PUBLIC, SUITE, HostSpec, LabIdentity, check_suite,
                     current_identity, topology_hosts)
from .sh import log, run

BOOT_TIMEOUT = 90.0


@dataclass(frozen=True)
class LabRequest:
    topology: str = "split"
    apps: int = 2
    database: str = "postgres"
    suite: str = SUITE  # Debian suite of every host...
    db_suite: str = ""  # ...except the db host's, when set (a fleet mid-upgrade)
    bastion: bool = False  # app and db hosts on a private network, reached via `bastion`
    acme: bool = False  # certificates from an ACME CA (pebble) in the outside namespace
    proxies: int = 1  # split topology: proxy1..proxyN

    def normalized(self) -> "LabRequest":
        suite = check_suite(self.suite)
        db_suite = check_suite(self.db_suite, "--db-suite") if self.db_suite else suite
        if self.topology == "single":
            if self.database not in ("postgres", "sqlite"):
                raise SystemExit(f"--database must be postgres or sqlite, got {self.database!r}")
            if db_suite != suite:
                raise SystemExit("--db-suite needs --topology split (on one host the db host "
                                 "is the only host: use --suite)")
            if self.bastion:
                raise SystemExit("--bastion needs the split topology")
            if self.proxies != 1:
                raise SystemExit("--proxies needs the split topology")
            return LabRequest("single", 1, self.database, suite, suite, acme=bool(self.acme))
        if self.database != "postgres":
            raise SystemExit("--database sqlite needs --topology single (app and db on one host)")
        return LabRequest("split", self.apps, "postgres", suite, db_suite,
                          bastion=bool(self.bastion), acme=bool(self.acme),
                          proxies=int(self.proxies))

    def suite_of(self, spec: HostSpec) -> str:
        """The Debian suite host ``spec`` runs (call on a normalized request)."""
        return self.db_suite if "db" in spec.tiers and self.db_suite else self.suite


def _state_file(ident: LabIdentity) -> Path:
    return ident.run_dir / "state.json"


def read_state(ident: LabIdentity) -> dict | None:
    try:
        return json.loads(_state_file(ident).read_text())
    except (OSError, ValueError):
        return None


def ssh_base(ident: LabIdentity) -> list[str]:
    return ["ssh", "-F", str(ident.state_dir / "ssh_config"), "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=3"]


def host_state(ident: LabIdentity, name: str, launcher_pid: int | None) -> str:
    if not launcher_pid or not machine.pid_alive(launcher_pid):
        return "stopped"
    proc = subprocess.run([*ssh_base(ident), name, "systemctl", "is-system-running"],
                          capture_output=True, text=True, timeout=15)
    state = proc.stdout.strip()
    return state or "unreachable"


def _healthy(ident: LabIdentity, state: dict) -> bool:
    if state.get("state_dir") != str(ident.state_dir):
        return False
    if not (ident.state_dir / "hosts.yaml").exists():
        return False
    if any("address6" not in h for h in state["hosts"].values()):
        return False  # made before lab hosts had IPv6 addresses
    if any(not net.netns_exists(ident.netns(n)) for n in state["hosts"]):
        return False
    if not all(machine.pid_alive(pid) for pid in state.get("services", {}).values()):
        return False
    with ThreadPoolExecutor(max_workers=16) as pool:
        states = list(pool.map(lambda n: host_state(ident, n, state["hosts"][n]["launcher"]),
                               state["hosts"]))
    return all(s in ("running", "degraded") for s in states)


def up(request: LabRequest = LabRequest()) -> Path:
    """Bring up the requested lab; a no-op when exactly that lab is already up and healthy.
    Returns the path of the lab inventory."""
    request = request.normalized()
    ident = current_identity()
    state = read_state(ident)
    if state and state.get("request") == asdict(request) and _healthy(ident, state):
        log(f"lab: already up ({request.topology}, {len(state['hosts'])} hosts)")
        _build_releases(ident)
        return ident.state_dir / "hosts.yaml"
    if state or net.list_netns(ident.prefix) or machine.lab_mounts(ident):
        log("lab: replacing the existing lab" if state else "lab: cleaning up a stale lab")
        down()
    started = time.monotonic()
    _raise_inotify_limits()
    specs = topology_hosts(request.topology, request.apps, request.bastion, request.proxies)
    images = {suite: image.ensure_images(suite)
              for suite in dict.fromkeys(request.suite_of(s) for s in specs)}
    ident.state_dir.mkdir(parents=True, exist_ok=True)
    ident.run_dir.mkdir(parents=True, exist_ok=True)
    machine.mount_hosts_dir(ident)
    key = _ensure_ssh_key(ident)
    net.create_switch(ident)
    if request.bastion:
        net.create_private_bridge(ident)
    state = {"request": asdict(request), "state_dir": str(ident.state_dir), "hosts": {}}
    recording = threading.Lock()

    def start(spec: HostSpec) -> None:
        address = spec.ssh_address(ident)
        for i, (network, addr) in enumerate(spec.addresses(ident)):
            net.attach(ident, spec.name, addr, ifname=f"eth{i}",
                       bridge=net.PRIVATE_BRIDGE if network == PRIVATE else "br0")
        base, repo = images[request.suite_of(spec)]
        root = machine.prepare_root(ident, spec, base, address, key)
        pid = machine.launch(ident, spec, root, repo)
        with recording:
            state["hosts"][spec.name] = {"address": address,
                                         # None: only on the IPv4-only private network
                                         "address6": ident.address6(spec.last_octet)
                                         if PUBLIC in spec.networks else None,
                                         "launcher": pid,
                                         "tiers": list(spec.tiers), "ssh_user": spec.ssh_user,
                                         "suite": request.suite_of(spec)}
            # Recorded after every host so a failure half-way can still be cleaned up.
            _state_file(ident).write_text(json.dumps(state, indent=2))

    # Every host is prepared and started at once (they boot in parallel anyway); the
    # state file keeps the inventory's host order.
    with ThreadPoolExecutor(max_workers=min(8, len(specs))) as pool:
        list(pool.map(start, specs))
    state["hosts"] = {s.name: state["hosts"][s.name] for s in specs}
    _state_file(ident).write_text(json.dumps(state, indent=2))
    _write_client_files(ident, specs, request)
    if request.acme:
        # The CA reaches the LAST proxy: with several, every other proxy's challenge has to
        # be forwarded to it by that one (what a DNS round robin does half of the time).
        proxy = [s for s in specs if "proxy" in s.tiers][-1]
        state["services"] = acme.start(ident, proxy.ssh_address(ident))
        _state_file(ident).write_text(json.dumps(state, indent=2))
    _wait_booted(ident, specs)
    _build_releases(ident)
    suites = ", ".join(f"{n} {h['suite']}" for n, h in state["hosts"].items())
    log(f"lab: {len(specs)} hosts up in {time.monotonic() - started:.1f} s ({suites})")
    return ident.state_dir / "hosts.yaml"


# Every host's systemd holds inotify instances of the one machine-wide user (root); the
# default of 128 runs out around a dozen hosts ("Too many open files" at boot).
INOTIFY_LIMITS = {"/proc/sys/fs/inotify/max_user_instances": 8192,
                  "/proc/sys/fs/inotify/max_user_watches": 524288}


def _raise_inotify_limits() -> None:
    for path, wanted in INOTIFY_LIMITS.items():
        current = int(Path(path).read_text())
        if current < wanted:
            Path(path).write_text(f"{wanted}\n")
            log(f"lab: raised {path.rsplit('/', 1)[1]} from {current} to {wanted}")


def down() -> None:
    """Stop every host and remove every namespace, mount, cgroup and process of this lab.
    Works from the state file when there is one, and sweeps by name prefix and cgroup for
    what a killed lab may have left behind."""
    ident = current_identity()
    started = time.monotonic()
    state = read_state(ident) or {"hosts": {}}
    launchers = {n: h["launcher"] for n, h in state["hosts"].items() if h.get("launcher")}
    # Launcher PIDs are only ours while they are still in our cgroups (PIDs get reused).
    ours = machine.cgroup_pids(ident)
    launchers = {n: p for n, p in launchers.items() if p in ours}
    machine.stop_all(ident, launchers)
    machine.unmount_all(ident)
    net.destroy(ident)
    machine.remove_cgroups(ident)
    names = list(state["hosts"]) or [p.name for p in machine.hosts_dir(ident).glob("*")]
    machine.remove_nspawn_leftovers(ident, names)
    subprocess.run(["rm", "-rf", "--one-file-system", str(ident.run_dir)])
    log(f"lab: down in {time.monotonic() - started:.1f} s")


def status() -> list[dict]:
    ident = current_identity()
    state = read_state(ident)
    if not state:
        return []
    rows = []
    for name, h in state["hosts"].items():
        rows.append({"host": name, "address": h["address"], "tiers": ",".join(h["tiers"]),
                     "user": h["ssh_user"], "suite": h.get("suite", SUITE),
                     "state": host_state(ident, name, h["launcher"])})
    return rows


PROBE_CODE = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except ConnectionRefusedError:
    print("closed")
except (socket.timeout, TimeoutError):
    print("filtered")
except OSError as e:
    print("filtered" if e.errno in (113, 101) else "error: %s" % e)
"""


def probe(host: str, port: int, source: str = "outside", timeout: float = 1.5) -> str:
    """open / closed / filtered, as seen from `source`: "outside" (the internet),
    "operator" (this machine, the admin address) or another lab host's name. ``host``: a
    lab host's name (its IPv4 address) or any IPv4/IPv6 address."""
    ident = current_identity()
    state = read_state(ident)
    if not state:
        raise SystemExit("lab: not up (run: inv lab.up)")
    hosts = state["hosts"]
    target = hosts[host]["address"] if host in hosts else host
    argv = [sys.executable, "-c", PROBE_CODE, target, str(port), str(timeout)]
    if source == "outside":
        argv = ["ip", "netns", "exec", ident.outside_ns, *argv]
    elif source in hosts:
        argv = ["ip", "netns", "exec", ident.netns(source), *argv]
    elif source != "operator":
        raise SystemExit(f"lab: unknown probe source {source!r}: outside, operator or a host")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10,
                          ).stdout.strip() or "error"


def cut_link(host: str) -> None:
    """Black-hole a lab host: its link to the lab's switch goes down (see `net.set_link`).
    `restore_link` undoes it; prefer `link_cut`, which always does."""
    net.set_link(current_identity(), _lab_host(host), up=False)


def restore_link(host: str) -> None:
    net.set_link(current_identity(), _lab_host(host), up=True)


@contextmanager
def link_cut(host: str, max_seconds: float = 300.0) -> Iterator[None]:
    """The host's link is cut for the ``with`` block, and restored when it ends, or after
    ``max_seconds`` at most even if the block is still running (a bounded fault)."""
    name = _lab_host(host)
    cut_link(name)
    timer = threading.Timer(max_seconds, restore_link, args=(name,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        restore_link(name)


def _lab_host(host: str) -> str:
    state = read_state(current_identity())
    if not state:
        raise SystemExit("lab: not up (run: inv lab.up)")
    if host not in state["hosts"]:
        raise SystemExit(f"lab: unknown host {host!r} (hosts: {', '.join(state['hosts'])})")
    return host


LISTENER_CODE = """
import socket, sys, time
addr, port, lifetime = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(64)
s.settimeout(0.5)
print("listening", flush=True)
deadline = time.monotonic() + lifetime
while time.monotonic() < deadline:
    try:
        conn, _ = s.accept()
    except socket.timeout:
        continue
    conn.close()
"""


def start_listener(port: int, address: str | None = None, *,
                   lifetime: float = 900.0) -> subprocess.Popen:
    """A TCP listener in the outside namespace (the internet) on ``address`` (default: the
    outside namespace's IPv4 address) that accepts and closes every connection, for
    egress tests. It exits by itself after ``lifetime`` seconds; `stop_listener` ends it
    sooner. Returns once it listens."""
    ident = current_identity()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ident.outside_ns, sys.executable, "-c", LISTENER_CODE,
         address or ident.outside_address, str(port), str(lifetime)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "listening":
        proc.kill()
        raise SystemExit(f"lab: the listener on port {port} did not start: "
                         f"{proc.stderr.read() if proc.stderr else ''}")
    return proc


def stop_listener(proc: subprocess.Popen) -> None:
    """End a listener `start_listener` started (by its PID, ours)."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _ensure_ssh_key(ident: LabIdentity) -> str:
    key = ident.state_dir / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "releasy-lab", "-f", str(key)])
    return (ident.state_dir / "id_ed25519.pub").read_text()


def _write_client_files(ident: LabIdentity, specs: tuple[HostSpec, ...],
                        request: LabRequest) -> None:
    sd = ident.state_dir
    known, config = [], []
    bastion = any(spec.name == BASTION for spec in specs)
    for spec in specs:
        address = spec.ssh_address(ident)
        root = machine.host_dir(ident, spec.name) / "root"
        pub = (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
        known.append(f"{address} {pub[0]} {pub[1]}")
        # People reach hosts without a public address the way the tasks do: via the bastion.
        jump = f"  ProxyJump {BASTION}\n" if bastion and address != ident.address(
            spec.last_octet) else ""
        config.append(
            f"Host {spec.name}\n  HostName {address}\n  User {spec.ssh_user}\n"
            f"  IdentityFile {sd / 'id_ed25519'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {sd / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
            f"{jump}  LogLevel ERROR\n")
    (sd / "known_hosts").write_text("\n".join(known) + "\n")
    (sd / "ssh_config").write_text("\n".join(config))
    (sd / "hosts.yaml").write_text(lab_inventory(ident, specs, request))
    secrets_file = sd / "secrets.yaml"
    if not secrets_file.exists():
        fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump({"admin_api_key": "lab-admin-" + secrets.token_urlsafe(24),
                            "api_key_pepper": "lab-pepper-" + secrets.token_urlsafe(24)}, f)
    (sd / "topology").write_text(f"{request.topology}\n")


# Debian's PostgreSQL takes 97 connections from the app role (max_connections 100 less 3
# reserved); the app's default pool is DEFAULT_DATABASE_MAX_CONNECTIONS per host. A big lab
# shares the 97 out rather than leave `fab site` warning that the pools do not fit (as it
# would an operator).
LAB_PG_ROOM = 97


def lab_inventory(ident: LabIdentity, specs: tuple[HostSpec, ...], request: LabRequest) -> str:
    """The inventory for exactly these hosts, in the schema of the example hosts.yaml."""
    hosts = {}
    jump_hosts = {}
    ssh: dict = {"user": "root", "identity_file": "id_ed25519", "connect_timeout": 5}
    for spec in specs:
        if spec.name == BASTION:
            # Not a managed host: a jump host with its own (unprivileged) user.
            jump_hosts[spec.name] = {"address": spec.ssh_address(ident),
                                     "private_address": spec.tier_address(ident),
                                     "user": spec.ssh_user}
            ssh["jump"] = spec.name
            continue
        entry: dict = {"address": spec.ssh_address(ident)}
        if spec.tier_address(ident) != entry["address"]:
            entry["private_address"] = spec.tier_address(ident)
        if spec.ssh_user != "root":
            entry["ssh_user"] = spec.ssh_user
        hosts[spec.name] = entry
    if jump_hosts:
        for spec in specs:
            if spec.name in hosts and spec.ssh_address(ident) == ident.address(spec.last_octet):
                hosts[spec.name]["jump"] = False  # has a public side (the proxy): direct
    tiers: dict[str, list[str]] = {"proxy": [], "app": [], "db": []}
    for spec in specs:
        for tier in spec.tiers:
            tiers[tier].append(spec.name)
    data = {
        "environment": "lab",
        "admin_cidrs": [f"{ident.operator_address}/32"],
        "known_hosts": "known_hosts",
        "ssh": ssh,
        **({"jump_hosts": jump_hosts} if jump_hosts else {}),
        "hosts": hosts,
        "tiers": tiers,
        "database": {"kind": request.database},
        **({"app": {"database_max_connections": LAB_PG_ROOM // len(tiers["app"])}}
           if len(tiers["app"]) * DEFAULT_DATABASE_MAX_CONNECTIONS > LAB_PG_ROOM else {}),
        "release": {"source": "releases", "arch": "x86_64"},
        "tls": {"mode": "self-signed", "server_name": "releasy.lab.test"},
        **({"tls": {"mode": "acme", "server_name": "releasy.lab.test", "acme": {
            "email": acme.EMAIL, "directory_url": acme.directory_url(ident),
            "ca_bundle": acme.ca_bundle(ident).name}}} if request.acme else {}),
        "secrets": {"file": "secrets.yaml"},
    }
    header = ("# Generated by `inv lab.up` for the local lab; rewritten on every lab.up.\n"
              "# Same schema as the commented example ./hosts.yaml at the repository root.\n")
    return header + yaml.safe_dump(data, sort_keys=False)


def _wait_booted(ident: LabIdentity, specs: tuple[HostSpec, ...]) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    pending = {s.name for s in specs}
    last: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        def check(name: str) -> tuple[str, str]:
            try:
                proc = subprocess.run([*ssh_base(ident), name, "systemctl",
                                       "is-system-running"], capture_output=True, text=True,
                                      timeout=10)
                return name, proc.stdout.strip() or proc.stderr.strip()[-200:]
            except subprocess.TimeoutExpired:
                return name, "ssh timed out"
        with ThreadPoolExecutor(max_workers=16) as pool:
            for name, answer in pool.map(check, sorted(pending)):
                last[name] = answer
                if answer in ("running", "degraded"):
                    pending.discard(name)
        if pending:
            time.sleep(0.3)
    if pending:
        detail = ", ".join(f"{n}: {last.get(n, '?')}" for n in sorted(pending))
        raise SystemExit(f"lab: hosts did not finish booting within {BOOT_TIMEOUT:.0f} s "
                         f"({detail}); see {ident.run_dir}/hosts/NAME/console.log")


def _build_releases(ident: LabIdentity) -> None:
    from .standin.build import default_releases
    default_releases(ident.state_dir / "releases")


def operator_ssh(ident: LabIdentity, host: str, *argv: str, timeout: float = 60,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run a command on a lab host with the plain OpenSSH client (tests use it to look at
    hosts independently of our executor)."""
    # ssh joins its arguments into one shell line: quote them so they arrive as words.
    proc = subprocess.run([*ssh_base(ident), host, shlex.join(argv)], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ssh {host} {argv}: exit {proc.returncode}: {proc.stderr}")
    return proc

