"""`fab proxy.setup`: converge nginx on every proxy host, in parallel.

What `setup` leaves on every proxy host:

- ``/etc/nginx/sites-available/releasy.conf`` (enabled by a symlink in ``sites-enabled``):
  port 80 redirects to 443; 443 terminates TLS (TLS 1.2/1.3) and proxies to the upstream
  block with keepalive, forwarded headers, bounded retries on another app host.
- ``/etc/nginx/releasy/upstream.conf``: the upstream block alone, included by the site, so
  rollouts change the rotation without touching the site (`tiers.proxy.set_upstreams`).
- ``/etc/nginx/releasy/tls/``: the certificate (0644) and key (0600): uploaded from the
  inventory's ``tls.certificate``/``tls.key`` (``mode: files``), or generated ON the host
  (``mode: self-signed``, CN/SAN = ``tls.server_name``) when absent, not covering the name,
  or expiring within 30 days.
- Debian's default site disabled; nginx running and enabled at boot.

Every change goes through ONE remote script per host (`tiers.proxy_apply`): staged files
are moved over the live ones, ``nginx -t`` checks them, and a rejected configuration is
rolled back before anything reloads; nginx is reloaded (never restarted) only when
something changed. A no-op run costs one round trip per host (one facts probe,
`tiers.proxy_state`). The files are rendered by `tiers.proxy_render`.

The upstream servers are the inventory's app hosts (`upstreams_for`) when the upstream file
is first written. After that, `setup` keeps the servers the live file lists (re-rendered
with the current template), because rollouts own the rotation: re-running setup in the
middle of a blue/green switch or after a host was taken out must not undo that. A listed
server that is no longer an app host of the inventory is taken out (the database no
longer lets it in); none left: the inventory's app hosts. An app host `fab site` installed
for the first time (``joining``) is added: it cannot have been drained by hand.
``reset_upstreams=True`` (``fab proxy.setup --reset-upstreams``) restores the default.
"""
from __future__ import annotations

import hashlib
import os
import secrets as _random
from collections.abc import Mapping, Sequence
from typing import Any

from ..commands import nginx as cmd
from ..errors import BadInput
from ..executor import HostConnection
from ..inventory import Inventory
from ..packages import PROXY_PACKAGES
from ..remote import FILES_DIR, ensure_dir, ensure_packages, render_diff
from . import acme as acme_tier
from .proxy_apply import Item, Upload, apply, report_item, upload
from .proxy_render import (FILES_DIR_ENV, MAINTENANCE_TEMPLATE, SELF_SIGNED_DAYS, SITE_TEMPLATE,
                           UPSTREAM_TEMPLATE, describe, render_maintenance_page, render_site,
                           render_upstream, split_by_inventory, staged_path, templates_dir,
                           tls_paths, upstreams_for, with_joining)
from .proxy_state import HostState, assume_installed, read_state

__all__ = ["setup"]

DIRS = ((cmd.CONF_DIR, 0o755), (cmd.TLS_DIR, 0o700))


def _attrs_ok(stat: dict[str, Any] | None, mode: int, kind: str = "regular file") -> bool:
    return bool(stat and stat["type"] == kind and stat["owner"] == "root"
                and stat["group"] == "root" and stat["mode"] == mode)


def _file_item(path: str, new: bytes, old_text: str | None, stat: dict[str, Any] | None,
               mode: int, token: str, *, label: str | None = None) -> Item:
    """A text config file we can compare by content (its current text was probed)."""
    name = label or f"file {path}"
    old = None if old_text is None else old_text.encode()
    if old == new and _attrs_ok(stat, mode):
        return Item(name, False)
    if old is None:
        detail = f"created, {len(new)} bytes"
    elif old != new:
        detail = "content"
    else:
        detail = f"owner/mode -> root:root {mode:04o}"
    diff = render_diff(old, new, path) if old != new else None
    staged = staged_path(path, token)
    return Item(f"{name} ({detail})", True, diff, path,
                 [Upload(new, staged, mode)], [cmd.Install(path, staged)])


def _blob_item(path: str, new: bytes, sha: str | None, stat: dict[str, Any] | None,
               mode: int, token: str, *, secret: bool) -> Item:
    """A file compared by hash only (the key's content is never read back)."""
    new_sha = hashlib.sha256(new).hexdigest()
    if sha == new_sha and _attrs_ok(stat, mode):
        return Item(f"file {path}", False)
    if sha == new_sha:
        return Item(f"file {path} (owner/mode -> root:root {mode:04o})", True,
                     ops=[cmd.SetAttrs(path, "root", "root", mode)])
    detail = "created" if sha is None else ("secret content" if secret else "content")
    staged = staged_path(path, token)
    return Item(f"file {path} ({detail})", True,
                 uploads=[Upload(new, staged, mode, secret)],
                 ops=[cmd.Install(path, staged)])


def _tls_items(inv: Inventory, st: HostState, token: str,
               material: tuple[bytes, bytes] | None) -> list[Item]:
    cert, key = tls_paths(inv)
    if inv.tls.mode == "files":
        assert material is not None
        cert_data, key_data = material
        return [
            _blob_item(cert, cert_data, st.sha256[cert], st.stats[cert], 0o644, token,
                       secret=False),
            _blob_item(key, key_data, st.sha256[key], st.stats[key], 0o600, token,
                       secret=True),
        ]
    name = inv.tls.server_name
    info = st.cert
    key_stat = st.stats.get(key)
    why = None
    if inv.tls.mode == "acme":
        # Only a bootstrap for nginx to start with; the ACME step replaces it.
        if info is None or key_stat is None:
            why = "absent; bootstrap until the ACME CA issues one"
    elif info is None or key_stat is None:
        why = "absent"
    elif not info.covers(name):
        why = f"does not cover {name}"
    elif not info.valid_long_enough:
        why = "expires within 30 days (or is unreadable)"
    if why is not None:
        cert_new, key_new = staged_path(cert, token), staged_path(key, token)
        gen = cmd.Generate(tuple(cmd.self_signed_argv(cert_new, key_new, name,
                                                      days=SELF_SIGNED_DAYS)),
                           (cert_new, key_new), ((cert_new, 0o644),),
                           what="openssl (self-signed certificate)")
        return [Item(f"self-signed certificate for {name} ({why}: generated on the host,"
                      f" {cert}, key {key})", True,
                      ops=[gen, cmd.Install(cert, cert_new), cmd.Install(key, key_new)])]
    kind = "certificate" if inv.tls.mode == "acme" else "self-signed certificate"
    items = [Item(f"{kind} for {name} ({cert})", False)]
    for path, mode in ((cert, 0o644), (key, 0o600)):
        if not _attrs_ok(st.stats[path], mode):
            items.append(Item(f"file {path} (owner/mode -> root:root {mode:04o})", True,
                               ops=[cmd.SetAttrs(path, "root", "root", mode)]))
    return items


def _upstream_servers_to_write(c: HostConnection, inv: Inventory, live_text: str | None,
                               reset: bool, joining: Sequence[str] = ()
                               ) -> list[tuple[str, int]]:
    default = upstreams_for(inv)
    if live_text is None or reset:
        return default
    try:
        live = cmd.check_servers(cmd.parse_upstream_servers(live_text))
    except ValueError:
        c.reporter.info(c.name, f"{cmd.UPSTREAM_FILE} lists no usable servers: rewriting it with"
                                f" the inventory's app hosts")
        return default
    live, gone = split_by_inventory(inv, live)
    if gone:
        # This run's pg_hba and firewall no longer let them reach the database, so requests
        # sent there would fail. Taking them out is a reload, like a drain.
        c.reporter.info(c.name, f"upstream servers that are no longer app hosts in the"
                                f" inventory taken out of rotation: {describe(gone)}")
        if not live:
            return default
    live, added = with_joining(inv, live, joining)
    if added:
        c.reporter.info(c.name, f"first install on {', '.join(added)}: put in rotation")
    if live != default:
        c.reporter.info(c.name, (
            f"upstream servers kept as the last rollout left them: {describe(live)}"
            f" (inventory default: {describe(default)}; `fab proxy.setup --reset-upstreams`"
            f" restores it)"))
    return live


def _setup_host(c: HostConnection, inv: Inventory, *, reset_upstreams: bool,
                joining: Sequence[str], tls_material: tuple[bytes, bytes] | None,
                environ: Mapping[str, str]) -> None:
    st = read_state(c, inv)
    if st.packages_installed:
        c.reporter.unchanged(c.name, f"packages {' '.join(PROXY_PACKAGES)}")
    else:
        ensure_packages(c, PROXY_PACKAGES)
        # Installing nginx created /etc/nginx, Debian's default site and started nginx.
        st = assume_installed(st) if c.dry_run else read_state(c, inv)

    for path, mode in DIRS:
        if _attrs_ok(st.stats[path], mode, "directory"):
            c.reporter.unchanged(c.name, f"dir {path}")
        else:
            ensure_dir(c, path, mode=mode)

    token = _random.token_hex(4)
    site = render_site(inv, ipv6=st.ipv6, host=c.name, environ=environ).encode()
    servers = _upstream_servers_to_write(c, inv, st.texts[cmd.UPSTREAM_FILE], reset_upstreams,
                                         joining)
    upstream = render_upstream(servers, environ=environ).encode()
    page = render_maintenance_page(inv, environ=environ).encode()
    items = [
        _file_item(cmd.MAINTENANCE_PAGE, page, st.texts[cmd.MAINTENANCE_PAGE],
                   st.stats[cmd.MAINTENANCE_PAGE], 0o644, token,
                   label=f"maintenance page {cmd.MAINTENANCE_PAGE}"),
        _file_item(cmd.SITE_FILE, site, st.texts[cmd.SITE_FILE], st.stats[cmd.SITE_FILE], 0o644, token),
        _file_item(cmd.UPSTREAM_FILE, upstream, st.texts[cmd.UPSTREAM_FILE], st.stats[cmd.UPSTREAM_FILE],
                   0o644, token, label=f"upstream file {cmd.UPSTREAM_FILE} [{describe(servers)}]"),
        *_tls_items(inv, st, token, tls_material),
    ]
    if st.site_link == cmd.SITE_FILE:
        items.append(Item(f"site enabled ({cmd.SITE_LINK} -> {cmd.SITE_FILE})", False))
    else:
        items.append(Item(f"site enabled ({cmd.SITE_LINK} -> {cmd.SITE_FILE})", True,
                           ops=[cmd.Link(cmd.SITE_LINK, cmd.SITE_FILE)]))
    if st.default_site:
        items.append(Item(f"Debian's default site disabled (removed {cmd.DEFAULT_SITE})", True,
                           ops=[cmd.Remove(cmd.DEFAULT_SITE)]))
    else:
        items.append(Item("Debian's default site disabled", False))

    ops = [op for item in items for op in item.ops]
    service = []
    if ops and st.active:
        service.append(Item("nginx reloaded (configuration changed)", True))
    if not st.active:
        service.append(Item("nginx started", True))
    if not st.enabled:
        service.append(Item("nginx enabled at boot", True))
    if not service:
        service.append(Item("nginx running and enabled; configuration unchanged, not reloaded",
                             False))

    if c.dry_run:
        for item in items + service:
            report_item(c, item)
        return
    if ops or not st.active or not st.enabled:
        upload(c, [u for item in items for u in item.uploads])
        markers = apply(c, ops, enable=not st.enabled, rejected=items,
                         fix_hint=_fix_hint(inv, items, environ))
        service = [s for s in service if not s.changed]
        if "reloaded" in markers:
            service.append(Item("nginx reloaded (configuration changed)", True))
        if "started" in markers:
            service.append(Item("nginx started", True))
        if "enabled" in markers:
            service.append(Item("nginx enabled at boot", True))
    for item in items + service:
        report_item(c, item)
    if inv.tls.mode == "acme":
        cert, key = tls_paths(inv)
        acme_tier.converge(c, inv, cert, key)


def _fix_hint(inv: Inventory, items: Sequence[Item], environ: Mapping[str, str]) -> str:
    """Name what the operator can correct, for the files this run tried to change."""
    changed = {op.live for item in items for op in item.ops if isinstance(op, cmd.Install)}
    suspects = []
    for path, template in ((cmd.SITE_FILE, SITE_TEMPLATE), (cmd.UPSTREAM_FILE, UPSTREAM_TEMPLATE),
                           (cmd.MAINTENANCE_PAGE, MAINTENANCE_TEMPLATE)):
        if path in changed:
            suspects.append(f"the template {templates_dir(template, environ) / template}")
    if inv.tls.mode == "files" and changed & set(tls_paths(inv)):
        suspects.append(f"the TLS files {inv.tls.certificate} and {inv.tls.key} (is the key"
                        f" the certificate's?)")
    if not suspects:
        suspects.append("the nginx configuration file nginx -t names")
    return f"correct {' or '.join(suspects)}, then re-run fab proxy.setup"


def _read_tls_material(inv: Inventory, session: Any) -> tuple[bytes, bytes] | None:
    if inv.tls.mode != "files":
        return None
    assert inv.tls.certificate is not None and inv.tls.key is not None
    try:
        cert = inv.tls.certificate.read_bytes()
        key = inv.tls.key.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read the TLS certificate/key named in {inv.path}"
                       f" (tls.certificate / tls.key): {exc}") from None
    # The key's lines are secret: mask them wherever a tool might echo them.
    session.executor.masker.add([key.decode("utf-8", "replace")])
    return cert, key


def setup(session: Any, *, reset_upstreams: bool = False, joining: Sequence[str] = (),
          environ: Mapping[str, str] = os.environ) -> None:
    """Install and configure nginx on every proxy host (those of ``session.limit``), in
    parallel (see module doc). ``joining``: app hosts `fab site` has just installed for the
    first time (ready): they go into the rotation the proxies keep."""
    inv: Inventory = session.inventory
    templates_dir(SITE_TEMPLATE, environ)  # a bad RELEASY_FILES_DIR fails before any SSH
    override = environ.get(FILES_DIR_ENV)
    hosts = session.targets(inv.hosts_in("proxy"))
    if not hosts:
        return
    material = _read_tls_material(inv, session)
    if override:
        for h in hosts:
            session.reporter.info(h.name, f"templates: {FILES_DIR_ENV}={override} first,"
                                          f" then {FILES_DIR}")

    def one(c: HostConnection) -> None:
        _setup_host(c, inv, reset_upstreams=reset_upstreams, joining=joining,
                    tls_material=material, environ=environ)

    session.executor.each(hosts, one)
