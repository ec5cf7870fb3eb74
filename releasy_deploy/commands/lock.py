"""Everything the deploy lock runs on the lock's host: SQL (parameters always bound, never
formatted in), the flock holder and status scripts, the watchdog, and their paths. Pure.

How these fit together is told in `releasy_deploy.lock`'s docstring.
"""
from __future__ import annotations

import re

FLOCK_PATH = "/run/releasy-deploy.lock"
HOLDER_PATH = "/run/releasy-deploy.holder"
#: the host's watchdog frees the lock after WATCHDOG_QUIET_S without a heartbeat (so within
#: ~15 s of our network vanishing); `releasy_deploy.channels.Heartbeat` beats every 3 s.
WATCHDOG_QUIET_S = 12
#: where `fab deploy.freeze` leaves its marker, on the lock's host (root only).
STATE_DIR = "/etc/releasy-deploy"
FREEZE_FILE = f"{STATE_DIR}/frozen"
#: server-side TCP keepalives of the lock session (see the lock's docstring for their reach).
SERVER_KEEPALIVES = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 2,
                     "tcp_keepalives_count": 3}

TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(%s::int4, %s::int4)"
UNLOCK_SQL = "SELECT pg_advisory_unlock(%s::int4, %s::int4)"
SET_NAME_SQL = "SELECT set_config('application_name', %s, false)"
# objsubid 2 = the two-int key space (bigint keys have objsubid 1).
HOLDER_SQL = """
SELECT a.pid, a.application_name, a.usename, host(a.client_addr), a.backend_start,
       a.pid = pg_backend_pid()
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid::bigint = %s AND l.objid::bigint = %s
"""


def keepalive_statements() -> list[str]:
    return [f"SET {name} = {int(value)}" for name, value in SERVER_KEEPALIVES.items()]


# $1 lock file, $2 holder file, $3 seconds to wait (0: don't). Prints BUSY plus the holder
# file and exits 3; or takes the lock, prints ACQUIRED, reads the holder label from stdin
# (so its "since" is the moment the lock was granted), writes it to the holder file, prints
# LOCKED and the freeze marker ($5: "FROZEN <record>" or THAWED, read while holding the
# lock), then holds the lock until its stdin (our SSH channel) closes, says "release", or
# stays silent for $4 seconds (no heartbeat: we are gone). The holder file is
# removed before the lock is released, so a stale one is only ever left by a crash (and
# the status script trusts /proc/locks, not the file, for held vs free).
# `flock --close FILE COMMAND` rather than `flock FD` in this shell: the lock must be held
# by exactly one live process (flock itself, waiting for COMMAND), because /proc/locks
# inside a container (a pid namespace) hides locks whose owner pid is gone -- and the
# status script reads /proc/locks. --close: COMMAND does not inherit the locked file, so
# the lock ends with the flock process whatever happens to it.
FLOCK_HOLD_SCRIPT = """set -u
lock=$1 holder=$2 wait=$3 quiet=$4 frozen=$5
hold='echo ACQUIRED
IFS= read -r label || exit 5
printf "%s\\n" "$label" > "$1.new" && mv -f -- "$1.new" "$1" || exit 4
echo LOCKED
if [ -f "$3" ]; then printf "FROZEN %s\\n" "$(head -c 2000 -- "$3" | tr -d "\\n")"; else echo THAWED; fi
while IFS= read -r -t "$2" beat; do [ "$beat" = release ] && break; done
rm -f -- "$1"'
take() {
  flock "$@" --close --conflict-exit-code 75 "$lock" bash -c "$hold" releasy-deploy-lock \
    "$holder" "$quiet" "$frozen"
}
if [ "$wait" = 0 ]; then take --nonblock; else take --wait "$wait"; fi
rc=$?
[ "$rc" = 75 ] || exit "$rc"
echo BUSY
cat -- "$holder" 2>/dev/null
exit 3
"""

# $1 lock file, $2 holder file. Prints FREE, or "HELD <pid>" and the holder file. Reads
# /proc/locks (granted locks only: blocked waiters are listed as "N: -> FLOCK ...") for the
# lock file's device:inode in the kernel's format (major:minor in hex, inode in decimal).
FLOCK_STATUS_SCRIPT = """set -u
[ -e "$1" ] || { echo FREE; exit 0; }
d=$(stat -c %d -- "$1") && i=$(stat -c %i -- "$1") || exit 4
id=$(printf '%02x:%02x:%s' $(( (d >> 8) & 0xfff )) $(( (d & 0xff) | ((d >> 12) & 0xfff00) )) "$i")
pid=$(awk -v id="$id" '$2 == "FLOCK" && $6 == id { print $5; exit }' /proc/locks)
[ -n "$pid" ] || { echo FREE; exit 0; }
echo "HELD $pid"
cat -- "$2" 2>/dev/null || true
"""


def flock_hold_argv(wait: float) -> list[str]:
    seconds = max(0, int(-(-wait // 1)))  # whole seconds, rounded up
    return ["sh", "-c", FLOCK_HOLD_SCRIPT, "releasy-deploy-lock", FLOCK_PATH, HOLDER_PATH,
            str(seconds), str(WATCHDOG_QUIET_S), FREEZE_FILE]


def flock_status_argv() -> list[str]:
    return ["sh", "-c", FLOCK_STATUS_SCRIPT, "releasy-deploy-lock", FLOCK_PATH, HOLDER_PATH]


# $1 backend pid, $2 its backend_start (epoch text), $3 seconds of silence allowed, $4 the
# freeze marker. Reads heartbeat lines; after $3 s without one, or at EOF, terminates that
# one backend (ending the lock session); "release" ends it quietly; "frozen?" is answered
# with "FROZEN <record>" or THAWED (no extra SSH command for it). bash: for `read -t`.
WATCHDOG_SCRIPT = """set -u
pid=$1 start=$2 quiet=$3 frozen=$4
case "$pid" in ''|*[!0-9]*) echo "bad backend pid" >&2; exit 2;; esac
case "$start" in ''|*[!0-9.]*) echo "bad backend start" >&2; exit 2;; esac
case "$quiet" in ''|*[!0-9]*) echo "bad timeout" >&2; exit 2;; esac
echo WATCHING
while IFS= read -r -t "$quiet" beat; do
  case "$beat" in
    release) exit 0;;
    frozen?) if [ -f "$frozen" ]; then printf 'FROZEN %s\\n' "$(head -c 2000 -- "$frozen" | tr -d '\\n')"
             else echo THAWED; fi;;
  esac
done
cd /
runuser -u postgres -- psql -X -A -t -q -d postgres -c "SELECT pg_terminate_backend(pid)
  FROM pg_stat_activity WHERE pid = $pid AND extract(epoch FROM backend_start)::text = '$start'"
echo "no heartbeat for $quiet s: ended deploy lock session $pid" >&2
"""

BACKEND_SQL = ("SELECT pid, extract(epoch FROM backend_start)::text FROM pg_stat_activity"
               " WHERE pid = pg_backend_pid()")
TERMINATE_SQL = "SELECT pg_terminate_backend(%s)"


def watchdog_argv(pid: int, backend_start: str, quiet: int = WATCHDOG_QUIET_S) -> list[str]:
    if not re.fullmatch(r"\d+(\.\d+)?", backend_start):
        raise ValueError(f"not an epoch: {backend_start!r}")
    return ["bash", "-c", WATCHDOG_SCRIPT, "releasy-deploy-watchdog", str(int(pid)),
            backend_start, str(int(quiet)), FREEZE_FILE]

