"""Plans as data: what a rolling flow will do, host by host, decided before anything runs.

A planner is a pure function from what preflight saw (`AppState` per app host) and the
operator's flags to a `RollingPlan`: named stages (batches), each host going through the
same typed steps. The runner executes any plan; `--dry-run` prints it from the same data.
Adding a flow means writing a planner, not copying the runner.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..commands import app as appcmd
from ..fleet import FleetRecord

UNIT = appcmd.SERVICE

#: The per-host steps a plan can use, in the order they run on a drained host:
#: point `current` at the target release, restart the unit, poll /ready, check /version.
HOST_STEPS = ("switch", "start", "ready", "validate")
#: Steps after which the host no longer runs what it ran before: undone by restarting it on
#: the release it ran at preflight.
CHANGING_STEPS = frozenset(HOST_STEPS)


@dataclass(frozen=True)
class AppState:
    """What preflight saw on one app host."""

    name: str
    current: str | None
    installed: tuple[str, ...] = ()  # complete releases, oldest first
    markers: Mapping[str, str | None] = field(default_factory=dict)  # version -> sha256
    active: str = "unknown"  # ActiveState of releasy.service
    ready: bool = False
    free_bytes: int | None = None
    levels: Mapping[str, int] = field(default_factory=dict)  # recorded migration levels
    instance_releases: frozenset[str] = frozenset()
    in_rotation: bool = True
    #: out of rotation and behind the fleet (`releasy_deploy.fleet`): a rollout changes it
    #: in place and leaves it out; only `fab app.undrain` puts it back.
    held_out: bool = False

    def holds(self, version: str, sha256: str | None = None) -> bool:
        if version not in self.installed:
            return False
        return sha256 is None or self.markers.get(version) == sha256


@dataclass(frozen=True)
class Batch:
    """One stage of a plan: these hosts go through the plan's host steps together."""

    stage: str  # "migrate" (first host alone), "roll", "restart"
    hosts: tuple[str, ...]
    #: drained first and re-added once ready; False: out of rotation, changed in place and
    #: left out (a host drained by hand).
    rotates: bool = True

    @property
    def label(self) -> str:
        return "+".join(self.hosts)


@dataclass(frozen=True)
class RollingPlan:
    """A whole rolling flow, as data."""

    flow: str  # the task, also the audit action: "deploy.rolling", "app.restart"...
    title: str  # how messages name it: "Rolling deploy", "Rolling restart"
    #: the release every changed host ends on; None: each host keeps the one it runs.
    target: str | None
    host_steps: tuple[str, ...]
    batches: tuple[Batch, ...]
    skipped: tuple[str, ...] = ()  # already where the plan wants them
    #: not yet where the plan wants them, left as they are on purpose (a canary's other
    #: hosts, hosts outside --limit): they keep serving their release beside the target.
    held: tuple[str, ...] = ()
    #: what to do next about the held hosts, said when the plan ends.
    held_advice: str = ""
    stage_release: bool = False  # upload + unpack the target on hosts lacking it first
    backup: bool = False  # dump the database before the first host changes
    #: after the last batch: record migration levels and prune releases (a release change).
    records_release: bool = False
    #: how a host left out of rotation comes back, said in the failure paragraph.
    left_out_advice: str = ""
    #: how messages name the releases when ``target`` is None (e.g. the one they all run).
    current_text: str = "their current releases"
    #: app hosts that could not be reached (--skip-unreachable): (host, in rotation at
    #: preflight: taken out before the first change). Left behind, and recorded so.
    unreachable: tuple[tuple[str, bool], ...] = ()

    def __post_init__(self) -> None:
        unknown = [s for s in self.host_steps if s not in HOST_STEPS]
        if unknown or not self.host_steps:
            raise ValueError(f"host steps must be some of {HOST_STEPS}, got {self.host_steps}")
        if "switch" in self.host_steps and self.target is None:
            raise ValueError("a plan that switches releases needs a target release")

    @property
    def hosts(self) -> list[str]:
        return [n for b in self.batches for n in b.hosts]

    @property
    def first_migrates(self) -> bool:
        return bool(self.batches) and self.batches[0].stage == "migrate"

    @property
    def target_text(self) -> str:
        return self.target if self.target is not None else self.current_text

    def host_words(self) -> str:
        """What happens to each host, in words: "switch to 1.1.0, start, wait for /ready"."""
        words = {"switch": f"switch to {self.target}", "start": f"restart {UNIT}",
                 "ready": "wait for /ready", "validate": "check /version"}
        if "switch" in self.host_steps:
            words["start"] = "start"
        return ", ".join(words[s] for s in self.host_steps)

    def stage_words(self, batch: Batch) -> str:
        """The stage line of one batch."""
        steps = self.host_words()
        if batch.stage == "migrate":
            steps = steps.replace("start", "start alone (migrations run here)", 1)
        if not batch.rotates:
            return f"{steps} in place (out of rotation: it stays out)"
        return f"drain {batch.label}, {steps}, re-add"

    def describe(self, states: Mapping[str, AppState] | None = None,
                 db_host: str = "the db host") -> str:
        """The plan in one line (what the operator confirms)."""
        rolling = [b for b in self.batches if b.rotates and b.stage != "migrate"]
        if self.target is None:
            in_place = [n for b in self.batches if not b.rotates for n in b.hosts]
            parts = [f"batch {i + 1}: {b.label} (drain, restart, /ready, re-add)"
                     for i, b in enumerate(rolling)]
            if in_place:
                parts.insert(0, f"{', '.join(in_place)}: out of rotation, restarted in place"
                                f" and left out")
            return "; ".join(parts)
        parts = [f"{n}: unreachable, " + ("taken out of rotation first, " if listed else "")
                 + "skipped (recorded as behind)" for n, listed in self.unreachable]
        for b in self.batches:
            role = " (first, alone: any migrations run here)" if b.stage == "migrate" else ""
            if not b.rotates:
                role += " (out of rotation, behind: updated in place, stays out)"
            for n in b.hosts:
                st = states.get(n) if states else None
                if st is not None:
                    parts.append(f"{n}: {st.current} -> {self.target}{role}")
        if self.skipped:
            parts.append(f"already on {self.target}: {', '.join(self.skipped)}")
        if self.held:
            kept = ", ".join(f"{n} ({states[n].current})" if states and n in states else n
                             for n in self.held)
            parts.append(f"then stop: {kept} keep their release, in rotation beside"
                         f" {self.target}")
        sizes = sorted({len(b.hosts) for b in rolling})
        if rolling:
            parts.append(f"then {len(rolling)} batch(es) of {'/'.join(map(str, sizes))}")
        if self.backup:
            parts.append(f"database dump on {db_host} first")
        return "; ".join(parts)


# ------------------------------------------------------------------------------ planners
def hold_out_behind(apps: Mapping[str, AppState],
                    record: FleetRecord | None) -> dict[str, AppState]:
    """The states, with the hosts out of rotation that a rollout left behind (the fleet
    record names them) marked ``held_out``: no rollout puts them back into rotation; it
    updates them in place (`releasy_deploy.fleet`). A host an interrupted rollout left out
    is not held: it is re-added and rolled as before. Pure."""
    behind = set(record.behind) if record is not None else set()
    return {n: replace(st, held_out=not st.in_rotation and n in behind)
            for n, st in apps.items()}


def serving_problems(states: Iterable[AppState], unreachable: Iterable[str]) -> list[str]:
    """A rollout that skips hosts or holds some out needs two others to take turns."""
    states = list(states)
    serving = [st.name for st in states if not st.held_out]
    out = [*unreachable, *(st.name for st in states if st.held_out)]
    if out and len(serving) < 2:
        return [f"only {', '.join(serving) or 'no host'} can serve while {', '.join(out)}"
                f" stay out of rotation (unreachable, or behind the fleet): a rolling deploy"
                f" needs two app hosts taking turns. Bring {', '.join(out)} back first"]
    return []


def hosts_to_roll(states: Sequence[AppState], version: str) -> list[str]:
    """Hosts that still need V, those already out of rotation first (they serve nothing,
    so starting with them costs no capacity)."""
    todo = [s for s in states if not (s.current == version and s.ready)]
    return [s.name for s in sorted(todo, key=lambda s: s.in_rotation)]


def plan_batches(todo: Sequence[str], batch: int, app_hosts: int, *,
                 migrate_first: bool) -> tuple[str | None, list[list[str]]]:
    """(first host, started alone to run the migrations | None, then batches).

    A batch never holds every app host: at least one stays in rotation.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if app_hosts < 2:
        raise ValueError("a rolling rollout needs at least two app hosts")
    size = min(batch, app_hosts - 1)
    rest = list(todo)
    first = rest.pop(0) if migrate_first and rest else None
    return first, [rest[i:i + size] for i in range(0, len(rest), size)]


def plan_release_rollout(states: Sequence[AppState], version: str, batch: int, *,
                         flow: str, title: str, backup: bool, stage_release: bool,
                         unreachable: Sequence[tuple[str, bool]] = (),
                         only: Collection[str] | None = None, canary: int | None = None,
                         held_advice: str = "") -> RollingPlan:
    """Rolling deploy and rollback: every host not yet ready on ``version`` is drained,
    switched, started, checked and re-added; the first one alone when no host runs
    ``version`` yet (it runs the migrations), then batches of ``batch``. Hosts out of
    rotation because they are behind the fleet go first, one at a time, in place: they
    serve nothing, and stay out. ``unreachable`` hosts (not in ``states``) are only named.

    ``only`` (--limit): hosts outside it are held (left on their release). ``canary``:
    only the first ``canary`` hosts that need ``version`` change, the rest are held; a
    later plan without it continues from there (the migrations already ran, so no host
    goes alone and no dump is taken again)."""
    todo = hosts_to_roll(states, version)
    kept = [n for n in todo if only is not None and n not in only]
    todo = [n for n in todo if n not in kept]
    if canary is not None:
        if canary < 1:
            raise ValueError("a canary needs at least one host")
        kept += todo[canary:]
        todo = todo[:canary]
    behind = [s.name for s in states if s.held_out and s.name in todo]
    migrate_first = not any(st.current == version and st.ready for st in states)
    serving = sum(1 for s in states if not s.held_out)
    rolling = [n for n in todo if n not in behind]
    first, batches = plan_batches(rolling, batch, max(serving, 2),
                                  migrate_first=migrate_first and not behind)
    stages = [Batch("migrate" if migrate_first and i == 0 else "roll", (n,), rotates=False)
              for i, n in enumerate(behind)]
    stages += ([Batch("migrate", (first,))] if first is not None else []) + [
        Batch("roll", tuple(b)) for b in batches]
    skipped = tuple(s.name for s in states if s.name not in todo and s.name not in kept)
    return RollingPlan(
        flow=flow, title=title, target=version, host_steps=HOST_STEPS,
        batches=tuple(stages), skipped=skipped,
        held=tuple(n for n in (s.name for s in states) if n in kept),
        held_advice=held_advice if kept else "",
        stage_release=stage_release and bool(todo), backup=backup and migrate_first
        and bool(todo), records_release=True, unreachable=tuple(unreachable))


def canary_problem(states: Sequence[AppState], version: str, canary: int) -> str | None:
    """Why ``--canary N`` cannot be honoured (None: it can). A canary leaves at least one
    host that needs ``version`` on its release; a fleet all on ``version`` has nothing
    to try."""
    todo = hosts_to_roll(states, version)
    if canary < 1:
        return f"--canary must be 1 or more, got {canary}"
    if todo and canary >= len(todo):
        return (f"--canary {canary} would change every host that needs {version}"
                f" ({', '.join(todo)}): that is the whole rollout; run it without --canary,"
                f" or give fewer hosts")
    return None


def plan_restart(in_place: Sequence[str], batches: Sequence[Sequence[str]],
                 states: Mapping[str, AppState]) -> RollingPlan:
    """Rolling restart: hosts out of rotation are restarted in place and left out; the
    others batch by batch (drain, restart, /ready, re-add). Which hosts go in which batch
    is `maintenance.restart_plan`'s decision."""
    return RollingPlan(
        flow="app.restart", title="Rolling restart", target=None,
        host_steps=("start", "ready"),
        batches=tuple([Batch("restart", (n,), rotates=False) for n in in_place]
                      + [Batch("restart", tuple(b)) for b in batches]),
        left_out_advice="Once a host left out is fixed, `fab app.undrain --host NAME` puts it"
                        " back (it checks /ready first).",
        current_text=_common_release([*in_place, *(n for b in batches for n in b)], states))


def _common_release(hosts: Sequence[str], states: Mapping[str, AppState]) -> str:
    versions = {states[n].current for n in hosts}
    if len(versions) == 1:
        (only,) = versions
        if only is not None:
            return only
    return "their current releases"


def plan_reconfigure(changed: Sequence[str], states: Mapping[str, AppState],
                     batch: int = 1) -> RollingPlan:
    """Rolling reconfiguration: app hosts whose env file or unit changed while they serve
    are restarted batch by batch (drain, restart, /ready, re-add), never all at once; a
    host out of rotation is restarted in place. The new files are already written (the
    running process keeps its old environment until the restart)."""
    in_place = [n for n in changed if not states[n].in_rotation]
    serving = [n for n in changed if states[n].in_rotation]
    rotation = sum(1 for st in states.values() if st.in_rotation)
    size = max(1, min(batch, rotation - 1))
    batches = [serving[i:i + size] for i in range(0, len(serving), size)]
    plan = plan_restart(in_place, batches, states)
    return RollingPlan(**{**plan.__dict__, "flow": "app.setup",
                          "title": "Rolling reconfiguration",
                          "left_out_advice": "The new settings are written on every changed"
                                             " host; re-running the same command restarts"
                                             " the hosts that do not run them yet."})
