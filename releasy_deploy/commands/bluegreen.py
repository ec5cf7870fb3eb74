"""Blue/green's paths and remote scripts (pure builders): the instance's link and env file,
the script that starts the idle instance, the one that finishes (argv pairs from the
planner), the cleanup after a failure before the switch, the warm-up probe and the check
for a port in use. Every value is validated or ``shlex.quote()``d."""
from __future__ import annotations

import hashlib
import shlex
from collections.abc import Sequence

from ..inventory import check_version
from . import app as appcmd
from . import systemd

__all__ = ["WARMUP_SUCCESSES", "WARMUP_INTERVAL_S", "instance_unit", "instance_bind",
           "instance_link", "instance_env_file", "render_instance_env", "listening_shell",
           "start_script", "finish_script", "cleanup_script", "warmup_argv"]

#: /ready answers in a row, WARMUP_INTERVAL_S apart, before the new instance gets traffic.
WARMUP_SUCCESSES = 3
WARMUP_INTERVAL_S = 0.3

_port = appcmd.check_port  # one validation for every instance name
instance_unit = appcmd.instance_unit
instance_bind = appcmd.instance_bind


def instance_link(port: int) -> str:
    """The symlink the instance runs its release from (ExecStart=LINK/releasy-server)."""
    return f"{appcmd.INSTANCES_DIR}/{_port(port)}"


def instance_env_file(port: int) -> str:
    """Read after releasy.env by the template unit: the per-instance overrides."""
    return f"{appcmd.CONFIG_DIR}/instance-{_port(port)}.env"


def render_instance_env(port: int) -> str:
    return ("# Managed by releasy-deploy (fab deploy.bluegreen): local changes are overwritten.\n"
            f"# Read after {appcmd.ENV_FILE} by {instance_unit(port)}: its own listen address.\n"
            + systemd.env_assignment("RELEASY_BIND_ADDR", instance_bind(port)) + "\n")


def listening_shell(port: int) -> str:
    """Prints a line when something listens on TCP ``port`` (read-only)."""
    return f"ss -Hltn {shlex.quote(f'sport = :{_port(port)}')}"


def start_script(port: int, version: str, *, stop_first: Sequence[str] = (),
                 env_sum: str | None = None, daemon_reload: bool = False) -> str:
    """Stop whatever of ours holds the idle ``port`` (``stop_first``), point the idle
    instance at ``version``, write its env file unless its sha256 is already ``env_sum``,
    start it."""
    unit = instance_unit(port)
    env_text = render_instance_env(port)
    lines = ["set -eu"]
    for other in stop_first:
        lines.append(shlex.join(systemd.systemctl("stop", other)))
    if env_sum != hashlib.sha256(env_text.encode()).hexdigest():
        lines += [
            f"tmp=$(mktemp {shlex.quote(appcmd.CONFIG_DIR)}/.instance-env.XXXXXX)",
            f"printf '%s' {shlex.quote(env_text)} > \"$tmp\"",
            "chmod 0644 \"$tmp\"",
            f"mv -f \"$tmp\" {shlex.quote(instance_env_file(port))}",
        ]
    target = f"{appcmd.RELEASES_DIR}/{check_version(version)}"
    staged = f"{appcmd.INSTANCES_DIR}/.{port}.new"
    lines += [
        shlex.join(["ln", "-sfn", "--", target, staged]),
        shlex.join(["mv", "-T", "--", staged, instance_link(port)]),
    ]
    if daemon_reload:
        lines.append(shlex.join(systemd.daemon_reload_argv()))
    # reset-failed: a failed earlier attempt must not count against StartLimitBurst.
    lines.append(shlex.join(systemd.systemctl("reset-failed", unit)) + " || true")
    lines.append(shlex.join(systemd.systemctl("start", unit)))
    return "\n".join(lines) + "\n"


def finish_script(steps: Sequence[tuple[str, list[str]]]) -> str:
    """The finish step's (what, argv) pairs as one script, stopping at the first failure."""
    return "set -e\n" + "\n".join(shlex.join(argv) for _what, argv in steps) + "\n"


def cleanup_script(port: int) -> str:
    """Best effort, after a failure before the switch: stop the idle instance (never in
    rotation) and remove its link so nothing can start it by accident."""
    unit = instance_unit(port)
    return "\n".join([
        shlex.join(systemd.systemctl("stop", unit)) + " || rc=1",
        shlex.join(systemd.systemctl("reset-failed", unit)) + " || true",
        shlex.join(["rm", "-f", "--", instance_link(port)]) + " || rc=1",
        'exit "${rc:-0}"',
    ]) + "\n"


# $1 URL, $2 unit, $3 answers wanted in a row, $4 seconds between probes, $5 timeout (whole
# seconds). Exit 0 once warm (unit still active), 3 on timeout, 4 if the unit stopped or
# failed, 5 without curl. One line of explanation on stdout.
WARMUP_SCRIPT = """if ! command -v curl >/dev/null 2>&1; then
  echo "curl is not installed (apt-get install curl)"; exit 5
fi
now_ms() { t=$(date +%s%N); echo $(( t / 1000000 )); }
end=$(( $(now_ms) + $5 * 1000 ))
n=0
out=
while :; do
  if out=$(curl -fsS --max-time 2 -o /dev/null "$1" 2>&1); then
    n=$((n + 1))
  else
    n=0
  fi
  state=$(systemctl is-active "$2" 2>/dev/null) || true
  case $state in
    failed|inactive) printf '%s is %s; last probe: %s\\n' "$2" "$state" "${out:-ok}"; exit 4;;
  esac
  if [ "$n" -ge "$3" ] && [ "$state" = active ]; then echo "warm: $n answers in a row"; exit 0; fi
  if [ "$(now_ms)" -ge "$end" ]; then
    printf 'only %s /ready answers in a row within %s s (%s is %s); last probe: %s\\n' \\
      "$n" "$5" "$2" "$state" "${out:-ok}"
    exit 3
  fi
  sleep "$4"
done
"""


def warmup_argv(bind: str, unit: str, *, successes: int = WARMUP_SUCCESSES,
                interval: float = WARMUP_INTERVAL_S, timeout: int) -> list[str]:
    if not isinstance(successes, int) or successes < 1:
        raise ValueError(f"successes must be a positive integer, got {successes!r}")
    if not isinstance(timeout, int) or timeout < 1:
        raise ValueError(f"timeout must be a positive whole number of seconds, got {timeout!r}")
    if not 0 < interval <= 60:
        raise ValueError(f"interval must be within (0, 60] seconds, got {interval!r}")
    return ["sh", "-c", WARMUP_SCRIPT, "releasy-warmup", appcmd.ready_url(bind),
            systemd.check_unit(unit), str(successes), f"{interval:g}", str(timeout)]
