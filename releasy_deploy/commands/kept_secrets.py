"""Where and how an environment's secrets are kept on its app hosts (pure builders).

Each app host keeps the secrets it was given in ``/etc/releasy-deploy/secrets.json``
(root:root 0600) inside ``/etc/releasy-deploy`` (root:root 0700): outside every path the
service account can write, and unreadable by it. The file is the tool's record of what the
host runs with; the operator's side may lack a secret (cron, a second operator) without the
host losing it (see `releasy_deploy.secret_policy`).

Hosts set up before the file existed still have their secrets in ``/etc/releasy/releasy.env``;
the probe reads those lines too, so the first run keeps them and writes the file.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Mapping

from . import app as appcmd
from .shell_read import print_lines_starting, print_text

KEPT_DIR = "/etc/releasy-deploy"
KEPT_FILE = f"{KEPT_DIR}/secrets.json"

# secret name -> the variable Releasy reads (the same names as releasy_deploy.secrets)
VARIABLES: Mapping[str, str] = {
    "admin_api_key": "RELEASY_ADMIN_API_KEY",
    "api_key_pepper": "RELEASY_API_KEY_PEPPER",
    "artifact_access_key": "RELEASY_ARTIFACT_ACCESS_KEY",
    "artifact_secret_key": "RELEASY_ARTIFACT_SECRET_KEY",
}
_BY_VARIABLE = {v: k for k, v in VARIABLES.items()}

_MARK = "--releasy-kept-secrets--"

# Read as root. The kept file counts only when it and its directory are root-owned, not
# symlinks, and not writable by anyone else: otherwise it says so and the caller refuses.
PROBE = f"""\
d={shlex.quote(KEPT_DIR)}; f={shlex.quote(KEPT_FILE)}; e={shlex.quote(appcmd.ENV_FILE)}
if [ -L "$d" ] || {{ [ -e "$d" ] && [ ! -d "$d" ]; }}; then echo "state: bad-dir"
elif [ -L "$f" ] || {{ [ -e "$f" ] && [ ! -f "$f" ]; }}; then echo "state: bad-file"
elif [ -f "$f" ]; then
  printf 'state: %s %s %s %s\n' $(stat -c '%U:%G %a' -- "$d" "$f")
  {print_text('"$f"')}
elif [ -d "$d" ]; then echo "state: $(stat -c '%U:%G %a' -- "$d") absent"
else echo "state: absent"
fi
echo {_MARK}
if [ -f "$e" ] && [ ! -L "$e" ]; then
  {print_lines_starting('"$e"', [f"{name}=" for name in VARIABLES.values()])}
fi
"""

# stdin: the JSON document. Creates the directory 0700 if needed; writes via a temp file
# in the same directory + rename, so readers never see half a file.
WRITE_SCRIPT = """\
set -eu
d=$1; f=$2
if [ -L "$d" ] || { [ -e "$d" ] && [ ! -d "$d" ]; }; then
  echo "$d is not a directory (a symlink?); refusing to write secrets there" >&2; exit 3
fi
mkdir -p -m 0700 -- "$d"
chown root:root -- "$d"; chmod 0700 -- "$d"
t=$(mktemp -- "$d/.secrets.XXXXXX")
trap 'rm -f -- "$t"' EXIT
cat > "$t"
chmod 0600 -- "$t"
mv -f -T -- "$t" "$f"
trap - EXIT
"""

_WANT_DIR = "root:root 700"
_WANT_FILE = "root:root 600"


@dataclass(frozen=True, repr=False)
class KeptState:
    """What one host holds. ``kept``: the kept file's secrets (None when there is no file);
    ``env``: the secrets found in releasy.env; ``problem``: why the kept file cannot be
    trusted (never a value); ``tidy``: file and directory have root:root 0600/0700."""

    kept: Mapping[str, str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None
    tidy: bool = False

    def __repr__(self) -> str:  # never the values
        return (f"KeptState(kept={sorted(self.kept) if self.kept is not None else None}, "
                f"env={sorted(self.env)}, problem={self.problem!r}, tidy={self.tidy})")


def unquote_env_value(text: str) -> str | None:
    """The value of a double-quoted EnvironmentFile value as `systemd.quote_env_value`
    writes it (\\ " ` $ escaped); None when it is not in that form."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return None
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
            continue
        if ch == '"':
            return None
        out.append(ch)
        i += 1
    return "".join(out)


def parse_probe(out: str) -> KeptState:
    head, sep, env_part = out.partition(_MARK + "\n")
    if not sep:
        head, sep, env_part = out.partition(_MARK)
    first, _, body = head.partition("\n")
    state = first.removeprefix("state: ").strip()
    env: dict[str, str] = {}
    for line in env_part.splitlines():
        name, eq, raw = line.partition("=")
        value = unquote_env_value(raw.strip())
        if eq and name in _BY_VARIABLE and value:
            env[_BY_VARIABLE[name]] = value
    if state in ("absent",) or state.endswith(" absent"):
        return KeptState(None, env)
    if state == "bad-dir":
        return KeptState(None, env, f"{KEPT_DIR} is not a directory (a symlink?)")
    if state == "bad-file":
        return KeptState(None, env, f"{KEPT_FILE} is not a regular file (a symlink?)")
    parts = state.split(" ")
    dir_attrs, file_attrs = " ".join(parts[:2]), " ".join(parts[2:4])
    if not dir_attrs.startswith("root:") or not file_attrs.startswith("root:"):
        return KeptState(None, env, f"{KEPT_DIR} or {KEPT_FILE} is not owned by root")
    try:
        data = json.loads(body)
    except ValueError:
        return KeptState(None, env, f"{KEPT_FILE} is not valid JSON")
    if not isinstance(data, dict) or not all(
            k in VARIABLES and isinstance(v, str) and v for k, v in data.items()):
        return KeptState(None, env, f"{KEPT_FILE} is not a mapping of secret names to strings")
    return KeptState(data, env, None, (dir_attrs, file_attrs) == (_WANT_DIR, _WANT_FILE))


def render(values: Mapping[str, str]) -> bytes:
    """The kept file's content: stable, so equal values mean equal bytes."""
    return (json.dumps({k: values[k] for k in sorted(values)}, indent=1) + "\n").encode()


def write_argv() -> list[str]:
    return ["sh", "-c", WRITE_SCRIPT, "releasy-keep-secrets", KEPT_DIR, KEPT_FILE]

