"""What `fab site` does first, for every tier at once.

1. `prefetch_all`: every tier's facts of every host in ONE parallel read (one round trip
   per host), kept on each host's connection. The tiers' own first looks
   (``read_facts(..., reuse=True)``) then cost nothing on a host nothing was changed on
   since, so a no-op `fab site` makes one read per host instead of one phase per tier.
2. `install_packages`: every host's whole package set (all its tiers', PostgreSQL's major
   picked from the host as the db tier does) in ONE apt call per host, all hosts at once.
   Installing is most of a first install's time; after it the tiers only have ordered,
   short steps left, and each finds its packages in place ("unchanged").

Hosts that lack nothing are not contacted again. A dry run installs nothing (the tiers
report what they would install, as before). With ``--limit`` only the hosts it names are
read and installed.

3. `firewall.open_ahead` (called by `site.run` before the app tier): on hosts whose
   firewall is on already, the allow rules a grown fleet needs (a new app host's
   PostgreSQL rule on the db host) before the tiers that need them, not at the end.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..executor import HostConnection
from ..facts import Fact, OsRelease, PackageVersion, prefetch
from ..hostos import check_release
from ..inventory import Host, Inventory
from ..packages import ACME_PACKAGES, APP_PACKAGES, FIREWALL_PACKAGES, PROXY_PACKAGES
from ..remote import ensure_packages
from ..session import Session
from . import app_facts, db, firewall_state, proxy_state

__all__ = ["host_facts", "host_packages", "prefetch_all", "install_packages"]


def _uses_postgres(inv: Inventory, host: Host) -> bool:
    return host.has("db") and inv.database.kind == "postgres"


def host_packages(inv: Inventory, host: Host) -> tuple[str, ...]:
    """The Debian packages of the host's tiers other than PostgreSQL's (whose major is read
    from the host: `db.install_state`), in the tiers' order."""
    wanted: list[str] = []
    if host.has("app"):
        wanted += APP_PACKAGES
    if host.has("proxy"):
        wanted += PROXY_PACKAGES
        if inv.tls.mode == "acme":
            wanted += ACME_PACKAGES
    wanted += FIREWALL_PACKAGES  # every host gets the firewall
    return tuple(dict.fromkeys(wanted))


def host_facts(inv: Inventory, host: Host) -> list[Fact]:
    """Every fact the tiers of ``host`` look at first, `fab site`'s tier order."""
    facts: list[Fact] = [OsRelease()]
    if _uses_postgres(inv, host):
        facts += db.state_facts(inv)
    if host.has("app"):
        facts += app_facts.state_facts(inv, host)
    if host.has("proxy"):
        facts += proxy_state.state_facts(inv)
    facts += firewall_state.state_facts(inv, host)
    facts += [PackageVersion(p) for p in host_packages(inv, host)]
    return list(dict.fromkeys(facts))


def prefetch_all(session: Session, extra: Mapping[str, Iterable[Fact]] | None = None
                 ) -> dict[str, dict[Fact, Any]]:
    """Read every host's facts at once (one round trip per host, all hosts in parallel;
    those of ``--limit``). ``extra``: host name -> more facts the caller will look at on
    that host before anything changes (read in the same round trip)."""
    inv = session.inventory
    more = extra or {}
    return session.executor.each(
        session.targets(inv.hosts),
        lambda c: prefetch(c, [*host_facts(inv, c.host), *more.get(c.name, ())], sudo=True))


def install_packages(session: Session, seen: dict[str, dict[Fact, Any]], *,
                     then: Callable[[HostConnection], None] | None = None) -> list[str]:
    """Install what each host lacks, every host at once, its whole set in one apt call.
    ``seen``: what `prefetch_all` read; ``then``: called with each host's connection as
    soon as its packages are in (the host's own thread; not in a dry run). Returns the
    hosts that installed something."""
    inv = session.inventory
    hosts = session.targets(inv.hosts)
    for host in hosts:  # an unsupported host stops the run before any host is changed
        check_release(host.name, seen[host.name][OsRelease()])
    if session.dry_run:
        return []
    # PostgreSQL's major is read from the db host first: a pin its release does not offer
    # is refused (exit 2) before any host installs anything.
    postgres = {h.name: db.install_state(session.executor.conn(h), inv)
                for h in hosts if _uses_postgres(inv, h)}

    def one(c: HostConnection) -> bool:
        wanted = list(host_packages(inv, c.host))
        lacking = [p for p in wanted if not seen[c.name].get(PackageVersion(p))]
        pg_state = postgres.get(c.name)
        if pg_state is not None:
            wanted = [*pg_state.layout.packages, *wanted]
            lacking += list(pg_state.missing_packages)
        if lacking:
            if pg_state is not None:
                db.seed_config(c, inv, pg_state)
            ensure_packages(c, wanted)
        if then is not None:
            then(c)
        return bool(lacking)

    done = session.executor.each(hosts, one)
    return [name for name, installed in done.items() if installed]
