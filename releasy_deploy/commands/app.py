"""App tier: remote layout, pure command/script builders and parsers (no SSH here).

Values reach shell scripts only as positional parameters ("$1") or through `shlex.quote`;
argv lists are rendered by the executor. Everything here is unit-tested as data.
"""
from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from ..inventory import VERSION_RE, Host, Inventory
from ..templates import render_template
from .shell_read import read_first_word
from .systemd import ENV_NAME_RE, check_unit, daemon_reload_argv, env_assignment, systemctl

# -------------------------------------------------------------------------- layout
RELEASY_ROOT = "/opt/releasy"
RELEASES_DIR = f"{RELEASY_ROOT}/releases"
CURRENT_LINK = f"{RELEASY_ROOT}/current"
INSTANCES_DIR = f"{RELEASY_ROOT}/instances"
CONFIG_DIR = "/etc/releasy"
ENV_FILE = f"{CONFIG_DIR}/releasy.env"
DATA_DIR = "/var/lib/releasy"
UNIT_DIR = "/etc/systemd/system"
SERVICE = "releasy.service"
TEMPLATE_UNIT = "releasy@.service"
MARKER = ".sha256"  # in each release dir: the sha256 of the tarball it was unpacked from
# The SQLite database (single host). The URL itself comes from the db tier (same value).
SQLITE_URL = f"sqlite://{DATA_DIR}/releasy.db"

#: the one file an upstream release tarball holds.
BINARY_NAME = "releasy-server"

PREFERRED_UID = 10001  # what upstream's container image uses
NOLOGIN = "/usr/sbin/nologin"
NO_SHELLS = frozenset({"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"})

# Variables whose values are secret as a whole (never shown, not even in a masked diff).
SECRET_VARIABLES = frozenset({
    "RELEASY_ADMIN_API_KEY", "RELEASY_API_KEY_PEPPER", "RELEASY_ARTIFACT_ACCESS_KEY",
    "RELEASY_ARTIFACT_SECRET_KEY",
})


@dataclass(frozen=True)
class DirSpec:
    path: str
    owner: str
    group: str
    mode: int


def directories(user: str, group: str) -> tuple[DirSpec, ...]:
    """Every directory the app tier owns, parents first."""
    return (
        DirSpec(RELEASY_ROOT, "root", "root", 0o755),
        DirSpec(RELEASES_DIR, "root", "root", 0o755),
        DirSpec(INSTANCES_DIR, "root", "root", 0o755),
        DirSpec(CONFIG_DIR, "root", group, 0o750),
        DirSpec(DATA_DIR, user, group, 0o750),
    )


# -------------------------------------------------------------------------- addresses
def bind_address(inv: Inventory, host: Host) -> str:
    """Where Releasy listens on ``host``: loopback on a single host (the proxy is local),
    else the host's private address, which the proxy reaches and the firewall admits."""
    port = inv.app.bind_port
    if inv.topology == "single":
        return f"127.0.0.1:{port}"
    ip = ipaddress.ip_address(host.private_address)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def http_origin(bind: str) -> str:
    return f"http://{bind}"


def ready_url(bind: str) -> str:
    return f"{http_origin(bind)}/ready"


def ready_transfer(url: str) -> list[str]:
    """curl's arguments for one readiness transfer: the body dropped, ``-f`` failing on
    HTTP >= 400, and one ``ready EXITCODE`` line written out (0: answered 2xx)."""
    # A --write-out format starting with "@" would name a file: this one must not.
    return ["-fsS", "--max-time", "2", "-o", "/dev/null", "-w", "ready %{exitcode}\n", url]


def parse_ready_line(line: str, code: int) -> int:
    """The exit status of a readiness transfer from its ``ready EXITCODE`` line; any other
    line (curl missing or cut off) is a failure (curl's own status, else 1)."""
    word, _, status = line.partition(" ")
    if word == "ready" and status.isdigit():
        return int(status)
    return code or 1


# -------------------------------------------------------------------------- service account
@dataclass(frozen=True)
class Account:
    """What the host says about the service account (`account_probe`)."""

    uid: int | None = None  # None: no such user
    group: str | None = None  # the user's primary group name
    shell: str | None = None
    group_exists: bool = False  # a group with the user's name exists
    uid_taken: bool = False  # PREFERRED_UID is in use by some user
    gid_taken: bool = False  # PREFERRED_UID is in use as a gid

    @property
    def exists(self) -> bool:
        return self.uid is not None


# The account ``{q}`` and whatever holds PREFERRED_UID, in two getent calls: passwd entries
# (the user's and uid PREFERRED_UID's), "@group", then group entries (the group of that
# name, gid PREFERRED_UID and the user's primary group). The parser reads the columns.
_ACCOUNT_PROBE = """p=$(getent passwd -- {q} {uid})
printf '%s\\n@group\\n' "$p"
g=
while IFS=: read -r n _ _ gid _; do [ "$n" = {q} ] && g=$gid; done <<RELEASY_PASSWD
$p
RELEASY_PASSWD
case $g in *[!0-9]*) g=;; esac
getent group -- {q} {uid} $g"""


def account_probe(name: str) -> str:
    return _ACCOUNT_PROBE.format(q=shlex.quote(name), uid=PREFERRED_UID)


def parse_account(stdout: str, name: str) -> Account:
    """`Account` of ``name`` from `account_probe`'s output."""
    passwd, _, groups = stdout.partition("@group\n")
    users = [line.split(":") for line in passwd.splitlines()]
    group_rows = [line.split(":") for line in groups.splitlines()]
    uid = gid = shell = None
    for fields in users:
        if len(fields) >= 7 and fields[0] == name and fields[2].isdigit():
            uid, gid, shell = int(fields[2]), fields[3], fields[6]
    preferred = str(PREFERRED_UID)
    group = next((g[0] for g in group_rows if uid is not None and len(g) >= 3
                  and g[2] == gid), None)
    return Account(uid, group, shell,
                   group_exists=any(g[0] == name for g in group_rows),
                   uid_taken=any(len(u) >= 3 and u[2] == preferred for u in users),
                   gid_taken=any(len(g) >= 3 and g[2] == preferred for g in group_rows))


def account_commands(name: str, account: Account) -> list[list[str]]:
    """groupadd/useradd argv lists creating the service account; [] when it exists.

    uid/gid 10001 (upstream's) when free. An existing group of that name is reused.
    """
    if account.exists:
        return []
    cmds: list[list[str]] = []
    if not account.group_exists:
        gid = [] if account.gid_taken else ["--gid", str(PREFERRED_UID)]
        cmds.append(["groupadd", "--system", *gid, name])
    uid = [] if account.uid_taken else ["--uid", str(PREFERRED_UID)]
    cmds.append(["useradd", "--system", *uid, "--gid", name, "--no-create-home",
                 "--home-dir", DATA_DIR, "--shell", NOLOGIN, "--comment", "Releasy server",
                 name])
    return cmds


# -------------------------------------------------------------------------- environment file
def database_password(url: str) -> str | None:
    """The password inside a database URL, if any (to register it as a secret)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    return unquote(password) if password else None


def sqlite_path(url: str) -> str | None:
    """The absolute file path of a ``sqlite:`` URL (``sqlite:///abs/path.db``), else None."""
    if not url.startswith("sqlite:"):
        return None
    rest = url[len("sqlite://"):] if url.startswith("sqlite://") else url[len("sqlite:"):]
    path = rest.partition("?")[0]
    return path if path.startswith("/") and path != "/" else None


def public_base_url(inv: Inventory) -> str:
    """The base Releasy builds download links from: ``app.public_base_url``, else
    ``https://`` + ``tls.server_name`` (the name the proxy serves). Upstream's own default
    would be ``http://127.0.0.1:8080``: links pointing at the app host's loopback."""
    return inv.app.public_base_url or f"https://{inv.tls.server_name}"


def env_variables(inv: Inventory, host: Host, secrets: Any, database_url: str
                  ) -> list[tuple[str, str]]:
    """(name, value) pairs for /etc/releasy/releasy.env, in a stable order.

    ``secrets`` is a `Secrets` (anything with ``.get(name)``); unset optional ones are left
    out, so Releasy applies its own defaults.
    """
    app = inv.app
    out: list[tuple[str, str]] = [
        ("RELEASY_BIND_ADDR", bind_address(inv, host)),
        ("RELEASY_DATABASE_URL", database_url),
        ("RELEASY_DATABASE_MAX_CONNECTIONS", str(app.database_max_connections)),
        ("RELEASY_LOG_LEVEL", app.log_level),
        ("RELEASY_DOWNLOAD_TOKEN_TTL_SECONDS", str(app.download_token_ttl_seconds)),
    ]
    out.append(("RELEASY_PUBLIC_BASE_URL", public_base_url(inv)))
    jwt = app.operator_jwt
    if jwt is not None:
        out += [
            ("RELEASY_OPERATOR_JWKS_URL", jwt.jwks_url),
            ("RELEASY_OPERATOR_ISSUER", jwt.issuer),
            ("RELEASY_OPERATOR_AUDIENCE", jwt.audience),
        ]
        if jwt.resource:
            out.append(("RELEASY_OPERATOR_RESOURCE", jwt.resource))
        out += [
            ("RELEASY_OPERATOR_JWKS_TTL_SECONDS", str(jwt.jwks_ttl_seconds)),
            ("RELEASY_OPERATOR_JWT_LEEWAY_SECONDS", str(jwt.jwt_leeway_seconds)),
        ]
    store = app.artifact_storage
    if store is not None:
        out += [
            ("RELEASY_ARTIFACT_BUCKET", store.bucket),
            ("RELEASY_ARTIFACT_REGION", store.region),
            ("RELEASY_ARTIFACT_ENDPOINT", store.endpoint),
            ("RELEASY_ARTIFACT_PATH_STYLE", "true" if store.path_style else "false"),
            ("RELEASY_ARTIFACT_PRESIGN_EXPIRES_SECONDS", str(store.presign_expires_seconds)),
        ]
    for secret, variable in (("admin_api_key", "RELEASY_ADMIN_API_KEY"),
                             ("api_key_pepper", "RELEASY_API_KEY_PEPPER"),
                             ("artifact_access_key", "RELEASY_ARTIFACT_ACCESS_KEY"),
                             ("artifact_secret_key", "RELEASY_ARTIFACT_SECRET_KEY")):
        value = secrets.get(secret)
        if value is not None:
            out.append((variable, value))
    return out


def render_env_file(variables: Sequence[tuple[str, str]], service_group: str) -> str:
    seen: set[str] = set()
    for name, _ in variables:
        if name in seen:
            raise ValueError(f"environment variable {name} is set twice")
        seen.add(name)
    return render_template("releasy/releasy.env.j2", {
        "assignments": [env_assignment(n, v) for n, v in variables],
        "service_group": service_group,
    })


_URL_PASSWORD = re.compile(r"(://[^/?#@\s:]*:)[^/?#@\s]*@")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&\s\"]*", re.IGNORECASE)
HIDDEN = "****"


def _redact_line(line: str) -> tuple[str, str | None]:
    """(shown form, variable name or None)."""
    stripped = line.strip()
    if not stripped or stripped.startswith(("#", ";")):
        return line, None
    name, sep, value = line.partition("=")
    name = name.strip()
    if not sep or not ENV_NAME_RE.fullmatch(name):
        # Not one of our assignments (hand-edited?): it could be part of a secret.
        return "(line not shown)", None
    if name in SECRET_VARIABLES:
        return f"{name}={HIDDEN}", name
    value = _PASSWORD_PARAM.sub(rf"\g<1>{HIDDEN}", _URL_PASSWORD.sub(rf"\g<1>{HIDDEN}@", value))
    return f"{name}={value}", name


def redact_env_texts(old: str, new: str) -> tuple[str, str]:
    """Both versions of an env file with secret values hidden, for a diff that is safe to
    print. Hiding is by variable name (and URL passwords), not by known secret values, so
    a rotated-away old value is hidden too. A hidden value that changed still shows up:
    its lines are marked "(changed, not shown)"."""
    def index(text: str) -> dict[str, str]:
        raw: dict[str, str] = {}
        for line in text.splitlines():
            _, name = _redact_line(line)
            if name:
                raw[name] = line
        return raw

    old_raw, new_raw = index(old), index(new)

    def render(text: str, mine: dict[str, str], other: dict[str, str], tag: str) -> str:
        lines = []
        for line in text.splitlines():
            shown, name = _redact_line(line)
            if name and name in other and other[name] != mine[name]:
                counterpart, _ = _redact_line(other[name])
                if counterpart == shown:  # the difference is inside the hidden part
                    shown += f"  ({tag} value, not shown)"
            lines.append(shown)
        return "\n".join(lines) + ("\n" if text.endswith("\n") else "")

    return render(old, old_raw, new_raw, "old"), render(new, new_raw, old_raw, "new")


# -------------------------------------------------------------------------- units
def unit_context(service_user: str, service_group: str) -> dict[str, str]:
    return {
        "service_user": service_user,
        "service_group": service_group,
        "env_file": ENV_FILE,
        "config_dir": CONFIG_DIR,
        "data_dir": DATA_DIR,
        "current_link": CURRENT_LINK,
        "instances_dir": INSTANCES_DIR,
        "binary": BINARY_NAME,
    }


def render_units(service_user: str, service_group: str) -> dict[str, str]:
    """Unit file name -> content, for releasy.service and the releasy@.service template."""
    ctx = unit_context(service_user, service_group)
    return {
        SERVICE: render_template("systemd/releasy.service.j2", ctx),
        TEMPLATE_UNIT: render_template("systemd/releasy@.service.j2", ctx),
    }


def install_units_script(units: Mapping[str, str], *, probe_target: str,
                         unit_dir: str = UNIT_DIR, staging_parent: str = "/etc/systemd",
                         instances_dir: str = INSTANCES_DIR) -> str:
    """Upload candidates to a temp dir, `systemd-analyze verify` them, then move them into
    /etc/systemd/system (same file system: each rename is atomic). Nothing is installed if
    verification fails (exit 3, its output on stderr).

    systemd only *warns* about unknown keys or bad values (exit 0), so any message naming
    a candidate file counts as a failure too. A template is verified through a throwaway
    instance ``verify-PID`` linked to ``probe_target`` (a release dir), because verify also
    checks that ExecStart exists. The staging dir is on the same file system as ``unit_dir``
    but outside systemd's search path.
    """
    if not units:
        raise ValueError("no units to install")
    lines = [
        "set -eu",
        f"tmp=$(mktemp -d {shlex.quote(staging_parent)}/.releasy-units.XXXXXX)",
        "probe=",
        "trap 'rm -rf \"$tmp\"; if [ -n \"$probe\" ]; then rm -f \"$probe\"; fi' EXIT",
    ]
    verify: list[str] = []
    for name, content in units.items():
        check_unit(name)
        lines.append(f"printf '%s' {shlex.quote(content)} > \"$tmp\"/{shlex.quote(name)}")
        if name.endswith("@.service"):
            lines.append(f"probe={shlex.quote(instances_dir)}/verify-$$")
            lines.append(f"ln -sfn {shlex.quote(probe_target)} \"$probe\"")
            stem = name[: -len("@.service")]
            verify.append(f"\"$tmp\"/{shlex.quote(stem + '@verify-')}\"$$\".service")
        else:
            verify.append(f"\"$tmp\"/{shlex.quote(name)}")
    lines += [
        f"if out=$(systemd-analyze verify --man=no {' '.join(verify)} 2>&1); then rc=0;"
        " else rc=$?; fi",
        "if [ \"$rc\" -ne 0 ] || printf '%s\\n' \"$out\" | grep -qF \"$tmp/\"; then",
        "  printf '%s\\n' \"$out\" | sed \"s|$tmp/|(candidate) |g\" >&2",
        "  exit 3",
        "fi",
    ]
    for name in units:
        q = shlex.quote(name)
        lines.append(f"chown root:root \"$tmp\"/{q} && chmod 0644 \"$tmp\"/{q}")
        lines.append(f"mv -f \"$tmp\"/{q} {shlex.quote(unit_dir + '/' + name)}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------- releases
def version_key(version: str) -> tuple:
    """Sort key: numeric X.Y.Z, a pre-release before its release (semver-ish)."""
    core, _, build = version.partition("+")
    main, dash, pre = core.partition("-")
    nums = tuple(int(x) if x.isdigit() else 0 for x in main.split("."))
    pre_key: tuple = (1,) if not dash else (0, tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")))
    return nums, pre_key, build


@dataclass(frozen=True)
class ReleaseState:
    """/opt/releasy on a host: the ``current`` link and the release dirs found."""

    current_target: str | None = None  # readlink of current, None when absent
    releases: Mapping[str, tuple[str | None, bool]] = field(default_factory=dict)
    # version -> (sha256 marker or None, binary is executable)

    @property
    def current(self) -> str | None:
        """The version ``current`` points at, if it points at one of our release dirs."""
        t = self.current_target
        if not t:
            return None
        for prefix in ("releases/", f"{RELEASES_DIR}/"):
            if t.startswith(prefix):
                v = t[len(prefix):].rstrip("/")
                if VERSION_RE.fullmatch(v):
                    return v
        return None

    def installed(self) -> list[str]:
        """Complete releases (marker and executable present), oldest first."""
        return sorted((v for v, (marker, ok) in self.releases.items() if marker and ok),
                      key=version_key)

    def holds(self, version: str, sha256: str) -> bool:
        marker, ok = self.releases.get(version, (None, False))
        return ok and marker == sha256


RELEASES_PROBE = f"""cd {shlex.quote(RELEASY_ROOT)} 2>/dev/null || exit 0
if t=$(readlink current); then printf 'current %s\\n' "$t"; fi
for d in releases/*/; do
  [ -d "$d" ] || continue
  v=${{d#releases/}}; v=${{v%/}}
  {read_first_word("sum", f'"${{d}}{MARKER}"')}
  if [ -x "${{d}}{BINARY_NAME}" ] && [ -f "${{d}}{BINARY_NAME}" ]; then bin=yes; else bin=no; fi
  printf 'release %s %s %s\\n' "$v" "${{sum:--}}" "$bin"
done"""


def parse_releases(stdout: str) -> ReleaseState:
    current = None
    releases: dict[str, tuple[str | None, bool]] = {}
    for line in stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "current":
            current = rest or None
        elif kind == "release":
            parts = rest.split()
            if len(parts) == 3 and VERSION_RE.fullmatch(parts[0]):
                marker = parts[1] if re.fullmatch(r"[0-9a-f]{64}", parts[1]) else None
                releases[parts[0]] = (marker, parts[2] == "yes")
    return ReleaseState(current, releases)


# Reads the tarball on stdin, checks its sha256 on the host, unpacks it into a temp dir
# next to the target and renames that into place: a half-unpacked release never exists.
# $1 version, $2 expected sha256.
STAGE_SCRIPT = f"""set -eu
releases={shlex.quote(RELEASES_DIR)}
# staging dirs left by an upload that was cut off (older than an hour: not a running one)
find "$releases" -mindepth 1 -maxdepth 1 -name '.stage-*' -mmin +60 \\
  -exec rm -rf {{}} + 2>/dev/null || true
tmp=$(mktemp -d "$releases/.stage-$1.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/release.tar.gz"
actual=$(sha256sum < "$tmp/release.tar.gz")
actual=${{actual%% *}}
if [ "$actual" != "$2" ]; then
  echo "the uploaded tarball has sha256 $actual, expected $2 (corrupted in transit?);" \\
    "nothing was changed: re-run" >&2
  exit 3
fi
mkdir "$tmp/unpacked"
tar -xzf "$tmp/release.tar.gz" -C "$tmp/unpacked" --no-same-owner --no-same-permissions \\
  {BINARY_NAME}
chown root:root "$tmp/unpacked" "$tmp/unpacked/{BINARY_NAME}"
chmod 0755 "$tmp/unpacked" "$tmp/unpacked/{BINARY_NAME}"
printf '%s\\n' "$2" > "$tmp/unpacked/{MARKER}"
chmod 0644 "$tmp/unpacked/{MARKER}"
if [ -e "$releases/$1" ] || [ -L "$releases/$1" ]; then
  mv -T "$releases/$1" "$tmp/replaced"
fi
mv -T "$tmp/unpacked" "$releases/$1"
"""


def stage_argv(version: str, sha256: str) -> list[str]:
    if not VERSION_RE.fullmatch(version) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"invalid release {version!r} / sha256 {sha256!r}")
    return ["sh", "-c", STAGE_SCRIPT, "releasy-stage", version, sha256]


# $1 version. Atomic switch: a new link under a temp name, renamed over `current`.
ACTIVATE_SCRIPT = f"""set -eu
cd {shlex.quote(RELEASY_ROOT)}
if ! [ -f "releases/$1/{MARKER}" ] || ! [ -x "releases/$1/{BINARY_NAME}" ]; then
  echo "release $1 is not installed in {RELEASES_DIR} (stage it first)" >&2
  exit 3
fi
ln -sfn "releases/$1" current.tmp
mv -T current.tmp current
"""


def activate_argv(version: str) -> list[str]:
    if not VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid release version {version!r}")
    return ["sh", "-c", ACTIVATE_SCRIPT, "releasy-activate", version]


# -------------------------------------------------------------------------- readiness
# Polls /ready every 0.1 s (probing is cheap; a late answer costs every host of a rollout)
# until it answers 2xx (exit 0), the deadline passes (exit 3) or the unit failed, gave up
# or crashed and is waiting to be restarted (exit 4: no point waiting out the start limit).
# $1 URL, $2 unit, $3 timeout in whole seconds.
READY_SCRIPT = """if ! command -v curl >/dev/null 2>&1; then
  echo "curl is not installed (apt-get install curl)"; exit 5
fi
now_ms() { t=$(date +%s%N); echo $(( t / 1000000 )); }
end=$(( $(now_ms) + $3 * 1000 ))
while :; do
  if out=$(curl -fsS --max-time 2 -o /dev/null "$1" 2>&1); then exit 0; fi
  active=$(systemctl show -p ActiveState --value "$2" 2>/dev/null) || true
  sub=$(systemctl show -p SubState --value "$2" 2>/dev/null) || true
  case $active/$sub in
    failed/*|inactive/*|*/auto-restart)
      printf '%s is %s (%s); last probe: %s\\n' "$2" "$active" "$sub" "$out"; exit 4;;
  esac
  if [ "$(now_ms)" -ge "$end" ]; then printf 'last probe: %s\\n' "$out"; exit 3; fi
  sleep 0.1
done
"""


def wait_ready_argv(bind: str, unit: str, timeout: int) -> list[str]:
    if not isinstance(timeout, int) or timeout < 1:
        raise ValueError(f"timeout must be a positive whole number of seconds, got {timeout!r}")
    return ["sh", "-c", READY_SCRIPT, "releasy-ready", ready_url(bind), check_unit(unit),
            str(timeout)]


# -------------------------------------------------------------------------- the service
@dataclass(frozen=True)
class ServicePlan:
    commands: tuple[tuple[str, ...], ...]  # run in this order, as root
    enable: bool  # was not enabled
    start: str | None  # None, or why it is (re)started


def service_plan(props: Mapping[str, str], *, units_changed: bool,
                 reasons: Sequence[str], unit: str = SERVICE) -> ServicePlan:
    """What to run so ``unit`` is loaded, enabled and running the current configuration.

    ``props``: `systemctl show` of the unit; ``reasons``: what changed that it uses (a
    restart is needed only then). daemon-reload only when a unit file changed (or systemd
    says one changed on disk).
    """
    state = props.get("ActiveState") or "inactive"
    commands: list[tuple[str, ...]] = []
    if units_changed or props.get("NeedDaemonReload") == "yes":
        commands.append(tuple(daemon_reload_argv()))
    enable = props.get("UnitFileState") != "enabled"
    if enable:
        commands.append(tuple(systemctl("enable", unit)))
    start = None
    if state in ("inactive", "failed"):
        start = f"started (was {state}" + "".join(f"; {r}" for r in reasons) + ")"
    elif reasons:
        start = f"restarted ({'; '.join(reasons)})"
    elif state != "active":  # activating (auto-restart loop), deactivating, reloading...
        start = f"restarted (was {state})"
    if start:
        # reset-failed also zeroes the start-rate counter: StartLimitBurst is there to stop
        # crash loops, not to refuse a deliberate deploy (several deploys within a minute).
        commands.append(tuple(systemctl("reset-failed", unit)))
        commands.append(tuple(systemctl("restart", unit)))
    return ServicePlan(tuple(commands), enable, start)


def script_of(commands: Sequence[Sequence[str]]) -> str:
    """A ``set -e`` script running argv lists in order (each rendered with shlex.join)."""
    return "set -e\n" + "\n".join(shlex.join(list(c)) for c in commands) + "\n"


# ------------------------------------------------------------------------------ blue/green names
def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port!r}")
    return port


def instance_unit(port: int) -> str:
    """``releasy@PORT.service``: the template unit's instance for that port."""
    return f"releasy@{check_port(port)}.service"


def instance_bind(port: int) -> str:
    """Single host: blue/green instances listen on loopback only (the proxy is local)."""
    return f"127.0.0.1:{check_port(port)}"
