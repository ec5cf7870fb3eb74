"""Where the fleet record lives on the db host, and the commands that read and write it.

The record (`releasy_deploy.fleet.FleetRecord`, JSON) says which release the last rolling
deploy or rollback left the app hosts on and which app hosts it could not reach (they are
behind). It lives on the db host, beside the deploy lock, in the tool's own root-only
state directory: the one host every rollout needs anyway, and not an app host (a dead app
host is exactly the one whose state we cannot read). Pure builders only.
"""
from __future__ import annotations

import shlex

__all__ = ["TOOL_STATE_DIR", "FLEET_FILE", "read_shell", "write_argv"]

#: root-owned 0700: the service account cannot write what the tool decides on.
TOOL_STATE_DIR = "/var/lib/releasy-deploy"
FLEET_FILE = f"{TOOL_STATE_DIR}/fleet.json"

# $1 the directory, $2 the file; the new content on stdin. Atomic: a temporary file in the
# same directory, renamed over the old one.
_WRITE = """set -e
umask 077
install -d -m 0700 -o root -g root -- "$1"
tmp="$2.new.$$"
cat > "$tmp"
mv -f -- "$tmp" "$2"
"""


def read_shell(path: str = FLEET_FILE) -> str:
    """Prints the record; exit 3 when there is none."""
    q = shlex.quote(path)
    return f"[ -f {q} ] || exit 3; cat -- {q}"


def write_argv(directory: str = TOOL_STATE_DIR, path: str = FLEET_FILE) -> list[str]:
    """Replace the record with what comes on stdin (run as root)."""
    return ["sh", "-c", _WRITE, "releasy-fleet", directory, path]
