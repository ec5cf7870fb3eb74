"""The proxy tier: Debian's nginx terminating TLS in front of the app hosts.

What `setup` leaves on every proxy host:

- ``/etc/nginx/sites-available/releasy.conf`` (enabled by a symlink in ``sites-enabled``):
  port 80 redirects to 443; 443 terminates TLS (TLS 1.2/1.3) and proxies to the upstream
  block with keepalive, forwarded headers, bounded retries on another app host.
- ``/etc/nginx/releasy/upstream.conf``: the upstream block alone, included by the site, so
  rollouts change the rotation without touching the site (`set_upstreams`).
- ``/etc/nginx/releasy/tls/``: the certificate (0644) and key (0600): uploaded from the
  inventory's ``tls.certificate``/``tls.key`` (``mode: files``), or generated ON the host
  (``mode: self-signed``, CN/SAN = ``tls.server_name``) when absent, not covering the name,
  or expiring within 30 days.
- Debian's default site disabled; nginx running and enabled at boot.

Every change goes through ONE remote script per host (see `releasy_deploy.commands.nginx`):
staged files are moved over the live ones, ``nginx -t`` checks them, and a rejected
configuration is rolled back before anything reloads; nginx is reloaded (never restarted)
only when something changed. A no-op run costs one round trip per host (one facts probe).

Templates are ``files/nginx/*.j2``. Setting the environment variable ``RELEASY_FILES_DIR``
to a directory makes every template be looked up there first (same relative name, e.g.
``$RELEASY_FILES_DIR/nginx/releasy-site.conf.j2``), falling back to the repository's
``files/``: an operator can override one template without forking the project, and the
tests use it to feed nginx a broken site.

The upstream servers are the inventory's app hosts (`upstreams_for`) when the upstream file
is first written. After that, `setup` keeps the servers the live file lists (re-rendered
with the current template), because rollouts own the rotation: re-running setup in the
middle of a blue/green switch or after a host was taken out must not undo that.
``reset_upstreams=True`` (``fab proxy.setup --reset-upstreams``) restores the default.

Rollouts (draining a host): ``set_upstreams(session, servers_without_it)`` rewrites the
upstream file, validates and reloads; the reload returns once the master runs the new
configuration and the old workers stopped accepting, so no NEW request reaches the removed
host. Requests already in flight on old workers are still running: ``wait_old_workers_gone
(conn, timeout)`` on each proxy host waits until every old worker (title "nginx: worker
process is shutting down") has finished them and exited. Only then stop the app host.
"""
from __future__ import annotations

import hashlib
import os
import secrets as _random
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..commands import acme as acme_cmd
from ..commands import nginx as cmd
from ..errors import BadInput, DeployError, RemoteCommandError
from ..executor import HostConnection, tail
from ..facts import (Fact, FileSha256, FileStat, LinkTarget, OsRelease, PackageVersion, ServiceActive,
                     ServiceEnabled, read_facts)
from ..inventory import Inventory
from ..hostos import check_release
from ..packages import PROXY_PACKAGES
from ..remote import FILES_DIR, ensure_dir, ensure_packages, render_diff, render_template
from . import acme as acme_tier

__all__ = [
    "FILES_DIR_ENV", "SITE_TEMPLATE", "UPSTREAM_TEMPLATE", "SITE_FILE", "SITE_LINK",
    "DEFAULT_SITE", "CONF_DIR", "TLS_DIR", "UPSTREAM_FILE", "UPSTREAM_NAME",
    "NginxConfigRejected", "templates_dir", "tls_paths", "upstreams_for", "render_site",
    "render_upstream", "setup", "set_upstreams", "current_upstreams", "nginx_reload",
    "wait_old_workers_gone", "ProxyText", "ProxyPresent", "ProxyCert", "ProxyIpv6",
]

FILES_DIR_ENV = "RELEASY_FILES_DIR"
SITE_TEMPLATE = "nginx/releasy-site.conf.j2"
UPSTREAM_TEMPLATE = "nginx/upstream.conf.j2"
MAINTENANCE_TEMPLATE = "nginx/maintenance.html.j2"

SITE_FILE = "/etc/nginx/sites-available/releasy.conf"
SITE_LINK = "/etc/nginx/sites-enabled/releasy.conf"
DEFAULT_SITE = "/etc/nginx/sites-enabled/default"  # Debian's "Welcome to nginx" site
CONF_DIR = "/etc/nginx/releasy"
TLS_DIR = f"{CONF_DIR}/tls"
UPSTREAM_FILE = f"{CONF_DIR}/upstream.conf"
UPSTREAM_NAME = "releasy_app"
DIRS = ((CONF_DIR, 0o755), (TLS_DIR, 0o700))

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

APPLY_TIMEOUT = cmd.LOCK_TIMEOUT + cmd.RELOAD_TIMEOUT + 60


class NginxConfigRejected(DeployError):
    """``nginx -t`` refused the new files; they were rolled back, nothing was reloaded."""


# --------------------------------------------------------------------------------------
# Pure parts: templates, paths, upstream servers
# --------------------------------------------------------------------------------------
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
    return f"{TLS_DIR}/{stem}.crt", f"{TLS_DIR}/{stem}.key"


def upstreams_for(inv: Inventory) -> list[tuple[str, int]]:
    """The default rotation: every app host's private address and the app's bind port.

    On a single host the app listens on loopback only, so the proxy uses 127.0.0.1.
    """
    port = inv.app.bind_port
    if inv.is_single_host:
        return [("127.0.0.1", port)]
    return cmd.check_servers([(h.private_address, port) for h in inv.hosts_in("app")])


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
        "upstream_file": UPSTREAM_FILE,
        "upstream_name": UPSTREAM_NAME,
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
        "upstream_name": UPSTREAM_NAME,
        "servers": [cmd.format_server(a, p) for a, p in checked],
        "keepalive": KEEPALIVE,
        "zone_size": ZONE_SIZE,
        "max_fails": MAX_FAILS,
        "fail_timeout": FAIL_TIMEOUT,
    }, base_dir=templates_dir(UPSTREAM_TEMPLATE, environ))


def _describe(servers: Sequence[tuple[str, int]]) -> str:
    return ", ".join(cmd.format_server(a, p) for a, p in servers) or "(none)"


def _staged(path: str, token: str) -> str:
    head, _, name = path.rpartition("/")
    # A dot name: nginx's "include sites-enabled/*" never picks it up.
    return f"{head}/.{name}.releasy-new-{token}"


# --------------------------------------------------------------------------------------
# Facts (read in ONE round trip per host)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProxyText(Fact):
    """The text of a regular file, or None when there is none."""

    path: str

    def shell(self) -> str:
        q = shlex.quote(self.path)
        return f"[ -f {q} ] || exit 3; cat -- {q}"

    def parse(self, out: str, code: int) -> str | None:
        return out if code == 0 else None


@dataclass(frozen=True)
class ProxyPresent(Fact):
    """Something is at ``path``: also true for a dangling symlink."""

    path: str

    def shell(self) -> str:
        q = shlex.quote(self.path)
        return f"[ -e {q} ] || [ -L {q} ]"

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass(frozen=True)
class ProxyCert(Fact):
    """The certificate at ``path`` (`commands.nginx.CertInfo`), or None."""

    path: str

    def shell(self) -> str:
        return cmd.cert_probe_shell(self.path)

    def parse(self, out: str, code: int) -> Any:
        return cmd.parse_cert_probe(out, code)


@dataclass(frozen=True)
class ProxyIpv6(Fact):
    """The host has IPv6 (nginx may listen on [::])."""

    def shell(self) -> str:
        return "[ -e /proc/net/if_inet6 ]"

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass
class _HostState:
    packages: dict[str, str | None]
    stats: dict[str, dict[str, Any] | None]
    texts: dict[str, str | None]
    sha256: dict[str, str | None]
    cert: Any  # CertInfo | None
    site_link: str | None
    default_site: bool
    ipv6: bool
    active: bool
    enabled: bool

    @property
    def packages_installed(self) -> bool:
        return all(self.packages.values())


_TEXTS = (SITE_FILE, UPSTREAM_FILE, cmd.MAINTENANCE_PAGE)
_STATS = (CONF_DIR, TLS_DIR, SITE_FILE, UPSTREAM_FILE, cmd.MAINTENANCE_PAGE)


def state_facts(inv: Inventory) -> list[Fact]:
    """What the proxy tier looks at on a proxy host (one round trip; `fab site` prefetches
    it). Read with sudo: the key is root-only."""
    cert, key = tls_paths(inv)
    names: list[Fact] = [OsRelease(), *(PackageVersion(p) for p in PROXY_PACKAGES)]
    names += [FileStat(p) for p in (*_STATS, cert, key)]
    names += [ProxyText(p) for p in _TEXTS]
    names += [LinkTarget(SITE_LINK),
              ProxyPresent(DEFAULT_SITE), ProxyIpv6(), ServiceActive("nginx"),
              ServiceEnabled("nginx")]
    if inv.tls.mode == "files":
        names += [FileSha256(cert), FileSha256(key)]
    else:
        names.append(ProxyCert(cert))
    return names


def _read_state(c: HostConnection, inv: Inventory) -> _HostState:
    cert, key = tls_paths(inv)
    stat_paths = [*_STATS, cert, key]
    got = read_facts(c, state_facts(inv), sudo=True, reuse=True)
    check_release(c.name, got[OsRelease()])  # before anything is changed on it
    return _HostState(
        packages={p: got[PackageVersion(p)] for p in PROXY_PACKAGES},
        stats={p: got[FileStat(p)] for p in stat_paths},
        texts={p: got[ProxyText(p)] for p in _TEXTS},
        sha256={p: got.get(FileSha256(p)) for p in (cert, key)},
        cert=got.get(ProxyCert(cert)),
        site_link=got[LinkTarget(SITE_LINK)],
        default_site=got[ProxyPresent(DEFAULT_SITE)],
        ipv6=got[ProxyIpv6()],
        active=got[ServiceActive("nginx")],
        enabled=got[ServiceEnabled("nginx")] == "enabled",
    )


def _assume_installed(st: _HostState) -> _HostState:
    """Dry-run on a host without nginx: what installing Debian's package would leave."""
    st.packages = {p: "(to be installed)" for p in st.packages}
    st.default_site = True
    st.active = st.enabled = True
    return st


# --------------------------------------------------------------------------------------
# Planning: what differs, as reportable items carrying their uploads and operations
# --------------------------------------------------------------------------------------
@dataclass
class _Upload:
    data: bytes
    path: str
    mode: int
    secret: bool = False


@dataclass
class _Item:
    what: str
    changed: bool
    diff: str | None = None
    diff_path: str | None = None
    uploads: list[_Upload] = field(default_factory=list)
    ops: list[cmd.Op] = field(default_factory=list)


def _attrs_ok(stat: dict[str, Any] | None, mode: int, kind: str = "regular file") -> bool:
    return bool(stat and stat["type"] == kind and stat["owner"] == "root"
                and stat["group"] == "root" and stat["mode"] == mode)


def _file_item(path: str, new: bytes, old_text: str | None, stat: dict[str, Any] | None,
               mode: int, token: str, *, label: str | None = None) -> _Item:
    """A text config file we can compare by content (its current text was probed)."""
    name = label or f"file {path}"
    old = None if old_text is None else old_text.encode()
    if old == new and _attrs_ok(stat, mode):
        return _Item(name, False)
    if old is None:
        detail = f"created, {len(new)} bytes"
    elif old != new:
        detail = "content"
    else:
        detail = f"owner/mode -> root:root {mode:04o}"
    diff = render_diff(old, new, path) if old != new else None
    staged = _staged(path, token)
    return _Item(f"{name} ({detail})", True, diff, path,
                 [_Upload(new, staged, mode)], [cmd.Install(path, staged)])


def _blob_item(path: str, new: bytes, sha: str | None, stat: dict[str, Any] | None,
               mode: int, token: str, *, secret: bool) -> _Item:
    """A file compared by hash only (the key's content is never read back)."""
    new_sha = hashlib.sha256(new).hexdigest()
    if sha == new_sha and _attrs_ok(stat, mode):
        return _Item(f"file {path}", False)
    if sha == new_sha:
        return _Item(f"file {path} (owner/mode -> root:root {mode:04o})", True,
                     ops=[cmd.SetAttrs(path, "root", "root", mode)])
    detail = "created" if sha is None else ("secret content" if secret else "content")
    staged = _staged(path, token)
    return _Item(f"file {path} ({detail})", True,
                 uploads=[_Upload(new, staged, mode, secret)],
                 ops=[cmd.Install(path, staged)])


def _tls_items(inv: Inventory, st: _HostState, token: str,
               material: tuple[bytes, bytes] | None) -> list[_Item]:
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
        cert_new, key_new = _staged(cert, token), _staged(key, token)
        gen = cmd.Generate(tuple(cmd.self_signed_argv(cert_new, key_new, name,
                                                      days=SELF_SIGNED_DAYS)),
                           (cert_new, key_new), ((cert_new, 0o644),),
                           what="openssl (self-signed certificate)")
        return [_Item(f"self-signed certificate for {name} ({why}: generated on the host,"
                      f" {cert}, key {key})", True,
                      ops=[gen, cmd.Install(cert, cert_new), cmd.Install(key, key_new)])]
    kind = "certificate" if inv.tls.mode == "acme" else "self-signed certificate"
    items = [_Item(f"{kind} for {name} ({cert})", False)]
    for path, mode in ((cert, 0o644), (key, 0o600)):
        if not _attrs_ok(st.stats[path], mode):
            items.append(_Item(f"file {path} (owner/mode -> root:root {mode:04o})", True,
                               ops=[cmd.SetAttrs(path, "root", "root", mode)]))
    return items


def _upstream_servers_to_write(c: HostConnection, inv: Inventory, live_text: str | None,
                               reset: bool) -> list[tuple[str, int]]:
    default = upstreams_for(inv)
    if live_text is None or reset:
        return default
    try:
        live = cmd.check_servers(cmd.parse_upstream_servers(live_text))
    except ValueError:
        c.reporter.info(c.name, f"{UPSTREAM_FILE} lists no usable servers: rewriting it with"
                                f" the inventory's app hosts")
        return default
    if live != default:
        c.reporter.info(c.name, (
            f"upstream servers kept as the last rollout left them: {_describe(live)}"
            f" (inventory default: {_describe(default)}; `fab proxy.setup --reset-upstreams`"
            f" restores it)"))
    return live


# --------------------------------------------------------------------------------------
# Acting
# --------------------------------------------------------------------------------------
def _report(c: HostConnection, item: _Item) -> None:
    if not item.changed:
        c.reporter.unchanged(c.name, item.what)
        return
    if c.dry_run:
        c.reporter.would(c.name, f"change: {item.what}")
    else:
        c.reporter.changed(c.name, item.what)
    if item.diff:
        c.reporter.diff(c.name, item.diff_path or item.what, item.diff)


def _upload(c: HostConnection, uploads: Sequence[_Upload]) -> None:
    done: list[str] = []
    try:
        for u in uploads:
            c.put_bytes(u.data, u.path, mode=u.mode, secret=u.secret)
            done.append(u.path)
    except BaseException:
        if done:  # best effort: do not leave staged copies behind
            try:
                c.run(["rm", "-f", "--", *done], sudo=True, check=False)
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass
        raise


def _apply(c: HostConnection, ops: Sequence[cmd.Op], *, enable: bool, fix_hint: str,
           rejected: Sequence[_Item] = ()) -> dict[str, list[str]]:
    """Run the apply script; map its exit codes to actionable errors."""
    script = cmd.apply_script(ops, backup_parent=CONF_DIR, enable=enable)
    res = c.run_script(script, sudo=True, check=False, timeout=APPLY_TIMEOUT,
                       label="swap nginx config, nginx -t, reload if changed")
    markers = cmd.parse_markers(res.stdout)
    if res.exit_code == 0:
        for line in res.stderr.splitlines():
            if "[warn]" in line:
                c.reporter.info(c.name, "nginx -t: " + cmd.tidy_nginx_messages(c.mask(line)))
        return markers
    said = tail(cmd.tidy_nginx_messages(c.mask(res.stderr.strip() or res.stdout.strip())))
    quoted = "\n".join(f"    {line}" for line in said.splitlines()) or "    (no output)"
    if res.exit_code == cmd.EXIT_CONFIG_REJECTED:
        for item in rejected:  # what was refused, to see the offending lines in context
            if item.diff:
                c.reporter.info(c.name, f"rejected: {item.what}")
                c.reporter.diff(c.name, item.diff_path or item.what, item.diff)
        raise NginxConfigRejected(
            f"{c.name}: nginx rejected the new configuration (nginx -t). The previous files"
            f" were restored and nginx was not reloaded: it keeps serving the old"
            f" configuration.\n  nginx -t said:\n{quoted}\n"
            f"  (file names and line numbers refer to the rejected new version)\n"
            f"  Fix: {fix_hint}", host=c.name)
    if res.exit_code == cmd.EXIT_SERVICE_FAILED:
        raise DeployError(
            f"{c.name}: nginx could not start or apply the new configuration; the previous"
            f" files were restored.\n{quoted}\n  Fix: check `journalctl -u nginx` and"
            f" /var/log/nginx/error.log on {c.name} (a port already in use?), then re-run.",
            host=c.name)
    if res.exit_code == cmd.EXIT_LOCKED:
        raise DeployError(f"{c.name}: {said}", host=c.name)
    raise RemoteCommandError(
        c.name, f"sh -s  # script: swap nginx config ({len(ops)} operations)",
        res.exit_code, said,
        hint=f"the previous files were restored; fix the cause on {c.name} and re-run")


def _setup_host(c: HostConnection, inv: Inventory, *, reset_upstreams: bool,
                tls_material: tuple[bytes, bytes] | None, environ: Mapping[str, str]) -> None:
    st = _read_state(c, inv)
    if st.packages_installed:
        c.reporter.unchanged(c.name, f"packages {' '.join(PROXY_PACKAGES)}")
    else:
        ensure_packages(c, PROXY_PACKAGES)
        # Installing nginx created /etc/nginx, Debian's default site and started nginx.
        st = _assume_installed(st) if c.dry_run else _read_state(c, inv)

    for path, mode in DIRS:
        if _attrs_ok(st.stats[path], mode, "directory"):
            c.reporter.unchanged(c.name, f"dir {path}")
        else:
            ensure_dir(c, path, mode=mode)

    token = _random.token_hex(4)
    site = render_site(inv, ipv6=st.ipv6, host=c.name, environ=environ).encode()
    servers = _upstream_servers_to_write(c, inv, st.texts[UPSTREAM_FILE], reset_upstreams)
    upstream = render_upstream(servers, environ=environ).encode()
    page = render_maintenance_page(inv, environ=environ).encode()
    items = [
        _file_item(cmd.MAINTENANCE_PAGE, page, st.texts[cmd.MAINTENANCE_PAGE],
                   st.stats[cmd.MAINTENANCE_PAGE], 0o644, token,
                   label=f"maintenance page {cmd.MAINTENANCE_PAGE}"),
        _file_item(SITE_FILE, site, st.texts[SITE_FILE], st.stats[SITE_FILE], 0o644, token),
        _file_item(UPSTREAM_FILE, upstream, st.texts[UPSTREAM_FILE], st.stats[UPSTREAM_FILE],
                   0o644, token, label=f"upstream file {UPSTREAM_FILE} [{_describe(servers)}]"),
        *_tls_items(inv, st, token, tls_material),
    ]
    if st.site_link == SITE_FILE:
        items.append(_Item(f"site enabled ({SITE_LINK} -> {SITE_FILE})", False))
    else:
        items.append(_Item(f"site enabled ({SITE_LINK} -> {SITE_FILE})", True,
                           ops=[cmd.Link(SITE_LINK, SITE_FILE)]))
    if st.default_site:
        items.append(_Item(f"Debian's default site disabled (removed {DEFAULT_SITE})", True,
                           ops=[cmd.Remove(DEFAULT_SITE)]))
    else:
        items.append(_Item("Debian's default site disabled", False))

    ops = [op for item in items for op in item.ops]
    service = []
    if ops and st.active:
        service.append(_Item("nginx reloaded (configuration changed)", True))
    if not st.active:
        service.append(_Item("nginx started", True))
    if not st.enabled:
        service.append(_Item("nginx enabled at boot", True))
    if not service:
        service.append(_Item("nginx running and enabled; configuration unchanged, not reloaded",
                             False))

    if c.dry_run:
        for item in items + service:
            _report(c, item)
        return
    if ops or not st.active or not st.enabled:
        _upload(c, [u for item in items for u in item.uploads])
        markers = _apply(c, ops, enable=not st.enabled, rejected=items,
                         fix_hint=_fix_hint(inv, items, environ))
        service = [s for s in service if not s.changed]
        if "reloaded" in markers:
            service.append(_Item("nginx reloaded (configuration changed)", True))
        if "started" in markers:
            service.append(_Item("nginx started", True))
        if "enabled" in markers:
            service.append(_Item("nginx enabled at boot", True))
    for item in items + service:
        _report(c, item)
    if inv.tls.mode == "acme":
        cert, key = tls_paths(inv)
        acme_tier.converge(c, inv, cert, key)


def _fix_hint(inv: Inventory, items: Sequence[_Item], environ: Mapping[str, str]) -> str:
    """Name what the operator can correct, for the files this run tried to change."""
    changed = {op.live for item in items for op in item.ops if isinstance(op, cmd.Install)}
    suspects = []
    for path, template in ((SITE_FILE, SITE_TEMPLATE), (UPSTREAM_FILE, UPSTREAM_TEMPLATE),
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


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def setup(session: Any, *, reset_upstreams: bool = False,
          environ: Mapping[str, str] = os.environ) -> None:
    """Install and configure nginx on every proxy host (those of ``session.limit``), in
    parallel (see module doc)."""
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
        _setup_host(c, inv, reset_upstreams=reset_upstreams, tls_material=material,
                    environ=environ)

    session.executor.each(hosts, one)


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
    label = _describe(checked)

    def one(c: HostConnection) -> None:
        old = c.read_file(UPSTREAM_FILE, sudo=True)
        if old is None:
            raise _not_set_up(c)
        if old == new:
            c.reporter.unchanged(c.name, f"upstream {label} ({UPSTREAM_FILE})")
            return
        try:
            before = _describe(cmd.parse_upstream_servers(old.decode("utf-8", "replace")))
        except ValueError:
            before = "(unparsable)"
        item = _Item(f"upstream {before} -> {label} ({UPSTREAM_FILE})", True,
                     render_diff(old, new, UPSTREAM_FILE), UPSTREAM_FILE)
        if c.dry_run:
            _report(c, item)
            c.reporter.would(c.name, "reload nginx")
            return
        staged = _staged(UPSTREAM_FILE, _random.token_hex(4))
        _upload(c, [_Upload(new, staged, 0o644)])
        markers = _apply(c, [cmd.Install(UPSTREAM_FILE, staged)], enable=False,
                         rejected=[item], fix_hint="check the servers passed to set_upstreams")
        if "reloaded" in markers:
            item.what += ", nginx reloaded"
        elif "started" in markers:
            item.what += ", nginx started"
        _report(c, item)

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
