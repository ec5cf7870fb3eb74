"""The firewall's lockout revert on a host (pure builders): where its state lives, the
script that saves ufw's files, arms a transient systemd timer that restores them and then
runs the ufw commands, the script that disarms the timer, the command that reverts at once,
and the earlier version's state directory (how to tell it is ours, how to remove it).

State: everything `apply` keeps on a host lives in `STATE_DIR`, root-owned 0700, outside
any directory the service account can write. The earlier version kept it in
`OLD_STATE_DIR` under the service-owned /var/lib/releasy: it is removed when root owns it
(its content is never read: the service account could have written it), and anything else
there is left alone.
"""
from __future__ import annotations

import shlex

from ..templates import FILES_DIR
from .fleet import TOOL_STATE_DIR

__all__ = [
    "REVERT_UNIT", "REVERT_SCRIPT", "REVERT_SOURCE", "STATE_DIR", "SAVED_DIR", "OLD_STATE_DIR",
    "REVERT_TIMER", "OLD_STATE_PROBE", "apply_script", "disarm_script",
    "revert_now_argv", "remove_old_state_argv",
]

REVERT_UNIT = "releasy-firewall-revert"
REVERT_SCRIPT = "/usr/local/sbin/releasy-firewall-revert"
STATE_DIR = f"{TOOL_STATE_DIR}/firewall"
SAVED_DIR = f"{STATE_DIR}/previous"
OLD_STATE_DIR = "/var/lib/releasy/firewall"  # the earlier version's, in the service's directory
REVERT_SOURCE = FILES_DIR / "firewall" / "releasy-firewall-revert"

REVERT_TIMER = f"{REVERT_UNIT}.timer"  # "active" (or "activating") while it is armed
# "root": a real directory root owns (ours to remove); "foreign": anything else there;
# nothing when absent.
OLD_STATE_PROBE = (f"d={shlex.quote(OLD_STATE_DIR)}; if [ -L \"$d\" ]; then echo foreign; "
                   f"elif [ -d \"$d\" ]; then [ \"$(stat -c %u -- \"$d\")\" = 0 ] && echo root"
                   f" || echo foreign; elif [ -e \"$d\" ]; then echo foreign; fi")


def apply_script(commands: list[list[str]], *, token: str, revert_after: int) -> str:
    """One script: save ufw's files, arm the revert timer, run the ufw commands.

    Prints ``@armed`` once the timer is armed (so a failure after it is known to leave a
    revert pending). ufw exits 0 when asked to delete a rule it does not have; that is
    turned into a failure naming the command.
    """
    q = shlex.quote
    lines = [
        "set -eu",
        "umask 077",
        "export LANG=C",
        f"state={q(STATE_DIR)}",
        f"saved={q(SAVED_DIR)}",
        # Root's own directories, 0700: refuse anything there we did not make.
        f"for d in {q(TOOL_STATE_DIR)} \"$state\"; do",
        '  if [ -L "$d" ] || { [ -e "$d" ] && [ ! -d "$d" ]; }; then',
        "    printf 'refusing: %s is not a plain directory\\n' \"$d\" >&2; exit 1",
        "  fi",
        '  mkdir -p -m 0700 "$d"',
        '  if [ "$(stat -c %u -- "$d")" != 0 ]; then',
        "    printf 'refusing: %s is not owned by root\\n' \"$d\" >&2; exit 1",
        "  fi",
        '  chmod 0700 "$d"',
        "done",
        'rm -rf "$saved.new"',
        'mkdir "$saved.new"',
        "for f in /etc/ufw/user.rules /etc/ufw/user6.rules /etc/ufw/ufw.conf; do",
        '  if [ -e "$f" ]; then cp -p "$f" "$saved.new/"; fi',
        "done",
        'cp -p /etc/default/ufw "$saved.new/default-ufw"',
        'rm -rf "$saved"',
        'mv "$saved.new" "$saved"',
        'rm -f "$state/reverted"',
        # A finished revert can leave a failed unit behind; its name must be free.
        f"systemctl reset-failed {q(REVERT_TIMER)} {q(REVERT_UNIT + '.service')}"
        " 2>/dev/null || true",
        # AccuracySec: the default (1 min) would let the timer fire up to a minute late.
        # RemainAfterElapse=no: the transient timer unloads after firing, freeing its name.
        shlex.join(["systemd-run", "--quiet", f"--unit={REVERT_UNIT}",
                    "--description=releasy: restore the previous firewall unless disarmed",
                    f"--on-active={int(revert_after)}s",
                    "--timer-property=AccuracySec=1s",
                    "--timer-property=RemainAfterElapse=no",
                    "--", REVERT_SCRIPT, token]),
        "echo @armed",
        # On failure: ufw's last words, then the command (the caller shows the last lines).
        "ufw_do() {",
        '  if ! out=$("$@" 2>&1); then',
        "    printf '%s\\n' \"$out\" | tail -n 4 >&2",
        "    printf 'failed: %s\\n' \"$*\" >&2; exit 1",
        "  fi",
        "  printf '%s\\n' \"$out\"",
        '  case $out in *"Could not delete"*)',
        "    printf 'ufw did not find the rule to delete: %s\\n' \"$*\" >&2; exit 1;;",
        "  esac",
        "}",
    ]
    lines += ["ufw_do " + shlex.join(argv) for argv in commands]
    return "\n".join(lines) + "\n"


def disarm_script(token: str) -> str:
    """Stop the revert timer; print ``@disarmed``, or ``@fired`` if the revert already ran."""
    q = shlex.quote
    return "\n".join([
        f"systemctl stop {q(REVERT_TIMER)} 2>/dev/null || true",
        f"if grep -qxF {q(token)} {q(STATE_DIR + '/reverted')} 2>/dev/null"
        f" || systemctl is-active --quiet {q(REVERT_UNIT + '.service')}; then",
        "  echo @fired",
        "else",
        "  echo @disarmed",
        "fi",
    ]) + "\n"


def revert_now_argv(token: str) -> list[str]:
    """Restore the saved firewall at once, then stop the timer (which would do the same)."""
    return ["sh", "-c", '"$1" "$2" && systemctl stop "$3"', "releasy-fw-revert",
            REVERT_SCRIPT, token, REVERT_TIMER]


def remove_old_state_argv() -> list[str]:
    """Remove the earlier version's state directory, only while it is still a real
    directory owned by root (checked again here, at the moment of removal). `rm -r`
    removes symlinks inside it, never what they point to."""
    return ["sh", "-c", 'd=$1; if [ ! -L "$d" ] && [ -d "$d" ] && '
            '[ "$(stat -c %u -- "$d")" = 0 ]; then rm -rf -- "$d"; fi',
            "releasy-fw-migrate", OLD_STATE_DIR]
