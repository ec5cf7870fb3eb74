"""The proxy tier's pure parts: the nginx files Releasy writes, rendered from templates.

Templates are ``files/nginx/*.j2``. Setting the environment variable ``RELEASY_FILES_DIR``
to a directory makes every template be looked up there first (same relative name, e.g.
``$RELEASY_FILES_DIR/nginx/releasy-site.conf.j2``), falling back to the repository's
``files/``: an operator can override one template without forking the project, and the
tests use it to feed nginx a broken site.

The paths of the files on a proxy host are in `releasy_deploy.commands.nginx`. No SSH here.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..commands import acme as acme_cmd
from ..commands import nginx as cmd
from ..errors import BadInput
from ..inventory import Inventory
from ..remote import FILES_DIR, render_template

__all__ = [
    "FILES_DIR_ENV", "SITE_TEMPLATE", "UPSTREAM_TEMPLATE", "MAINTENANCE_TEMPLATE",
    "templates_dir", "tls_paths", "upstreams_for", "split_by_inventory", "with_joining",
    "acme_peers", "render_site", "render_maintenance_page", "render_upstream", "describe",
    "staged_path",
]

FILES_DIR_ENV = "RELEASY_FILES_DIR"
SITE_TEMPLATE = "nginx/releasy-site.conf.j2"
UPSTREAM_TEMPLATE = "nginx/upstream.conf.j2"
MAINTENANCE_TEMPLATE = "nginx/maintenance.html.j2"

# Proxy settings (see files/nginx/releasy-site.conf.j2 for why).
KEEPALIVE = 32
NEXT_UPSTREAM_TRIES = 3
NEXT_UPSTREAM_TIMEOUT = "30s"
# A dead app host (measured, docs/zero-downtime.md): each try on it costs at most the
# connect timeout, then it is skipped for FAIL_TIMEOUT, in every worker (the zone).
CONNECT_TIMEOUT = "1s"  # a LAN: a live app host accepts in milliseconds
MAX_FAILS = 1
FAIL_TIMEOUT = "10s"
ZONE_SIZE = "64k"
SEND_TIMEOUT = "60s"
READ_TIMEOUT = "60s"
SELF_SIGNED_DAYS = 365


def templates_dir(name: str, environ: Mapping[str, str] = os.environ) -> Path:
    """The directory to render template ``name`` from: ``$RELEASY_FILES_DIR`` if it holds
    that template, else the repository's ``files/``. A set but missing directory is an
    error (a typo must not silently fall back)."""
    override = environ.get(FILES_DIR_ENV)
    if override:
        base = Path(override).expanduser()
        if not base.is_dir():
            raise BadInput(f"{FILES_DIR_ENV}={override} is not a directory; point it at a "
                           f"copy of files/ (templates are looked up there first) or unset it")
        if (base / name).is_file():
            return base
    return FILES_DIR


def tls_paths(inv: Inventory) -> tuple[str, str]:
    """(certificate, key) paths on the proxy hosts for the inventory's TLS mode."""
    stem = {"files": "releasy", "acme": "acme"}.get(inv.tls.mode, "self-signed")
    return f"{cmd.TLS_DIR}/{stem}.crt", f"{cmd.TLS_DIR}/{stem}.key"


def upstreams_for(inv: Inventory) -> list[tuple[str, int]]:
    """The default rotation: every app host's private address and the app's bind port.

    On a single host the app listens on loopback only, so the proxy uses 127.0.0.1.
    """
    port = inv.app.bind_port
    if inv.is_single_host:
        return [("127.0.0.1", port)]
    return cmd.check_servers([(h.private_address, port) for h in inv.hosts_in("app")])


def split_by_inventory(inv: Inventory, servers: Sequence[tuple[str, int]]
                       ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``servers`` (checked, as `cmd.check_servers` returns them) split into those on an
    inventory app host, matched by address (a rollout's port choice is kept), and the rest:
    hosts taken out of the inventory, which the firewall and pg_hba no longer let reach the
    database. On a single host the one app host is every server's."""
    if inv.is_single_host:
        return list(servers), []
    known = {address for address, _ in upstreams_for(inv)}
    kept = [s for s in servers if s[0] in known]
    return kept, [s for s in servers if s[0] not in known]


def with_joining(inv: Inventory, servers: Sequence[tuple[str, int]], joining: Sequence[str]
                 ) -> tuple[list[tuple[str, int]], list[str]]:
    """``servers`` with the app hosts named in ``joining`` added (their default server, at
    the end), and the names of those added (a host listed already, on any port, stays as
    it is). On a single host, ``servers`` unchanged."""
    if inv.is_single_host or not joining:
        return list(servers), []
    listed = {address for address, _ in servers}
    added = [(h.name, server) for h, server in zip(inv.hosts_in("app"), upstreams_for(inv))
             if h.name in joining and server[0] not in listed]
    return [*servers, *(server for _, server in added)], [name for name, _ in added]


def acme_peers(inv: Inventory, host: str | None) -> list[str]:
    """Port 80 of every other proxy (``tls.mode: acme``): where this one looks for an ACME
    challenge it does not have."""
    if inv.tls.mode != "acme" or host is None:
        return []
    return [cmd.format_server(h.private_address, 80) for h in inv.hosts_in("proxy")
            if h.name != host]


def render_site(inv: Inventory, *, ipv6: bool = True, host: str | None = None,
                environ: Mapping[str, str] = os.environ) -> str:
    """The site file for this inventory (on proxy ``host``: with several proxies in acme
    mode it names the others). ``ipv6``: also listen on [::] (host has IPv6)."""
    cert, key = tls_paths(inv)
    return render_template(SITE_TEMPLATE, {
        "server_name": inv.tls.server_name,
        "certificate": cert,
        "certificate_key": key,
        "upstream_file": cmd.UPSTREAM_FILE,
        "upstream_name": cmd.UPSTREAM_NAME,
        "acme_webroot": acme_cmd.WEBROOT if inv.tls.mode == "acme" else None,
        "acme_peers": acme_peers(inv, host),
        "ipv6": ipv6,
        "next_upstream_tries": NEXT_UPSTREAM_TRIES,
        "next_upstream_timeout": NEXT_UPSTREAM_TIMEOUT,
        "connect_timeout": CONNECT_TIMEOUT,
        "send_timeout": SEND_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
        "maintenance_flag": cmd.MAINTENANCE_FLAG,
        "maintenance_page": cmd.MAINTENANCE_PAGE,
        "maintenance_uri": cmd.MAINTENANCE_URI,
        "retry_after": cmd.MAINTENANCE_RETRY_AFTER_S,
    }, base_dir=templates_dir(SITE_TEMPLATE, environ))


def render_maintenance_page(inv: Inventory, *,
                            environ: Mapping[str, str] = os.environ) -> str:
    """The page nginx shows while the maintenance flag is set (operator-replaceable)."""
    return render_template(MAINTENANCE_TEMPLATE, {
        "server_name": inv.tls.server_name,
        "retry_after": cmd.MAINTENANCE_RETRY_AFTER_S,
    }, base_dir=templates_dir(MAINTENANCE_TEMPLATE, environ))


def render_upstream(servers: Sequence[tuple[str, int]], *,
                    environ: Mapping[str, str] = os.environ) -> str:
    """The upstream file listing exactly ``servers`` (validated; empty list refused)."""
    checked = cmd.check_servers(servers)
    return render_template(UPSTREAM_TEMPLATE, {
        "upstream_name": cmd.UPSTREAM_NAME,
        "servers": [cmd.format_server(a, p) for a, p in checked],
        "keepalive": KEEPALIVE,
        "zone_size": ZONE_SIZE,
        "max_fails": MAX_FAILS,
        "fail_timeout": FAIL_TIMEOUT,
    }, base_dir=templates_dir(UPSTREAM_TEMPLATE, environ))


def describe(servers: Sequence[tuple[str, int]]) -> str:
    """``servers`` as nginx writes them, comma-separated, for reports."""
    return ", ".join(cmd.format_server(a, p) for a, p in servers) or "(none)"


def staged_path(path: str, token: str) -> str:
    """Where a new version of ``path`` is uploaded before the apply script moves it over."""
    head, _, name = path.rpartition("/")
    # A dot name: nginx's "include sites-enabled/*" never picks it up.
    return f"{head}/.{name}.releasy-new-{token}"
