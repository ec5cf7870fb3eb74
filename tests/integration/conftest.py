"""The local lab for integration tests: brought up once per lab shape, shared by every module
of that shape, and always torn down at the end so no host, namespace or mount outlives the
test run.

Sharing: each test has a lab shape (the `lab_shape` marker, on the module or on one test;
without one, the default lab: split topology, two app hosts). The suite runs the tests of one
shape together (`pytest_collection_modifyitems` below), so each shape comes up once, plus
once per module that needs hosts nothing has provisioned yet (`lab_session.fresh`, or
`lab_session.pristine` which keeps the running lab when the hosts it names are still
untouched). A module that shares a lab puts it into a known state first (`LabHandle.reset`)
instead of assuming what the previous module left. The order only saves time: any module
still passes on its own (`pytest tests/integration/test_X.py`)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import yaml

from lab import lab as lab_ops
from lab.config import LabIdentity, current_identity
from releasy_deploy.commands.fleet import FLEET_FILE
from releasy_deploy.commands.lock import FREEZE_FILE
from releasy_deploy.commands.nginx import MAINTENANCE_FLAG
from releasy_deploy.commands.postgres import SQLITE_PATH
from tests.integration.labtools import FAB, ROOT, fab_env


# ------------------------------------------------------------------------- lab shapes
Shape = lab_ops.LabRequest
SPLIT = Shape("split", 2).normalized()  # the default lab (`split_lab`, `use()`)
SPLIT3 = Shape("split", 3).normalized()
SINGLE_SQLITE = Shape("single", database="sqlite").normalized()
SINGLE_POSTGRES = Shape("single", database="postgres").normalized()

# The order shapes come up in; a shape not listed here comes after these, in the order its
# first test was collected.
SHAPE_ORDER = (SPLIT, SPLIT3, SINGLE_SQLITE, SINGLE_POSTGRES)

# Within a shape, the modules listed here run first and in this order (the others follow in
# file order). They need hosts nothing has provisioned yet, and are ordered so the ones that
# touch different hosts or tiers share one fresh lab: test_lab ends with `lab.down`; the
# firewall module (listeners by hand on 80/443/5432/8080, ufw disabled afterwards), the load
# generator's (a stand-in on app1), the proxy tier's (nginx on proxy1 only), the db tier's
# (PostgreSQL on db1 only), then the stand-in's (its own port, an empty database) and
# app_tier's split test share a second; test_output and test_site share a third and its first `fab site`
# (`lab_session.first_site`). The modules after them reset the lab they share. On one host,
# test_bluegreen comes last: it shares the lab like the others, but leaves the application
# under its releasy@PORT units, which a reset (`fab site` keeps the live instance) does not
# undo.
MODULE_ORDER = {
    SPLIT: ("test_lab", "test_firewall", "test_loadgen", "test_proxy_tier", "test_db_tier",
            "test_standin_lab", "test_app_tier", "test_output", "test_site"),
    SINGLE_SQLITE: ("test_app_tier", "test_site", "test_backups", "test_lock",
                    "test_bluegreen"),
    SINGLE_POSTGRES: ("test_site", "test_db_tier", "test_bluegreen"),
}
# Last of all, whatever their shape: they look at what every other module left behind.
LAST_MODULES = ("test_zz_no_secrets_in_output",)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "lab_shape(topology='split', apps=2, database='postgres', suite='bookworm',"
                   " db_suite='', bastion=False, acme=False, proxies=1): the lab the test"
                   " runs on (the arguments of `lab_session.use`); tests of one shape run"
                   " together")


def shape_of(item) -> lab_ops.LabRequest:
    marker = item.get_closest_marker("lab_shape")
    if marker is None:
        return SPLIT
    return Shape(*marker.args, **marker.kwargs).normalized()


def lab_order(items) -> list:
    """The integration tests grouped by lab shape (see SHAPE_ORDER and MODULE_ORDER); a
    module's tests keep their file order."""
    shapes = list(SHAPE_ORDER)
    for item in items:
        if shape_of(item) not in shapes:
            shapes.append(shape_of(item))

    def key(indexed):
        index, item = indexed
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in LAST_MODULES:
            return (len(shapes), 0, index)
        shape = shape_of(item)
        listed = MODULE_ORDER.get(shape, ())
        rank = listed.index(module) if module in listed else len(listed)
        return (shapes.index(shape), rank, index)

    return [item for _, item in sorted(enumerate(items), key=key)]


# The test being set up and its lab shape: a lab it asks for must have that shape, or the
# grouping above would boot labs back and forth without anyone noticing.
_RUNNING: list = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _RUNNING[:] = [item.nodeid, shape_of(item)]


# What each lab shape's tests cost (seconds, from the suite's own summary, 3 shards on the
# 2-core machine, 2026-12-07; the single SQLite shape with test_faults_restore's ~40 s
# added): `--lab-shard` balances the shards on it. A shape is one
# unit of work: split between shards, its lab would come up (and be provisioned: a first
# install, CPU-bound) in both, which cost more than the finer balance saved (per (shape,
# module) units: 19-21 min, 16 bring-ups; whole shapes: 18 min, 12 bring-ups). A shape
# not listed counts as 60 s.
SHAPE_SECONDS = {
    SPLIT: 900, SPLIT3: 780, SINGLE_SQLITE: 390, SINGLE_POSTGRES: 165,
    Shape("split", 2, bastion=True, acme=True, proxies=2).normalized(): 115,
    Shape("split", 2, suite="trixie").normalized(): 100,
    Shape("split", 2, suite="trixie", db_suite="bookworm").normalized(): 55,
    Shape("single", suite="trixie").normalized(): 45,
}
# The unit tests run in shard 1: what they cost, for the balance.
UNIT_SECONDS = 80


def _module(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


def shards(items, count: int) -> list[set]:
    """The lab shapes of each of ``count`` shards: the costliest shape first, each to the
    shard with the least so far (shard 1 starts with the unit tests)."""
    shapes = list(dict.fromkeys(shape_of(i) for i in items))
    load = [UNIT_SECONDS] + [0] * (count - 1)
    chosen: list[set] = [set() for _ in range(count)]
    for shape in sorted(shapes, key=lambda s: -SHAPE_SECONDS.get(s, 60)):
        least = load.index(min(load))
        chosen[least].add(shape)
        load[least] += SHAPE_SECONDS.get(shape, 60)
    return chosen


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--lab-shard I/N`` -> (I, N); None without it."""
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        raise pytest.UsageError(f"--lab-shard wants I/N with 1 <= I <= N, got {text!r}")
    return index, count


def pytest_collection_modifyitems(session, config, items):
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in Path(str(item.path)).parents]
    for slot, item in zip(slots, lab_order([items[i] for i in slots])):
        items[slot] = item
    shard = parse_shard(config.getoption("lab_shard"))
    if shard is None:
        return
    index, count = shard
    lab_items = [items[i] for i in slots if _module(items[i]) not in LAST_MODULES]
    mine = shards(lab_items, count)[index - 1]
    # The last modules look at what the others left in this process: every shard runs them.
    keep = [i for i in items if here not in Path(str(i.path)).parents
            or shape_of(i) in mine or _module(i) in LAST_MODULES]
    if index > 1:  # the unit tests run once, in shard 1
        keep = [i for i in keep if here in Path(str(i.path)).parents]
    kept = {id(i) for i in keep}
    dropped = [i for i in items if id(i) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@dataclass
class LabHandle:
    ident: LabIdentity
    topology: str
    inventory: Path

    @property
    def state_dir(self) -> Path:
        return self.ident.state_dir

    @property
    def releases(self) -> Path:
        return self.ident.state_dir / "releases"

    def host_root(self, host: str) -> Path:
        """The host's root filesystem as seen from this machine (for test set-up only)."""
        return lab_ops.machine.host_dir(self.ident, host) / "root"

    def inventory_variant(self, directory: Path, change=None) -> Path:
        """A copy of the lab inventory in ``directory`` (its relative paths made absolute, so
        it works from there), changed in place by ``change(data)`` when given."""
        data = yaml.safe_load(self.inventory.read_text())
        base = self.inventory.parent
        data["known_hosts"] = str(base / data["known_hosts"])
        data["ssh"]["identity_file"] = str(base / data["ssh"]["identity_file"])
        data["release"]["source"] = str(base / data["release"]["source"])
        data["secrets"]["file"] = str(base / data["secrets"]["file"])
        acme = data["tls"].get("acme") or {}
        if "ca_bundle" in acme:
            acme["ca_bundle"] = str(base / acme["ca_bundle"])
        if change is not None:
            change(data)
        path = directory / "hosts.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def sudo(self, host: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """As root on any lab host (app2 logs in as the sudo user `deploy`)."""
        return self.ssh(host, "sudo", "-n", *argv, check=check)

    def reset_to(self, version: str, app_hosts, *, inventory: Path | None = None,
                 timeout: float = 600) -> None:
        """A brand-new database, no dumps, no recorded migration levels and no fleet record
        left by earlier modules, then `fab site --version VERSION`."""
        started = time.monotonic()
        self.clear(app_hosts, inventory=inventory)
        self.fab("site", "--version", version, inventory=inventory, timeout=timeout)
        _RESET_SECONDS.append(time.monotonic() - started)

    def clear(self, app_hosts, *, inventory: Path | None = None) -> None:
        """Releasy stopped on ``app_hosts`` (their recorded migration levels gone), the
        application database dropped (when there is one), no dumps, no fleet record, no
        deploy freeze and no maintenance page."""
        data = yaml.safe_load((inventory or self.inventory).read_text())
        for host in data["tiers"]["proxy"]:
            self.sudo(host, "rm", "-f", MAINTENANCE_FLAG)
        for host in app_hosts:
            self.sudo(host, "sh", "-c", "systemctl stop releasy.service 2>/dev/null;"
                                        " rm -f /opt/releasy/releases/*/.schema-version",
                      check=False)
        drop = (f"rm -f {SQLITE_PATH} {SQLITE_PATH}-wal {SQLITE_PATH}-shm"
                if data["database"]["kind"] == "sqlite" else
                "if command -v psql >/dev/null; then runuser -u postgres -- psql -XAtq -c"
                " 'DROP DATABASE IF EXISTS releasy WITH (FORCE)'; fi")
        self.sudo(data["tiers"]["db"][0], "sh", "-c",
                  f"cd / && {drop}; rm -rf /var/backups/releasy {FLEET_FILE} {FREEZE_FILE}")

    def reset(self, version: str = "1.0.0", *, inventory: Path | None = None,
              timeout: float = 900) -> "LabHandle":
        """Put a shared lab into a known state, whatever the modules before left behind:
        `reset_to` (a brand-new database, no dumps, `fab site --version VERSION`, which also
        converges every config file and the firewall to the inventory) and every app host
        back in the proxies' rotation."""
        data = yaml.safe_load((inventory or self.inventory).read_text())
        self.reset_to(version, data["tiers"]["app"], inventory=inventory, timeout=timeout)
        self.fab("proxy.setup", "--reset-upstreams", inventory=inventory)
        return self

    def settle(self, version: str | None = None) -> None:
        """What a module sharing the lab leaves for the next one, whatever its tests did or
        where one failed, through the operator's own tasks: every host's network link up,
        the maintenance page off, deploys not frozen, the whole fleet on ``version`` (when
        given: a canary or a skipped host finished) and every app host in the proxies'
        rotation. Best effort: what it cannot fix, the next module's `reset` does."""
        tiers = yaml.safe_load(self.inventory.read_text())["tiers"]
        for host in dict.fromkeys(h for names in tiers.values() for h in names):
            lab_ops.restore_link(host)
        self.fab("proxy.maintenance", "--off", check=False)
        self.fab("deploy.unfreeze", check=False)
        if version is not None:
            self.fab("deploy.rolling", "--version", version, "--yes", check=False)
        self.fab("proxy.setup", "--reset-upstreams", check=False)

    def ssh(self, host: str, *argv: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Look at a host with the plain OpenSSH client, independently of our executor."""
        return lab_ops.operator_ssh(self.ident, host, *argv, check=check, timeout=timeout)

    def probe(self, host: str, port: int, source: str = "outside") -> str:
        return lab_ops.probe(host, port, source)

    def fab(self, *args: str, inventory: Path | None = None, check: bool = True,
            env: dict | None = None, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run the operator CLI exactly as an operator would (a separate process); stdin is
        ``input`` on a pipe, or /dev/null: never a terminal."""
        full_env = fab_env(inventory or self.inventory, **(env or {}))
        # stdin from /dev/null, as under cron: nothing may wait for an answer.
        stdin = {"stdin": subprocess.DEVNULL} if input is None else {"input": input}
        proc = subprocess.run([FAB, "-r", str(ROOT / "fabfile"), *args], cwd=ROOT,
                              env=full_env, capture_output=True, text=True, timeout=timeout,
                              **stdin)
        _CAPTURED.append(proc.stdout + proc.stderr)
        _remember_secrets(self)
        if check and proc.returncode != 0:
            raise AssertionError(f"fab {' '.join(args)} exited {proc.returncode}\n"
                                 f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        return proc


# Every fab output the suite captured, and every secret value that existed at the time:
# the last test greps the former for the latter.
_CAPTURED: list[str] = []
_SECRETS: set[str] = set()


def _remember_secrets(lab: "LabHandle") -> None:
    secrets_file = lab.state_dir / "secrets.yaml"
    if secrets_file.exists():
        values = yaml.safe_load(secrets_file.read_text()) or {}
        _SECRETS.update(str(v) for v in values.values() if v)
    state = lab_ops.read_state(lab.ident) or {"hosts": {}}
    for host in state["hosts"]:
        # Read from the host's filesystem directly: no SSH, nothing printed.
        password = lab.host_root(host) / "etc/releasy/database-password"
        if password.exists():
            _SECRETS.add(password.read_text().strip())


@pytest.fixture(scope="session")
def known_secrets() -> set[str]:
    return _SECRETS


@pytest.fixture(scope="session")
def captured_outputs() -> list[str]:
    return _CAPTURED


class LabSession:
    def __init__(self) -> None:
        self.ident = current_identity()
        self.current: tuple | None = None
        # every time hosts were booted (the shape, seconds), for the summary
        self.bring_ups: list[tuple[str, float]] = []
        self._first_site: tuple | None = None

    def use(self, topology: str = "split", apps: int = 2, database: str = "postgres",
            suite: str = "bookworm", db_suite: str = "", *, bastion: bool = False,
            acme: bool = False, proxies: int = 1) -> LabHandle:
        """The running lab when it has this shape (as earlier modules left it), else a new
        one."""
        self._first_site = None
        return self._up(Shape(topology, apps, database, suite, db_suite, bastion=bastion,
                              acme=acme, proxies=proxies))

    def fresh(self, topology: str = "split", apps: int = 2, database: str = "postgres",
              suite: str = "bookworm", db_suite: str = "", *, bastion: bool = False,
              acme: bool = False, proxies: int = 1) -> LabHandle:
        """A lab whose hosts have never been provisioned (replaces any current lab)."""
        lab_ops.down()
        return self.use(topology, apps, database, suite, db_suite, bastion=bastion, acme=acme,
                        proxies=proxies)

    def pristine(self, topology: str = "split", apps: int = 2, *,
                 untouched: dict[str, tuple[str, ...]], **shape) -> LabHandle:
        """A lab of this shape where, on each host named in ``untouched``, none of its paths
        exists (say {"proxy1": ("/etc/nginx",)}: nothing has set up nginx there yet): the
        running lab when it qualifies, else a fresh one. For modules that need only some
        hosts or tiers untouched, so that several of them can share one fresh lab."""
        handle = self.use(topology, apps, **shape)
        if any(handle.ssh(host, "ls", "-d", *paths, check=False).stdout.strip()
               for host, paths in untouched.items()):
            handle = self.fresh(topology, apps, **shape)
        return handle

    def first_site(self, workdir: Path, version: str = "1.0.0"):
        """(lab, process, JSON-log events) of the first `fab site --version VERSION` on a
        fresh split lab, run once and shared by the modules that look at it, as long as no
        other module has used the lab since (they run one after the other: MODULE_ORDER)."""
        if self._first_site is None:
            lab = self.fresh("split", 2)
            log = workdir / "first-site.jsonl"
            proc = lab.fab("site", "--version", version, env={"RELEASY_JSON_LOG": str(log)})
            events = [json.loads(line) for line in log.read_text().splitlines()]
            self._first_site = (lab, proc, events)
        return self._first_site

    def _up(self, request: lab_ops.LabRequest) -> LabHandle:
        if _RUNNING and _RUNNING[1] != request.normalized():
            pytest.fail(f"{_RUNNING[0]} asks for the lab {_label(request)} but its lab_shape"
                        f" is {_label(_RUNNING[1])}: mark it with the shape it uses"
                        f" (`pytest.mark.lab_shape(...)`, see tests/integration/conftest.py)")
        before = lab_ops.read_state(self.ident)
        started = time.monotonic()
        inventory = lab_ops.up(request)
        after = lab_ops.read_state(self.ident)
        if before is None or _launchers(before) != _launchers(after):
            self.bring_ups.append((_label(request), time.monotonic() - started))
        self.current = tuple(asdict(request).values())
        return LabHandle(self.ident, request.topology, inventory)


def _label(request: lab_ops.LabRequest) -> str:
    shape = request.normalized()
    return (f"{shape.topology} apps={shape.apps} {shape.database} {shape.suite}"
            + (f"/{shape.db_suite}" if shape.db_suite != shape.suite else "")
            + (" bastion" if shape.bastion else "") + (" acme" if shape.acme else "")
            + (f" proxies={shape.proxies}" if shape.proxies != 1 else ""))


def _launchers(state: dict | None) -> dict:
    return {n: h.get("launcher") for n, h in (state or {}).get("hosts", {}).items()}


_SESSION: list[LabSession] = []


# Seconds per integration module: its tests' setup, call and teardown (module fixtures, and
# so any lab bring-up or reset, count for the module that needed them).
_MODULE_SECONDS: defaultdict[str, float] = defaultdict(float)
# The same per lab shape (what `SHAPE_SECONDS` balances the shards on).
_SHAPE_SECONDS: defaultdict[str, float] = defaultdict(float)
# Seconds of each `LabHandle.reset_to` (a shared lab put back to a known state).
_RESET_SECONDS: list[float] = []


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::", 1)[0]
    if "tests/integration/" in module:
        _MODULE_SECONDS[module.rsplit("/", 1)[-1]] += report.duration
        if _RUNNING and _RUNNING[0] == report.nodeid:
            _SHAPE_SECONDS[_label(_RUNNING[1])] += report.duration


def pytest_terminal_summary(terminalreporter):
    """The lab's costs, to see where the suite's time goes: each bring-up (hosts booted) and
    each module's wall time, with the machine's load (the figures depend on it)."""
    for session in _SESSION:
        booted = sum(seconds for _, seconds in session.bring_ups)
        terminalreporter.write_line(f"lab bring-ups: {len(session.bring_ups)} ({booted:.0f} s)")
        for n, (shape, seconds) in enumerate(session.bring_ups, 1):
            terminalreporter.write_line(f"  {n:2}. {shape}: {seconds:.0f} s")
    if _RESET_SECONDS:
        terminalreporter.write_line(f"lab resets (new database, `fab site`):"
                                    f" {len(_RESET_SECONDS)} ({sum(_RESET_SECONDS):.0f} s)")
    if _MODULE_SECONDS:
        terminalreporter.write_line(f"integration modules, slowest first (load average"
                                    f" {os.getloadavg()[0]:.1f}):")
        for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"  {seconds:7.0f} s  {module}")
        terminalreporter.write_line("lab shapes (SHAPE_SECONDS):")
        for shape, seconds in sorted(_SHAPE_SECONDS.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"  {seconds:7.0f} s  {shape}")


@pytest.fixture(scope="session")
def lab_session():
    if os.geteuid() != 0:
        pytest.fail("integration tests need root: the lab uses namespaces, mounts and nspawn")
    session = LabSession()
    _SESSION.append(session)
    try:
        yield session
    finally:
        lab_ops.down()


@pytest.fixture(scope="module")
def split_lab(lab_session) -> LabHandle:
    return lab_session.use("split", 2)
