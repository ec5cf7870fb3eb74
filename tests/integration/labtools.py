"""Helpers the lab test modules share: run the operator's CLI as a person would (in the
background, following its output, on a terminal, or holding the deploy lock against it),
look at hosts with plain OpenSSH (releases, PIDs, /ready, the proxy's rotation, the audit
log, the database), fetch through the proxy, and run load through it. One copy here instead
of one per module."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab import lab as lab_ops
from lab.loadgen import LoadGenerator
from releasy_deploy.commands.nginx import MAINTENANCE_FLAG
from releasy_deploy.commands.postgres import SQLITE_PATH

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")


# ------------------------------------------------------------------ the operator's CLI
def fab_env(inventory: Path, **extra: str) -> dict[str, str]:
    """The environment `fab` runs in against ``inventory`` (output unbuffered)."""
    return {**os.environ, "RELEASY_INVENTORY": str(inventory), "PYTHONUNBUFFERED": "1", **extra}


def start_fab(inventory: Path, *args: str, **popen) -> subprocess.Popen:
    """`fab ARGS` as an operator starts it, in the background: stdout and stderr piped as
    text unless ``popen`` says otherwise (stdin: ours, unless it says so too)."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([FAB, "-r", str(ROOT / "fabfile"), *args], cwd=ROOT,
                            env=fab_env(inventory), **options)


class Following:
    """`fab ARGS` (typically ``app.logs --follow``) started by `start_fab`, its stdout read
    into `lines` in the background; the end of the ``with`` block is one Ctrl-C (SIGINT, to
    the PID we started), after which `exit_code` holds how it ended."""

    def __init__(self, inventory: Path, *args: str) -> None:
        self.proc = start_fab(inventory, *args)
        self.lines: list[str] = []
        self.exit_code: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, predicate, what: str, timeout: float = 30) -> None:
        """Until ``predicate(lines)`` holds (fail after ``timeout`` s, showing the lines)."""
        try:
            wait_until(lambda: predicate(self.lines), what, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its lines so far: {self.lines}") from None

    def __enter__(self) -> Following:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.exit_code = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)


class FabTerminal:
    """`fab ARGS` with a terminal (a local pty) as its stdin and stdout, for a ``with`` block
    (which kills it, by its PID, if it is still running at the end)."""

    def __init__(self, inventory: Path, *args: str, **env: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the real CLI
            os.chdir(ROOT)
            os.execve(FAB, [FAB, "-r", str(ROOT / "fabfile"), *args], fab_env(inventory, **env))
        self.seen = bytearray()
        self.exit_code: int | None = None

    def __enter__(self) -> FabTerminal:
        return self

    def __exit__(self, *exc) -> None:
        if self.exit_code is None:
            os.kill(self.pid, signal.SIGKILL)  # only the process we started
            self._reap()

    def _read(self, timeout: float) -> bytes | None:
        """What arrived within ``timeout`` s (None: nothing did; b"": the terminal closed)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        try:
            return os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return b""

    def read_until(self, pattern: bytes, timeout: float = 30) -> None:
        """Read until ``pattern`` has been written (fail after ``timeout`` s, or at EOF)."""
        deadline = time.monotonic() + timeout
        while pattern not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"waited for {pattern!r}; got {bytes(self.seen)[-500:]!r}"
            data = self._read(left)
            assert data != b"", f"EOF waiting for {pattern!r}; got {bytes(self.seen)[-500:]!r}"
            self.seen += data or b""

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def finish(self, timeout: float, what: str) -> str:
        """Read to the end (fail, saying ``what``, when ``timeout`` s pass without a byte),
        reap the process (`exit_code`): everything it wrote, CRLF as LF."""
        while data := self._read(timeout):
            self.seen += data
        assert data is not None, what
        self._reap()
        return bytes(self.seen).decode("utf-8", "replace").replace("\r\n", "\n")

    def _reap(self) -> None:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.exit_code = os.waitstatus_to_exitcode(status)


# Takes the deploy lock through the library in a process of its own and holds it until its
# stdin closes, as a long rollout would (argv[1]: the version it records, "" for none).
HOLDER_CODE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from releasy_deploy.cli import session
from releasy_deploy.lock import deploy_lock
with session() as s, deploy_lock(s, version=sys.argv[1] or None) as info:
    print("held", info.describe(), flush=True)
    sys.stdin.read()
"""


@contextmanager
def deploy_lock_held(inventory: Path, version: str | None = None) -> Iterator[subprocess.Popen]:
    """The deploy lock held by another process for the ``with`` block (yielded once it holds
    the lock); released cleanly at the end."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_CODE, version or ""],
                              env=fab_env(inventory), cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not (lines[-1].startswith("held ") or lines[-1] == ""):
            lines.append(holder.stdout.readline())  # the reporter's lines come first
        assert lines[-1].startswith("held "), lines
        yield holder
    finally:
        holder.stdin.close()  # a clean release
        holder.wait(timeout=30)


# ------------------------------------------------------------------ hosts, seen over plain SSH
def app_octet(host: str) -> int:
    """The last address octet of an app host (app1 -> 21)."""
    return 20 + int(host.removeprefix("app"))


SOLO = "solo"
SERVER_NAME = "releasy.lab.test"
LOAD_THREADS = 4


def sh(lab, *argv: str, check: bool = True, host: str = SOLO) -> str:
    """A command on a lab host (the single host by default) over plain OpenSSH."""
    return lab.ssh(host, *argv, check=check).stdout.strip()  # each word arrives as one


AUDIT_LOG = "/var/log/releasy-deploy/audit.log"


def audit_line_counts(lab, hosts) -> dict[str, int]:
    """How many lines each of ``hosts``' audit logs holds (0 without one)."""
    return {h: int(lab.sudo(h, "sh", "-c", f"wc -l < {AUDIT_LOG} 2>/dev/null || echo 0")
                   .stdout) for h in hosts}


def last_audit(lab, host: str = SOLO) -> dict:
    """The last record of the audit log on ``host`` (read as root)."""
    return json.loads(lab.sudo(host, "tail", "-n1", AUDIT_LOG).stdout)


def psql(lab, sql: str, host: str = "db1", database: str = "releasy") -> list[list[str]]:
    """The rows ``sql`` returns (columns split at |), run as postgres on ``host``."""
    out = lab.sudo(host, "sh", "-c", 'cd / && exec runuser -u postgres -- psql -XAtq'
                                     ' -v ON_ERROR_STOP=1 -d "$2" -c "$1"', "psql", sql, database)
    return [line.split("|") for line in out.stdout.splitlines() if line]


def sqlite(lab, statement: str, host: str = SOLO) -> list[str]:
    """The lines ``statement`` prints, run by sqlite3 on the SQLite topology's database as
    the service account (whatever SQLite creates next to the file stays its own)."""
    return lab.ssh(host, "runuser", "-u", "releasy", "--", "sqlite3", SQLITE_PATH,
                   statement).stdout.splitlines()


def main_pid(lab, host: str = SOLO) -> str:
    """releasy.service's MainPID on ``host`` as systemd shows it ("0" when not running)."""
    return sh(lab, "systemctl", "show", "--property=MainPID", "--value", "releasy.service",
              host=host)


def main_pids(lab, hosts) -> dict[str, str]:
    """`main_pid` of each of ``hosts``."""
    return {h: main_pid(lab, h) for h in hosts}


def changed_total(output: str) -> int:
    """N of the "site: N changed" summary line of a `fab site` output."""
    match = re.search(r"^site: (\d+) changed", output, re.MULTILINE)
    assert match, output
    return int(match.group(1))


def current(lab, host) -> str:
    """The release /opt/releasy/current points at on an app host."""
    return lab.ssh(host, "readlink", "/opt/releasy/current").stdout.strip().rsplit("/", 1)[-1]


def ready(lab, host) -> bool:
    """An app host answers /ready (asked on the host itself, on its private address)."""
    url = f"http://10.77.{lab.ident.subnet_octet}.{app_octet(host)}:8080/ready"
    return lab.ssh(host, "curl", "-fsS", "--max-time", "3", url, check=False).returncode == 0


def wait_until(predicate, what: str, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned); fail after ``timeout``
    seconds naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_ready(lab, host: str, within: float = 60) -> None:
    """Poll `ready` until ``host`` answers /ready; fail after ``within`` seconds."""
    wait_until(lambda: ready(lab, host), f"{host} to answer /ready", within, interval=0.2)


def served_version(lab, host) -> str:
    """/version of the process running on an app host, asked on the host itself."""
    url = f"http://10.77.{lab.ident.subnet_octet}.{app_octet(host)}:8080/version"
    return json.loads(lab.ssh(host, "curl", "-fsS", "--max-time", "3", url).stdout)["version"]


def rotation(lab, proxy: str = "proxy1") -> list[str]:
    """The app hosts the proxy's upstream file lists, in order (addresses it cannot name
    stay addresses)."""
    text = lab.ssh(proxy, "cat", "/etc/nginx/releasy/upstream.conf").stdout
    by_address = {f"10.77.{lab.ident.subnet_octet}.{app_octet(f'app{i}')}:8080": f"app{i}"
                  for i in range(1, 41)}
    return [by_address.get(w[1], w[1]) for line in text.splitlines()
            if len(w := line.split("#", 1)[0].split()) >= 2 and w[0] == "server"]


def assert_all_on(lab, version: str, apps) -> None:
    """Every one of ``apps`` on ``version`` (linked and served), ready, and in rotation."""
    assert {h: current(lab, h) for h in apps} == dict.fromkeys(apps, version)
    assert {h: served_version(lab, h) for h in apps} == dict.fromkeys(apps, version)
    assert all(ready(lab, h) for h in apps), {h: ready(lab, h) for h in apps}
    assert rotation(lab) == list(apps)


def outside_get(lab, url: str, proxy: str = "proxy1",
                name: str = SERVER_NAME) -> tuple[int, str]:
    """GET ``url`` from the outside namespace (the internet), the site's ``name`` resolved
    to ``proxy`` (certificate not checked): (status, body), status 0 when nothing answered."""
    address = lab_ops.read_state(lab.ident)["hosts"][proxy]["address"]
    proc = subprocess.run(
        ["ip", "netns", "exec", lab.ident.outside_ns, "curl", "-ksS", "--max-time", "10",
         "--resolve", f"{name}:443:{address}", "-o", "-", "-w", "\n%{http_code}", url],
        capture_output=True, text=True, timeout=30)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def serving_through_proxy(lab, proxy: str = "proxy1") -> bool:
    """GET /ready through ``proxy``'s TLS site from the outside namespace answers 200."""
    return outside_get(lab, f"https://{SERVER_NAME}/ready", proxy)[0] == 200


def leave_serving(lab, proxy: str = SOLO) -> None:
    """What a module leaves the next one: no maintenance page (taken off if a failure left
    it on), the deploy lock free, the site serving through ``proxy``."""
    lab.fab("proxy.maintenance", "--off", check=False)
    assert lab.fab("deploy.lock").stdout.strip() == "deploy lock of lab: free"
    assert lab.ssh(proxy, "test", "-e", MAINTENANCE_FLAG, check=False).returncode == 1
    assert serving_through_proxy(lab, proxy)


def via_proxy(address: str, path: str = "/", timeout: float = 10) -> tuple[int, str]:
    """GET https://ADDRESS/PATH from this machine, the certificate not checked: (status,
    body), status 0 when nothing answered."""
    proc = subprocess.run(["curl", "-ksS", "--max-time", str(timeout), "-o", "-", "-w",
                           "\n%{http_code}", f"https://{address}{path}"],
                          capture_output=True, text=True, timeout=timeout + 30)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def load_through_proxy(lab, workdir: Path) -> LoadGenerator:
    """Mixed HTTPS load from the outside namespace through proxy1 (bounded: 300 s at most)."""
    return LoadGenerator(f"https://10.77.{lab.ident.subnet_octet}.10/",
                         server_name="releasy.lab.test", threads=4, rate=100, duration=300,
                         timeout=10, workdir=workdir)


def sequential_gets(lab, workdir: Path, seconds: float) -> dict:
    """One client, one request at a time (GET /version through proxy1, HTTPS, from the
    outside namespace) for ``seconds``; its summary, latency figures included."""
    load = LoadGenerator(f"https://10.77.{lab.ident.subnet_octet}.10/",
                         server_name="releasy.lab.test", threads=1, rate=0,
                         duration=seconds, timeout=10, mix="get-version", workdir=workdir)
    with load:
        load.wait_until(lambda p: p["t"] >= seconds - 0.5, timeout=seconds + 30)
    return load.summary


def report_latency(what: str, summary: dict) -> None:
    """Print the figures of `sequential_gets` (and the machine's load: they depend on it)."""
    lat = summary["latency_ms"]
    print(f"\n{what}: {summary['total']} requests, {summary['failed']} failed, p50"
          f" {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms, {lat['slow']} slower"
          f" than {lat['slow_ms']:g} ms (load average {os.getloadavg()[0]:.1f})")


def set_log_level(lab, inventory: Path, level: str) -> None:
    """Rewrite ``inventory`` (a `inventory_variant` of the lab's) with app.log_level LEVEL:
    one changed app env value, which `fab site` applies by a rolling reconfiguration."""
    lab.inventory_variant(inventory.parent, lambda d: d.setdefault("app", {}).update(
        log_level=level))


def report_load(what: str, summary: dict) -> None:
    """Print the request count and the version split over time (seconds since start)."""
    print(f"\n{what}: {summary['total']} requests, {summary['ok']} ok, {summary['failed']}"
          f" failed, {summary['requests_per_s']} req/s, versions {summary['versions']},"
          f" {summary.get('retried_stale_connections', 0)} retried on a fresh connection"
          f" after nginx closed an idle kept-alive one at a reload")
    for second, split in sorted(summary["per_second"].items(), key=lambda kv: int(kv[0])):
        print(f"  t={int(second):>3}s  " + "  ".join(f"{v}: {n}" for v, n in sorted(split.items())))


def assert_no_failed_request(load: LoadGenerator, summary: dict) -> None:
    """Zero failed requests, every response a 200. (A request routed to a stopped host, or
    cut by a restart, would be a 502 from nginx; a refused connection or a timeout an error.)
    The generator retries a request once when nginx closed the idle kept-alive connection it
    was reusing at a reload, as browsers and curl do; those are counted, not failures."""
    failures = [r for r in load.records() if r["status"] != 200]
    assert summary["failed"] == 0 and not failures, failures[:10]


# A no-op `fab site`: every tier's facts of a host in one read (`tiers.prepare`); the
# proxies also run the smoke test, and the database host gets the run's audit record (a run
# that changed nothing is recorded there only): 3 on a single host, 1 on an app host.
NO_OP_SITE_ROUND_TRIPS = 3
NO_OP_SITE_APP_HOST_ROUND_TRIPS = 1


def site_round_trips(lab, log: Path, *args: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Run `fab site` (with ``args``) with a JSON log: its output, and per host (round
    trips, connections) as the executor counted them."""
    out = lab.fab("site", *args, env={"RELEASY_JSON_LOG": str(log)}).stdout
    events = [json.loads(line) for line in log.read_text().splitlines()]
    return out, {e["host"]: (e["round_trips"], e["connections"])
                 for e in events if e["event"] == "round_trips"}


# ------------------------------------------------------------------ fault injection sweeps
FAULT_POINTS_ENV = "RELEASY_FAULT_POINTS"
#: what a run with RELEASY_FAULT set says on stderr: how many host-changing commands it ran
FAULT_COUNT = re.compile(r"fault injection: (\d+) host-changing command")
#: mode -> (RELEASY_FAULT suffix, what the message says, the exit codes allowed)
FAULT_MODES = {"fail": ("", "failed on purpose", (0, 1)),
               "drop": (":drop", "connection dropped on purpose", (0, 1, 4))}


def fault_points(total: int) -> list[int]:
    """The injection points a sweep tries: the first, a middle and the last, or every one
    with RELEASY_FAULT_POINTS=all (`make faults`)."""
    if os.environ.get(FAULT_POINTS_ENV) == "all":
        return list(range(1, total + 1))
    return sorted({1, (total + 1) // 2, total})


# ------------------------------------------------------------------ the single-host lab
def unit(lab, name: str) -> dict[str, str]:
    out = sh(lab, "systemctl", "show", "--property=ActiveState,UnitFileState,MainPID", name)
    return dict(line.split("=", 1) for line in out.splitlines())


def running(lab, name: str) -> tuple[str, str]:
    u = unit(lab, name)
    return u["ActiveState"], u["UnitFileState"]


def upstreams(lab) -> list[str]:
    text = sh(lab, "cat", "/etc/nginx/releasy/upstream.conf")
    return re.findall(r"^\s*server\s+(\S+)", text, re.MULTILINE)


def version_on(lab, port: int = 8080) -> str:
    """/version of the instance on ``port`` of the single host, asked on the host."""
    return json.loads(sh(lab, "curl", "-fsS", f"http://127.0.0.1:{port}/version"))["version"]


def version_timeline(summary: dict) -> list[tuple[int, dict[str, int]]]:
    # In time order: the JSON summary's keys may come back sorted as strings ("10" < "9").
    return sorted((int(second), split) for second, split in summary["per_second"].items())


def describe_load(summary: dict, retries: int) -> str:
    """Count and version split over time, runs of equal seconds folded together."""
    lines = [f"{summary['total']} requests, {summary['ok']} ok, {summary['failed']} failed,"
             f" {retries} retried on a stale keep-alive connection"]
    runs: list[list] = []
    for second, split in version_timeline(summary):
        key = tuple(sorted(split))
        if runs and runs[-1][2] == key and len(key) == 1:
            runs[-1][1] = second
            for v, n in split.items():
                runs[-1][3][v] += n
        else:
            runs.append([second, second, key, dict(split)])
    for first, last, _key, split in runs:
        span = f"{first} s" if first == last else f"{first}-{last} s"
        lines.append(f"  {span:>9}: " + ", ".join(f"{v} x {n}" for v, n in sorted(split.items())))
    return "\n".join(lines)


@contextmanager
def steady_load(lab, workdir: Path) -> Iterator[LoadGenerator]:
    """HTTPS through the proxy from the outside namespace for the ``with`` block: starts once
    answers flow, ends after more have flowed. Then checks nginx was only ever reloaded."""
    address = lab_ops.read_state(lab.ident)["hosts"][SOLO]["address"]
    load = LoadGenerator(f"https://{address}/", server_name=SERVER_NAME, threads=LOAD_THREADS,
                         rate=100, duration=300, workdir=workdir, timeout=5)
    nginx_before = unit(lab, "nginx.service")["MainPID"]
    with load:
        load.wait_until(lambda p: p["ok"] >= 50, timeout=30)
        yield load
        seen = load.progress()["total"]
        load.wait_until(lambda p: p["total"] >= seen + 100, timeout=30)
    assert unit(lab, "nginx.service")["MainPID"] == nginx_before, "nginx was restarted"
    # nginx closes idle keep-alive connections on every reload; the generator retries a
    # request once when that happens before any response byte (as real clients do).
    load.retries = load.summary["retried_stale_connections"]
    print(describe_load(load.summary, load.retries))
    assert load.retries <= 2 * LOAD_THREADS, load.summary  # about one per connection per reload
