"""The app tier's secrets and database URL: what every app host must run with, checked
against what the hosts keep (`secret_policy`), and registered with the masker before
anything could print them."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable
from urllib.parse import quote

from ..commands import app as cmd
from ..commands import kept_secrets as kept
from ..errors import BadInput, DeployError
from ..executor import HostConnection
from ..facts import read_fact
from ..secret_policy import ROTATION_EFFECTS, Resolution, SecretDrift, resolve
from ..session import Session
from . import db as db_tier
from .app_facts import KeptSecrets

__all__ = ["database_url", "resolve_secrets", "mask_host_secrets", "resolve_states"]


def database_url(session: Session) -> str:
    """RELEASY_DATABASE_URL, from the db tier: the one place the app tier asks for it.

    For PostgreSQL the URL holds the role's password; it is registered with the masker
    (the db tier does so too) before anything could print it.
    """
    url = db_tier.database_url(session)
    password = cmd.database_password(url)
    if password:
        session.executor.masker.add([password, quote(password, safe="")])
    return url


def resolve_secrets(session: Session, rotate: Iterable[str] = ()
                    ) -> tuple[Resolution, dict[str, kept.KeptState]]:
    """The secrets every app host must run with, checked against what the hosts keep
    (one round trip per app host, in parallel). Raises BadInput (exit 2, nothing changed)
    when a value would change without ``--rotate-secret NAME``; warns what a requested
    rotation breaks. Every value read is masked before anything could print it."""
    states = session.executor.each(
        session.inventory.hosts_in("app"),
        lambda c: read_fact(c, KeptSecrets(), sudo=True, reuse=True))
    return resolve_states(session, states, rotate)


def mask_host_secrets(session: Session, hosts: Iterable[Any] = ()) -> None:
    """Register the secrets that live only on hosts with the masker before a task that
    prints what hosts say (`fab app.logs`, `fab run`): the database password (PostgreSQL)
    and the secrets kept on those of ``hosts`` that are app hosts. One round trip per host
    read, the db host's and the app hosts' all in parallel. A host that cannot be read is
    skipped: the task itself will say why."""
    inv = session.inventory
    app_names = {h.name for h in inv.hosts_in("app")}
    targets = [h for h in hosts if getattr(h, "name", h) in app_names]
    target_names = {getattr(h, "name", h) for h in targets}
    db_host = inv.db_host if inv.database.kind == "postgres" else None
    readers = list(targets)
    if db_host is not None and db_host.name not in target_names:
        readers.append(db_host)

    def read(c: HostConnection) -> None:
        if db_host is not None and c.name == db_host.name:
            with contextlib.suppress(DeployError):
                database_url(session)
        if c.name not in target_names:
            return
        try:
            state = read_fact(c, KeptSecrets(), sudo=True)
        except DeployError:
            return
        session.executor.masker.add([*(state.kept or {}).values(), *state.env.values()])

    with contextlib.suppress(DeployError):
        session.executor.each(readers, read)


def resolve_states(session: Session, states: dict[str, kept.KeptState],
                   rotate: Iterable[str]) -> tuple[Resolution, dict[str, kept.KeptState]]:
    """`resolve_secrets` on the hosts' kept secrets already read (``states``)."""
    ex = session.executor
    for state in states.values():
        ex.masker.add([*(state.kept or {}).values(), *state.env.values()])
    try:
        res = resolve(session.secrets.values, states, rotate)
    except (SecretDrift, ValueError) as exc:
        raise BadInput(str(exc)) from None
    ex.masker.add(res.values.values())
    ex.secrets.update(res.values)  # never in a command line either
    for name in res.generated:
        session.reporter.info("secrets", f"{name} generated (none was set or kept on the app"
                                         f" hosts); kept in {kept.KEPT_FILE} on every app host")
    for name in res.kept_from_hosts:
        session.reporter.info("secrets", f"{name}: not set here, keeping the app hosts' value")
    for name in res.rotated:
        session.reporter.info("secrets", f"WARNING: rotating {name}: {ROTATION_EFFECTS[name]}")
    return res, states
