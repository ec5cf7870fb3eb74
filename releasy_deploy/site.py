"""`fab site`: provision every tier in dependency order, then the firewall, safely on an
environment that serves (the deploy lock held, app restarts rolled by the change engine).

First every host's facts in one parallel read and its packages in one apt call
(`tiers.prepare`). Then db first (the app needs its password), then app (the proxy's
upstreams must answer), then proxy, then the firewall last so a rule mistake cannot stop
the earlier steps from finishing. On a fleet whose firewall is on already, the allow rules
new hosts need (the db's PostgreSQL rule for a new app host) are opened before the app
tier (`firewall.open_ahead`): only the closing waits for the end. Hosts of one tier run in
parallel inside each tier's setup.

Only the database must wait for the db host's install; the app hosts and proxies would
otherwise sit idle meanwhile. So a host goes on as soon as its own packages are in
(`_after_packages`): where its firewall was off (ufw absent or inactive: a first install)
it gets its firewall, beside the other steps (`beside.Beside`): its plan is the one every
later run works under and depends on no tier's result. An app host with no release yet
gets its account, directories and release (not the env file: it needs the database's
password). Both start, as the packages do, before the deploy lock is taken (a first
install has no database to hold it in yet). On a first install the db step also makes
the cluster itself (the package is told not to) and goes on once it accepts connections:
the end of its start, Debian's own 2 s of checks, runs beside too. The firewall step
waits for what runs beside; a run that fails elsewhere waits for it too, before it
releases the lock, and reports its failures as well."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from contextlib import ExitStack, contextmanager

from . import schema
from .beside import Beside
from .commands.nginx import MAINTENANCE_ON, ready_through_proxy_argv
from .errors import DeployError
from .executor import HostConnection
from .facts import Fact, read_facts
from .inventory import Host, Inventory
from .lazy import lazy_module
from .lock import LockBusy, LockInfo, busy_message, deploy_lock, holder_info, prepare_lock
from .pipeline import Pipeline
from .session import Session
from .tiers import app_secrets, app_setup, db, firewall, prepare, proxy_setup
from .tiers.app_facts import ReleasyReleases

if TYPE_CHECKING:
    from .releases import LocalRelease

# Only a run that restarts serving app hosts (blue/green, the rolling runner) or names a
# version (its tarball, the backups) needs these: loading them costs a no-op run ~0.1 s.
backups = lazy_module("releasy_deploy.backups")
bluegreen = lazy_module("releasy_deploy.bluegreen")
engine_plan = lazy_module("releasy_deploy.engine.plan")
engine_runner = lazy_module("releasy_deploy.engine.runner")
preflight = lazy_module("releasy_deploy.rollout.preflight")
releases = lazy_module("releasy_deploy.releases")

STEPS = ("db", "app", "proxy", "firewall")


def smoke_test(session: Session) -> None:
    """End-to-end check: every proxy answers /ready with 200 from a Releasy instance; a
    proxy whose maintenance page is on (an operator's choice, or a restore that stopped)
    is said to be so, not failed."""
    argv = ready_through_proxy_argv(session.inventory.tls.server_name)

    def check(conn):
        result = conn.run(argv, check=False, mutates=False)
        answer = result.stdout.strip()
        if answer == MAINTENANCE_ON:
            session.reporter.info(conn.name, "maintenance page on: https /ready through the"
                                             " proxy not checked (`fab proxy.maintenance"
                                             " --off` ends the page)")
            return
        if answer != "200":
            raise DeployError(
                f"{conn.name}: https://{session.inventory.tls.server_name}/ready through the "
                f"proxy answered {answer or result.stderr.strip()!r}, not 200; "
                "check `fab app_setup.setup` output and the app hosts' journals", host=conn.name)
        session.reporter.info(conn.name, "https /ready through the proxy: 200")

    session.executor.each(session.inventory.hosts_in("proxy"), check)


def check_artifact(session: Session, version: str | None) -> LocalRelease | None:
    """The release tarball found and its sha256 verified here, before any host is contacted
    (the lock included): a bad artifact is bad input with nothing touched (exit 2)."""
    return None if version is None else releases.fetch_release(session.inventory, version)


def refuse_if_locked(session: Session) -> None:
    """Exit 3 before touching anything when another task holds the deploy lock. Read-only;
    on hosts where the database is not set up yet there is no lock to hold: go on."""
    try:
        holder = holder_info(session)
    except DeployError:
        return  # no database yet (first install) or not reachable: db.setup says more
    if holder is not None:
        raise LockBusy(busy_message(session.inventory.environment, holder), holder=holder)


def behind_database_facts(inv: Inventory, version: str | None) -> dict[str, list[Fact]]:
    """What `refuse_behind_database` reads, host name -> facts: the recorded levels on every
    app host, the migration level and the backups on the db host; nothing without a
    version. `run` prefetches them with every tier's facts (no round trip of their own)."""
    if version is None:
        return {}
    wanted: dict[str, list[Fact]] = {h.name: [schema.RecordedLevels()]
                                     for h in inv.hosts_in("app")}
    wanted.setdefault(schema.level_host(inv).name, []).extend(
        [schema.level_fact(inv), backups.BackupListing()])
    return wanted


def refuse_behind_database(session: Session, version: str | None) -> None:
    """Before anything is touched: BadInput (exit 2) when ``version`` is known to have run
    against fewer migrations than the database holds (its binary would refuse to start).
    Reads `behind_database_facts`: one read-only round trip per app host and the db host,
    none on a host whose facts were prefetched (`fab site`); nothing to check without a
    database yet (a first install)."""
    if version is None:
        return
    inv = session.inventory
    wanted = behind_database_facts(inv, version)
    found = session.executor.each(
        [inv.host(n) for n in wanted],
        lambda c: read_facts(c, wanted[c.name], sudo=True, reuse=True))
    where = schema.level_host(inv).name
    schema.refuse_if_behind(version, [found[h.name][schema.RecordedLevels()]
                                      for h in inv.hosts_in("app")],
                            found[where][backups.BackupListing()],
                            found[where][schema.level_fact(inv)])


@contextmanager
def change_lock(session: Session, *, version: str | None = None,
                wait: float = 0) -> Iterator[LockInfo | None]:
    """The deploy lock for a task that changes hosts (site, the tier setups, the firewall):
    LockBusy (exit 3) when another task holds it. Before the database exists (a first
    install, whose first step creates it) there is nothing to hold it in: None."""
    inv = session.inventory
    if session.dry_run:
        # Read-only: the lock is not taken (nor reported as a change).
        session.reporter.info(inv.db_host.name, "dry run: the deploy lock is not taken")
        yield LockInfo(environment=inv.environment, where="dry run", version=version,
                       note="dry run: lock not taken")
        return
    if inv.database.kind != "sqlite":
        try:
            db.database_url(session)
        except DeployError:
            session.reporter.info(inv.db_host.name, "no database yet: nothing to hold the"
                                                    " deploy lock in (first install)")
            yield None
            return
    with deploy_lock(session, version=version, wait=wait) as lock:
        yield lock


def setup_app(session: Session, version: str | None, lock: LockInfo | None, *,
              rotate: Iterable[str] = (),
              secrets: tuple[Any, Any] | None = None) -> tuple[str, ...]:
    """The app tier, safe on an environment that serves: files are written everywhere in
    parallel, but a host that serves and must restart (a changed env file or unit, another
    release) is restarted by the change engine, one batch at a time, drained first, with
    the first host alone when the release changes (migrations once) -- never all at once.
    First installs (nothing serves yet) and single hosts start in parallel as before.
    Returns the app hosts installed for the first time (ready now, not in rotation yet)."""
    inv = session.inventory
    rolling = not inv.is_single_host and len(inv.hosts_in("app")) >= 2
    done = app_setup.setup(session, version,
                     defer_restarts=(rolling or inv.is_single_host) and lock is not None,
                     rotate=rotate, secrets=secrets)
    unrecorded = done.unrecorded
    if done.deferred and lock is not None and inv.is_single_host:
        # One host: a fresh instance beside the live one, then the switch (blue/green).
        if not session.dry_run:
            bluegreen.run(session, version, lock=lock, yes=True)  # site asks nothing here
        else:
            session.reporter.would(inv.hosts_in("app")[0].name, "start a fresh instance beside"
                                   " the live one (blue/green), switch the proxy to it")
    elif done.deferred and lock is not None:
        if _roll_restarts(session, version, lock, done.deferred):
            # The rollout recorded the level of the release it rolled out everywhere.
            unrecorded = {h: v for h, v in unrecorded.items() if v != version}
    app_setup.record_levels(session, unrecorded)
    return done.first_installs


def _roll_restarts(session: Session, version: str | None, lock: LockInfo,
                   deferred: dict[str, list[str]]) -> bool:
    """The deferred restarts (and release switches) of the app hosts, by the change
    engine. True when ``version`` was rolled out (its level recorded by the runner)."""
    inv = session.inventory
    rolled = False
    timeout = float(inv.app.ready_timeout)
    pre = preflight.gather(session)
    states = list(pre.apps.values())
    if version is not None and any(pre.apps[n].current != version for n in deferred):
        # Checked before anything was touched too; again under the lock, on fresh facts.
        schema.refuse_if_behind(version, [st.levels for st in states], pre.backups,
                                pre.db_level)
        problems = preflight.preflight_problems(states, version)
        if problems:
            raise DeployError("not switching the release (the new files are written):\n  "
                              + "\n  ".join(problems))
        plan = engine_plan.plan_release_rollout(
            states, version, 1, flow="site", title="Rolling deploy", backup=True,
            stage_release=False, only=session.limit,
            held_advice=f"The other app hosts keep their release: `fab deploy.rolling"
                        f" --version {version}` brings them to it.")
        pipe = Pipeline("site", session.reporter)
        engine_runner.RollingRunner(session, pipe, lock, pre, plan, release=None,
                                    ready_timeout=timeout).run(yes=True)
        rolled = bool(plan.batches)
        deferred = {n: why for n, why in deferred.items() if n in plan.skipped}
        if not deferred:
            return rolled
        pre = preflight.gather(session)
    plan = engine_plan.plan_reconfigure(list(deferred), pre.apps)
    pipe = Pipeline("app_setup.setup", session.reporter)
    engine_runner.RollingRunner(session, pipe, lock, pre, plan, release=None,
                                ready_timeout=timeout).run(yes=True)
    return rolled


def _after_packages(session: Session, seen: dict[str, dict[Fact, Any]],
                    firewall_off: list[Host], release: LocalRelease | None
                    ) -> tuple[Beside | None, Callable[[HostConnection], None] | None]:
    """What a host does as soon as its packages are in (the packages step's ``then``), not
    waiting for the db host's install: its firewall, where it was off, begun beside the
    other steps (the `Beside` returned runs them), and on an app host with no release
    yet, the account, directories and release (`app_setup.stage_first_install`). Nothing
    in a dry run."""
    if session.dry_run:
        return None, None
    inv = session.inventory
    first = {h.name for h in session.targets(inv.hosts_in("app"))
             if seen[h.name][ReleasyReleases()].current is None}
    off = {h.name for h in firewall_off}
    beside = None
    if off:
        session.reporter.info("site", f"firewall off on {', '.join(h.name for h in firewall_off)}"
                                      f": each host's is converged once its packages are in,"
                                      f" beside the other steps")
        beside = Beside(what="the firewall", label="site", reporter=session.reporter)

    def then(c: HostConnection) -> None:
        if session.executor.interrupted:
            return  # Ctrl-C: this host's install ran to its end, nothing more begins
        if beside is not None and c.name in off:
            beside.start(c.name, lambda: firewall.apply(session, hosts=[c.host]))
        if c.name in first:
            app_setup.stage_first_install(c, inv, release)
    return beside, then


def run(session: Session, version: str | None = None, *, wait: float = 0,
        rotate: Iterable[str] = (), yes: bool = False) -> dict[str, int]:
    """Converge the whole inventory (or the hosts of ``session.limit``, in the same tier
    order: plans still derive from every host); returns the change tally summed over hosts.

    Under the deploy lock from the app tier on (the database it lives in comes first); a
    lock held elsewhere stops it before anything is touched (exit 3). The app hosts'
    secrets are checked first too: one that would drift is refused (exit 2) before any
    tier is touched."""
    started = time.monotonic()
    release = check_artifact(session, version)
    if not session.dry_run:
        prepare_lock(session)  # read, then taken, after the hosts answer the prefetch
    # Every tier's first look at every host, in one parallel read (read-only), with what
    # the database-level check below looks at.
    seen = prepare.prefetch_all(session, behind_database_facts(session.inventory, version))
    if not session.dry_run:
        refuse_if_locked(session)
    refuse_behind_database(session, version)
    secrets = app_secrets.resolve_secrets(session, rotate)
    joining: tuple[str, ...] = ()  # app hosts installed for the first time: into rotation
    firewall_on, firewall_off = firewall.split_by_seen(session, seen)
    with ExitStack() as stack:
        beside, then = _after_packages(session, seen, firewall_off, release)
        if beside is not None:
            stack.callback(beside.finish)
        # A cluster made by this run: its start ends beside the app and proxy steps.
        pg_start = Beside(what="the first start of PostgreSQL", label="site",
                          reporter=session.reporter)
        stack.callback(pg_start.finish)
        step_started = time.monotonic()
        installed = prepare.install_packages(session, seen, then=then)
        if installed:
            session.reporter.info("site", f"packages done in"
                                          f" {time.monotonic() - step_started:.1f} s"
                                          f" ({', '.join(installed)}, at once)")
        for step in STEPS:
            step_started = time.monotonic()
            session.reporter.info("site", f"--- {step} ---")
            if step == "db":
                # A PostgreSQL restart (downtime) asks first.
                db.setup(session, yes=yes, beside=pg_start)
                lock = stack.enter_context(change_lock(session, version=version, wait=wait))
                stack.callback(pg_start.finish)  # unwinding: wait for these, then the lock
                if beside is not None:
                    stack.callback(beside.finish)
            elif step == "app":
                # A grown fleet behind a firewall that is on: its new hosts' allow rules
                # (the db's PostgreSQL rule for a new app host) before the app tier.
                firewall.open_ahead(session, seen)
                joining = setup_app(session, version, lock, rotate=rotate, secrets=secrets)
            elif step == "proxy":
                proxy_setup.setup(session, joining=joining)
            else:
                pg_start.wait()
                if beside is None:
                    firewall.apply(session)
                else:
                    beside.wait()
                    if firewall_on:
                        firewall.apply(session, hosts=firewall_on)
            session.reporter.info("site", f"{step} done in"
                                          f" {time.monotonic() - step_started:.1f} s")
    if not session.dry_run:
        smoke_test(session)
    tally = session.reporter.tally()
    totals = {
        "changed": sum(t.changed for t in tally.values()),
        "unchanged": sum(t.unchanged for t in tally.values()),
        "would": sum(t.would for t in tally.values()),
    }
    session.reporter.summary()
    verb = "would change" if session.dry_run else "changed"
    count = totals["would"] + totals["changed"] if session.dry_run else totals["changed"]
    print(f"site: {count} {verb}, {totals['unchanged']} unchanged, "
          f"{len(session.targets(session.inventory.hosts))} hosts"
          f"{' (--limit)' if session.limit is not None else ''},"
          f" {time.monotonic() - started:.1f} s")
    return totals
