"""Blue/green deploy on a single host: ``fab deploy.bluegreen --version V``.

Two instances of the template unit ``releasy@PORT.service`` alternate between the two ports
of ``app.bluegreen_ports`` (default 8080/8081); exactly one is live, i.e. the one port the
proxy's upstream file lists. A deploy:

1. preflight: verify the artifact locally, take the deploy lock (the same lock as every
   rollout), read the host's state in ONE round trip and decide which instance is live;
2. stage: upload and unpack V (`tiers.app.stage_release`), not activated;
   backup: dump the database (`backups.create`, when ``database.backup_before_deploy``,
   the default) before V can migrate it, as a rolling deploy does;
3. start: point ``/opt/releasy/instances/IDLE`` at V, write ``instance-IDLE.env``
   (RELEASY_BIND_ADDR=127.0.0.1:IDLE) and start ``releasy@IDLE``: it migrates, then binds.
   Wait for ``/ready`` (`tiers.app.wait_ready`), then for `WARMUP_SUCCESSES` answers in a
   row (warm-up);
4. switch: the proxy's upstream becomes 127.0.0.1:IDLE (`tiers.proxy.set_upstreams`:
   ``nginx -t`` then reload), then wait until the nginx workers from before the reload
   finished their in-flight requests to the old instance (upstream does not drain on
   SIGTERM, so stopping it earlier would cut them);
5. finish: enable the new instance at boot; stop and disable the old one; point
   ``/opt/releasy/current`` at V (so ``app.setup`` and status see the live release); record
   the migration level each release ran against (`releasy_deploy.schema`, what
   ``deploy.rollback`` judges from); write the audit record (the rolling deploy's fields).

A release older than the database's migrations (known from its recorded level or a dump)
is refused in preflight: its binary would not start (sqlx VersionMissing).

Failure before the switch (stage, start, warm-up, a refused nginx configuration) stops and
removes the idle instance and leaves the live one, and the proxy, untouched: no request is
lost. Failure after the switch is not rolled back (the new instance is live and was ready);
re-running the same command converges (see below).

Hand-over from the plain unit. ``fab app.setup`` runs ``releasy.service`` on
``app.bind_port`` (one of the two ports). The first blue/green deploy treats it as the live
instance: V starts as ``releasy@OTHER``, the proxy switches to it, then ``releasy.service``
is stopped AND disabled, so a reboot brings up only the live instance. From then on the two
``releasy@`` instances alternate. `current` always follows the live version.

Converging. Every run decides from the host's state, never from memory: a unit of ours
running on the idle port (a killed deploy's leftover, or ``releasy.service`` started again
by ``app.setup``) is stopped before the idle instance starts; when V is already live the
run only converges the finish step (live instance enabled, every other unit stopped, after
in-flight requests drained, and disabled, `current`), which is a no-op the second time.
Anything else listening on the idle port is refused before anything changes.

``app.setup`` after a hand-over: today it sees ``releasy.service`` disabled and inactive,
so it enables and starts it again on ``app.bind_port`` (a second process out of rotation,
or a crash loop when the live instance holds that port). Blue/green reports that as a
conflict, with what it found, and stops and disables ``releasy.service`` on its next run.

Only the single-host topology: there the app binds loopback, the proxy is local and the
firewall needs no rule for either port. Split topologies use ``deploy.rolling``.
"""
from __future__ import annotations

import hashlib
import shlex
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import audit, schema
from . import backups as backups_mod
from .commands import app as appcmd
from .commands import nginx as nginxcmd
from .commands import systemd
from .errors import BadInput, DeployError, StepFailed
from .executor import HostConnection, tail
from .facts import Fact, FileSha256, FileStat, LinkTarget, OsRelease, read_facts
from .hostos import check_release
from .inventory import Inventory, check_version
from .lock import LockInfo, deploy_lock
from .pipeline import Pipeline
from .releases import fetch_release
from .rollout import ready_timeout_of
from .session import Session
from .tiers import app as app_tier
from .tiers import proxy as proxy_tier

__all__ = [
    "STAGES", "PLAIN_UNIT", "WARMUP_SUCCESSES", "DRAIN_TIMEOUT_S", "UnitState", "HostState",
    "Live", "Plan", "Outcome", "NotBlueGreenReady", "instance_unit", "instance_link",
    "instance_env_file", "instance_bind", "render_instance_env", "version_of_link",
    "fact_names", "parse_state", "find_live", "plan_deploy", "schema_refusal", "start_script",
    "finish_commands", "finish_script", "cleanup_script", "warmup_argv", "read_state", "run",
    "Listening",
]

PIPELINE = "deploy.bluegreen"
STAGES = ("preflight", "stage", "backup", "start", "switch", "finish", "failed")
PLAIN_UNIT = app_tier.SERVICE_UNIT  # releasy.service, what app.setup runs
LOOPBACK = "127.0.0.1"
#: /ready answers in a row, WARMUP_INTERVAL_S apart, before the new instance gets traffic.
WARMUP_SUCCESSES = 3
WARMUP_INTERVAL_S = 0.3
#: longest wait for in-flight requests of the old instance (nginx's proxy_read_timeout).
DRAIN_TIMEOUT_S = nginxcmd.DRAIN_TIMEOUT_S
AUDIT_ACTION = "deploy.bluegreen"

_RUNNING_STATES = systemd.RUNNING_STATES
_ENABLED_STATES = frozenset({"enabled", "enabled-runtime", "linked", "linked-runtime"})


class NotBlueGreenReady(DeployError):
    """The host is not in a state a blue/green deploy can start from (nothing changed)."""


# ------------------------------------------------------------------------------ names
_port = appcmd.check_port  # one validation for every instance name
instance_unit = appcmd.instance_unit


def instance_link(port: int) -> str:
    """The symlink the instance runs its release from (ExecStart=LINK/releasy-server)."""
    return f"{appcmd.INSTANCES_DIR}/{_port(port)}"


def instance_env_file(port: int) -> str:
    """Read after releasy.env by the template unit: the per-instance overrides."""
    return f"{appcmd.CONFIG_DIR}/instance-{_port(port)}.env"


instance_bind = appcmd.instance_bind


def render_instance_env(port: int) -> str:
    return ("# Managed by releasy-deploy (fab deploy.bluegreen): local changes are overwritten.\n"
            f"# Read after {appcmd.ENV_FILE} by {instance_unit(port)}: its own listen address.\n"
            + systemd.env_assignment("RELEASY_BIND_ADDR", instance_bind(port)) + "\n")


def version_of_link(target: str | None) -> str | None:
    """The release version a link target (``/opt/releasy/releases/V`` or
    ``releases/V``) names, or None."""
    return appcmd.ReleaseState(current_target=target).current if target else None


# ------------------------------------------------------------------------------ facts
@dataclass(frozen=True)
class Listening(Fact):
    """Something listens on TCP ``port``."""

    port: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _port(self.port)

    def shell(self) -> str:
        selector = f"sport = :{_port(self.port)}"
        return f"ss -Hltn {shlex.quote(selector)}"

    def parse(self, out: str, code: int) -> bool:
        return code == 0 and bool(out.strip())


@dataclass(frozen=True)
class UnitState:
    """``systemctl show`` of one unit, reduced to what the plan needs."""

    name: str
    active_state: str = "inactive"
    unit_file_state: str = ""
    main_pid: int = 0
    need_daemon_reload: bool = False

    @classmethod
    def from_show(cls, name: str, props: Mapping[str, str]) -> UnitState:
        pid = props.get("MainPID", "0")
        return cls(name, props.get("ActiveState") or "inactive",
                   props.get("UnitFileState") or "", int(pid) if pid.isdigit() else 0,
                   props.get("NeedDaemonReload") == "yes")

    @property
    def active(self) -> bool:
        return self.active_state == "active"

    @property
    def running(self) -> bool:
        """Up or on its way (including a crash loop's auto-restart): it may hold its port."""
        return self.active_state in _RUNNING_STATES

    @property
    def failed(self) -> bool:
        return self.active_state == "failed"

    @property
    def enabled(self) -> bool:
        return self.unit_file_state in _ENABLED_STATES


@dataclass(frozen=True)
class HostState:
    """Everything a blue/green deploy decides from, read in one round trip."""

    host: str
    ports: tuple[int, int]
    bind_port: int  # where releasy.service listens
    units: Mapping[str, UnitState]  # releasy.service and both instances
    links: Mapping[int, str | None]  # port -> instance link target
    env_sums: Mapping[int, str | None]  # port -> sha256 of instance-PORT.env
    listening: Mapping[int, bool]  # port -> something listens on it
    ready: Mapping[int, bool]  # port -> GET /ready answered 2xx
    releases: appcmd.ReleaseState
    upstream_text: str | None  # the proxy's upstream file; None: absent
    template_installed: bool
    db_level: int | None = None  # the database's _sqlx_migrations level (None: unreadable)
    levels: Mapping[str, int] = field(default_factory=dict)  # release -> recorded level
    backups: tuple = ()  # the pre-deploy dumps on the host (backups.Backup), oldest first

    def units_on(self, port: int) -> list[str]:
        """Our units that listen on ``port`` when running."""
        units = [instance_unit(port)]
        if port == self.bind_port:
            units.append(PLAIN_UNIT)
        return units


def fact_names(inv: Inventory) -> list[Fact]:
    """Everything preflight reads, as ONE facts call (on a single host the proxy and the
    database are local too)."""
    names: list[Fact] = [
        app_tier.ReleasyUnit(PLAIN_UNIT), app_tier.ReleasyReleases(),
        proxy_tier.ProxyText(proxy_tier.UPSTREAM_FILE),
        FileStat(f"{appcmd.UNIT_DIR}/{appcmd.TEMPLATE_UNIT}"),
        schema.level_fact(inv), schema.RecordedLevels(), backups_mod.BackupListing()]
    for port in inv.app.bluegreen_ports:
        names += [app_tier.ReleasyUnit(instance_unit(port)), LinkTarget(instance_link(port)),
                  FileSha256(instance_env_file(port)), Listening(port),
                  app_tier.ReleasyReady(appcmd.ready_url(instance_bind(port)))]
    return names


def parse_state(host: str, found: Mapping[Fact, Any], inv: Inventory) -> HostState:
    ports = inv.app.bluegreen_ports
    units = {PLAIN_UNIT: UnitState.from_show(PLAIN_UNIT,
                                             found[app_tier.ReleasyUnit(PLAIN_UNIT)])}
    for port in ports:
        unit = instance_unit(port)
        units[unit] = UnitState.from_show(unit, found[app_tier.ReleasyUnit(unit)])
    return HostState(
        host=host, ports=ports, bind_port=inv.app.bind_port, units=units,
        links={p: found[LinkTarget(instance_link(p))] for p in ports},
        env_sums={p: found[FileSha256(instance_env_file(p))] for p in ports},
        listening={p: bool(found[Listening(p)]) for p in ports},
        ready={p: bool(found[app_tier.ReleasyReady(appcmd.ready_url(instance_bind(p)))])
               for p in ports},
        releases=found[app_tier.ReleasyReleases()],
        upstream_text=found[proxy_tier.ProxyText(proxy_tier.UPSTREAM_FILE)],
        template_installed=found[FileStat(f"{appcmd.UNIT_DIR}/{appcmd.TEMPLATE_UNIT}")]
        is not None,
        db_level=found[schema.level_fact(inv)],
        levels=found[schema.RecordedLevels()],
        backups=tuple(found[backups_mod.BackupListing()]),
    )


def read_state(c: HostConnection, inv: Inventory) -> HostState:
    """The host's blue/green state: ONE round trip (read-only: also runs in dry-run)."""
    found = read_facts(c, [OsRelease(), *fact_names(inv)], sudo=True)
    check_release(c.name, found[OsRelease()])  # refused before anything changes
    return parse_state(c.name, found, inv)


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Live:
    """The instance the proxy sends traffic to."""

    port: int
    unit: str | None  # None: nothing of ours runs there (the site is down)
    version: str | None
    ready: bool

    def describe(self) -> str:
        where = instance_bind(self.port)
        if self.unit is None:
            return f"nothing (the proxy sends traffic to {where}, where no Releasy unit runs)"
        state = "ready" if self.ready else "NOT answering /ready"
        return f"{self.unit} on {where} running {self.version or 'an unknown release'} ({state})"


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


def find_live(state: HostState) -> Live:
    """Which instance the proxy sends traffic to. Raises NotBlueGreenReady when the host
    was never set up, or the proxy's upstream is not one of our loopback ports."""
    h = state.host
    if not state.template_installed:
        raise NotBlueGreenReady(
            f"{h}: the unit template {appcmd.UNIT_DIR}/{appcmd.TEMPLATE_UNIT} is not installed:"
            f" the app tier is not set up. Run `fab site --version VERSION` first.", host=h)
    if state.upstream_text is None:
        raise NotBlueGreenReady(
            f"{h}: {proxy_tier.UPSTREAM_FILE} does not exist: the proxy is not set up. Run"
            f" `fab site --version VERSION` first.", host=h)
    try:
        servers = nginxcmd.parse_upstream_servers(state.upstream_text)
    except ValueError as exc:
        servers, why = [], str(exc)
    else:
        why = "lists " + (", ".join(nginxcmd.format_server(a, p) for a, p in servers) or
                          "no server")
    ports = state.ports
    if len(servers) != 1 or servers[0][0] != LOOPBACK or servers[0][1] not in ports:
        wanted = " or ".join(instance_bind(p) for p in ports)
        raise NotBlueGreenReady(
            f"{h}: {proxy_tier.UPSTREAM_FILE} {why}; a blue/green deploy needs exactly one"
            f" server, {wanted} (app.bluegreen_ports). If no rollout is running, `fab"
            f" proxy.setup --reset-upstreams` restores the default, then re-run.", host=h)
    port = servers[0][1]
    instance = state.units[instance_unit(port)]
    plain = state.units[PLAIN_UNIT]
    if instance.active:
        return Live(port, instance.name, version_of_link(state.links[port]), state.ready[port])
    if port == state.bind_port and plain.active:
        return Live(port, PLAIN_UNIT, state.releases.current, state.ready[port])
    return Live(port, None, None, state.ready[port])


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


# ------------------------------------------------------------------------------ scripts
def start_script(state: HostState, plan: Plan) -> str:
    """Stop whatever of ours holds the idle port, point the idle instance at V, write its
    env file when it differs, start it. Every value is shlex.quote()d."""
    port = plan.idle_port
    unit = plan.new_unit
    link = instance_link(port)
    env_file = instance_env_file(port)
    env_text = render_instance_env(port)
    lines = ["set -eu"]
    for other in plan.stop_first:
        lines.append(shlex.join(systemd.systemctl("stop", other)))
    if state.env_sums[port] != hashlib.sha256(env_text.encode()).hexdigest():
        q = shlex.quote(env_file)
        lines += [
            f"tmp=$(mktemp {shlex.quote(appcmd.CONFIG_DIR)}/.instance-env.XXXXXX)",
            f"printf '%s' {shlex.quote(env_text)} > \"$tmp\"",
            "chmod 0644 \"$tmp\"",
            f"mv -f \"$tmp\" {q}",
        ]
    target = f"{appcmd.RELEASES_DIR}/{check_version(plan.version)}"
    staged = f"{appcmd.INSTANCES_DIR}/.{port}.new"
    lines += [
        shlex.join(["ln", "-sfn", "--", target, staged]),
        shlex.join(["mv", "-T", "--", staged, link]),
    ]
    if state.units[unit].need_daemon_reload:
        lines.append(shlex.join(systemd.daemon_reload_argv()))
    # reset-failed: a failed earlier attempt must not count against StartLimitBurst.
    lines.append(shlex.join(systemd.systemctl("reset-failed", unit)) + " || true")
    lines.append(shlex.join(systemd.systemctl("start", unit)))
    return "\n".join(lines) + "\n"


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


def finish_script(steps: list[tuple[str, list[str]]]) -> str:
    return "set -e\n" + "\n".join(shlex.join(argv) for _what, argv in steps) + "\n"


def cleanup_script(port: int) -> str:
    """Best effort, after a failure before the switch: stop the idle instance (never in
    rotation) and remove its link so nothing can start it by accident."""
    unit = instance_unit(port)
    return "\n".join([
        shlex.join(systemd.systemctl("stop", unit)) + " || rc=1",
        shlex.join(systemd.systemctl("reset-failed", unit)) + " || true",
        shlex.join(["rm", "-f", "--", instance_link(port)]) + " || rc=1",
        'exit "${rc:-0}"',
    ]) + "\n"


# $1 URL, $2 unit, $3 answers wanted in a row, $4 seconds between probes, $5 timeout (whole
# seconds). Exit 0 once warm (unit still active), 3 on timeout, 4 if the unit stopped or
# failed, 5 without curl. One line of explanation on stdout.
WARMUP_SCRIPT = """if ! command -v curl >/dev/null 2>&1; then
  echo "curl is not installed (apt-get install curl)"; exit 5
fi
now_ms() { t=$(date +%s%N); echo $(( t / 1000000 )); }
end=$(( $(now_ms) + $5 * 1000 ))
n=0
out=
while :; do
  if out=$(curl -fsS --max-time 2 -o /dev/null "$1" 2>&1); then
    n=$((n + 1))
  else
    n=0
  fi
  state=$(systemctl is-active "$2" 2>/dev/null) || true
  case $state in
    failed|inactive) printf '%s is %s; last probe: %s\\n' "$2" "$state" "${out:-ok}"; exit 4;;
  esac
  if [ "$n" -ge "$3" ] && [ "$state" = active ]; then echo "warm: $n answers in a row"; exit 0; fi
  if [ "$(now_ms)" -ge "$end" ]; then
    printf 'only %s /ready answers in a row within %s s (%s is %s); last probe: %s\\n' \\
      "$n" "$5" "$2" "$state" "${out:-ok}"
    exit 3
  fi
  sleep "$4"
done
"""


def warmup_argv(bind: str, unit: str, *, successes: int = WARMUP_SUCCESSES,
                interval: float = WARMUP_INTERVAL_S, timeout: int) -> list[str]:
    if not isinstance(successes, int) or successes < 1:
        raise ValueError(f"successes must be a positive integer, got {successes!r}")
    if not isinstance(timeout, int) or timeout < 1:
        raise ValueError(f"timeout must be a positive whole number of seconds, got {timeout!r}")
    if not 0 < interval <= 60:
        raise ValueError(f"interval must be within (0, 60] seconds, got {interval!r}")
    return ["sh", "-c", WARMUP_SCRIPT, "releasy-warmup", appcmd.ready_url(bind),
            systemd.check_unit(unit), str(successes), f"{interval:g}", str(timeout)]


# ------------------------------------------------------------------------------ acting
@dataclass
class Outcome:
    """What happened, for the task's last line and for tests."""

    host: str
    from_version: str | None
    to_version: str
    result: str  # "deployed" or "already live" (what a dry run found it would be)
    live_unit: str
    live_port: int
    dry_run: bool = False
    seconds: float = 0.0


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def _run_checked(c: HostConnection, script: str, label: str, *, hint: str) -> None:
    res = c.run_script(script, sudo=True, check=False, label=label)
    if res.ok or res.dry_run:
        return
    said = c.mask(res.stderr.strip() or res.stdout.strip()) or "(no output)"
    raise DeployError(f"{c.name}: {label} failed (exit code {res.exit_code}):\n"
                      f"{_indent(tail(said))}\n  {hint}", host=c.name)


def _start_idle(c: HostConnection, state: HostState, plan: Plan, timeout: float) -> None:
    unit, bind = plan.new_unit, instance_bind(plan.idle_port)
    stopping = f" (stopping {', '.join(plan.stop_first)} first)" if plan.stop_first else ""
    if c.dry_run:
        c.reporter.would(c.name, f"start {unit} with {plan.version} on {bind}{stopping}, wait"
                                 f" for /ready and {WARMUP_SUCCESSES} answers in a row")
        return
    _run_checked(c, start_script(state, plan), f"start {unit} with {plan.version}",
                 hint=f"see `journalctl -u {unit}` on {c.name}")
    c.reporter.changed(c.name, f"{unit} started with {plan.version} on {bind}{stopping}")
    started = time.monotonic()
    waited = app_tier.wait_ready(c, bind, timeout, unit=unit)  # migrations run before this
    left = max(1, int(timeout - (time.monotonic() - started)))
    res = c.run(warmup_argv(bind, unit, timeout=left), mutates=False, check=False,
                timeout=left + 30)
    said = c.mask(res.stdout.strip() or res.stderr.strip())
    if not res.ok:
        raise DeployError(
            f"{c.name}: {unit} answered /ready once but did not stay ready: {said}\n"
            f"  Last lines of `journalctl -u {unit}`:\n"
            f"{_indent(app_tier.journal_tail(c, unit))}", host=c.name)
    c.reporter.info(c.name, f"{unit} ready at http://{bind}/ready after {waited:.1f} s; {said}")


def _drain(session: Session, host: str, old: str) -> None:
    """Wait until the nginx workers from before the last reload finished their in-flight
    requests (to ``old``, the instance about to stop), on every proxy host."""
    if session.dry_run:
        session.reporter.would(host, f"wait for in-flight requests to {old} to finish")
        return

    def drain(conn: HostConnection) -> bool:
        started = time.monotonic()
        gone = proxy_tier.wait_old_workers_gone(conn, DRAIN_TIMEOUT_S)
        if gone:
            conn.reporter.info(conn.name, f"in-flight requests to {old} finished"
                                          f" ({time.monotonic() - started:.1f} s)")
        else:  # reported by wait_old_workers_gone with the pids
            conn.reporter.info(conn.name, f"stopping the old instance anyway: requests running"
                                          f" longer than {DRAIN_TIMEOUT_S:g} s may be cut")
        return gone

    session.executor.each(session.inventory.hosts_in("proxy"), drain)


def _switch(session: Session, host: str, plan: Plan) -> None:
    """Point every proxy at the new instance (nginx -t, reload), then drain the old one."""
    proxy_tier.set_upstreams(session, [(LOOPBACK, plan.idle_port)])
    _drain(session, host, instance_bind(plan.live.port))


def _finish(c: HostConnection, state: HostState, plan: Plan, *,
            level_now: int | None = None) -> bool:
    """Converge the end state in one round trip; True if anything visible changed."""
    steps = finish_commands(state, plan, level_now=level_now)
    if steps and not c.dry_run:
        _run_checked(c, finish_script(steps),
                     f"enable {plan.target_unit}, stop the other instances",
                     hint=f"check `systemctl status 'releasy*'` on {c.name}, then re-run the"
                          f" same command: it converges")
    shown = [what for what, _argv in steps if what]
    for what in shown:
        if c.dry_run:
            c.reporter.would(c.name, f"change: {what}")
        else:
            c.reporter.changed(c.name, what)
    if not shown:
        version = plan.version if plan.start else plan.live.version
        c.reporter.unchanged(c.name, f"{plan.target_unit} live on"
                                     f" {instance_bind(plan.target_port)} and enabled, no other"
                                     f" instance running, current -> releases/{version}")
    return bool(shown)


def _switched(session: Session, plan: Plan) -> bool | None:
    """After a failure in the switch stage: does a proxy already use the new port?
    None when that cannot be told (the new instance is then left running: safer)."""
    try:
        found = session.executor.each(session.inventory.hosts_in("proxy"),
                                      proxy_tier.current_upstreams)
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        return None
    return any((LOOPBACK, plan.idle_port) in servers for servers in found.values())


def _cleanup_idle(c: HostConnection, plan: Plan) -> bool | None:
    """True: stopped and unlinked; False: the script failed; None: could not run it."""
    try:
        res = c.run_script(cleanup_script(plan.idle_port), sudo=True, check=False,
                           label=f"stop {plan.new_unit}, remove its link")
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        return None
    return res.ok


def _audit(session: Session, host: Any, plan: Plan, result: str, *, started: float,
           changed: bool, backup: Any = None, **fields: object) -> None:
    """Append the audit record on the host (the rolling deploy's fields, plus which units
    and ports); a failure to do so is reported, not raised: it must not hide the deploy's
    own outcome."""
    entry = audit.record(AUDIT_ACTION, session.inventory.environment, to=plan.version,
                         result=result, from_versions={host.name: plan.live.version},
                         hosts_changed=[host.name] if changed else [],
                         backup=backup.name if backup is not None else None,
                         seconds=round(time.monotonic() - started, 1),
                         from_unit=plan.live.unit, from_port=plan.live.port, **fields)
    session.outcome.update(entry)
    try:
        audit.write(session.executor, [host], entry)
    except Exception as exc:  # noqa: BLE001
        session.reporter.error(host.name, f"could not write the audit record: {exc}")


def _failure_before_switch(c: HostConnection, stage: str, plan: Plan, exc: BaseException,
                           *, cleaned: bool | None, level_before: int | None = None,
                           level_now: int | None = None, backup: Any = None) -> str:
    """The one-paragraph explanation: host, stage, what still serves, the cause (with the
    journal lines wait_ready attached), what to do."""
    text = str(exc) if isinstance(exc, DeployError) else f"{type(exc).__name__}: {exc}"
    # wait_ready's advice ("app.setup --version PREVIOUS switches back") is for the plain
    # unit; here the old instance never stopped serving: there is nothing to switch back.
    text = "\n".join(ln for ln in text.splitlines() if "app.setup --version PREVIOUS" not in ln)
    text = text.removeprefix(f"{c.name}: ")
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
    return (f"{c.name}: deploy.bluegreen of {plan.version} failed in stage '{stage}', before"
            f" the switch: {kept}; {idle}.{database}\n  Cause: {_indent(text).lstrip()}\n"
            f"  Fix the cause, then deploy again (the same or another version).")


def run(session: Session, version: str | None, *, wait: float = 0, yes: bool = False,
        ready_timeout: Any = None, lock: LockInfo | None = None) -> Outcome:
    """Blue/green deploy of ``version`` on the single app host (see the module docstring).

    ``version`` None: the live release, restarted through the same switch (a fresh instance
    picks up a changed env file or unit; `fab site` / `fab app.setup` on a single host that
    serves). ``lock``: the deploy lock the caller already holds (else it is taken here).
    Raises BadInput (exit 2, nothing touched) for a split topology, a bad artifact or a
    release older than the database's migrations; LockBusy (exit 3) when another deploy
    holds the lock; DeployError otherwise.
    """
    inv = session.inventory
    started = time.monotonic()
    if not inv.is_single_host:
        raise BadInput(
            f"deploy.bluegreen runs two instances side by side on one host; {inv.path} has"
            f" {len(inv.hosts)} hosts ({inv.topology} topology): use `fab deploy.rolling"
            f" --version {version}` there")
    timeout = ready_timeout_of(inv, ready_timeout)
    restart = version is None
    # BadInput before any host is contacted (a restart stages nothing).
    release = None if version is None else fetch_release(inv, version)
    host = inv.hosts_in("app")[0]
    c = session.executor.conn(host)
    reporter = session.reporter
    pipe = Pipeline(PIPELINE, reporter)

    def outcome(result: str, plan: Plan) -> Outcome:
        return Outcome(host.name, plan.live.version, version, result, plan.target_unit,
                       plan.target_port, session.dry_run, time.monotonic() - started)

    with ExitStack() as stack:
        with pipe.stage("preflight", host.name, f"{version or 'restart'}: lock, live instance"):
            held = lock if lock is not None else stack.enter_context(
                deploy_lock(session, version=version, wait=wait))
            state = read_state(c, inv)
            if version is None:
                version = find_live(state).version or state.releases.current
                if version is None:
                    raise DeployError(f"{host.name}: no live release to restart", host=host.name)
            plan = plan_deploy(state, version, restart=restart)
            reporter.info(host.name, f"live: {plan.live.describe()}")
            if plan.live.unit is not None and not plan.live.ready:
                reporter.info(host.name, "the live instance does not answer /ready: deploying"
                                         " anyway (the new one must be ready before the switch)")
            for note in plan.notes:
                reporter.info(host.name, note)
            if state.db_level is None:
                raise DeployError(f"{host.name}: cannot read the database's migration level"
                                  f" (_sqlx_migrations in {inv.database.name}): is the database"
                                  f" up? `fab db.setup` checks it", host=host.name)
            refusal = schema_refusal(state, version) if plan.start and not restart else None
            if refusal:
                raise BadInput(refusal)

        if not plan.start:
            with pipe.stage("finish", host.name, f"{version} is already live"):
                stops = [argv[2] for _what, argv in finish_commands(state, plan)
                         if argv[:2] == ["systemctl", "stop"]]
                if stops:  # e.g. a deploy killed after its switch left the old one running
                    _drain(session, host.name, ", ".join(stops))
                changed = _finish(c, state, plan)
                _audit(session, host, plan, "already live" + (", converged" if changed else ""),
                       started=started, changed=changed, live_unit=plan.target_unit,
                       live_port=plan.target_port, schema_level=state.db_level)
            return outcome("already live", plan)

        if not session.dry_run:
            session.confirm(f"Blue/green deploy of {inv.environment} to {version} on"
                            f" {host.name}: start {plan.new_unit} beside"
                            f" {plan.live.describe()}, switch the proxy to it, stop the old"
                            f" one. Go?", yes=yes)
        stage = "stage"
        backup = None
        try:
            if release is not None:
                with pipe.stage("stage", host.name, f"upload and unpack {version}"):
                    app_tier.stage_release(c, release)
            if inv.database.backup_before_deploy and not restart:  # a restart migrates nothing
                stage = "backup"
                with pipe.stage("backup", host.name, f"dump the database (migration level"
                                                     f" {state.db_level})"):
                    backup = backups_mod.create(session, from_version=plan.live.version,
                                                to_version=version, level=state.db_level,
                                                existing=state.backups)
            held.ensure_held()
            stage = "start"
            with pipe.stage("start", host.name, f"{plan.new_unit} with {version}: migrations,"
                                                f" /ready, warm-up"):
                _start_idle(c, state, plan, timeout)
                level_now = None if session.dry_run else schema.read_level(session)
            held.ensure_held()
            stage = "switch"
            with pipe.stage("switch", host.name, f"proxy -> {instance_bind(plan.idle_port)},"
                                                 f" drain {instance_bind(plan.live.port)}"):
                _switch(session, host.name, plan)
        except BaseException as exc:
            switched = _switched(session, plan) if stage == "switch" else False
            if switched is False:
                cleaned: bool | None = True
                level_after = None
                if stage in ("start", "switch") and not session.dry_run:
                    with pipe.stage("failed", host.name,
                                    f"stop {plan.new_unit} (never in rotation)"):
                        cleaned = _cleanup_idle(c, plan)
                        try:
                            level_after = schema.read_level(session)
                        except Exception:  # noqa: BLE001 - the explanation says less then
                            level_after = None
                _audit(session, host, plan, f"failed in {stage}, before the switch",
                       started=started, changed=stage in ("start", "switch"), backup=backup,
                       live_unit=plan.live.unit, live_port=plan.live.port,
                       schema_level=level_after)
                reporter.error(host.name, f"deploy.bluegreen of {version} failed in stage"
                                          f" '{stage}', before the switch (details below)")
                if isinstance(exc, BadInput) or not isinstance(exc, Exception):
                    raise  # bad input keeps its exit code; Ctrl-C stays an interrupt
                raise StepFailed(_failure_before_switch(
                    c, stage, plan, exc, cleaned=cleaned, level_before=state.db_level,
                    level_now=level_after, backup=backup), host=host.name, cause=exc) from None
            _audit(session, host, plan, "failed in switch" + ("" if switched else
                                                               " (switch state unknown)"),
                   started=started, changed=True, backup=backup,
                   live_unit=plan.new_unit if switched else None)
            reporter.error(host.name, f"deploy.bluegreen of {version} failed during the switch"
                                      f" (details below)")
            if not isinstance(exc, Exception):
                raise
            state_now = "is live" if switched else "is running and may be live"
            raise StepFailed(
                f"{host.name}: deploy.bluegreen of {version} failed in stage 'switch':"
                f" {plan.new_unit} on {instance_bind(plan.idle_port)} {state_now}; nothing"
                f" was rolled back.\n  Cause: {_indent(str(exc)).lstrip()}\n  Re-run `fab"
                f" deploy.bluegreen --version {version}`: it converges.",
                host=host.name, cause=exc) from None

        with pipe.stage("finish", host.name, f"stop {plan.live.unit or 'nothing'}, enable"
                                             f" {plan.new_unit}, current -> {version}"):
            try:
                _finish(c, state, plan, level_now=level_now)
            except DeployError as exc:
                reporter.error(host.name, f"{version} is live, but finishing failed (details"
                                          f" below)")
                _audit(session, host, plan, "switched, then finish failed", started=started,
                       changed=True, backup=backup, live_unit=plan.new_unit,
                       live_port=plan.idle_port, schema_level=level_now)
                raise StepFailed(
                    f"{host.name}: {version} is live ({plan.new_unit} on"
                    f" {instance_bind(plan.idle_port)}), but stage 'finish' failed: {exc}\n"
                    f"  Re-run `fab deploy.bluegreen --version {version}`: it converges.",
                    host=host.name, cause=exc) from None
            _audit(session, host, plan, "ok", started=started, changed=True, backup=backup,
                   live_unit=plan.new_unit, live_port=plan.idle_port, schema_level=level_now)
    return outcome("deployed", plan)
