"""nginx on the proxy hosts, as data: argv lists and shell scripts built from quoted parts.

Pure functions only (no SSH); `releasy_deploy.tiers.proxy_apply` hands what they build to the
executor. Every value that reaches a script goes through `shlex.quote`.

The one script that changes nginx's configuration (`apply_script`) does, in ONE remote
process, under a host-wide lock:

1. optionally generate a self-signed certificate/key pair into staging paths;
2. back up each live path it is about to touch, then move the staged files over the live
   ones (same directory: atomic renames), (re)point symlinks, remove files;
3. ``nginx -t``; if it fails, restore every live path from its backup, print nginx's
   message on stderr and exit `EXIT_CONFIG_REJECTED` without reloading: the running nginx
   never sees the rejected files;
4. start nginx if it is not running, else reload it when something changed, and wait
   (bounded) until the master really runs the new configuration (new workers appeared);
   if it does not, restore the old files too, so the live files always match what runs.

The whole script is one function called on its last line: ``sh`` parses it completely
before running anything, so a dropped SSH connection cannot cut it in half.
"""
from __future__ import annotations

import ipaddress
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

#: How long a drain waits for nginx's old workers (after a reload) to finish the requests
#: they were serving: every flow that takes a host out of rotation waits this long at most.
DRAIN_TIMEOUT_S = 90.0

__all__ = [
    "SERVICE", "LOCK_PATH", "EXIT_CONFIG_REJECTED", "EXIT_STEP_FAILED", "EXIT_SERVICE_FAILED",
    "EXIT_LOCKED", "RELOAD_TIMEOUT", "format_server", "check_servers",
    "parse_upstream_servers", "self_signed_argv", "CertInfo", "cert_probe_shell",
    "parse_cert_probe", "Install", "Link", "Remove", "SetAttrs", "Generate", "Op",
    "apply_script", "reload_script", "wait_old_workers_script", "parse_markers",
    "tidy_nginx_messages", "MAINTENANCE_FLAG", "MAINTENANCE_PAGE", "MAINTENANCE_URI",
    "MAINTENANCE_RETRY_AFTER_S", "EXIT_NO_MAINTENANCE_PAGE", "maintenance_argv",
    "SITE_FILE", "SITE_LINK", "DEFAULT_SITE", "CONF_DIR", "TLS_DIR", "UPSTREAM_FILE",
    "UPSTREAM_NAME", "MAINTENANCE_ON", "ready_through_proxy_argv",
]

SERVICE = "nginx"

# Where Releasy's nginx files live on a proxy host (`tiers.proxy_setup` writes them).
SITE_FILE = "/etc/nginx/sites-available/releasy.conf"
SITE_LINK = "/etc/nginx/sites-enabled/releasy.conf"
DEFAULT_SITE = "/etc/nginx/sites-enabled/default"  # Debian's "Welcome to nginx" site
CONF_DIR = "/etc/nginx/releasy"
TLS_DIR = f"{CONF_DIR}/tls"
#: The upstream block alone, included by the site: the rotation rollouts rewrite.
UPSTREAM_FILE = f"{CONF_DIR}/upstream.conf"
UPSTREAM_NAME = "releasy_app"
LOCK_PATH = "/run/releasy-nginx.lock"
RELOAD_TIMEOUT = 20  # seconds for the master to start workers with the new configuration
LOCK_TIMEOUT = 120   # seconds to wait for another releasy change on the same host

EXIT_CONFIG_REJECTED = 10  # nginx -t failed; old files restored; nothing reloaded
EXIT_STEP_FAILED = 11      # a file operation failed; old files restored
EXIT_SERVICE_FAILED = 12   # start/reload failed or was not applied; old files restored
EXIT_LOCKED = 13           # another releasy change held the lock for LOCK_TIMEOUT s

# Appended, not prepended: `sudo` and root logins already have a sane PATH.
_PATH_FIX = 'PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"'
_DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_TITLE_SHUTTING_DOWN = "nginx: worker process is shutting down"


# --------------------------------------------------------------------------------------
# Upstream servers
# --------------------------------------------------------------------------------------
def format_server(address: str, port: int) -> str:
    """``10.0.0.21:8080`` / ``[2001:db8::21]:8080`` / ``app1.internal:8080``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address}:{port}"
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def check_servers(servers: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Validate (address, port) pairs; IPv6 literals come back compressed.

    Raises ValueError on an empty list (nginx would answer 502 to everything), a bad
    address or port, or a duplicate.
    """
    if isinstance(servers, (str, bytes)):
        raise TypeError("servers must be a sequence of (address, port) pairs")
    result: list[tuple[str, int]] = []
    for item in servers:
        try:
            address, port = item
        except (TypeError, ValueError):
            raise ValueError(f"upstream server {item!r} is not an (address, port) pair") from None
        if not isinstance(address, str):
            raise ValueError(f"upstream address {address!r} is not a string")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"upstream port {port!r} for {address} is not an integer 1..65535")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            if not _DNS_NAME.fullmatch(address) or len(address) > 253:
                raise ValueError(
                    f"upstream address {address!r} is neither an IP literal nor a DNS name"
                ) from None
            normalized = address.lower()
        else:
            if ip.is_unspecified or ip.is_multicast:
                raise ValueError(f"upstream address {address} is not a unicast host address")
            normalized = ip.compressed
        if (normalized, port) in result:
            raise ValueError(f"upstream server {format_server(normalized, port)} is listed twice")
        result.append((normalized, port))
    if not result:
        raise ValueError("refusing an empty upstream list: nginx would answer 502 to every request")
    return result


_SERVER_LINE = re.compile(r"^\s*server\s+([^\s;]+)[^;]*;", re.MULTILINE)


def parse_upstream_servers(text: str) -> list[tuple[str, int]]:
    """The ``server`` entries of an upstream file, in order (comments ignored)."""
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    servers: list[tuple[str, int]] = []
    for match in _SERVER_LINE.finditer(body):
        spec = match.group(1)
        if spec.startswith("["):
            host, _, rest = spec[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else "80"
        elif spec.count(":") == 1:
            host, port = spec.split(":")
        else:
            host, port = spec, "80"  # nginx's default port
        if not port.isdigit():
            raise ValueError(f"cannot parse upstream server {spec!r}")
        servers.append((host, int(port)))
    return servers


# --------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------
def self_signed_argv(cert: str, key: str, server_name: str, *, days: int = 365) -> list[str]:
    """openssl argv: a P-256 key and a self-signed certificate for ``server_name`` (CN+SAN)."""
    if not _DNS_NAME.fullmatch(server_name):
        raise ValueError(f"invalid TLS server name {server_name!r}")
    return [
        "openssl", "req", "-x509", "-nodes", "-sha256",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-days", str(days),
        "-subj", f"/CN={server_name}",
        "-addext", f"subjectAltName=DNS:{server_name}",
        "-keyout", key, "-out", cert,
    ]


# Renewed this long before it expires, so a periodic `fab proxy.setup` keeps it valid.
RENEW_BEFORE_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class CertInfo:
    dns_names: tuple[str, ...]
    valid_long_enough: bool  # not expiring within RENEW_BEFORE_SECONDS

    def covers(self, server_name: str) -> bool:
        return server_name.lower() in (n.lower() for n in self.dns_names)


def cert_probe_shell(path: str) -> str:
    """Shell printing a certificate's SAN and whether it expires soon (exit 3: no file)."""
    q = shlex.quote(path)
    return (f"[ -f {q} ] || exit 3; openssl x509 -noout -ext subjectAltName"
            f" -checkend {RENEW_BEFORE_SECONDS} -in {q}")


def parse_cert_probe(out: str, code: int) -> CertInfo | None:
    """None when there is no certificate file; otherwise what `cert_probe_shell` found.

    A file that is not a certificate gives no names and ``valid_long_enough=False``.
    """
    if code == 3:
        return None
    names = tuple(re.findall(r"DNS:([^,\s]+)", out))
    return CertInfo(names, "Certificate will not expire" in out)


# --------------------------------------------------------------------------------------
# The apply script
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Install:
    """Move ``staged`` (already uploaded, with its final owner/mode) over ``live``."""

    live: str
    staged: str


@dataclass(frozen=True)
class Link:
    """``live`` becomes a symlink to ``target``."""

    live: str
    target: str


@dataclass(frozen=True)
class Remove:
    live: str


@dataclass(frozen=True)
class SetAttrs:
    live: str
    owner: str
    group: str
    mode: int


@dataclass(frozen=True)
class Generate:
    """Run ``argv`` first (it writes only to ``outputs``, which later Install ops move)."""

    argv: tuple[str, ...]
    outputs: tuple[str, ...]
    chmod: tuple[tuple[str, int], ...] = ()  # (path, mode) applied to outputs afterwards
    what: str = "generate"


Op = Install | Link | Remove | SetAttrs | Generate

_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


def _check_abs(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path or "\n" in path:
        raise ValueError(f"remote path must be an absolute path without NUL/newline: {path!r}")
    return path


def _q(path: str) -> str:
    return shlex.quote(_check_abs(path))


def _link_temp(live: str) -> str:
    head, _, name = live.rpartition("/")
    return f"{head}/.{name}.releasy-link"


# Helpers shared by the scripts; they only use "$@" and variables set by the caller.
_HELPERS = r"""backup() {  # INDEX LIVE: keep LIVE's current version (or note its absence)
	if [ -e "$2" ] || [ -L "$2" ]; then cp -P -p -- "$2" "$bk/$1"; else : > "$bk/$1.absent"; fi
}
undo() {  # INDEX LIVE: put LIVE back as it was before this script
	if [ -e "$bk/$1.absent" ]; then rm -f -- "$2"
	elif [ -e "$bk/$1" ] || [ -L "$bk/$1" ]; then mv -f -- "$bk/$1" "$2"
	fi || { echo "could not restore $2: its previous version is kept in $bk/$1" >&2; keep=1; }
}
take_lock() {
	exec 9>"$lock" || exit 11
	if ! flock -w "$lock_wait" 9; then
		echo "another releasy change to nginx has been running on this host for ${lock_wait}s (lock $lock); try again when it is done" >&2
		exit 13
	fi
}
"""

_RELOAD_FN = r"""reload_nginx() {  # reload, then wait until the master runs the new configuration
	master=$(systemctl show -p MainPID --value nginx 2>/dev/null)
	case $master in ''|0) echo "nginx is active but systemd knows no main process" >&2; return 1 ;; esac
	old=" $(pgrep -P "$master" | tr '\n' ' ')"
	log=/var/log/nginx/error.log
	logged=$(stat -c %s "$log" 2>/dev/null || echo 0)
	emerg_at=
	systemctl reload nginx >&2 || return 1
	deadline=$(( $(date +%s) + reload_wait ))
	while :; do  # applied = the master started workers that did not exist before
		fresh=
		for p in $(pgrep -P "$master"); do
			case "$old " in *" $p "*) ;; *) fresh=1 ;; esac
		done
		[ -n "$fresh" ] && break
		# An [emerg] logged since the reload means the master refused a configuration (e.g.
		# a port in use). It may still be a previous reload's retries (bind is retried for
		# ~2.5 s) that delay ours, so allow a few more seconds before calling it failed.
		now=$(date +%s)
		if [ -z "$emerg_at" ] && tail -c +$((logged + 1)) "$log" 2>/dev/null | grep -q '\[emerg\]'; then
			emerg_at=$now
		fi
		if [ "$now" -ge "$deadline" ] || { [ -n "$emerg_at" ] && [ "$now" -ge $((emerg_at + 5)) ]; }; then
			echo "nginx did not apply the reload: it keeps running its previous configuration. New lines of $log:" >&2
			tail -c +$((logged + 1)) "$log" 2>/dev/null | tail -n 5 >&2
			return 2
		fi
		sleep 0.05
	done
	while :; do  # old workers told to quit: new requests now reach new workers only
		busy=
		for p in $old; do
			case $(ps -o args= -p "$p" 2>/dev/null) in
				*"shutting down"*) ;;
				"nginx: worker process"*|"nginx: cache"*) busy=1 ;;
			esac
		done
		[ -z "$busy" ] && break
		[ "$(date +%s)" -ge "$deadline" ] && break
		sleep 0.05
	done
	return 0
}
"""


def _prelude(lock_path: str, reload_timeout: int, lock_timeout: int) -> list[str]:
    return [
        _PATH_FIX,
        f"lock={_q(lock_path)}",
        f"lock_wait={int(lock_timeout)}",
        f"reload_wait={int(reload_timeout)}",
        "keep=",
        "bk=",
    ]


def apply_script(
    ops: Sequence[Op],
    *,
    backup_parent: str,
    manage_service: bool = True,
    enable: bool = False,
    lock_path: str = LOCK_PATH,
    reload_timeout: int = RELOAD_TIMEOUT,
    lock_timeout: int = LOCK_TIMEOUT,
) -> str:
    """The swap + ``nginx -t`` + restore-on-failure (+ start/reload/enable) script.

    ``backup_parent`` must be on the same filesystem as the live paths (restores are
    renames). With ``manage_service`` nginx is started if inactive, else reloaded when
    ``ops`` change anything; ``enable`` also enables it at boot. Prints ``@reloaded``,
    ``@started``, ``@enabled`` or ``@restored`` lines on stdout; nginx's own messages go
    to stderr. Exit codes: see ``EXIT_*``.
    """
    _check_abs(backup_parent)
    lines = ["#!/bin/sh", "# releasy: swap nginx configuration, validate, reload"]
    lines += _prelude(lock_path, reload_timeout, lock_timeout)
    lines.append(_HELPERS.rstrip("\n"))
    lines.append(_RELOAD_FN.rstrip("\n"))

    # Which live paths the script touches, in order; restore() walks them backwards.
    touched: list[str] = []
    steps: list[str] = []
    staged: list[str] = []
    for op in ops:
        if isinstance(op, Generate):
            staged.extend(_check_abs(p) for p in op.outputs)
            cmd = shlex.join(op.argv)
            failed = shlex.quote(f"{op.what} failed:")
            steps.append(f'if ! out=$({cmd} 2>&1); then fail {failed}" $out"; fi')
            for path, mode in op.chmod:
                steps.append(f"chmod {mode:04o} -- {_q(path)}"
                             f" || fail {shlex.quote('cannot chmod ' + path)}")
            continue
        i = len(touched)
        live = _check_abs(op.live)
        touched.append(live)
        steps.append(f"backup {i} {_q(live)} || fail {shlex.quote('cannot back up ' + live)}")
        steps.append(f"done_ops={i + 1}")
        if isinstance(op, Install):
            staged.append(_check_abs(op.staged))
            steps.append(f"mv -f -- {_q(op.staged)} {_q(live)}"
                         f" || fail {shlex.quote('cannot install ' + live)}")
        elif isinstance(op, Link):
            tmp = _link_temp(live)
            staged.append(tmp)
            steps.append(f"ln -sfn -- {shlex.quote(op.target)} {_q(tmp)}"
                         f" && mv -f -T -- {_q(tmp)} {_q(live)}"
                         f" || fail {shlex.quote('cannot link ' + live)}")
        elif isinstance(op, Remove):
            steps.append(f"rm -f -- {_q(live)} || fail {shlex.quote('cannot remove ' + live)}")
        elif isinstance(op, SetAttrs):
            for label, account in (("owner", op.owner), ("group", op.group)):
                if not _ACCOUNT.match(account):
                    raise ValueError(f"invalid {label} {account!r} for {live}")
            steps.append(f"chown -- {shlex.quote(op.owner + ':' + op.group)} {_q(live)}"
                         f" && chmod -- {op.mode:04o} {_q(live)}"
                         f" || fail {shlex.quote('cannot set owner/mode of ' + live)}")
        else:  # pragma: no cover - the Op union is closed
            raise TypeError(f"unknown operation {op!r}")

    restore = ["restore() {", "\tkeep="]
    for i in reversed(range(len(touched))):
        restore.append(f"\t[ \"$done_ops\" -gt {i} ] && undo {i} {_q(touched[i])}")
    restore.append('\t[ -n "$keep" ] || rm -rf -- "$bk"')
    restore.append("\techo @restored")
    restore.append("}")
    lines.extend(restore)
    cleanup = "cleanup() { rm -f -- " + " ".join(_q(p) for p in staged) + "; }" if staged \
        else "cleanup() { :; }"
    lines.append(cleanup)
    lines.append('fail() { printf \'%s\\n\' "$1" >&2; restore; cleanup; exit 11; }')

    body = [
        "main() {",
        "\ttrap '' HUP PIPE",  # a dropped SSH connection must not stop it half-way
        "\tumask 077",
        "\ttake_lock",
        f"\tbk=$(mktemp -d {_q(backup_parent)}/.releasy-swap.XXXXXXXX)"
        " || { cleanup; echo 'cannot create a backup directory' >&2; exit 11; }",
        "\tdone_ops=0",
    ]
    body += [f"\t{s}" for s in steps]
    body += [
        "\tif ! out=$(nginx -t 2>&1); then",
        "\t\trestore; cleanup",
        "\t\tprintf '%s\\n' \"$out\" >&2",
        "\t\texit 10",
        "\tfi",
        "\tprintf '%s\\n' \"$out\" | grep -F '[warn]' >&2",  # accepted, but worth a look
    ]
    if manage_service:
        changed = "1" if touched else ""
        body += [
            f"\tchanged={changed}",
            "\tif systemctl is-active --quiet nginx; then",
            "\t\tif [ -n \"$changed\" ]; then",
            "\t\t\tif ! reload_nginx; then restore; cleanup; exit 12; fi",
            "\t\t\techo @reloaded",
            "\t\tfi",
            "\telse",
            "\t\tif ! out=$(systemctl start nginx 2>&1); then",
            "\t\t\tprintf '%s\\n' \"$out\" >&2",
            "\t\t\tjournalctl -u nginx -n 8 --no-pager -o cat >&2 2>/dev/null",
            "\t\t\trestore; cleanup; exit 12",
            "\t\tfi",
            "\t\techo @started",
            "\tfi",
        ]
        if enable:
            body += [
                "\tif ! out=$(systemctl enable nginx 2>&1); then",
                "\t\tprintf 'cannot enable nginx at boot: %s\\n' \"$out\" >&2; exit 12",
                "\tfi",
                "\techo @enabled",
            ]
    body += ['\trm -rf -- "$bk"', "\texit 0", "}"]
    lines.extend(body)
    lines.append('main "$@"; exit $?')
    return "\n".join(lines) + "\n"


def reload_script(
    *, lock_path: str = LOCK_PATH, reload_timeout: int = RELOAD_TIMEOUT,
    lock_timeout: int = LOCK_TIMEOUT,
) -> str:
    """``nginx -t``, then a reload that waits until the new configuration runs.

    Exit 10 with nginx's message when the configuration is invalid (nothing reloaded),
    12 when nginx is not running or did not apply the reload. Prints ``@reloaded``.
    """
    lines = ["#!/bin/sh", "# releasy: nginx -t, reload nginx"]
    lines += _prelude(lock_path, reload_timeout, lock_timeout)
    lines.append(_HELPERS.rstrip("\n"))
    lines.append(_RELOAD_FN.rstrip("\n"))
    lines += [
        "main() {",
        "\ttrap '' HUP PIPE",
        "\ttake_lock",
        "\tif ! out=$(nginx -t 2>&1); then printf '%s\\n' \"$out\" >&2; exit 10; fi",
        "\tif ! systemctl is-active --quiet nginx; then",
        "\t\techo 'nginx is not running (run fab proxy.setup to start it)' >&2; exit 12",
        "\tfi",
        "\treload_nginx || exit 12",
        "\techo @reloaded",
        "}",
        'main "$@"; exit $?',
    ]
    return "\n".join(lines) + "\n"


def wait_old_workers_script(timeout: float, *, poll: float = 0.1) -> str:
    """Wait until no nginx worker is still finishing requests from before a reload.

    After a reload, old workers stop accepting, finish their in-flight requests, then
    exit; meanwhile their title is ``nginx: worker process is shutting down``. Prints
    ``@gone``, or ``@pending PID...`` once ``timeout`` seconds have passed (exit 0 both).
    """
    if timeout < 0:
        raise ValueError("timeout must be >= 0")
    pattern = shlex.quote("^" + _TITLE_SHUTTING_DOWN)
    return "\n".join([
        "#!/bin/sh",
        "# releasy: wait for old nginx workers to finish their requests",
        _PATH_FIX,
        f"deadline=$(( $(date +%s) + {math.ceil(timeout)} ))",
        f"while pids=$(pgrep -f {pattern}); do",
        "\tif [ \"$(date +%s)\" -ge \"$deadline\" ]; then echo @pending $pids; exit 0; fi",
        f"\tsleep {poll:g}",
        "done",
        "echo @gone",
    ]) + "\n"


_LOG_PREFIX = re.compile(
    r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} \[(\w+)\] \d+#\d+: ", re.MULTILINE)


def tidy_nginx_messages(text: str) -> str:
    """``2026/11/26 07:55:33 [emerg] 422#422: unknown ...`` -> ``nginx: [emerg] unknown ...``."""
    return _LOG_PREFIX.sub(lambda m: f"nginx: [{m.group(1)}] ", text)


def parse_markers(stdout: str) -> dict[str, list[str]]:
    """``@word args...`` lines of a script's stdout -> {word: args}."""
    found: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("@") and len(line) > 1:
            word, *args = line[1:].split()
            found[word] = args
    return found


# ----------------------------------------------------------------------- maintenance page
#: While this file exists, the site answers every HTTPS request with 503, ``Retry-After``
#: and the maintenance page (nginx checks for it per request: no reload to switch).
MAINTENANCE_FLAG = f"{CONF_DIR}/maintenance.on"
MAINTENANCE_PAGE = f"{CONF_DIR}/maintenance.html"
MAINTENANCE_URI = "/releasy-maintenance.html"  # internal: clients cannot request it
MAINTENANCE_RETRY_AFTER_S = 30
EXIT_NO_MAINTENANCE_PAGE = 20  # the proxy's site predates the page: run fab proxy.setup


def maintenance_argv(on: bool) -> list[str]:
    """Switch the maintenance page on or off on one proxy (idempotent; atomic rename).
    Prints ``@changed`` or ``@unchanged``; exit 20 (``on``) when the page is missing."""
    flag, page = shlex.quote(MAINTENANCE_FLAG), shlex.quote(MAINTENANCE_PAGE)
    if on:
        script = (f"[ -f {page} ] || exit {EXIT_NO_MAINTENANCE_PAGE}; "
                  f"if [ -e {flag} ]; then echo @unchanged; exit 0; fi; "
                  f"umask 022; printf 'on\\n' > {flag}.new && mv -f {flag}.new {flag}"
                  f" && echo @changed")
    else:
        script = (f"if [ -e {flag} ]; then rm -f {flag} && echo @changed;"
                  f" else echo @unchanged; fi")
    return ["sh", "-c", script]


#: What `ready_through_proxy_argv` prints instead of a status while the page is on.
MAINTENANCE_ON = "maintenance"


def ready_through_proxy_argv(server_name: str, flag: str = MAINTENANCE_FLAG) -> list[str]:
    """On a proxy host: GET /ready through nginx's TLS site, as a client would; prints the
    HTTP status, or `MAINTENANCE_ON` while the maintenance page is on (every request is a
    503 then, by design, so there is nothing to learn from one)."""
    return ["sh", "-c", 'if [ -e "$1" ]; then echo "$2"; exit 0; fi; shift 2; exec "$@"',
            "releasy-ready", flag, MAINTENANCE_ON,
            "curl", "-ksS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
            "--resolve", f"{server_name}:443:127.0.0.1", f"https://{server_name}/ready"]
