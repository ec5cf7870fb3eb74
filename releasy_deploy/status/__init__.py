"""``fab status``: the whole inventory in one table, read in one round trip per host.

Every host gets ONE batched facts script (`releasy_deploy.facts.read_facts`), all hosts in
parallel, holding every probe its tiers need:

- app hosts: the unit's state and MainPID, the release ``current`` points at and the one
  the process actually runs (GET /version when the binary has it, else the release
  directory of ``/proc/MainPID/exe``), ``/ready``, disk use of /opt/releasy and the data
  directory. On a single host the blue/green instances (``releasy@PORT``) are read too and
  the live one is the one the proxy lists (`releasy_deploy.bluegreen.find_live`);
- proxy hosts: nginx's state and the servers the upstream file lists. An app host is "in
  rotation" when every proxy lists it;
- the db host: PostgreSQL answering and the size of the app's database (SQLite: the size
  of the database file), disk use of the data directory;
- every host: ufw's state and rules, compared with the plan (`releasy_deploy.firewall`).

The deploy lock holder costs the db host one more round trip and a query through an SSH
tunnel (`lock.holder_info`: the same answer as ``fab deploy.lock``), right after its facts
while the other hosts are still being read.

Nothing here changes anything and no local secret is needed. An unreachable host is a
row marked unreachable, not a failure of the task. `StatusReport.problems` lists what is
unhealthy; the task exits 1 when there is anything in it (see `fabfile/status.py`).

Here: the task (`status`, reading every host and the lock); its parts, one job each:
`probes` (what is read on each host), `model` (the report as data), `assess` (facts to
rows, problems and the report, pure), `render` (the table and the JSON text).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..errors import DeployError
from ..executor import HostConnection
from ..facts import Fact, read_facts
from ..lock import holder_info, prepare_lock
from ..session import Session, select_hosts
from .assess import build_report
from .model import LockStatus, StatusReport
from .probes import fact_names

__all__ = ["gather", "status"]


def gather(session: Session) -> tuple[dict[str, Mapping[Fact, Any] | BaseException],
                                      LockStatus]:
    """(host -> its facts, or the exception that stopped reading them; the lock state).
    All hosts in parallel, ONE facts round trip each; the db host's worker then asks who
    holds the deploy lock (not at all when the host could not be read: no second wait for
    a connection time-out)."""
    inv = session.inventory
    db = inv.db_host.name
    lock = [LockStatus(None, f"{db} could not be read")]
    prepare_lock(session)

    def read(c: HostConnection) -> Mapping[Fact, Any] | BaseException:
        try:
            found = read_facts(c, fact_names(inv, c.host), sudo=True)
        except DeployError as exc:  # a row of the table, not a failure of the task
            return exc
        if c.name == db:
            lock[0] = _lock_status(session)
        return found

    return session.executor.each(inv.hosts, read), lock[0]


def _lock_status(session: Session) -> LockStatus:
    try:
        info = holder_info(session)
    except Exception as exc:  # noqa: BLE001 - shown in the table; status goes on
        text = str(exc).strip() if isinstance(exc, DeployError) else (
            f"{type(exc).__name__}: {session.executor.masker(str(exc))}")
        return LockStatus(None, (text.splitlines() or ["?"])[0])
    return LockStatus(None if info is None else info.describe())


def status(session: Session, only: str | None = None) -> StatusReport:
    """Read every host and the deploy lock, and build the report; ``only`` (``--host
    H[,H...]``, fab's -H): the report shows and judges those hosts only (every host is
    still read: an app host's rotation is what the proxies say)."""
    shown = {h.name for h in select_hosts(session.inventory, only, "--host")} if only else None
    found, lock = gather(session)
    report = build_report(session.inventory, found, lock)
    if shown is None:
        return report
    return replace(report, hosts=tuple(h for h in report.hosts if h.name in shown))

