"""`fab db.restore` as a plan: preflight reads the state (`db_state`), the pure planner
`plan_restore` turns it into a `SequencePlan`, and `engine.sequence.run_sequence` runs it
with this flow's actions (the existing ones: `backups.take_snapshot`, `backups.restore`,
the maintenance page, systemd), one undo path, one failure paragraph (`restores`).

The steps, in order::

    backup       save the current database to a pre-restore dump      (nothing to undo)
    maintenance  the maintenance page on for the downtime             (undo: page off as it was)
    stop         stop the Releasy units that run, per host            (undo: start them, /ready)
    restore      the dump in (PostgreSQL: one transaction)            (no undo: the paragraph
                                                                       reads whether it committed)
    start        start the same units again, wait for /ready          (settles stop, maintenance)
    page_off     the maintenance page off (as it was before); a proxy that keeps it
                 fails the restore: its paragraph says the data WAS restored, and how to
                 end the page

After a failure before the dump is in, the runner starts again what ran (Ctrl-C/SIGTERM
deferred), then takes the page off, but only once the hosts are back. Once `start` is
reached nothing is put back: the restored data stays, and if Releasy does not come back the
page stays on and the paragraph says the database WAS restored.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import backups, restores
from .backups import PRE_RESTORE, Backup
from .commands import nginx as nginxcmd
from .commands import systemd
from .db_state import DbState, gather_state, restore_level_problem, unit_bind, units_on_hosts
from .engine.sequence import Failure, SequencePlan, Step, run_sequence
from .errors import BadInput
from .inventory import Inventory
from .lock import deploy_lock
from .pipeline import Pipeline
from .tiers import app as app_tier
from .tiers import maintenance_page

__all__ = ["plan_restore", "restore_task", "RestoreActions", "failure_paragraph"]


def plan_restore(st: DbState, dump: Backup, *, db: str, proxies: Sequence[str]) -> SequencePlan:
    """The restore of ``dump`` given what preflight read (pure)."""
    running = {h: a.running for h, a in st.apps.items()}
    busy = tuple(h for h, units in running.items() if units)
    steps = [Step("backup", "backup", (db,), f"save the current database (migration level"
                                             f" {st.level}) to a new pre-restore dump")]
    if proxies:
        steps.append(Step("maintenance", "maintenance", tuple(proxies),
                          "maintenance page on for the downtime (503 with Retry-After)",
                          undo="page_back",
                          undo_what="maintenance page off as it was, once Releasy is back"))
    if busy:
        kinds = {tuple(units) for units in running.values() if units}
        what = (f"stop {', '.join(kinds.pop())}" if len(kinds) == 1
                else f"stop what runs ({units_on_hosts(running)})")
        steps.append(Step("stop", "stop", busy, what,
                          undo="start", undo_what="start them again and wait for /ready"))
    steps.append(Step("restore", "restore", (db,), f"restore {dump.name} (migration level"
                                                   f" {dump.level})"))
    if busy:
        steps.append(Step("start", "start", busy, "start the same units again, wait for"
                                                  " /ready", settles=("stop", "maintenance")))
    if proxies:
        steps.append(Step("page_off", "maintenance", tuple(proxies),
                          "maintenance page off (kept on if it was on before)",
                          settles=("maintenance",)))
    return SequencePlan("db.restore", "Restore", tuple(steps), (f"restore {dump.describe()}",))


@dataclass
class RestoreActions:
    """The steps' actions, and what they learn as they run (the page's earlier state, the
    safety dump, whether the hosts are down). What touches the hosts is in the last
    methods (the existing functions); the rest is the flow's logic."""

    session: Any
    st: DbState
    dump: Backup
    db: str
    running: dict[str, list[str]] = field(default_factory=dict)
    was_on: bool = False
    safety: Backup | None = None
    down: bool = False  # starting Releasy failed: the page stays on

    def __post_init__(self) -> None:
        self.running = {h: a.running for h, a in self.st.apps.items()}

    def table(self) -> dict[str, Any]:
        return {"backup": self.backup, "maintenance": self.page_on, "stop": self.stop,
                "restore": self.restore, "start": self.start, "page_off": self.page_off,
                "page_back": self.page_back}

    def backup(self, step: Step) -> Backup:
        self.safety = self.take_dump()
        return self.safety

    def page_on(self, step: Step) -> bool:
        # Clients get a 503 maintenance page (Retry-After) meanwhile, never a raw 502.
        self.was_on = self.switch_page(True)
        return self.was_on

    def stop(self, step: Step) -> None:
        self.stop_units(step.hosts)

    def restore(self, step: Step) -> None:
        self.restore_dump()

    def start(self, step: Step) -> None:
        try:
            self.start_units(step.hosts)
        except BaseException:
            self.down = True
            raise

    def page_off(self, step: Step) -> None:
        """The last step: the page off (kept on if it was on before). Raises when a proxy
        keeps it: the restore must not end as a success while clients get 503s."""
        self.end_page()

    def page_back(self, step: Step) -> bool:
        """The undo of `maintenance` after a failure: off once the hosts are back (as it
        was before); False: left on. Never raises: the flow is failing already."""
        if self.down:
            return False
        self.switch_page(False)
        return True

    def failed(self, f: Failure) -> BaseException | None:
        return failure_paragraph(f, db=self.db, dump=self.dump, safety=self.safety)

    # -- what touches the hosts
    def take_dump(self) -> Backup:
        return backups.take_snapshot(
            self.session, running=self.st.running_release, level=self.st.level or 0,
            purpose=PRE_RESTORE, existing=self.st.backups, protect=[self.dump.name])

    def switch_page(self, on: bool) -> bool:
        return maintenance_page.switch_for_downtime(self.session, on, was_on=self.was_on)

    def end_page(self) -> None:
        maintenance_page.end_downtime(self.session, was_on=self.was_on)

    def stop_units(self, hosts: Sequence[str]) -> None:
        def one(c) -> None:
            units = self.running[c.name]
            c.run(systemd.systemctl("stop", *units), sudo=True)
            c.reporter.changed(c.name, f"stopped {', '.join(units)} (database restore)")
        self.session.executor.each(hosts, one)

    def restore_dump(self) -> None:
        backups.restore(self.session, self.dump)

    def start_units(self, hosts: Sequence[str]) -> None:
        inv = self.session.inventory

        def one(c) -> None:
            for unit in self.running[c.name]:
                app_tier.restart_service(c, unit)
                bind = unit_bind(inv, inv.host(c.name), unit)
                waited = app_tier.wait_ready(c, bind, inv.app.ready_timeout, unit=unit)
                c.reporter.info(c.name, f"{unit} ready at http://{bind}/ready after"
                                        f" {waited:.1f} s")
        self.session.executor.each(hosts, one)


def failure_paragraph(f: Failure, *, db: str, dump: Backup,
                      safety: Backup | None) -> BaseException | None:
    """The one failure paragraph of `fab db.restore` (None: the original error as it is:
    the safety dump failed, nothing had changed and its own message says what to do)."""
    if f.step.kind == "backup":
        return None
    say = restores.not_back if f.step.kind in ("start", "page_off") else restores.not_restored
    return say(f, db=db, dump=dump, safety=safety)


def restore_task(session, name: str, *, yes: bool = False, wait: float = 0) -> Backup:
    """``fab db.restore --file NAME``: under the deploy lock, with confirmation; every
    Releasy unit that runs is stopped (downtime: no instance can keep serving while its
    tables are replaced), the current data is saved to a pre-restore dump, NAME is
    restored (PostgreSQL: one transaction), the units start again and must answer /ready.
    The proxies' rotation is not touched (nothing is drained: everything is stopped)."""
    inv = session.inventory
    db = backups.backup_host(inv).name
    if "/" in name or backups.parse_backup_name(name) is None:
        backups.find_backup([], name, environment=inv.environment, kind=inv.database.kind,
                            host=db)
    pipe = Pipeline("db.restore", session.reporter)
    with deploy_lock(session, version=None, wait=wait) as lock:
        with pipe.stage("preflight", what="lock, the dump, what runs on the app hosts"):
            st = gather_state(session, with_rotation=True)
            dump = backups.find_backup(st.backups, name, environment=inv.environment,
                                       kind=inv.database.kind, host=db)
            problem = restore_level_problem(dump, st.level, {
                a.host: (a.current, a.levels.get(a.current) if a.current else None)
                for a in st.apps.values()})
            if problem:
                raise BadInput(problem)
        plan = plan_restore(st, dump, db=db, proxies=_proxies(inv))
        for line in [*plan.notes, "plan:", *plan.describe()]:
            session.reporter.info(pipe.name, line)
        actions = RestoreActions(session, st, dump, db)
        if session.dry_run:
            actions.take_dump()  # what the safety dump would be called, which it would prune
            return dump
        with session.reporter.paused():
            session.confirm(
                f"Restore {inv.environment}'s database on {db} from {dump.name} (taken"
                f" {dump.when}, {dump.origin})? Every write made since then is LOST, and"
                f" Releasy is DOWN until it is done:\n  " + "\n  ".join(plan.describe()),
                yes=yes)
        run_sequence(plan, actions.table(), pipe=pipe, lock=lock, on_failure=actions.failed)
        for h, units in actions.running.items():
            if not units:
                session.reporter.info(h, "no Releasy unit was running here before the restore:"
                                         " left stopped")
        _report_rotation(session, st)
        assert actions.safety is not None
        session.reporter.info(db, f"restored {dump.name}; the data from before is in"
                                  f" {actions.safety.name}")
        return dump


def _proxies(inv: Inventory) -> tuple[str, ...]:
    return tuple(h.name for h in inv.hosts_in("proxy"))


def _report_rotation(session, st: DbState) -> None:
    """The proxies' upstream lists were never touched: say where each app host stands."""
    inv = session.inventory
    if inv.is_single_host or not st.upstreams:
        return
    for h in inv.hosts_in("app"):
        server = nginxcmd.check_servers([(h.private_address, inv.app.bind_port)])[0]
        missing = [p for p, servers in st.upstreams.items() if not servers or server not in servers]
        if missing:
            session.reporter.info(h.name, f"not in rotation on {', '.join(missing)} (as before"
                                          f" the restore): `fab app.undrain --host {h.name}`"
                                          f" puts it back")
        else:
            session.reporter.info(h.name, f"in rotation on {', '.join(st.upstreams)}")
