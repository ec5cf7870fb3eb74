"""The maintenance page on every proxy: while it is on, nginx answers every HTTPS request
with 503, ``Retry-After`` and the page `fab proxy.setup` installed (from
``files/nginx/maintenance.html.j2``), instead of the raw 502 a stopped app gives.

Switched by a flag file nginx looks for on each request (see the site template), so turning
it on or off is one atomic file operation per proxy, no reload, and idempotent.
`db.restore` and `deploy.rollback --restore-db` turn it on before stopping Releasy and off
once every app host answers /ready again; `fab proxy.maintenance --on/--off` by hand."""
from __future__ import annotations

from typing import Any

from ..commands import nginx as cmd
from ..errors import DeployError, RemoteCommandError, first_line

__all__ = ["switch", "switch_for_downtime", "end_downtime"]


def switch(session: Any, on: bool) -> dict[str, bool]:
    """Turn the page on (or off) on every proxy; returns proxy -> was it already so.

    Raises DeployError naming the proxy when its site predates the page (run `fab
    proxy.setup`), or ParallelError when a proxy fails."""
    state = "on" if on else "off"

    def one(c) -> bool:
        if c.dry_run:
            c.reporter.would(c.name, f"maintenance page {state}")
            return False
        try:
            res = c.run(cmd.maintenance_argv(on), sudo=True)
        except RemoteCommandError as exc:
            if exc.exit_code == cmd.EXIT_NO_MAINTENANCE_PAGE:
                raise DeployError(
                    f"{c.name}: no maintenance page ({cmd.MAINTENANCE_PAGE}): this proxy was"
                    f" set up by an earlier version; run `fab proxy.setup`, then again",
                    host=c.name) from None
            raise
        already = "@unchanged" in res.stdout
        if already:
            c.reporter.unchanged(c.name, f"maintenance page {state}")
        else:
            c.reporter.changed(c.name, f"maintenance page {state}" + (
                f" (503 with Retry-After: {cmd.MAINTENANCE_RETRY_AFTER_S})" if on else
                " (requests reach Releasy again)"))
        return already

    return session.executor.each(session.inventory.hosts_in("proxy"), one)


def switch_for_downtime(session: Any, on: bool, *, was_on: bool = False) -> bool:
    """For a flow with downtime (a restore): on before Releasy stops, off once it is ready
    again, unless it was already on before the flow (an operator's choice: kept). Never
    raises: a proxy that cannot show the page is reported and the flow goes on (clients
    then see 502s, as before the page existed). Returns whether it was on everywhere.
    A flow that ends well takes the page off with `end_downtime` instead, which raises."""
    if not on and was_on:
        _left_on(session)
        return True
    try:
        found = switch(session, on)
    except DeployError as exc:
        session.reporter.error("maintenance", f"maintenance page not switched"
                                              f" {'on' if on else 'off'} everywhere:"
                                              f" {first_line(exc)}")
        return False
    return bool(found) and all(found.values())


def end_downtime(session: Any, *, was_on: bool) -> None:
    """The page off at the end of a flow with downtime, once Releasy is back (kept on when
    it was on before the flow). Raises DeployError when a proxy keeps it: clients get 503s
    there until `fab proxy.maintenance --off`, so the flow must not end as a success."""
    if was_on:
        _left_on(session)
        return
    switch(session, False)


def _left_on(session: Any) -> None:
    for h in session.inventory.hosts_in("proxy"):
        session.reporter.info(h.name, "maintenance page left on (it was on before;"
                                      " `fab proxy.maintenance --off` ends it)")
