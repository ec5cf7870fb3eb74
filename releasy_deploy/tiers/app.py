"""The app tier's steps on one app host, as the flows (rolling and blue/green rollouts,
restores, `tiers.app_setup`) run them: stage a release, switch ``current`` to it, restart
the service, wait until it is ready (or show its journal).

Release switches follow Capistrano: unpack into ``/opt/releasy/releases/V`` via a temp dir +
rename, then switch the ``/opt/releasy/current`` symlink atomically. Readiness is polled on
``/ready`` from the host itself. The facts are in `tiers.app_facts`, setting hosts up in
`tiers.app_setup`, the secrets in `tiers.app_secrets`.
"""
from __future__ import annotations

import hashlib
import math
import time

from ..commands import app as cmd
from ..commands import systemd
from ..errors import BadInput, DeployError
from ..executor import HostConnection, tail
from ..facts import read_fact
from ..inventory import check_version
from ..releases import LocalRelease
from ..remote import Change, report
from .app_facts import SERVICE_UNIT, ReleasyReleases

__all__ = [
    "run_script", "current_release", "installed_releases", "stage_release", "stage_with",
    "activate_release", "activate_from", "restart_service", "journal_tail", "wait_ready",
    "JOURNAL_LINES",
]

JOURNAL_LINES = 30


def run_script(c: HostConnection, script: str, label: str, *, hint: str) -> None:
    """Run a mutating script as root; a failure names the step and what to do."""
    res = c.run_script(script, sudo=True, check=False, label=label)
    if res.ok or res.dry_run:
        return
    out = c.mask(res.stderr.strip() or res.stdout.strip()) or "(no output)"
    raise DeployError(
        f"{c.name}: {label} failed (exit code {res.exit_code}):\n"
        + "\n".join(f"    {line}" for line in tail(out).splitlines())
        + f"\n  {hint}",
        host=c.name,
    )


def _releases(c: HostConnection) -> cmd.ReleaseState:
    return read_fact(c, ReleasyReleases(), sudo=True)


def current_release(c: HostConnection) -> str | None:
    """The version ``/opt/releasy/current`` points at, or None."""
    return _releases(c).current


def installed_releases(c: HostConnection) -> list[str]:
    """Complete releases under /opt/releasy/releases, oldest first."""
    return _releases(c).installed()


def stage_release(c: HostConnection, release: LocalRelease) -> Change:
    """Upload and unpack ``release`` into /opt/releasy/releases/V (not activated).

    Skipped when the host already holds it with the same sha256 (its ``.sha256`` marker).
    """
    return stage_with(c, release, _releases(c))


def stage_with(c: HostConnection, release: LocalRelease, state: cmd.ReleaseState) -> Change:
    """`stage_release`, with the host's releases already read (``state``)."""
    target = f"{cmd.RELEASES_DIR}/{release.version}"
    if state.holds(release.version, release.sha256):
        return report(c, Change(False, f"release {release.version} in {target}"))
    how = ("replaces a different or incomplete copy" if release.version in state.releases
           else "uploaded")
    change = Change(True, f"release {release.version} ({how}, {release.size} bytes,"
                          f" sha256 {release.sha256[:12]}... -> {target})")
    if c.dry_run:
        return report(c, change)
    data = release.path.read_bytes()
    # Re-checked at upload time: the file could have changed since fetch_release verified it.
    if hashlib.sha256(data).hexdigest() != release.sha256:
        raise BadInput(f"{release.path} changed after it was verified (sha256 differs from"
                       f" {release.sha256}); nothing was uploaded to {c.name}")
    res = c.run(cmd.stage_argv(release.version, release.sha256), sudo=True, stdin=data,
                check=False)
    if not res.ok:
        out = c.mask(res.stderr.strip() or res.stdout.strip()) or "(no output)"
        raise DeployError(f"{c.name}: uploading release {release.version} failed (exit code"
                          f" {res.exit_code}): {tail(out)}\n  Nothing was switched; re-run"
                          f" (free space in {cmd.RELEASES_DIR}?)", host=c.name)
    return report(c, change)


def activate_release(c: HostConnection, version: str) -> Change:
    """Point /opt/releasy/current at releases/V atomically (the release must be staged).
    Does not restart anything."""
    check_version(version)
    return activate_from(c, version, current_release(c))


def activate_from(c: HostConnection, version: str, current: str | None) -> Change:
    """`activate_release`, with the release ``current`` points at already read."""
    if current == version:
        return report(c, Change(False, f"current -> releases/{version}"))
    change = Change(True, f"current -> releases/{version} (was {current or 'none'})")
    if not c.dry_run:
        run_script(c, cmd.script_of([cmd.activate_argv(version)]),
                    f"switch {cmd.CURRENT_LINK} to {version}",
                    hint=f"stage the release first (fab app.setup --version {version})")
    return report(c, change)


def restart_service(c: HostConnection, unit: str = SERVICE_UNIT) -> Change:
    """Restart ``unit`` now (reset-failed first, so a unit that hit its start limit starts)."""
    change = Change(True, f"{unit} restarted")
    if not c.dry_run:
        run_script(c, cmd.script_of([systemd.systemctl("reset-failed", unit),
                                      systemd.systemctl("restart", unit)]),
                    f"restart {unit}", hint=f"see `journalctl -u {unit}` on {c.name}")
    return report(c, change)


def journal_tail(c: HostConnection, unit: str, lines: int = JOURNAL_LINES) -> str:
    """The last ``lines`` journal lines of ``unit`` (masked), or a note when there are none."""
    res = c.run(systemd.journal_argv(unit, lines), sudo=True, mutates=False, check=False)
    text = c.mask((res.stdout or res.stderr).rstrip("\n"))
    return text or f"(no journal entries for {unit})"


def wait_ready(c: HostConnection, bind: str, timeout: float, *, unit: str = SERVICE_UNIT) -> float:
    """Poll ``http://BIND/ready`` from the host itself until it answers 2xx; returns the
    seconds waited. Raises DeployError with the unit's journal tail on timeout, or sooner
    when the unit failed."""
    seconds = max(1, math.ceil(timeout))
    started = time.monotonic()
    res = c.run(cmd.wait_ready_argv(bind, unit, seconds), mutates=False, check=False,
                timeout=seconds + 30)
    if res.ok:
        return time.monotonic() - started
    said = c.mask(res.stdout.strip() or res.stderr.strip())
    if res.exit_code == 3:
        what = f"did not become ready within {seconds} s (GET {cmd.ready_url(bind)}; {said})"
    elif res.exit_code == 4:
        what = f"stopped before it became ready ({said})"
    elif res.exit_code == 5:
        raise DeployError(f"{c.name}: cannot probe readiness: {said}", host=c.name)
    else:
        raise DeployError(f"{c.name}: the readiness probe of {unit} failed (exit code"
                          f" {res.exit_code}): {said or '(no output)'}", host=c.name)
    journal = journal_tail(c, unit)
    raise DeployError(
        f"{c.name}: {unit} {what}.\n"
        f"  Last {JOURNAL_LINES} lines of `journalctl -u {unit}`:\n"
        + "\n".join(f"    {line}" for line in journal.splitlines())
        + f"\n  Fix the cause above (settings in {cmd.ENV_FILE}, database reachable?) and re-run;"
          f" `fab app.setup --version PREVIOUS` switches back to an earlier release.",
        host=c.name,
    )
