"""The proxy tier as the rollouts use it: the rotation (which app hosts nginx sends to)
and draining.

Rollouts (draining a host): ``set_upstreams(session, servers_without_it)`` rewrites the
upstream file (`commands.nginx.UPSTREAM_FILE`), validates and reloads; the reload returns
once the master runs the new configuration and the old workers stopped accepting, so no
NEW request reaches the removed host. Requests already in flight on old workers are still
running: ``wait_old_workers_gone(conn, timeout)`` on each proxy host waits until every old
worker (title "nginx: worker process is shutting down") has finished them and exited.
Only then stop the app host.

Setting nginx up is `tiers.proxy_setup`; its files are rendered by `tiers.proxy_render`,
its facts read by `tiers.proxy_state`, changes applied by `tiers.proxy_apply`.
"""
from __future__ import annotations

import secrets as _random
from collections.abc import Sequence
from typing import Any

from ..commands import nginx as cmd
from ..commands.nginx import UPSTREAM_FILE
from ..errors import BadInput, DeployError
from ..executor import HostConnection, tail
from ..remote import render_diff
from .proxy_apply import (APPLY_TIMEOUT, Item, NginxConfigRejected, Upload, apply, report_item,
                          upload)
from .proxy_render import describe, render_upstream, staged_path

__all__ = [
    "set_upstreams", "current_upstreams", "nginx_reload", "wait_old_workers_gone",
    "NginxConfigRejected",
]


def set_upstreams(session: Any, servers: Sequence[tuple[str, int]]) -> None:
    """Make every proxy host send traffic to exactly ``servers`` ((address, port) pairs).

    Rewrites only the upstream file, validates with ``nginx -t`` (rolled back if refused)
    and reloads only if the file changed; returns once the new rotation is live on every
    proxy host. Refuses an empty list. Raises if a proxy was never set up.
    """
    try:
        checked = cmd.check_servers(servers)
    except ValueError as exc:
        raise BadInput(f"set_upstreams: {exc}") from None
    new = render_upstream(checked).encode()
    label = describe(checked)

    def one(c: HostConnection) -> None:
        old = c.read_file(UPSTREAM_FILE, sudo=True)
        if old is None:
            raise _not_set_up(c)
        if old == new:
            c.reporter.unchanged(c.name, f"upstream {label} ({UPSTREAM_FILE})")
            return
        try:
            before = describe(cmd.parse_upstream_servers(old.decode("utf-8", "replace")))
        except ValueError:
            before = "(unparsable)"
        item = Item(f"upstream {before} -> {label} ({UPSTREAM_FILE})", True,
                     render_diff(old, new, UPSTREAM_FILE), UPSTREAM_FILE)
        if c.dry_run:
            report_item(c, item)
            c.reporter.would(c.name, "reload nginx")
            return
        staged = staged_path(UPSTREAM_FILE, _random.token_hex(4))
        upload(c, [Upload(new, staged, 0o644)])
        markers = apply(c, [cmd.Install(UPSTREAM_FILE, staged)], enable=False,
                         rejected=[item], fix_hint="check the servers passed to set_upstreams")
        if "reloaded" in markers:
            item.what += ", nginx reloaded"
        elif "started" in markers:
            item.what += ", nginx started"
        report_item(c, item)

    session.executor.each(session.inventory.hosts_in("proxy"), one)


def current_upstreams(conn: HostConnection) -> list[tuple[str, int]]:
    """The servers the live upstream file on this proxy host lists, in order."""
    data = conn.read_file(UPSTREAM_FILE, sudo=True)
    if data is None:
        raise _not_set_up(conn)
    try:
        return cmd.parse_upstream_servers(data.decode("utf-8", "replace"))
    except ValueError as exc:
        raise DeployError(f"{conn.name}: {UPSTREAM_FILE}: {exc}; fix or remove the line and"
                          f" run fab proxy.setup", host=conn.name) from None


def nginx_reload(conn: HostConnection) -> None:
    """``nginx -t`` then reload; returns once the master runs the new configuration and
    the old workers stopped accepting (they may still finish in-flight requests: see
    `wait_old_workers_gone`). Never restarts nginx."""
    if conn.dry_run:
        conn.reporter.would(conn.name, "reload nginx")
        return
    res = conn.run_script(cmd.reload_script(), sudo=True, check=False, timeout=APPLY_TIMEOUT,
                          label="nginx -t && reload nginx")
    if res.exit_code == 0:
        conn.reporter.changed(conn.name, "nginx reloaded")
        return
    said = tail(cmd.tidy_nginx_messages(conn.mask(res.stderr.strip() or res.stdout.strip())))
    if res.exit_code == cmd.EXIT_CONFIG_REJECTED:
        raise NginxConfigRejected(
            f"{conn.name}: nginx -t failed, not reloading (nginx keeps its current"
            f" configuration):\n    " + said.replace("\n", "\n    "), host=conn.name)
    raise DeployError(f"{conn.name}: nginx reload failed:\n    "
                      + said.replace("\n", "\n    "), host=conn.name)


def wait_old_workers_gone(conn: HostConnection, timeout: float) -> bool:
    """Wait (at most ``timeout`` s, one round trip) until no nginx worker from before the
    last reload is left, i.e. every request they were serving has finished.

    True when none is left; False on timeout (reported, with their PIDs): long requests
    are still running and stopping their upstream now would cut them.
    """
    res = conn.run_script(cmd.wait_old_workers_script(timeout), sudo=True, mutates=False,
                          timeout=timeout + 30, label="wait for old nginx workers to exit")
    markers = cmd.parse_markers(res.stdout)
    if "gone" in markers:
        return True
    pids = " ".join(markers.get("pending", [])) or "?"
    conn.reporter.info(conn.name, f"old nginx workers still finishing requests after"
                                  f" {timeout:g} s (pids {pids})")
    return False


def _not_set_up(c: HostConnection) -> DeployError:
    return DeployError(f"{c.name}: {UPSTREAM_FILE} does not exist: nginx is not set up for"
                       f" Releasy on this host; run fab proxy.setup first", host=c.name)
