"""Day-2 maintenance on a running environment: rolling restart, taking an app host out of
the proxies' rotation and back, the service journal, and ad-hoc commands.

- `restart` (``fab app.restart``): a plan (`engine.plan.plan_restart`) run by the rolling
  deploy's own runner (`engine.runner`: drain from every proxy and wait until the old nginx
  workers finished their in-flight requests, restart, poll ``/ready``, re-add together with
  draining the next batch, and the same recovery and failure report), under the deploy
  lock; its host steps are "start, ready" where a deploy's are "switch, start, ready,
  validate". A host drained by hand
  (`drain`) is restarted in place and stays out of rotation.
- `drain` / `undrain` (``fab app.drain/undrain --host H``): the rotation lives in the
  proxies' upstream file (`tiers.proxy.set_upstreams`), which ``fab proxy.setup`` keeps, so
  a drained host stays drained until `undrain`. Both run under the deploy lock, since
  rollouts own the rotation too. Draining the last host in rotation (or the last one that
  answers ``/ready``) is refused; `undrain` checks ``/ready`` first. `drain` never needs
  the host itself (a dead host is taken out without waiting for its requests); `undrain`
  refuses a host behind the fleet (`releasy_deploy.fleet`).
- `logs` (``fab app.logs``): the journal of the Releasy units, each line prefixed by host;
  ``follow`` streams every host at once, whole lines, until Ctrl-C.
- `run_adhoc` (``fab run --tier T -- CMD``): the ONE place where shell text written by the
  operator runs on the hosts, as ``sh -c CMD`` (as root, through ``sudo -n`` for a non-root
  SSH user), on every host of the tier in parallel, with a per-host summary.

Pure parts (argv builders, plans, rotation arithmetic, the summary) are unit-tested.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from . import audit, rollout, schema
from .commands import app as appcmd
from .commands import nginx as nginxcmd
from .commands import systemd
from .errors import (BadInput, DeployError, HostKeyError, ParallelError, RemoteCommandError,
                     StepFailed, UnreachableError, first_line)
from .executor import HostConnection, render_masked, tail
from .facts import Fact, tolerant_reader
from .fleet import FleetFile, FleetRecord, behind_reason, fleet_release, undrain_refusal
from .inventory import TIERS, Host, Inventory
from .lock import deploy_lock
from .pipeline import Pipeline
from .rollout import preflight
from .engine.plan import AppState, plan_restart
from .engine.runner import DRAIN_TIMEOUT_S, JOURNAL_LINES, RollingRunner
from .session import Session, select_hosts, split_names
from .status.assess import app_server
from .tiers import proxy_state
from .tiers import app_facts
from .tiers import app as app_tier
from .tiers import proxy as proxy_tier

__all__ = [
    "UNIT", "INSTANCE_UNITS", "LastHostInRotation", "AdhocFailed",
    "RotationView", "Rotation", "RestartPlan", "HostRun", "app_host", "app_hosts", "adhoc_hosts",
    "logs_argv", "adhoc_argv",
    "rotation_after_drain", "rotation_after_undrain", "restart_plan", "run_summary",
    "read_rotation", "restart", "drain", "undrain", "logs", "run_adhoc",
]

UNIT = app_facts.SERVICE_UNIT
#: the blue/green instances of a single host (journalctl matches the pattern itself).
INSTANCE_UNITS = "releasy@*.service"
MAX_LOG_LINES = 10000


class LastHostInRotation(BadInput):
    """Draining (or restarting) this host would leave no app host serving (exit 2)."""


class AdhocFailed(StepFailed):
    """``fab run``: the command failed (or could not run) on at least one host (exit 1, or
    4 when every failing host was unreachable)."""


# ------------------------------------------------------------------------------ pure parts
def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"


def app_host(inv: Inventory, name: str) -> Host:
    """The app host called ``name``; BadInput naming the app hosts otherwise."""
    apps = inv.hosts_in("app")
    if not name:
        raise BadInput(f"name the app host: --host H (or fab's -H H); app hosts:"
                       f" {_names(h.name for h in apps)}")
    for h in apps:
        if h.name == name:
            return h
    where = "is not an app host" if any(h.name == name for h in inv.hosts) else "is unknown"
    raise BadInput(f"--host {name}: {where} in {inv.path}; app hosts: "
                   f"{_names(h.name for h in apps)}")


def app_hosts(inv: Inventory, spec: str | None) -> list[Host]:
    """The app hosts named by ``--host H[,H...]`` (or fab's -H), in inventory order; every
    app host when ``spec`` is empty. BadInput naming a name that is no app host."""
    if not spec:
        return list(inv.hosts_in("app"))
    wanted = {app_host(inv, n).name for n in split_names(spec)}
    return [h for h in inv.hosts_in("app") if h.name in wanted]


def _whole_number(value: Any, flag: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"{flag} must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise BadInput(f"{flag} must be between {low} and {high}, got {number}")
    return number


def logs_argv(lines: int, follow: bool = False) -> list[str]:
    """journalctl for Releasy's units (the plain one and any blue/green instance): the last
    ``lines`` entries, then, with ``follow``, new ones as they come."""
    argv = systemd.journal_argv(UNIT, lines)  # validates lines
    argv[3:3] = ["--unit", INSTANCE_UNITS]
    return argv + (["--follow"] if follow else [])


def adhoc_argv(command: str) -> list[str]:
    """``sh -c COMMAND``: the operator's own shell snippet, as one argv word."""
    if not isinstance(command, str) or not command.strip():
        raise BadInput("no command given: `fab run --tier TIER -- COMMAND...`")
    if "\x00" in command:
        raise BadInput("the command contains a NUL byte")
    return ["sh", "-c", command]


def rotation_after_drain(app_names: Sequence[str], in_rotation: Iterable[str],
                         ready: Mapping[str, bool], host: str) -> list[str]:
    """The rotation once ``host`` is out (inventory order). Refuses (LastHostInRotation)
    when nothing, or nothing that answers /ready, would be left serving."""
    current = set(in_rotation)
    remaining = [n for n in app_names if n in current and n != host]
    out = [n for n in app_names if n not in current and n != host]
    if not remaining:
        back = f"`fab app.undrain --host {out[0]}`" if out else "undrain another host"
        raise LastHostInRotation(
            f"refusing to drain {host}: it is the last app host in rotation (out of rotation:"
            f" {_names(out)}); every request would fail. Put another host back first"
            f" ({back}), then drain {host}. Nothing was changed.")
    if not any(ready.get(n, False) for n in remaining):
        raise LastHostInRotation(
            f"refusing to drain {host}: no other host in rotation answers /ready"
            f" ({_names(remaining)}); every request would fail. Fix them first (`fab status`,"
            f" `fab app.restart --host NAME`). Nothing was changed.")
    return remaining


def rotation_after_undrain(app_names: Sequence[str], in_rotation: Iterable[str],
                           host: str) -> list[str]:
    current = set(in_rotation) | {host}
    return [n for n in app_names if n in current]


@dataclass(frozen=True)
class RotationView:
    """One app host as the proxies and the host itself see it."""

    name: str
    in_rotation: bool  # listed by every proxy
    ready: bool
    active: str  # ActiveState of releasy.service
    reachable: bool = True  # False: nothing else here was read (ready False)
    current: str | None = None  # the release /opt/releasy/current points at
    level: int | None = None  # the migration level recorded for that release


@dataclass(frozen=True)
class Rotation:
    """`read_rotation`: every app host's view, the database's level and the fleet record."""

    views: dict[str, RotationView]
    db_level: int | None
    record: FleetRecord | None

    def behind(self, host: str) -> tuple[str | None, str | None]:
        """(why ``host`` is behind the fleet or None, the release that fixes it)."""
        v = self.views[host]
        serving = {n: w.current for n, w in self.views.items()
                   if w.in_rotation and w.reachable and n != host}
        fleet = fleet_release(serving)
        reason = behind_reason(host, v.current, fleet=fleet, fleet_hosts=serving,
                               level=v.level, db_level=self.db_level, record=self.record)
        return reason, fleet or (self.record.release if self.record else None)


@dataclass(frozen=True)
class RestartPlan:
    in_place: tuple[str, ...]  # out of rotation (drained by hand): restarted, left out
    batches: tuple[tuple[str, ...], ...]  # drained, restarted, re-added, batch by batch

    @property
    def hosts(self) -> list[str]:
        return [*self.in_place, *(n for b in self.batches for n in b)]

    def describe(self) -> str:
        parts = [f"batch {i + 1}: {'+'.join(b)} (drain, restart, /ready, re-add)"
                 for i, b in enumerate(self.batches)]
        if self.in_place:
            parts.insert(0, f"{_names(self.in_place)}: out of rotation, restarted in place"
                            f" and left out")
        return "; ".join(parts)


def restart_plan(states: Sequence[AppState], targets: Sequence[str],
                 batch: int) -> RestartPlan:
    """Which hosts restart in which order. At least one ready host stays in rotation
    throughout; hosts in rotation that do not answer /ready go first (they serve nothing
    useful). Raises BadInput when the plan cannot keep a host serving."""
    by_name = {s.name: s for s in states}
    bare = [n for n in targets if by_name[n].current is None]
    if bare:
        raise BadInput(f"no release is installed on {_names(bare)}: nothing to restart"
                       f" (`fab app.setup --version X` installs one)")
    rotation = [s.name for s in states if s.in_rotation]
    in_place = tuple(n for n in targets if not by_name[n].in_rotation)
    rolling = [n for n in targets if by_name[n].in_rotation]
    if rolling and len(rotation) < 2:
        out = [s.name for s in states if not s.in_rotation]
        raise LastHostInRotation(
            f"refusing to restart {_names(rolling)}: it is the only app host in rotation"
            f" (out: {_names(out)}), so restarting it would fail every request. `fab"
            f" app.undrain --host {out[0] if out else 'NAME'}` first. Nothing was changed.")
    rolling.sort(key=lambda n: by_name[n].ready)  # not ready first (stable otherwise)
    size = max(1, min(batch, len(rotation) - 1))
    batches = [tuple(rolling[i:i + size]) for i in range(0, len(rolling), size)]
    ready_later: set[str] = set()
    for b in batches:
        left = [n for n in rotation if n not in b]
        if not any(by_name[n].ready or n in ready_later for n in left):
            raise LastHostInRotation(
                f"refusing to restart {'+'.join(b)}: no other host in rotation answers /ready"
                f" ({_names(left)}), so every request would fail meanwhile. Restart those"
                f" first (`fab app.restart --host NAME`). Nothing was changed.")
        ready_later.update(b)
    return RestartPlan(in_place, tuple(batches))


@dataclass(frozen=True)
class HostRun:
    """``fab run`` on one host."""

    host: str
    exit_code: int | None  # None: it did not run (unreachable, sudo refused...)
    seconds: float
    error: str | None = None
    unreachable: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def run_summary(runs: Sequence[HostRun], elapsed: float) -> str:
    """One line per host (exit code, duration), then the totals."""
    width = max((len(r.host) for r in runs), default=0)
    lines = []
    for r in runs:
        if r.exit_code is None:
            what = f"{'unreachable' if r.unreachable else 'not run'}: {r.error or '?'}"
            lines.append(f"  {r.host.ljust(width)}  {'-':>7}  {r.seconds:6.1f} s  FAILED ({what})")
        else:
            verdict = "ok" if r.ok else "FAILED"
            lines.append(f"  {r.host.ljust(width)}  exit {r.exit_code:>3}  {r.seconds:6.1f} s"
                         f"  {verdict}")
    failed = sum(1 for r in runs if not r.ok)
    lines.append(f"{len(runs)} hosts, {failed} failed, {elapsed:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ rotation
def read_rotation(session: Session) -> Rotation:
    """Every app host's place in the rotation, readiness and release, the database's level
    and the fleet record: ONE round trip per host, in parallel (a host with several tiers
    gets one too). An unreachable app-only host is a view (``reachable=False``), not an
    error: the rotation lives on the proxies."""
    inv = session.inventory
    wanted: dict[str, list[Fact]] = {}
    for h in inv.hosts_in("proxy"):
        wanted[h.name] = [proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE)]
    for h in inv.hosts_in("app"):
        bind = app_facts.bind_address(inv, h)
        wanted.setdefault(h.name, []).extend(
            [app_facts.ReleasyReady(appcmd.ready_url(bind)), app_facts.ReleasyUnit(UNIT),
             app_facts.ReleasyReleases(), schema.RecordedLevels()])
    wanted.setdefault(inv.db_host.name, []).extend([schema.level_fact(inv), FleetFile()])
    app_only = [h.name for h in inv.hosts_in("app") if h.tiers == ("app",)]
    found = session.executor.each([inv.host(n) for n in wanted],
                                  tolerant_reader(wanted, app_only))
    lists = []
    for p in inv.hosts_in("proxy"):
        text = found[p.name][proxy_state.ProxyText(nginxcmd.UPSTREAM_FILE)]
        if text is None:
            raise DeployError(f"{p.name}: {nginxcmd.UPSTREAM_FILE} does not exist: nginx is"
                              f" not set up for Releasy there; run `fab proxy.setup` first",
                              host=p.name)
        try:
            lists.append(nginxcmd.check_servers(nginxcmd.parse_upstream_servers(text)))
        except ValueError as exc:
            raise DeployError(f"{p.name}: {nginxcmd.UPSTREAM_FILE}: {exc}; run `fab"
                              f" proxy.setup --reset-upstreams`", host=p.name) from None
    views = {}
    for h in inv.hosts_in("app"):
        f = found[h.name]
        server = app_server(inv, h)
        listed = all(server in servers for servers in lists)
        if isinstance(f, UnreachableError):
            views[h.name] = RotationView(h.name, listed, False, "unknown", reachable=False)
            continue
        current = f[app_facts.ReleasyReleases()].current
        views[h.name] = RotationView(
            h.name, listed,
            bool(f[app_facts.ReleasyReady(appcmd.ready_url(app_facts.bind_address(inv, h)))]),
            f[app_facts.ReleasyUnit(UNIT)].get("ActiveState", "unknown"), current=current,
            level=f[schema.RecordedLevels()].get(current or ""))
    db = found[inv.db_host.name]
    return Rotation(views, db[schema.level_fact(inv)], db[FleetFile()])


def _split_only(inv: Inventory, what: str, advice: str) -> None:
    apps = inv.hosts_in("app")
    if inv.topology == "single" or len(apps) < 2:
        raise LastHostInRotation(
            f"{what}: {inv.path} has a single app host ({_names(h.name for h in apps)}), the"
            f" only one in rotation; taking it out would fail every request. {advice}")


def _set_rotation(session: Session, names: Sequence[str]) -> None:
    inv = session.inventory
    proxy_tier.set_upstreams(session, [app_server(inv, inv.host(n)) for n in names])


def _audit(session: Session, action: str, *, skip: Iterable[str] = (), **fields: Any) -> None:
    """An audit record on every host (but the ``skip`` ones: unreachable); a failure to
    write it is reported, not raised."""
    skipped = set(skip)
    try:
        audit.write(session.executor, [h for h in session.inventory.hosts
                                       if h.name not in skipped],
                    audit.record(action, session.inventory.environment, **fields))
    except DeployError as exc:
        session.reporter.error(session.inventory.environment,
                               f"audit record not written everywhere: {first_line(exc)}")


def drain(session: Session, host: str, *, wait: float = 0) -> None:
    """Take ``host`` out of every proxy's rotation; returns once the requests it was
    serving have finished (old nginx workers gone). Idempotent."""
    inv = session.inventory
    target = app_host(inv, host).name
    _split_only(inv, f"refusing to drain {target}",
                "On a single host `fab deploy.bluegreen` switches releases without downtime.")
    names = [h.name for h in inv.hosts_in("app")]
    r = session.reporter
    with deploy_lock(session, version=None, wait=wait):
        views = read_rotation(session).views
        in_rotation = [n for n in names if views[n].in_rotation]
        if target not in in_rotation:
            r.unchanged(target, f"out of rotation already (in rotation: {_names(in_rotation)})")
            return
        remaining = rotation_after_drain(names, in_rotation,
                                         {n: v.ready for n, v in views.items()}, target)
        _set_rotation(session, remaining)
        if session.dry_run:
            r.would(target, f"leave the rotation (in rotation then: {_names(remaining)})")
            return
        r.changed(target, f"out of rotation (in rotation now: {_names(remaining)})")
        unreachable = [n for n, v in views.items() if not v.reachable]
        if target in unreachable:
            # Nothing to wait for that could end well: a request on a dead host never gets
            # its answer (nginx gives up after proxy_read_timeout).
            r.info(target, "unreachable: taken out without it; could not wait for the"
                           " requests it was serving (they fail or time out at the proxy)."
                           f" It stays out until `fab app.undrain --host {target}`, which"
                           f" refuses it while it is behind the fleet")
        elif all(session.executor.each(
                inv.hosts_in("proxy"),
                lambda c: proxy_tier.wait_old_workers_gone(c, DRAIN_TIMEOUT_S)).values()):
            r.info(target, "no request in flight any more: safe to work on; `fab app.undrain"
                           f" --host {target}` puts it back")
        else:
            r.info(target, f"requests were still in flight after {DRAIN_TIMEOUT_S:g}"
                           " s (long requests?): wait a little before stopping it")
        _audit(session, "app.drain", skip=unreachable, target=target, rotation=remaining,
               reachable=target not in unreachable)


def undrain(session: Session, host: str, *, wait: float = 0) -> None:
    """Put ``host`` back into every proxy's rotation, if it answers /ready. Idempotent."""
    inv = session.inventory
    target = app_host(inv, host).name
    names = [h.name for h in inv.hosts_in("app")]
    r = session.reporter
    with deploy_lock(session, version=None, wait=wait):
        state = read_rotation(session)
        views = state.views
        in_rotation = [n for n in names if views[n].in_rotation]
        if target in in_rotation:
            r.unchanged(target, f"in rotation already (in rotation: {_names(in_rotation)})")
            return
        view = views[target]
        if not view.reachable:
            raise UnreachableError(f"{target}: unreachable: not putting it back into rotation."
                                   f" Nothing was changed.", host=target)
        reason, release = state.behind(target)
        if reason is not None:
            raise BadInput(undrain_refusal(target, reason, release), host=target)
        if not view.ready:
            journal = app_tier.journal_tail(session.executor.conn(target), UNIT, JOURNAL_LINES)
            raise DeployError(
                f"{target}: not putting it back into rotation: it does not answer /ready"
                f" ({UNIT} is {view.active}). Last journal lines:\n"
                + "\n".join(f"    {line}" for line in journal.splitlines())
                + f"\n  Fix it (`fab app.restart --host {target}`, or `fab app.setup`), then"
                  f" re-run `fab app.undrain --host {target}`.", host=target)
        wanted = rotation_after_undrain(names, in_rotation, target)
        _set_rotation(session, wanted)
        if session.dry_run:
            r.would(target, f"join the rotation (in rotation then: {_names(wanted)})")
            return
        r.changed(target, f"back in rotation (in rotation now: {_names(wanted)})")
        _audit(session, "app.undrain", skip=[n for n, v in views.items() if not v.reachable],
               target=target, rotation=wanted)


# ------------------------------------------------------------------------------ restart
def restart(session: Session, *, host: str | None = None, batch: Any = 1, yes: bool = False,
            wait: float = 0, ready_timeout: Any = None) -> RestartPlan:
    """``fab app.restart``: restart Releasy on every app host (or ``host``), batch by batch,
    each batch drained first and re-added once ready; under the deploy lock.

    Raises BadInput (2) for bad flags or a plan that would leave nothing serving, LockBusy
    (3), RolloutFailed (1/4) when a host does not come back (it is restarted once more;
    the message says where everything stands).
    """
    inv = session.inventory
    batch = _whole_number(batch, "--batch", 1, 1000)
    timeout = rollout.ready_timeout_of(inv, ready_timeout)
    targets = [h.name for h in app_hosts(inv, host)]
    _split_only(inv, "refusing a rolling restart",
                "Restarting it is downtime; if that is acceptable: `fab run --tier app --"
                " systemctl restart UNIT` with the live unit `fab status` names. `fab"
                " deploy.bluegreen` switches releases without downtime.")
    pipe = Pipeline("app.restart", session.reporter)
    with ExitStack() as stack:
        with pipe.stage("preflight", what="lock, every host's state"):
            lock = stack.enter_context(deploy_lock(session, version=None, wait=wait))
            pre = preflight.gather(session)
            order = restart_plan(list(pre.apps.values()), targets, batch)
            plan = plan_restart(order.in_place, order.batches, pre.apps)
            r = RollingRunner(session, pipe, lock, pre, plan, release=None,
                              ready_timeout=timeout)
        r.run(yes)
    return order


# ------------------------------------------------------------------------------ logs
def logs(session: Session, *, host: str | None = None, lines: Any = systemd.DEFAULT_LOG_LINES,
         follow: bool = False) -> None:
    """Print the Releasy journal of every app host (or ``host``), each line as
    ``[host] | ...``: grouped by host, or with ``follow`` streamed as it comes from all
    hosts at once (whole lines) until Ctrl-C, which ends it normally."""
    inv = session.inventory
    count = _whole_number(lines, "--lines", 1, MAX_LOG_LINES)
    targets = app_hosts(inv, host)
    if follow:
        session.reporter.end_live()  # a stream of lines, not a progress view
        _follow(session, targets, count)
        return
    argv = logs_argv(count)

    def read(c: HostConnection) -> str:
        res = c.run(argv, sudo=True, mutates=False, check=False)
        if not res.ok:
            raise RemoteCommandError(c.name, render_masked(res.argv, c.mask), res.exit_code,
                                     tail(c.mask(res.stderr or res.stdout)),
                                     hint=f"check `journalctl -u {UNIT}` on {c.name}")
        return c.mask(res.stdout)

    failure: ParallelError | None = None
    try:
        found = session.executor.each(targets, read)
    except ParallelError as exc:
        failure, found = exc, exc.results
    for h in targets:
        if h.name not in found:
            continue
        text = found[h.name].rstrip("\n")
        if not text:
            session.reporter.info(h.name, f"(no journal entries for {UNIT})")
        for line in text.splitlines():
            session.reporter.output(h.name, line)
    if failure is not None:
        raise failure


def _follow(session: Session, targets: Sequence[Host], lines: int) -> None:
    ex, reporter = session.executor, session.reporter
    argv = logs_argv(lines, follow=True)
    stopping = threading.Event()
    failures: dict[str, BaseException] = {}

    def stream(h: Host) -> None:
        try:
            res = ex.conn(h).run(argv, sudo=True, mutates=False, check=False, echo=True)
            if not stopping.is_set():
                failures[h.name] = DeployError(f"{h.name}: journalctl stopped (exit code"
                                               f" {res.exit_code})", host=h.name)
        except Exception as exc:  # noqa: BLE001 - reported below unless we are stopping
            if not stopping.is_set():
                failures[h.name] = exc
        if h.name in failures:
            reporter.error(h.name, first_line(failures[h.name]))

    threads = [threading.Thread(target=stream, args=(h,), name=f"releasy-logs-{h.name}",
                                daemon=True) for h in targets]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    except KeyboardInterrupt:
        # Ctrl-C is how --follow ends (exit 0 unless a host failed before). Closing the
        # connections ends every remote journalctl (its output is gone); the readers are
        # daemon threads and need no joining.
        stopping.set()
        ex.close()
    if failures:
        raise ParallelError(failures, {}, mask=ex.masker)


# ------------------------------------------------------------------------------ ad-hoc
def adhoc_hosts(inv: Inventory, tier: str | None, host: str | None) -> list[Host]:
    """``fab run``'s hosts: those of ``tier``, or only the ``--host H[,H...]`` (fab's -H)
    among them; without a tier, the named hosts whatever their tiers. BadInput otherwise."""
    if tier is None:
        if not host:
            raise BadInput("say where to run it: --tier TIER and/or --host H[,H...] (or fab's"
                           " -H H[,H...])")
        return select_hosts(inv, host, "--host")
    if tier not in TIERS:
        raise BadInput(f"--tier {tier!r}: tiers are {', '.join(TIERS)}")
    hosts = list(inv.hosts_in(tier))
    if host:
        names = {h.name for h in hosts}
        outside = [n for n in split_names(host) if n not in names]
        if outside:
            raise BadInput(f"--host {', '.join(outside)}: not one of the {tier} hosts in"
                           f" {inv.path}: {_names(names)}")
        wanted = set(split_names(host))
        hosts = [h for h in hosts if h.name in wanted]
    return hosts


def run_adhoc(session: Session, tier: str | None, command: str, *,
              host: str | None = None) -> list[HostRun]:
    """Run the operator's ``command`` with ``sh -c`` as root on every host of ``tier`` (or
    the ``host`` list, see `adhoc_hosts`) in parallel, output streamed as
    ``[host] | ...``; print the summary. Raises AdhocFailed when it failed or could not
    run anywhere."""
    inv = session.inventory
    hosts = adhoc_hosts(inv, tier, host)
    argv = adhoc_argv(command)
    started = time.monotonic()

    def one(c: HostConnection) -> HostRun:
        t0 = time.monotonic()
        try:
            res = c.run(argv, sudo=True, check=False, echo=True)
        except DeployError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return HostRun(c.name, None, time.monotonic() - t0,
                           first.removeprefix(f"{c.name}: "),
                           unreachable=isinstance(exc, (UnreachableError, HostKeyError)))
        return HostRun(c.name, res.exit_code, time.monotonic() - t0)

    found = session.executor.each(hosts, one, close_on_interrupt=True)  # `tail -f`: one Ctrl-C
    runs = [found[h.name] for h in hosts]
    shown = session.executor.masker(command)
    print(f"summary of `{shown}` on the {tier or 'named'} hosts:\n"
          + run_summary(runs, time.monotonic() - started), flush=True)
    failed = [r for r in runs if not r.ok]
    if failed:
        raise AdhocFailed(f"the command failed on {_names(r.host for r in failed)} of"
                          f" {len(runs)} {tier or 'named'} host(s) (see the summary above)",
                          unreachable=all(r.unreachable for r in failed))
    return runs
