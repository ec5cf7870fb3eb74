"""The fleet's release, and the app hosts that are behind it.

An app host is *behind* when it runs another release than the fleet (the hosts the proxies
route to), or a release that ran against a lower database migration level than the
database holds now. A host gets there by missing a rollout: dead or cut off while
`fab deploy.rolling --skip-unreachable` updated the others. Such a host must never serve
again on its old release, so:

- `fab app.undrain` refuses it (exit 2) and names the deploy that brings it up to date;
- a rollout never puts a host its record names as behind back into rotation by itself:
  it is updated in place and left out, for `fab app.undrain` to put back;
- `fab status` headlines it.

The fleet's release is read live (the release every host in rotation runs). The rollouts
also keep a record on the db host (`FleetRecord`, `commands.fleet.FLEET_FILE`): the release
they left the fleet on and the hosts they could not reach, so a host that is still
unreachable is known to be behind too. Everything here is pure except `write_record`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .commands import fleet as fleetcmd
from .executor import HostConnection
from .facts import Fact
from .inventory import VERSION_RE

__all__ = ["FleetRecord", "FleetFile", "AppView", "fleet_release", "behind_reason",
           "undrain_refusal", "next_record", "fleet_headlines", "write_record"]


@dataclass(frozen=True)
class FleetRecord:
    """What the last rollout left: the fleet on ``release`` (database at ``level``); the
    hosts in ``behind`` (host -> the release it was last known on, None: unknown) missed it."""

    release: str
    level: int | None = None
    behind: Mapping[str, str | None] = field(default_factory=dict)
    by: str = ""  # the flow that wrote it: deploy.rolling, deploy.rollback, app.setup
    at: str = ""  # UTC, ISO 8601

    def to_json(self) -> str:
        return json.dumps({"release": self.release, "level": self.level,
                           "behind": dict(self.behind), "by": self.by, "at": self.at},
                          sort_keys=True) + "\n"

    @staticmethod
    def parse(text: str) -> FleetRecord | None:
        """The record, or None for anything that is not one (never trusted blindly: it is
        only ever used to say a host is behind, never to put one back)."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("release"), str) \
                or not VERSION_RE.fullmatch(data["release"]):
            return None
        behind = data.get("behind") if isinstance(data.get("behind"), dict) else {}
        level = data.get("level")
        return FleetRecord(
            data["release"], level if isinstance(level, int) else None,
            {str(h): (v if isinstance(v, str) else None) for h, v in behind.items()},
            str(data.get("by") or ""), str(data.get("at") or ""))


@dataclass(frozen=True)
class FleetFile(Fact):
    """The fleet record on the db host (None: no rollout wrote one yet, or unreadable)."""

    def shell(self) -> str:
        return fleetcmd.read_shell()

    def parse(self, out: str, code: int) -> FleetRecord | None:
        return FleetRecord.parse(out) if code == 0 else None


def fleet_release(in_rotation: Mapping[str, str | None]) -> str | None:
    """The release every host in rotation runs (host -> release); None when they differ
    (a rollout in progress or cut short) or none is known."""
    releases = set(in_rotation.values())
    if len(releases) != 1:
        return None
    (only,) = releases
    return only


def _names(hosts: Iterable[str]) -> str:
    return ", ".join(hosts) or "none"


def behind_reason(host: str, current: str | None, *, fleet: str | None,
                  fleet_hosts: Iterable[str] = (), level: int | None = None,
                  db_level: int | None = None, record: FleetRecord | None = None
                  ) -> str | None:
    """Why ``host`` (running ``current``, whose recorded migration level is ``level``) is
    behind; None when it is not (or nothing says so). ``fleet``: `fleet_release` of the
    OTHER hosts in rotation."""
    if current is None:
        return None
    if fleet is not None and current != fleet:
        return (f"it runs {current}, but the hosts in rotation ({_names(fleet_hosts)}) run"
                f" {fleet}")
    if level is not None and db_level is not None and level < db_level:
        return (f"it runs {current}, which ran against database migration level {level};"
                f" the database is at {db_level} now")
    if fleet is None and record is not None and host in record.behind \
            and current != record.release:
        return (f"it runs {current}; {record.by or 'a rollout'} left the fleet on"
                f" {record.release}{' at ' + record.at if record.at else ''} without it")
    return None


def undrain_refusal(host: str, reason: str, target: str | None) -> str:
    """The message `fab app.undrain` refuses a host that is behind with (exit 2)."""
    fix = (f"`fab deploy.rolling --version {target} --yes` brings it up to date (it stays"
           f" out of rotation meanwhile)" if target else
           "a rolling deploy to the fleet's release brings it up to date (it stays out of"
           " rotation meanwhile)")
    return (f"refusing to put {host} back into rotation: it is behind the fleet ({reason})."
            f" It must not serve its old release. {fix}; then `fab app.undrain --host {host}`."
            f" Nothing was changed.")


def next_record(previous: FleetRecord | None, *, release: str, level: int | None,
                skipped: Iterable[str], updated: Iterable[str], by: str, at: str,
                was: str | None = None) -> FleetRecord:
    """The record a rollout to ``release`` leaves: hosts it ``updated`` are no longer
    behind; hosts it ``skipped`` (unreachable) are, with the release they were last known
    on (the fleet's before this rollout: ``was``, else the previous record's); hosts an
    earlier rollout left behind and this one did not reach stay behind."""
    done = set(updated)
    behind: dict[str, str | None] = {}
    if previous is not None:
        behind.update({h: v for h, v in previous.behind.items() if h not in done})
    for h in skipped:
        if h not in behind:
            behind[h] = was or (previous.release if previous is not None else None)
    return FleetRecord(release, level, dict(sorted(behind.items())), by, at)


@dataclass(frozen=True)
class AppView:
    """An app host as `fab status` saw it (``current``/``ready`` None: not read)."""

    reachable: bool
    current: str | None = None
    ready: bool | None = None


def fleet_headlines(apps: Mapping[str, AppView], rotation: Mapping[str, bool | None],
                    record: FleetRecord | None) -> list[str]:
    """What `fab status` says first: app hosts the proxies route to (``rotation``) that
    cannot serve (unreachable, not ready), and app hosts behind the fleet's release."""
    serving = {n: v.current for n, v in apps.items() if v.reachable and rotation.get(n)}
    lines = []
    for n, v in apps.items():
        if rotation.get(n) and not v.reachable:
            lines.append(f"{n}: unreachable, and the proxies still route requests to it;"
                         f" `fab app.drain --host {n}` takes it out (it does not need {n})")
        elif rotation.get(n) and v.ready is False:
            lines.append(f"{n}: the proxies route requests to it but it does not answer"
                         f" /ready; fix it (`fab app.restart --host {n}`) or `fab app.drain"
                         f" --host {n}`")
        others = {m: r for m, r in serving.items() if m != n}
        fleet = fleet_release(others)
        reason = None
        if v.reachable:
            reason = behind_reason(n, v.current, fleet=fleet, fleet_hosts=others,
                                   record=record)
        elif record is not None and n in record.behind:
            reason = (f"last known on {record.behind[n] or 'an older release'};"
                      f" {record.by or 'a rollout'} left the fleet on {record.release}")
        if reason is not None:
            fix = fleet or (record.release if record else None)
            then = "" if rotation.get(n) else f", then `fab app.undrain --host {n}`"
            lines.append(f"{n}: behind the fleet's release ({reason}); `fab deploy.rolling"
                         f" --version {fix or 'V'} --yes` brings it up to date{then}")
    return lines


def write_record(conn: HostConnection, record: FleetRecord) -> None:
    """Replace the record on the db host (``conn``); one round trip."""
    if conn.dry_run:
        conn.reporter.would(conn.name, f"record the fleet on {record.release}"
                                       f" (behind: {_names(record.behind)})")
        return
    conn.run(fleetcmd.write_argv(), sudo=True, stdin=record.to_json().encode())
    conn.reporter.changed(conn.name, f"{fleetcmd.FLEET_FILE}: fleet on {record.release},"
                                     f" behind: {_names(record.behind)}")
