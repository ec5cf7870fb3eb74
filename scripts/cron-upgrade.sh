#!/usr/bin/env bash
# Example cron wrapper: upgrade Releasy to the newest stable release the inventory's release
# source offers (local directory: the newest tarball by version order; URL source: the newest
# version pinned in release.sha256 / sha256_file), only if an app host runs an older one.
#
#   */15 * * * *  deploy  RELEASY_INVENTORY=/srv/releasy/hosts.yaml /srv/releasy-deploy/scripts/cron-upgrade.sh
#
# It never prompts (stdin is /dev/null and --yes is given) and passes fab's exit code
# through: 0 upgraded or nothing to do, 1 the rollout failed (hosts were put back; see the
# log), 2 bad input (inventory, secrets, artifact), 3 another deploy holds the lock (not an
# error for cron: the next run tries again), 4 a host is unreachable.
#
# Human output is appended to $RELEASY_CRON_LOG_DIR/cron.log, one JSON object per event to
# $RELEASY_JSON_LOG (default $RELEASY_CRON_LOG_DIR/cron.jsonl). cron mails whatever a job
# prints: this prints nothing on success or "busy", and the end of the log on failure.
set -uo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
fab=${RELEASY_FAB:-$here/.venv/bin/fab}
log_dir=${RELEASY_CRON_LOG_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/releasy-deploy}
mkdir -p -- "$log_dir"
log=$log_dir/cron.log
json=${RELEASY_JSON_LOG:-$log_dir/cron.jsonl}

printf '\n=== %s cron-upgrade (pid %s)\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$$" >>"$log"
cd "$here" || exit 2
"$fab" deploy.rolling --version newest --only-if-newer --yes --json-log "$json" \
    </dev/null >>"$log" 2>&1
rc=$?
case $rc in
  0) ;;
  3) printf 'deploy lock busy: another deploy is running; trying again next time\n' >>"$log" ;;
  *) printf 'releasy cron-upgrade failed (exit code %s); end of %s:\n' "$rc" "$log" >&2
     tail -n 40 -- "$log" >&2 ;;
esac
exit "$rc"
