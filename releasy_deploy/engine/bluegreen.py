"""Blue/green as a plan (pure): which instance starts on which port, what the finish step
converges, and the sequence of typed steps `engine.sequence.run_sequence` runs, each with
what undoing it means.

The steps: stage (upload and unpack the release; nothing to undo: a staged release is
inert), backup (the pre-deploy dump; nothing to undo), start (the idle instance with the
new release; undone by stopping it and removing its link: it was never in rotation), switch
(the proxies to the new port, then drain the old one; undone only while no proxy uses the
new port: then the idle instance is stopped too; once one does, the new instance is live
and stays: the failure paragraph says so and a re-run converges), finish (enable the new
instance, stop and disable the others, `current`; never undone: the switch before it is the
point of no return). A deploy of the live version is one step: converge the finish.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import schema
from ..bluegreen_state import PLAIN_UNIT, HostState, Live, NotBlueGreenReady, find_live
from ..commands import app as appcmd
from ..commands import bluegreen as bgcmd
from ..commands import systemd
from ..commands.bluegreen import instance_bind, instance_unit
from ..errors import DeployError
from ..inventory import check_version
from .sequence import SequencePlan, Step

__all__ = ["FLOW", "Plan", "plan_deploy", "schema_refusal", "finish_commands", "start_script",
           "plan_bluegreen", "before_switch_paragraph", "switch_paragraph",
           "finish_paragraph", "indent"]

FLOW = "deploy.bluegreen"


@dataclass(frozen=True)
class Plan:
    version: str
    live: Live
    idle_port: int
    start: bool  # False: V is already live; only the finish step is converged
    stop_first: tuple[str, ...] = ()  # our units occupying the idle port, stopped first
    notes: tuple[str, ...] = field(default=())  # conflicts found, for the operator

    @property
    def new_unit(self) -> str:
        return instance_unit(self.idle_port)

    @property
    def target_unit(self) -> str:
        """The unit that is live once the deploy is done."""
        if self.start or self.live.unit is None:
            return self.new_unit
        return self.live.unit

    @property
    def target_port(self) -> int:
        return self.idle_port if self.start else self.live.port


def plan_deploy(state: HostState, version: str, *, restart: bool = False) -> Plan:
    """What a deploy of ``version`` does on this host (pure). ``restart``: start a fresh
    instance even when ``version`` is live (a changed env file or unit takes effect)."""
    check_version(version)
    live = find_live(state)
    idle = state.ports[1] if live.port == state.ports[0] else state.ports[0]
    notes: list[str] = []
    plain = state.units[PLAIN_UNIT]
    if live.unit is not None and live.unit != PLAIN_UNIT and (plain.running or plain.enabled):
        what = " and ".join(w for w, hit in (("enabled", plain.enabled),
                                             (f"{plain.active_state}", plain.running)) if hit)
        notes.append(
            f"conflict: {PLAIN_UNIT} is {what} while {live.unit} is live (did `fab app.setup`"
            f" start it again?); it is not in rotation: stopping and disabling it")
    start = live.unit is None or live.version != version or restart
    stop_first: list[str] = []
    if start:
        ours = state.units_on(idle)
        stop_first = [u for u in ours if state.units[u].running]
        if state.listening[idle] and not stop_first:
            raise NotBlueGreenReady(
                f"{state.host}: port {idle} (the idle one of app.bluegreen_ports) is in use by"
                f" a process that is not a Releasy unit of ours. Find it with `ss -ltnp"
                f" 'sport = :{idle}'` on {state.host} and stop it, or choose other"
                f" app.bluegreen_ports; nothing was changed.", host=state.host)
        for unit in stop_first:
            if unit != PLAIN_UNIT:  # the releasy.service conflict is already noted above
                notes.append(f"{unit} was left running on the idle port {idle} (not in"
                             f" rotation; an interrupted deploy?): stopping it first")
    return Plan(version, live, idle, start, tuple(stop_first), tuple(notes))


def schema_refusal(state: HostState, version: str) -> str | None:
    """Why ``version`` cannot start against the database (pure), or None: known from the
    level recorded for that release, or from the dump taken when leaving it."""
    why = schema.older_than_database(version, [state.levels], state.backups, state.db_level)
    return None if why is None else f"{state.host}: {why}"


def finish_commands(state: HostState, plan: Plan, *, level_now: int | None = None
                    ) -> list[tuple[str, list[str]]]:
    """(what, argv) pairs that leave exactly the target unit enabled and running, every
    other unit of ours stopped and disabled, and `current` on the live version (pure).
    Steps with an empty ``what`` are bookkeeping, not reported as changes: the migration
    level each release ran against (``level_now``: the database's after the new one's
    start), which `deploy.rollback` judges from.

    ``state`` is what preflight read; units in ``plan.stop_first`` were stopped since."""
    target = plan.target_unit
    steps: list[tuple[str, list[str]]] = []
    if not state.units[target].enabled:
        steps.append((f"{target} enabled (starts at boot)",
                      systemd.systemctl("enable", target)))
    old_live = plan.live.unit if plan.start else None
    for name, unit in state.units.items():
        if name == target:
            continue
        if unit.enabled:
            steps.append((f"{name} disabled (no longer starts at boot)",
                          systemd.systemctl("disable", name)))
        if unit.running and name not in plan.stop_first:
            if name == old_live:
                what = (f"{name} stopped (was live on {instance_bind(plan.live.port)},"
                        f" {plan.live.version or 'unknown release'})")
            else:
                what = f"{name} stopped (was {unit.active_state}, not in rotation)"
            steps.append((what, systemd.systemctl("stop", name)))
        elif unit.failed:
            steps.append((f"{name} failed state cleared (not in rotation)",
                          systemd.systemctl("reset-failed", name)))
    live_version = plan.version if plan.start else plan.live.version
    if live_version is not None and state.releases.current != live_version:
        steps.append((f"current -> releases/{live_version} (was"
                      f" {state.releases.current or 'none'})",
                      appcmd.activate_argv(live_version)))
    levels: dict[str, int] = {}
    if plan.start and level_now is not None:
        levels[plan.version] = level_now
    old = plan.live.version if plan.live.unit is not None else None
    if old is not None and state.db_level is not None and old not in state.levels:
        levels[old] = state.db_level  # what the live release has been running against
    if levels:
        steps.append(("", schema.record_script_argv(levels)))
    return steps


def start_script(state: HostState, plan: Plan) -> str:
    """The start step's script for this host (`commands.bluegreen.start_script`)."""
    port = plan.idle_port
    return bgcmd.start_script(port, plan.version, stop_first=plan.stop_first,
                              env_sum=state.env_sums[port],
                              daemon_reload=state.units[plan.new_unit].need_daemon_reload)


def plan_bluegreen(state: HostState, plan: Plan, *, stage: bool, backup: bool,
                   proxies: Sequence[str] = ()) -> SequencePlan:
    """The steps of the deploy ``plan`` decided (pure). ``stage``: a release to upload (not
    for a restart); ``backup``: the pre-deploy dump; ``proxies``: the hosts whose upstream
    switches (the app host itself on a single host)."""
    h = (state.host,)
    version = plan.version
    if not plan.start:
        return SequencePlan(FLOW, f"deploy.bluegreen of {version}", (
            Step("converge", "finish", h, f"{version} is already live"),), plan.notes)
    new, idle, old = plan.new_unit, instance_bind(plan.idle_port), instance_bind(plan.live.port)
    steps = []
    if stage:
        steps.append(Step("stage", "stage", h, f"upload and unpack {version}"))
    if backup:
        steps.append(Step("backup", "backup", h, f"dump the database (migration level"
                                                 f" {state.db_level})"))
    steps += [
        Step("start", "start", h, f"{new} with {version}: migrations, /ready, warm-up",
             undo="stop_idle", undo_what=f"stop {new} (never in rotation), remove its link"),
        Step("switch", "switch", tuple(proxies) or h, f"proxy -> {idle}, drain {old}",
             undo="check_switch", undo_what=f"stop {new} if no proxy uses {idle} yet; once"
                                            f" one does, it stays live (a re-run converges)",
             final=True),
        Step("finish", "finish", h, f"stop {plan.live.unit or 'nothing'}, enable {new},"
                                    f" current -> {version}"),
    ]
    return SequencePlan(FLOW, f"deploy.bluegreen of {version}", tuple(steps), plan.notes)


# ------------------------------------------------------------------------------ the paragraphs
def indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def before_switch_paragraph(host: str, stage: str, plan: Plan, exc: BaseException, *,
                            cleaned: bool | None, level_before: int | None = None,
                            level_now: int | None = None, backup: Any = None) -> str:
    """The one-paragraph explanation: host, stage, what still serves, the cause (with the
    journal lines wait_ready attached), what to do."""
    text = str(exc) if isinstance(exc, DeployError) else f"{type(exc).__name__}: {exc}"
    # wait_ready's advice ("app.setup --version PREVIOUS switches back") is for the plain
    # unit; here the old instance never stopped serving: there is nothing to switch back.
    text = "\n".join(ln for ln in text.splitlines() if "app.setup --version PREVIOUS" not in ln)
    text = text.removeprefix(f"{host}: ")
    live = plan.live
    if live.unit is not None:
        kept = (f"the proxy still sends every request to {live.unit} on"
                f" {instance_bind(live.port)} ({live.version or 'unknown release'}), untouched")
    else:
        kept = f"the proxy was not changed (it still points at {instance_bind(live.port)})"
    if stage in ("stage", "backup"):
        idle = "nothing was started"
    elif cleaned:
        idle = f"{plan.new_unit} was stopped and its link removed"
    elif cleaned is None:
        idle = f"{plan.new_unit} may still be running (not in rotation); a re-run stops it"
    else:
        idle = f"stopping {plan.new_unit} failed too (it is not in rotation); a re-run stops it"
    database = ""
    if level_now is not None and level_before is not None and level_now != level_before:
        restore = (f"`fab deploy.rollback --to {live.version} --restore-db --backup"
                   f" {backup.name}` restores the dump taken before this deploy (writes made"
                   f" since {backup.when} are lost)" if backup is not None and live.version
                   else "restore a dump taken before this deploy")
        database = (f"\n  The database is now at migration level {level_now} (was"
                    f" {level_before}): {live.version or 'the live release'} keeps serving,"
                    f" but would refuse to start again (sqlx VersionMissing): {restore}.")
    return (f"{host}: deploy.bluegreen of {plan.version} failed in stage '{stage}', before"
            f" the switch: {kept}; {idle}.{database}\n  Cause: {indent(text).lstrip()}\n"
            f"  Fix the cause, then deploy again (the same or another version).")


def switch_paragraph(host: str, plan: Plan, exc: BaseException, *, switched: bool | None) -> str:
    """A failed switch after which a proxy uses the new port (``switched``), or may
    (None): the new instance stays, nothing is rolled back."""
    state_now = "is live" if switched else "is running and may be live"
    return (f"{host}: deploy.bluegreen of {plan.version} failed in stage 'switch':"
            f" {plan.new_unit} on {instance_bind(plan.idle_port)} {state_now}; nothing"
            f" was rolled back.\n  Cause: {indent(str(exc)).lstrip()}\n  Re-run `fab"
            f" deploy.bluegreen --version {plan.version}`: it converges.")


def finish_paragraph(host: str, plan: Plan, exc: BaseException) -> str:
    """A failed finish: the new release is live; a re-run converges the rest."""
    return (f"{host}: {plan.version} is live ({plan.new_unit} on"
            f" {instance_bind(plan.idle_port)}), but stage 'finish' failed: {exc}\n"
            f"  Re-run `fab deploy.bluegreen --version {plan.version}`: it converges.")
