"""`fab app.setup`: Releasy on every app host, as an unprivileged systemd service.

`setup` works in two passes over the app hosts, each pass in parallel:

1. look: ONE batched facts script per host reads everything the later steps compare
   against (`tiers.app_facts`: packages, account, directories, files, releases, unit
   state, readiness);
2. act: each step compares with those facts and only acts on a difference, reporting
   changed / ok / would change. A run that finds nothing to do costs that one round trip.

Before either pass the release tarball is verified locally (`releases.fetch_release`), so a
bad artifact fails with nothing changed on any host. Releases are staged and switched, the
service restarted and waited for, by the steps of `tiers.app`; the service restarts only
when something it uses changed (release, env file, unit).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from ..commands import app as cmd
from ..commands import kept_secrets as kept
from ..commands import systemd
from ..commands.nginx import UPSTREAM_FILE
from .. import schema
from ..errors import BadInput, DeployError
from ..executor import HostConnection, tail
from ..facts import OsRelease, FileSha256, FileStat, PackageVersion, read_facts
from ..inventory import Inventory
from ..hostos import check_release
from ..releases import LocalRelease, fetch_release
from ..secret_policy import Resolution
from ..remote import Change, ensure_packages, render_diff, report
from ..session import Session
from .app import activate_from, run_script, stage_with, wait_ready
from .app_facts import (PACKAGES, SERVICE_UNIT, HostFacts, KeptSecrets, ReleasyAccount,
                        ReleasyReady, ReleasyReleases, ReleasyUnit, bind_address, fact_names,
                        live_instance)
from .app_secrets import database_url, resolve_secrets, resolve_states

__all__ = ["setup", "stage_first_install", "AppSetup", "record_levels"]


@dataclass(frozen=True)
class _Plan:
    inv: Inventory
    secrets: Any
    version: str | None
    release: LocalRelease | None
    database_url: str
    kept: Mapping[str, kept.KeptState] = field(default_factory=dict)  # host -> kept secrets

    @property
    def user(self) -> str:
        return self.inv.app.service_user


def _gather(c: HostConnection, plan: _Plan, *, with_secrets: bool = False) -> HostFacts:
    bind = bind_address(plan.inv, c.host)
    extra = [KeptSecrets()] if with_secrets else []
    names = fact_names(plan.inv, bind, cmd.sqlite_path(plan.database_url))
    found = read_facts(c, [OsRelease(), *names, *extra], sudo=True, reuse=True)
    check_release(c.name, found[OsRelease()])  # before anything is changed on it
    return HostFacts(
        kept=found.get(KeptSecrets()),
        missing_packages=tuple(p for p in PACKAGES if not found[PackageVersion(p)]),
        account=found[ReleasyAccount(plan.user)],
        stats={k.path: v for k, v in found.items() if isinstance(k, FileStat)},
        sums={k.path: v for k, v in found.items() if isinstance(k, FileSha256)},
        releases=found[ReleasyReleases()],
        levels=found[schema.RecordedLevels()],
        unit=found[ReleasyUnit(SERVICE_UNIT)],
        ready=found[ReleasyReady(cmd.ready_url(bind))],
        instances={p: found[ReleasyUnit(cmd.instance_unit(p))]
                   for p in plan.inv.app.bluegreen_ports if plan.inv.is_single_host},
        instances_ready={p: found[ReleasyReady(cmd.ready_url(cmd.instance_bind(p)))]
                         for p in plan.inv.app.bluegreen_ports if plan.inv.is_single_host},
    )


def stage_first_install(c: HostConnection, inv: Inventory,
                        release: LocalRelease | None) -> None:
    """On an app host with no release yet, what `setup` does there that needs nothing from
    the database: the service account, the directories, ``release`` uploaded (not
    switched). `fab site` runs it as soon as the host's packages are in, while the db host
    may still be installing PostgreSQL; `setup` then finds it all in place. Not in a dry
    run (nothing is installed then either)."""
    if c.dry_run:
        return
    plan = _Plan(inv, {}, None, release, database_url="")  # no URL yet: the db step's
    f = _gather(c, plan)
    if f.releases.current is not None:
        return  # serving, or about to: its changes belong to `setup` and its rollout
    group = _ensure_account(c, plan.user, f.account)
    _ensure_dirs(c, plan.user, group, f)
    if release is not None:
        stage_with(c, release, f.releases)


def setup(session: Session, version: str | None = None, *, defer_restarts: bool = False,
          rotate: Iterable[str] = (),
          secrets: tuple[Resolution, dict[str, kept.KeptState]] | None = None
          ) -> AppSetup:
    """Install and start Releasy on every app host (in parallel).

    ``version``: the release to run; None keeps each host's current release (and fails
    when a host has none). ``rotate``: secret names whose value may change (see
    `resolve_secrets`; ``secrets`` is its result when the caller already has it). Raises
    BadInput before touching any host when the artifact is missing, unpinned or does not
    verify, or when a secret would drift.

    ``defer_restarts`` (an environment that serves, see `releasy_deploy.site`): a host that
    is ready and would need a restart (env file, unit) or a release switch gets its files
    written and the release staged, but is neither switched nor restarted. Returns those
    hosts with the reasons, for a rolling restart or deploy, one batch at a time, and the
    hosts whose release (once every host serves) has no migration level recorded yet.
    """
    inv = session.inventory
    hosts = session.targets(inv.hosts_in("app"))
    if not hosts:
        return AppSetup({}, {})
    if secrets is None and len(hosts) < len(inv.hosts_in("app")):
        # --limit: the secrets are the fleet's, read from every app host (a host set up
        # alone must not generate a pepper of its own).
        secrets = resolve_secrets(session, rotate)
    release = fetch_release(inv, version) if version is not None else None
    plan = _Plan(inv, {}, version, release, database_url(session))
    ex = session.executor
    # Without a resolution from the caller, the kept secrets come in the same batch.
    found = ex.each(hosts, lambda c: _gather(c, plan, with_secrets=secrets is None))
    res, states = secrets if secrets is not None else resolve_states(
        session, {n: f.kept for n, f in found.items()}, rotate)
    plan = replace(plan, secrets=res.values, kept=states)
    if version is None:
        bare = [h.name for h in hosts if found[h.name].releases.current is None]
        if bare:
            raise BadInput(f"no release installed on {', '.join(bare)}: pass --version")
    done = ex.each(hosts, lambda c: _converge(c, plan, found[c.name], defer_restarts))
    unrecorded = schema.levels_to_record(
        {h.name: version or found[h.name].releases.current for h in hosts},
        {h.name: found[h.name].levels for h in hosts})
    return AppSetup({h.name: done[h.name] for h in hosts if done[h.name]}, unrecorded,
                    tuple(h.name for h in hosts if found[h.name].releases.current is None))


@dataclass(frozen=True)
class AppSetup:
    """What `setup` leaves to its caller: restarts to roll (host -> reasons), the hosts
    whose release has no migration level recorded (host -> release; `record_levels`), and
    the hosts that had no release before (first installs: never in rotation, so never
    drained by hand; `fab site` puts them in)."""

    deferred: dict[str, list[str]]
    unrecorded: dict[str, str]
    first_installs: tuple[str, ...] = ()


def record_levels(session: Session, unrecorded: Mapping[str, str]) -> None:
    """Once every app host serves: record the database's migration level now for the
    release each host of ``unrecorded`` runs (it started, or runs, against that level).
    One read on the db host, one write per host; nothing when all are recorded."""
    if not unrecorded or session.dry_run:
        return
    level = schema.read_level(session)

    def record(c: HostConnection) -> None:
        c.run(schema.record_script_argv({unrecorded[c.name]: level}), sudo=True)
        c.reporter.info(c.name, f"migration level {level} recorded for release"
                                f" {unrecorded[c.name]}")
    session.executor.each(list(unrecorded), record)


def _converge(c: HostConnection, plan: _Plan, f: HostFacts, defer: bool = False) -> list[str]:
    """Converge one host; returns the reasons of a restart left to a rolling one ([]: none
    was needed, or it was done here)."""
    inv = plan.inv
    if f.missing_packages:
        ensure_packages(c, PACKAGES)
    else:
        report(c, Change(False, f"packages {' '.join(PACKAGES)}"))
    group = _ensure_account(c, plan.user, f.account)
    _ensure_dirs(c, plan.user, group, f)
    _ensure_sqlite_file(c, plan, group, f)

    live = live_instance(inv, f)
    if live is not None:
        return _converge_bluegreen(c, plan, f, group, live, defer)
    # A single host serves only once its proxy routes to Releasy (before `proxy.setup`
    # there is nothing to switch: a restart in place costs no request).
    serving = (defer and f.ready and f.releases.current is not None
               and f.unit.get("ActiveState") == "active"
               and (not inv.is_single_host or f.stats.get(UPSTREAM_FILE) is not None))

    target = plan.version or f.releases.current
    assert target is not None  # setup() refused hosts without a release
    staged = False
    if plan.release is not None:
        staged = stage_with(c, plan.release, f.releases).changed

    _ensure_kept_secrets(c, plan)
    env_changed = _ensure_env_file(c, plan, group, f)

    activated = False
    if f.releases.current is None:
        # Nothing runs a release yet: switching first lets the units verify against it.
        activated = activate_from(c, target, f.releases.current).changed
    units = cmd.render_units(plan.user, group)
    changed_units = _ensure_units(c, units, f, probe_target=f"{cmd.RELEASES_DIR}/{target}")
    switch_later = serving and target != f.releases.current
    if f.releases.current is not None and not switch_later:
        activated = activate_from(c, target, f.releases.current).changed

    reasons = [why for why, hit in (
        (f"release {target} staged", staged), (f"switched to {target}", activated),
        ("env file changed", env_changed),
        (f"{SERVICE_UNIT} changed", SERVICE_UNIT in changed_units),
    ) if hit]
    if switch_later:
        reasons.append(f"switch {f.releases.current} -> {target}")
    deferred = reasons if serving else []
    restarted = _ensure_service(c, f.unit, reload=bool(changed_units),
                                reasons=[] if deferred else reasons)
    if deferred:
        verb = "would be" if c.dry_run else "is"
        c.reporter.info(c.name, f"{SERVICE_UNIT} serves: its restart ({'; '.join(deferred)})"
                                f" {verb} done one batch at a time, drained first")
        return deferred

    bind = bind_address(inv, c.host)
    if c.dry_run:
        return []
    if restarted or not f.ready:
        waited = wait_ready(c, bind, inv.app.ready_timeout)
        c.reporter.info(c.name, f"{SERVICE_UNIT} ready at http://{bind}/ready after {waited:.1f} s"
                                f" (release {target})")
    else:
        c.reporter.info(c.name, f"{SERVICE_UNIT} ready at http://{bind}/ready (release {target})")
    return []


def _converge_bluegreen(c: HostConnection, plan: _Plan, f: HostFacts, group: str,
                        live: int, defer: bool = False) -> list[str]:
    """Blue/green owns the release and the running instance: keep config files right, but
    restart or switch nothing here (a live instance found stopped is started as it is).
    Returns the reasons for a fresh instance when ``defer`` (the caller switches to one:
    `releasy_deploy.site`), else [] and says the changes wait for the next `fab
    deploy.bluegreen`."""
    unit = cmd.instance_unit(live)
    if plan.version and plan.version != f.releases.current:
        raise BadInput(f"{c.name}: {unit} serves {f.releases.current} (blue/green): change "
                       f"the release with `fab deploy.bluegreen --version {plan.version}`")
    _ensure_kept_secrets(c, plan)
    env_changed = _ensure_env_file(c, plan, group, f)
    units = cmd.render_units(plan.user, group)
    changed_units = _ensure_units(c, units, f,
                                  probe_target=f"{cmd.RELEASES_DIR}/{f.releases.current}")
    if changed_units and not c.dry_run:
        run_script(c, cmd.script_of([["systemctl", "daemon-reload"]]), "systemctl daemon-reload",
                    hint=f"see `systemctl status {unit}` on {c.name}")
    reasons = [why for why, hit in (("env file changed", env_changed),
                                    (f"{cmd.TEMPLATE_UNIT} changed",
                                     cmd.TEMPLATE_UNIT in changed_units)) if hit]
    if reasons and defer:
        verb = "would be" if c.dry_run else "is"
        c.reporter.info(c.name, f"{unit} is live (blue/green): its restart ({'; '.join(reasons)})"
                                f" {verb} done by starting a fresh instance and switching to it")
    elif env_changed or changed_units:
        c.reporter.info(c.name, f"{unit} is live (blue/green): the changes take effect at the "
                                "next `fab deploy.bluegreen`, which starts a fresh instance")
    report(c, Change(False, f"{SERVICE_UNIT} left stopped: {unit} is live (blue/green)"))
    if reasons and defer:
        return reasons
    state = f.instances.get(live, {}).get("ActiveState")
    if state != "active":
        # The proxy routes to it, but it died or was stopped (a restore that could not bring
        # it back): started as it is, never restarted or switched here.
        if not c.dry_run:
            run_script(c, cmd.script_of([systemd.systemctl("start", unit)]),
                       f"systemctl start {unit}",
                       hint=f"see `journalctl -u {unit}` and `systemctl status {unit}` on"
                            f" {c.name}")
        report(c, Change(True, f"{unit} started (was {state or 'unknown'})"))
    if c.dry_run:
        return []
    bind = cmd.instance_bind(live)
    if state != "active" or not f.instances_ready.get(live):
        wait_ready(c, bind, plan.inv.app.ready_timeout, unit=unit)
    c.reporter.info(c.name, f"{unit} ready at http://{bind}/ready "
                            f"(release {f.releases.current})")
    return []


def _ensure_account(c: HostConnection, user: str, acct: cmd.Account) -> str:
    """Create the service account if missing; returns its primary group."""
    if acct.exists:
        if acct.shell not in cmd.NO_SHELLS:
            raise DeployError(
                f"{c.name}: the service user {user} exists with login shell {acct.shell}; Releasy"
                f" must run as an account without a shell. Run `usermod -s {cmd.NOLOGIN} {user}`"
                f" on {c.name} if {user} is only used by Releasy, or set app.service_user to an"
                f" unused name",
                host=c.name,
            )
        group = acct.group or user
        report(c, Change(False, f"user {user} (uid {acct.uid}, group {group})"))
        return group
    commands = cmd.account_commands(user, acct)
    uid = "uid 10001" if not acct.uid_taken else "system uid (10001 is taken)"
    if not c.dry_run:
        run_script(c, cmd.script_of(commands), f"create user {user}",
                    hint=f"check /etc/passwd and /etc/group on {c.name} for a conflicting {user}")
    report(c, Change(True, f"user {user} (created: {uid}, no login shell, home {cmd.DATA_DIR})"))
    return user


def _ensure_dirs(c: HostConnection, user: str, group: str, f: HostFacts) -> None:
    commands: list[list[str]] = []
    changes: list[Change] = []
    for d in cmd.directories(user, group):
        st = f.stats.get(d.path)
        mode = f"{d.mode:04o}"
        if st is None:
            change = Change(True, f"dir {d.path} (created, {d.owner}:{d.group} {mode})")
            commands.append(["mkdir", "-p", "--", d.path])
        elif st["type"] != "directory":
            raise DeployError(f"{c.name}: {d.path} exists but is a {st['type']}, not a directory;"
                              f" move it away and re-run", host=c.name)
        elif (st["owner"], st["group"], st["mode"]) != (d.owner, d.group, d.mode):
            change = Change(True, f"dir {d.path} ({st['owner']}:{st['group']} {st['mode']:04o}"
                                  f" -> {d.owner}:{d.group} {mode})")
        else:
            report(c, Change(False, f"dir {d.path}"))
            continue
        commands += [["chown", "--", f"{d.owner}:{d.group}", d.path], ["chmod", "--", mode, d.path]]
        changes.append(change)
    if commands and not c.dry_run:
        run_script(c, cmd.script_of(commands), "create the app directories",
                    hint=f"check the file systems under /opt, /etc and /var/lib on {c.name}")
    for change in changes:
        report(c, change)


def _ensure_sqlite_file(c: HostConnection, plan: _Plan, group: str, f: HostFacts) -> None:
    """SQLite only: an empty database file owned by the service user, if none exists yet
    (sqlx does not create one unless the URL says mode=rwc). An existing file is left as is."""
    path = cmd.sqlite_path(plan.database_url)
    if not path:
        return
    if f.stats.get(path) is not None:
        report(c, Change(False, f"sqlite database {path}"))
        return
    if not path.startswith(cmd.DATA_DIR + "/"):
        raise DeployError(f"{c.name}: the SQLite database {path} does not exist and is outside"
                          f" {cmd.DATA_DIR}, the only directory Releasy may write to", host=c.name)
    if not c.dry_run:
        # Created by the service account itself, never replacing anything (noclobber): the
        # directory is its own, so whatever it planted there root must not write through.
        argv = ["runuser", "-u", plan.user, "--", "sh", "-c", 'umask 077; set -C; : > "$1"',
                "releasy-create-db", path]
        run_script(c, cmd.script_of([argv]), f"create {path}",
                    hint=f"check that {cmd.DATA_DIR} exists on {c.name}")
    report(c, Change(True, f"sqlite database {path} (created empty, {plan.user}:{group} 0600)"))


def _ensure_kept_secrets(c: HostConnection, plan: _Plan) -> None:
    """The host keeps the secrets it runs with (root:root 0600 in a root 0700 directory),
    written before the env file: a later run without them keeps them (secret_policy)."""
    state = plan.kept.get(c.name, kept.KeptState())
    values = dict(plan.secrets)
    if state.kept == values and state.tidy:
        report(c, Change(False, f"file {kept.KEPT_FILE} (secrets kept, not shown)"))
        return
    how = ("created" if state.kept is None else "owner/mode fixed" if state.kept == values
           else "updated")
    if not c.dry_run:
        res = c.run(kept.write_argv(), sudo=True, stdin=kept.render(values), check=False)
        if not res.ok:
            out = c.mask(res.stderr.strip() or res.stdout.strip()) or "(no output)"
            raise DeployError(f"{c.name}: writing {kept.KEPT_FILE} failed (exit code"
                              f" {res.exit_code}): {tail(out)}", host=c.name)
    report(c, Change(True, f"file {kept.KEPT_FILE} ({how}, root:root 0600, names: "
                           f"{', '.join(sorted(values)) or 'none'}; values not shown)"))


def _ensure_env_file(c: HostConnection, plan: _Plan, group: str, f: HostFacts) -> bool:
    """The env file has the rendered content, root:GROUP 0640. True if its content changed
    (an owner/mode fix alone does not need a restart)."""
    path = cmd.ENV_FILE
    text = cmd.render_env_file(
        cmd.env_variables(plan.inv, c.host, plan.secrets, plan.database_url), group)
    data = text.encode("utf-8")
    st, current_sum = f.stats.get(path), f.sums.get(path)
    if st is not None and not st["type"].startswith("regular"):
        raise DeployError(f"{c.name}: {path} is a {st['type']}, not a file; move it away and"
                          f" re-run", host=c.name)
    want = ("root", group, 0o640)
    same_content = st is not None and current_sum == hashlib.sha256(data).hexdigest()
    same_attrs = st is not None and (st["owner"], st["group"], st["mode"]) == want
    if same_content and same_attrs:
        report(c, Change(False, f"file {path}"))
        return False
    if same_content:
        change = Change(True, f"file {path} ({st['owner']}:{st['group']} {st['mode']:04o}"
                              f" -> root:{group} 0640)")
        if not c.dry_run:
            run_script(c, cmd.script_of([["chown", "--", f"root:{group}", path],
                                          ["chmod", "--", "0640", path]]),
                        f"fix owner/mode of {path}", hint=f"check {path} on {c.name}")
        report(c, change)
        return False
    diff = None
    if c.dry_run:
        # Secret values are hidden by variable name, so even rotated-away ones never show.
        old = c.read_file(path, sudo=True) if st is not None else None
        shown_old, shown_new = cmd.redact_env_texts(
            "" if old is None else old.decode("utf-8", "replace"), text)
        diff = render_diff(None if old is None else shown_old.encode(), shown_new.encode(), path)
    change = Change(True, f"file {path} ({'content' if st is not None else 'created'},"
                          f" root:{group} 0640, secret values not shown)", diff)
    if not c.dry_run:
        c.put_bytes(data, path, owner="root", group=group, mode=0o640, secret=True)
    report(c, change, path=path)
    return True


def _ensure_units(c: HostConnection, units: dict[str, str], f: HostFacts, *,
                  probe_target: str) -> set[str]:
    """Install the unit files that differ (verified first). Returns the names whose content
    changed: only those need a daemon-reload (an owner/mode fix does not)."""
    changed: dict[str, str] = {}
    content_changed: set[str] = set()
    changes: list[tuple[Change, str]] = []
    for name, content in units.items():
        path = f"{cmd.UNIT_DIR}/{name}"
        st, current_sum = f.stats.get(path), f.sums.get(path)
        data = content.encode("utf-8")
        same_content = st is not None and current_sum == hashlib.sha256(data).hexdigest()
        if same_content and (st["owner"], st["group"], st["mode"]) == ("root", "root", 0o644):
            report(c, Change(False, f"unit {path}"))
            continue
        diff = None
        if c.dry_run:
            old = c.read_file(path, sudo=True) if st is not None else None
            diff = render_diff(old, data, path)
        verb = ("owner/mode fixed" if same_content else "updated" if st is not None
                else "created")
        changes.append((Change(True, f"unit {path} ({verb}, verified with systemd-analyze)",
                               diff), path))
        changed[name] = content
        if not same_content:
            content_changed.add(name)
    if changed and not c.dry_run:
        run_script(
            c, cmd.install_units_script(changed, probe_target=probe_target),
            f"install {', '.join(changed)} (systemd-analyze verify)",
            hint="the candidate unit files were NOT installed; fix the templates in"
                 " files/systemd/ (or what the messages above point at) and re-run")
    for change, path in changes:
        report(c, change, path=path)
    return content_changed


def _ensure_service(c: HostConnection, unit: dict[str, str], *, reload: bool,
                    reasons: list[str]) -> bool:
    """daemon-reload / enable / (re)start as needed, in one round trip. True if (re)started."""
    plan = cmd.service_plan(unit, units_changed=reload, reasons=reasons)
    if plan.commands and not c.dry_run:
        run_script(c, cmd.script_of(plan.commands), f"systemctl ({SERVICE_UNIT})",
                    hint=f"see `journalctl -u {SERVICE_UNIT}` and `systemctl status"
                         f" {SERVICE_UNIT}` on {c.name}")
    report(c, Change(plan.enable, f"{SERVICE_UNIT} enabled"
                                   + (" (starts at boot)" if plan.enable else "")))
    if plan.start:
        report(c, Change(True, f"{SERVICE_UNIT} {plan.start}"))
    else:
        report(c, Change(False, f"{SERVICE_UNIT} active (MainPID {unit.get('MainPID', '?')})"))
    return plan.start is not None
