"""The firewall on every host: ufw converged to `releasy_deploy.firewall.plan_rules`.

`plan`, `apply`, `status` and `audit` all read a host in ONE round trip (ufw's rules,
status and defaults, the address the host sees for our SSH connection, listening TCP
ports, a pending revert), in parallel across hosts. A host that already matches the plan
costs exactly that round trip in `apply` and runs no ufw command that changes anything.

Lockout protection, two layers:

1. Before touching a host (even installing ufw), `apply` checks the address and port the
   host sees for our own SSH connection (``$SSH_CONNECTION``, read on the host): if the
   address is not inside ``admin_cidrs`` or the port is not the host's ``ssh_port``, the
   plan would shut us out, so it refuses and changes nothing on that host.
2. Before changing ufw, `apply` saves the current rule files and arms a transient systemd
   timer (``releasy-firewall-revert.timer``) that restores them after ``revert_after``
   seconds. It then changes the rules, opens a brand-new SSH connection (a second
   Executor: same host-key checks, a new TCP connection that must pass the new rules) and
   disarms the timer over that connection. If the new connection fails, the timer stays
   armed and the host reverts itself.

`audit` checks reachability against the plan from a vantage point: a network namespace
(``--netns``; the lab's "outside") or, without it, "from here" (the machine running the
task), on each host's SSH address and on its global IPv6 addresses. The vantage address
each host sees is the namespace's source address, or, from here, the address the host sees
for our SSH connection (right behind NAT too). Given ``--listener ADDR:PORT`` it also
connects from every host to that listener and checks the egress plan: reached where the
plan allows it, dropped (a timeout, not a refusal) where it does not.

Egress (``egress.restrict``): each host's outgoing rules come from
`releasy_deploy.firewall.egress_rules`, fed with what the host itself reports in the same
probe round trip (its resolvers, what the names it must reach resolve to).

State: everything `apply` keeps on a host lives in `STATE_DIR`, root-owned 0700, outside
any directory the service account can write. The earlier version kept it in
`OLD_STATE_DIR` under the service-owned /var/lib/releasy: `apply` removes that directory
when root owns it (its content is never read: the service account could have written it),
and leaves anything else there alone.
"""
from __future__ import annotations

import ipaddress
import json
import re
import secrets as _random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .. import firewall as fw
from ..errors import BadInput, DeployError, RemoteCommandError, UnreachableError, first_line
from ..executor import Executor, HostConnection
from ..facts import Fact, OsRelease, PackageVersion, read_facts
from ..firewall import HostDiff, HostNet, LiveRule, Rule, UfwDefaults, UfwStatus
from ..inventory import Host, Inventory
from ..hostos import check_release
from ..packages import FIREWALL_PACKAGES
from ..remote import FILES_DIR, Change, ensure_packages, put_file, report
from ..session import Session

__all__ = [
    "plan", "apply", "open_ahead", "status", "audit", "converge", "read_state", "HostState",
    "FirewallRefused", "FirewallLockout", "apply_script", "disarm_script", "probe_reachability",
    "check_ssh_source", "REVERT_UNIT", "REVERT_SCRIPT", "STATE_DIR", "OLD_STATE_DIR",
    "SshClient", "UfwConf", "UfwUserRules", "UfwDefaultsFile", "TcpListeners",
    "RevertPending", "Resolvers", "Resolve", "Ipv6Addresses", "OldStateDir", "AptProxyConf",
    "host_rules", "APT_PROXY_CONF", "apt_proxy_conf", "listener_probe_script",
    "parse_listener",
]

REVERT_UNIT = "releasy-firewall-revert"
REVERT_SCRIPT = "/usr/local/sbin/releasy-firewall-revert"
TOOL_STATE_DIR = "/var/lib/releasy-deploy"  # root-owned 0700: the service cannot write it
STATE_DIR = f"{TOOL_STATE_DIR}/firewall"
SAVED_DIR = f"{STATE_DIR}/previous"
OLD_STATE_DIR = "/var/lib/releasy/firewall"  # the earlier version's, in the service's directory
APT_PROXY_CONF = "/etc/apt/apt.conf.d/80releasy-egress-proxy"
REVERT_SOURCE = FILES_DIR / "firewall" / "releasy-firewall-revert"
MIN_REVERT_AFTER = 5
MAX_REVERT_AFTER = 3600
PROBE_TIMEOUT = 1.5
_NETNS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class FirewallRefused(DeployError):
    """apply refused to touch a host (it would lock us out, or a revert is pending)."""


class FirewallLockout(DeployError):
    """The rules were changed but a new SSH connection failed: the host reverts itself."""


# --------------------------------------------------------------------------- probes

# Who are we, as the host sees us? sudo resets the environment, so when $SSH_CONNECTION is
# not ours directly, read it from the nearest ancestor that has it (sudo itself, or the
# login shell): /proc/PID/environ is readable as root.
_SSH_CLIENT_SHELL = r"""if [ -n "${SSH_CONNECTION:-}" ]; then printf '%s\n' "$SSH_CONNECTION"; exit 0; fi
pid=$$
while [ "${pid:-0}" -gt 1 ]; do
  conn=$(tr '\0' '\n' < "/proc/$pid/environ" | sed -n 's/^SSH_CONNECTION=//p' | head -n 1)
  if [ -n "$conn" ]; then printf '%s\n' "$conn"; exit 0; fi
  pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status")
done
exit 1"""

@dataclass(frozen=True)
class SshClient(Fact):
    """(our address as the host sees it, its port), from $SSH_CONNECTION; None if unknown."""

    def shell(self) -> str:
        return _SSH_CLIENT_SHELL

    def parse(self, out: str, code: int) -> tuple[fw.Address, int] | None:
        return fw.parse_ssh_connection(out.strip()) if code == 0 else None


# ufw's own files, not the `ufw` command: each `ufw status` / `ufw show added` starts Python
# (~0.25 s per host on a busy machine), a `cat` costs nothing. ufw not installed: None.
UFW_CONF, UFW_DEFAULTS = "/etc/ufw/ufw.conf", "/etc/default/ufw"
UFW_RULES, UFW_RULES6 = "/etc/ufw/user.rules", "/etc/ufw/user6.rules"


@dataclass(frozen=True)
class UfwConf(Fact):
    """Enabled or not, logging and default policies (`firewall.UfwStatus`, no rows), from
    ufw.conf and /etc/default/ufw; None when ufw is not installed."""

    def shell(self) -> str:
        return (f"[ -f {UFW_CONF} ] || exit 3; cat -- {UFW_CONF} && echo @defaults &&"
                f" cat -- {UFW_DEFAULTS}")

    def parse(self, out: str, code: int) -> UfwStatus | None:
        if code != 0:
            return None
        conf, _, defaults = out.partition("@defaults\n")
        return fw.parse_ufw_conf(conf, defaults)


@dataclass(frozen=True)
class UfwUserRules(Fact):
    """The rules added to ufw (`firewall.LiveRule`s, as ``ufw show added`` lists them), from
    user.rules and, when ufw filters IPv6, user6.rules; None when ufw is not installed."""

    def shell(self) -> str:
        return (f"[ -f {UFW_RULES} ] || exit 3; cat -- {UFW_RULES} &&"
                f" if ! grep -qi '^IPV6=no' {UFW_DEFAULTS}; then cat -- {UFW_RULES6}; fi")

    def parse(self, out: str, code: int) -> list[LiveRule] | None:
        return fw.parse_user_rules(out) if code == 0 else None


@dataclass(frozen=True)
class UfwDefaultsFile(Fact):
    """The default policies in /etc/default/ufw (`firewall.UfwDefaults`), or None."""

    def shell(self) -> str:
        return "cat /etc/default/ufw"

    def parse(self, out: str, code: int) -> UfwDefaults | None:
        return fw.parse_defaults(out) if code == 0 else None


@dataclass(frozen=True)
class TcpListeners(Fact):
    """(address, port) of every listening TCP socket."""

    def shell(self) -> str:
        return "ss -ltnH"

    def parse(self, out: str, code: int) -> list[tuple[str, int]]:
        return fw.parse_listeners(out) if code == 0 else []


@dataclass(frozen=True)
class RevertPending(Fact):
    """The lockout-revert timer is armed."""

    def shell(self) -> str:
        return f"systemctl is-active {shlex.quote(REVERT_UNIT + '.timer')}"

    def parse(self, out: str, code: int) -> bool:
        return out.strip() in ("active", "activating")


@dataclass(frozen=True)
class Resolvers(Fact):
    """The DNS resolvers the host uses (resolv.conf, and systemd-resolved's upstreams when
    resolv.conf points at its stub)."""

    def shell(self) -> str:
        return ("cat /etc/resolv.conf; echo; echo @resolved;"
                " cat /run/systemd/resolve/resolv.conf")

    def parse(self, out: str, code: int) -> list:
        return fw.parse_resolvers(out)


@dataclass(frozen=True)
class Resolve(Fact):
    """The addresses ``name`` resolves to on the host (empty when it does not)."""

    name: str

    def shell(self) -> str:
        return f"getent ahosts -- {shlex.quote(self.name)}"

    def parse(self, out: str, code: int) -> tuple:
        return fw.parse_getent_hosts(out) if code == 0 else ()


@dataclass(frozen=True)
class Ipv6Addresses(Fact):
    """The host's global IPv6 addresses."""

    def shell(self) -> str:
        return "ip -6 -o addr show scope global"

    def parse(self, out: str, code: int) -> list:
        return fw.parse_ipv6_addresses(out)


@dataclass(frozen=True)
class OldStateDir(Fact):
    """The earlier version's state directory: "root" when it is a real directory root owns
    (ours to remove), "foreign" for anything else there (never touched), None when absent."""

    def shell(self) -> str:
        return (f"d={shlex.quote(OLD_STATE_DIR)}; if [ -L \"$d\" ]; then echo foreign; "
                f"elif [ -d \"$d\" ]; then [ \"$(stat -c %u -- \"$d\")\" = 0 ] && echo root"
                f" || echo foreign; elif [ -e \"$d\" ]; then echo foreign; fi")

    def parse(self, out: str, code: int) -> str | None:
        return out.strip() or None


@dataclass(frozen=True)
class AptProxyConf(Fact):
    """apt's proxy drop-in as we wrote it, or None."""

    def shell(self) -> str:
        return f"cat -- {shlex.quote(APT_PROXY_CONF)}"

    def parse(self, out: str, code: int) -> str | None:
        return out if code == 0 else None


@dataclass(frozen=True)
class HostState:
    """What one probe round trip saw on a host."""

    ssh_client: tuple[fw.Address, int] | None  # (our address as the host sees it, its port)
    installed: bool
    status: UfwStatus | None
    rules: tuple[LiveRule, ...]
    defaults: UfwDefaults | None
    listeners: tuple[tuple[str, int], ...] = ()
    revert_pending: bool = False
    net: HostNet = HostNet()
    ipv6: tuple[ipaddress.IPv6Address, ...] = ()  # global IPv6 addresses
    old_state: str | None = None  # see the fw_old_state probe
    apt_proxy_conf: str | None = None

    @property
    def active(self) -> bool:
        return self.status is not None and self.status.active


_PROBES = (OsRelease(), SshClient(), PackageVersion(FIREWALL_PACKAGES[0]), UfwConf(),
           UfwUserRules(), UfwDefaultsFile(), TcpListeners(), RevertPending(), Resolvers(), Ipv6Addresses(),
           OldStateDir(), AptProxyConf())


def state_facts(inv: Inventory, host: Host) -> list[Fact]:
    """What `apply` looks at on one host (one round trip; `fab site` prefetches it)."""
    return [*_PROBES, *(Resolve(n) for n in fw.names_to_resolve(inv, host))]


def read_state(c: HostConnection, resolve: tuple[str, ...] | list[str] = (), *,
               reuse: bool = False) -> HostState:
    """Everything the firewall tasks need from a host, in one round trip (read-only);
    ``resolve``: DNS names to resolve on the host (`fw.names_to_resolve`). ``reuse``: what
    `fab site` prefetched will do (`facts.read_facts`)."""
    seen = read_facts(c, (*_PROBES, *(Resolve(n) for n in resolve)), sudo=True, reuse=reuse)
    check_release(c.name, seen[OsRelease()])  # before anything is changed on it
    installed = seen[PackageVersion(FIREWALL_PACKAGES[0])] is not None
    status, added = seen[UfwConf()], seen[UfwUserRules()]
    if installed and (status is None or added is None):
        raise DeployError(
            f"{c.name}: ufw is installed but {UFW_CONF} or {UFW_RULES} cannot be read; "
            f"run `sudo ufw status verbose` on {c.name} to see why, fix it and re-run", host=c.name)
    net = HostNet(tuple(seen[Resolvers()]), {n: seen[Resolve(n)] for n in resolve})
    return HostState(seen[SshClient()], installed, status, tuple(added or ()),
                     seen[UfwDefaultsFile()], tuple(seen[TcpListeners()]),
                     seen[RevertPending()], net, tuple(seen[Ipv6Addresses()]),
                     seen[OldStateDir()], seen[AptProxyConf()])


def host_rules(inv: Inventory, host: Host, state: HostState) -> list[Rule]:
    """The full plan of one host: ingress (topology) + egress (topology + what the host
    reported). Raises DeployError naming the host when an egress name does not resolve."""
    try:
        egress = fw.egress_rules(inv, host, state.net)
    except fw.EgressError as exc:
        raise DeployError(str(exc), host=exc.host) from None
    return fw.plan_rules(inv)[host.name] + egress


def apt_proxy_conf(url: str | None) -> bytes | None:
    """apt's drop-in for egress.apt_proxy (http and https sources through it)."""
    if url is None:
        return None
    proxy = url if url.endswith("/") else url + "/"
    return (f"// Managed by releasy-deploy (egress.apt_proxy): apt reaches its sources "
            f"through this proxy.\nAcquire::http::Proxy \"{proxy}\";\n"
            f"Acquire::https::Proxy \"{proxy}\";\n").encode()


# --------------------------------------------------------------------------- lockout layer 1


def check_ssh_source(host: Host, state: HostState, admin_cidrs) -> None:
    """Refuse (FirewallRefused) when the plan would not let our own SSH connection in.
    Behind a jump host the plan allows SSH from the jump host's private address only, so
    that is what our connection must be seen coming from."""
    jump = getattr(host, "jump", None)
    allowed = fw.ssh_sources(host, admin_cidrs)
    cidrs = ", ".join(str(n) for n in allowed)
    what = (f"jump host {jump.name}'s private_address ({jump.private_address})"
            if jump is not None
            else f"admin_cidrs ({cidrs})")
    nothing = f"Nothing was changed on {host.name}."
    if state.ssh_client is None:
        raise FirewallRefused(
            f"{host.name}: refusing to change the firewall: cannot tell which address the "
            f"host sees for our SSH connection ($SSH_CONNECTION is not set in the login "
            f"session), so it cannot check that {what} keep it open. "
            f"{nothing}", host=host.name)
    address, port = state.ssh_client
    if not any(address.version == n.version and address in n for n in allowed):
        fix = (f"  Set private_address of jump host {jump.name} to {address} (the address "
               f"{host.name} sees it connect from)." if jump is not None else
               f"  Add the network of {address} to admin_cidrs in the inventory, or run from "
               f"an admin network.")
        raise FirewallRefused(
            f"{host.name}: refusing to change the firewall: the host sees our SSH connection "
            f"coming from {address}, which is not inside {what}; the plan "
            f"allows SSH only from there, so applying it would lock this machine out.\n"
            f"{fix} {nothing}", host=host.name)
    if port != host.ssh_port:
        raise FirewallRefused(
            f"{host.name}: refusing to change the firewall: our SSH connection arrives on "
            f"port {port} on the host, but the inventory's ssh_port for {host.name} is "
            f"{host.ssh_port} (a port forward?); the plan allows SSH only on "
            f"{host.ssh_port}, so applying it would lock this machine out.\n"
            f"  Make ssh_port the port sshd listens on, as the host sees it. {nothing}",
            host=host.name)


# --------------------------------------------------------------------------- scripts


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
        f"systemctl reset-failed {q(REVERT_UNIT + '.timer')} {q(REVERT_UNIT + '.service')}"
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
        f"systemctl stop {q(REVERT_UNIT + '.timer')} 2>/dev/null || true",
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
            REVERT_SCRIPT, token, REVERT_UNIT + ".timer"]


def remove_old_state_argv() -> list[str]:
    """Remove the earlier version's state directory, only while it is still a real
    directory owned by root (checked again here, at the moment of removal). `rm -r`
    removes symlinks inside it, never what they point to."""
    return ["sh", "-c", 'd=$1; if [ ! -L "$d" ] && [ -d "$d" ] && '
            '[ "$(stat -c %u -- "$d")" = 0 ]; then rm -rf -- "$d"; fi',
            "releasy-fw-migrate", OLD_STATE_DIR]


# --------------------------------------------------------------------------- reporting


def _policy_text(state: HostState) -> str:
    if not state.installed:
        return "ufw not installed"
    d = state.defaults
    incoming = d.incoming if d else "?"
    outgoing = d.outgoing if d else "?"
    active = "active" if state.active else "inactive"
    return f"ufw {active}, default {incoming} incoming / {outgoing} outgoing"


def _report_diff(c: HostConnection, diff: HostDiff, state: HostState, *,
                 done: bool, prune_unmanaged: bool) -> None:
    """changed/would lines for each change, ok lines for what already matches."""
    r = c.reporter

    def change(done_text: str, would_text: str) -> None:
        if done:
            r.changed(c.name, done_text)
        else:
            r.would(c.name, would_text)

    for rule in diff.satisfied:
        r.unchanged(c.name, f"firewall rule {rule}")
    if diff.ipv6:
        change("ufw IPv6 filtering turned on (IPV6=yes in /etc/default/ufw), every rule "
               "re-added for IPv6", "turn on ufw IPv6 filtering (IPV6=yes) and re-add every rule")
    for rule in diff.add:
        change(f"firewall rule added: {rule}", f"add firewall rule: {rule}")
    for rule in diff.recomment:
        change(f"firewall rule comment set: {rule}", f"set firewall rule comment: {rule}")
    for rule in diff.remove:
        why = "ours, no longer planned" if rule.managed else "not ours, --prune-unmanaged"
        change(f"firewall rule removed ({why}): {rule}",
               f"remove firewall rule ({why}): {rule}")
    for direction, now, want in diff.defaults:
        text = f"ufw default {direction}: {now or 'unknown'} -> {want}"
        change(text, f"set {text}")
    if diff.enable:
        change("ufw enabled", "enable ufw")
    if not diff.defaults and not diff.enable and not diff.ipv6 and not diff.opening_only:
        r.unchanged(c.name, _policy_text(state))
    for rule in diff.unexpected:
        hint = "" if prune_unmanaged else " (--prune-unmanaged removes it)"
        r.info(c.name, f"unexpected firewall rule, not ours, kept{hint}: {rule}")


# --------------------------------------------------------------------------- apply


def _fresh_check(fresh: Executor, host: Host, token: str, revert_after: int,
                 armed_at: float) -> None:
    """Disarm the revert timer over a brand-new SSH connection, or leave it armed."""
    by = time.strftime("%H:%M:%S", time.localtime(armed_at + revert_after))
    conn = fresh.conn(host)
    try:
        res = conn.run_script(disarm_script(token), sudo=True, label="disarm firewall revert")
    except DeployError as exc:  # unreachable, host key, sudo, the script itself
        first = first_line(exc)
        raise FirewallLockout(
            f"{host.name}: after the firewall change a NEW SSH connection to "
            f"{host.ssh_user}@{host.address}:{host.ssh_port} failed ({first}).\n"
            f"  New connections may be locked out. The revert timer "
            f"({REVERT_UNIT}.timer) stays armed: {host.name} restores its previous firewall by "
            f"itself {revert_after} s after the change (by about {by}).\n"
            f"  Check admin_cidrs and the host's SSH port, then re-run `fab firewall.apply`.",
            host=host.name) from None
    finally:
        conn.close()
    if "@fired" in res.stdout:
        raise FirewallLockout(
            f"{host.name}: the revert timer fired before the new SSH connection confirmed the "
            f"change ({revert_after} s was not enough): {host.name} restored its previous "
            f"firewall. Re-run with a larger --revert-after.", host=host.name)
    if "@disarmed" not in res.stdout:
        raise DeployError(f"{host.name}: unexpected answer while disarming the revert timer; "
                          f"check `systemctl status {REVERT_UNIT}.timer` on the host",
                          host=host.name)


RulesFor = Callable[[HostState], list[Rule]]


def converge(c: HostConnection, rules: list[Rule] | RulesFor, *, admin_cidrs,
             fresh: Executor | None, revert_after: int = 60, prune_unmanaged: bool = False,
             policies=fw.WANTED_DEFAULTS, resolve: tuple[str, ...] = (),
             add_only: bool = False) -> HostDiff:
    """Make one host's ufw exactly ``rules`` (lockout-protected); returns what differed.

    ``rules``: the list, or a function of the host's probed state (egress depends on it).
    ``policies``: the default policies (`fw.wanted_defaults`); ``resolve``: names the rules
    function needs resolved on the host. ``fresh`` opens the brand-new connection that
    confirms the change (None only in dry-run). ``add_only``: only the planned rules a
    running ufw lacks (`fw.additions_only`; `open_ahead`), nothing reported otherwise. The
    building block of `apply`.
    """
    host = c.host
    state = read_state(c, resolve, reuse=True)
    if add_only:
        diff = fw.additions_only(fw.diff_host(
            host.name, rules(state) if callable(rules) else list(rules), state.rules,
            active=state.active, defaults=state.defaults, policies=policies))
        if not diff.changes or state.revert_pending or c.dry_run:
            return diff  # `apply` at the end reports, or refuses a pending revert
        c.reporter.info(c.name, "firewall on: opening what the tiers need before they run"
                                " (the rest of the firewall comes last)")
        return _change(c, diff, state, fresh=fresh, revert_after=revert_after,
                       prune_unmanaged=prune_unmanaged, resolve=resolve, policies=policies)
    check_ssh_source(host, state, admin_cidrs)
    if state.revert_pending:
        raise FirewallRefused(
            f"{host.name}: a firewall revert is pending ({REVERT_UNIT}.timer, armed by an "
            f"apply whose new-connection check failed or was interrupted). Wait for it to "
            f"restore the previous rules (`systemctl list-timers {REVERT_UNIT}.timer` on the "
            f"host), fix the cause and re-run; to keep the current rules instead, run "
            f"`systemctl stop {REVERT_UNIT}.timer` there. Nothing was changed.",
            host=host.name)
    planned = rules(state) if callable(rules) else list(rules)
    _migrate_old_state(c, state)
    if not state.installed:
        ensure_packages(c, FIREWALL_PACKAGES)
        if not c.dry_run:
            state = read_state(c, resolve)
    else:
        c.reporter.unchanged(c.name, f"packages {' '.join(FIREWALL_PACKAGES)}")
    diff = fw.diff_host(host.name, planned, state.rules, active=state.active,
                        defaults=state.defaults, prune_unmanaged=prune_unmanaged,
                        policies=policies)
    if not diff.changes or c.dry_run:
        _report_diff(c, diff, state, done=False, prune_unmanaged=prune_unmanaged)
        return diff
    return _change(c, diff, state, fresh=fresh, revert_after=revert_after,
                   prune_unmanaged=prune_unmanaged, resolve=resolve, policies=policies)


def _change(c: HostConnection, diff: HostDiff, state: HostState, *, fresh: Executor | None,
            revert_after: int, prune_unmanaged: bool, resolve: tuple[str, ...],
            policies=fw.WANTED_DEFAULTS) -> HostDiff:
    """Apply ``diff`` under the revert timer, confirm it over a brand-new connection, then
    check ufw reached it."""
    host = c.host
    assert fresh is not None, "converge needs a fresh Executor outside dry-run"
    put_file(c, REVERT_SCRIPT, REVERT_SOURCE.read_bytes(), mode=0o755)
    token = _random.token_hex(8)
    script = apply_script(fw.ufw_commands(diff), token=token, revert_after=revert_after)
    armed_at = time.time()
    try:
        c.run_script(script, sudo=True, label="firewall: save, arm revert, apply ufw rules")
    except UnreachableError as exc:
        raise FirewallLockout(
            f"{host.name}: lost the SSH connection while changing the firewall "
            f"({first_line(exc)}). If the revert timer was armed, {host.name} "
            f"restores its previous firewall by itself within {revert_after} s. Check the "
            f"host, then re-run.", host=host.name) from None
    except RemoteCommandError as exc:
        # The change failed half-way: put the previous firewall back now.
        try:
            c.run(revert_now_argv(token), sudo=True)
            restored = "the previous firewall was restored"
        except DeployError:
            restored = (f"restoring the previous firewall failed too; the revert timer "
                        f"({REVERT_UNIT}.timer) restores it within {revert_after} s")
        said = "\n".join(f"    {line}" for line in exc.stderr_tail.splitlines()[-6:])
        raise DeployError(
            f"{host.name}: changing the firewall failed; {restored}. ufw said:\n{said}\n"
            f"  Fix the cause on {host.name} (`sudo ufw show added`) and re-run.",
            host=host.name) from None
    _report_diff(c, diff, state, done=True, prune_unmanaged=prune_unmanaged)
    _fresh_check(fresh, host, token, revert_after, armed_at)
    c.reporter.info(c.name, "a new SSH connection got through: revert timer disarmed")
    after = read_state(c, resolve)
    left = fw.diff_host(host.name, diff.planned, after.rules, active=after.active,
                        defaults=after.defaults, prune_unmanaged=prune_unmanaged,
                        policies=policies)
    if diff.opening_only:
        left = fw.additions_only(left)
    if left.changes:
        raise DeployError(
            f"{host.name}: ufw did not converge to the plan (still to do: "
            f"{'; '.join(' '.join(a) for a in fw.ufw_commands(left))}); run `sudo ufw show "
            f"added` on {host.name} and report this", host=host.name)
    return diff


def _migrate_old_state(c: HostConnection, state: HostState) -> None:
    """The earlier version's state directory under /var/lib/releasy goes (see the module
    docstring); nothing in it is needed: every change saves afresh."""
    if state.old_state == "root":
        change = Change(True, f"removed the earlier version's firewall state {OLD_STATE_DIR} "
                              f"(now kept in {STATE_DIR})")
        if not c.dry_run:
            c.run(remove_old_state_argv(), sudo=True)
        report(c, change)
    elif state.old_state == "foreign":
        c.reporter.info(c.name, f"{OLD_STATE_DIR} is not ours (not a root-owned directory): "
                                f"left alone, never read")


def _ensure_apt_proxy(c: HostConnection, inv: Inventory, state: HostState) -> None:
    """egress.apt_proxy's apt drop-in present exactly when configured."""
    want = apt_proxy_conf(inv.egress.apt_proxy)
    have = state.apt_proxy_conf
    if want is None:
        if have is not None:
            if not c.dry_run:
                c.run(["rm", "-f", "--", APT_PROXY_CONF], sudo=True)
            report(c, Change(True, f"file {APT_PROXY_CONF} removed (no egress.apt_proxy)"))
    elif have is None or have.encode() != want:
        put_file(c, APT_PROXY_CONF, want, mode=0o644)


def _check_revert_after(revert_after: int) -> int:
    if not isinstance(revert_after, int) or not \
            MIN_REVERT_AFTER <= revert_after <= MAX_REVERT_AFTER:
        raise BadInput(f"--revert-after must be {MIN_REVERT_AFTER}..{MAX_REVERT_AFTER} "
                       f"seconds, got {revert_after!r}")
    return revert_after


def apply(session: Session, *, revert_after: int = 60, prune_unmanaged: bool = False) -> None:
    """Converge every host's firewall (those of ``session.limit``) to the plan, hosts in
    parallel (dry-run: report only)."""
    _check_revert_after(revert_after)
    inv = session.inventory
    if revert_after <= inv.ssh.connect_timeout:
        # Otherwise the host could revert before a failing new connection even times out.
        raise BadInput(f"--revert-after ({revert_after} s) must be longer than "
                       f"ssh.connect_timeout ({inv.ssh.connect_timeout:g} s)")
    # --limit: only those hosts change; every host's rules still derive from the whole
    # inventory (the topology), as without it.
    _converge_all(session, session.targets(inv.hosts), revert_after=revert_after,
                  prune_unmanaged=prune_unmanaged)


def open_ahead(session: Session, seen: Mapping[str, Mapping[Fact, Any]]) -> None:
    """`fab site` before its app tier: every host whose firewall was on (``seen``: what
    `prepare.prefetch_all` read) gets the planned allow rules it lacks (a new app host's
    PostgreSQL rule on the db host, a new proxy's rule on the app hosts), so the tiers can
    reach each other before `apply` runs last. Only opening: removals, policies and
    enabling stay with `apply`. No round trip where nothing changed since the prefetch;
    a dry run does nothing."""
    hosts = [h for h in session.targets(session.inventory.hosts)
             if (ufw := seen[h.name].get(UfwConf())) is not None and ufw.active]
    if hosts and not session.dry_run:
        _converge_all(session, hosts, revert_after=60, add_only=True)


def _converge_all(session: Session, hosts: Sequence[Host], *, revert_after: int,
                  prune_unmanaged: bool = False, add_only: bool = False) -> None:
    inv = session.inventory
    wanted = fw.wanted_defaults(inv.egress.restrict)
    fresh = None
    if not session.dry_run:
        # Its own connections: each proves that a brand-new SSH session gets through.
        fresh = Executor(inv, reporter=session.reporter, secrets=session.secrets)

    def one(c: HostConnection) -> HostDiff:
        def rules_for(state: HostState) -> list[Rule]:
            # Called by converge once the host passed the lockout checks; apt's proxy
            # drop-in is kept in step here because it needs the same probed state.
            rules = host_rules(inv, c.host, state)
            if not add_only:
                _ensure_apt_proxy(c, inv, state)
            return rules
        return converge(c, rules_for, admin_cidrs=inv.admin_cidrs, fresh=fresh,
                        revert_after=revert_after, prune_unmanaged=prune_unmanaged,
                        policies=wanted, resolve=tuple(fw.names_to_resolve(inv, c.host)),
                        add_only=add_only)

    try:
        session.executor.each(hosts, one)
    finally:
        if fresh is not None:
            fresh.close()


# --------------------------------------------------------------------------- plan / status


@dataclass(frozen=True)
class HostPlan:
    state: HostState
    diff: HostDiff
    refused: str | None  # why apply would refuse this host
    rules: tuple[Rule, ...] = ()


def _host_plan(c: HostConnection, inv: Inventory) -> HostPlan:
    state = read_state(c, fw.names_to_resolve(inv, c.host))
    rules = host_rules(inv, c.host, state)
    refused = None
    try:
        check_ssh_source(c.host, state, inv.admin_cidrs)
    except FirewallRefused as exc:
        refused = str(exc)
    diff = fw.diff_host(c.name, rules, state.rules, active=state.active,
                        defaults=state.defaults,
                        policies=fw.wanted_defaults(inv.egress.restrict))
    return HostPlan(state, diff, refused, tuple(rules))


def plan(session: Session) -> dict[str, HostPlan]:
    """Per host, the rules apply would add and remove against the live ufw state; with
    egress.restrict, the outgoing rules with their reasons."""
    inv = session.inventory

    def one(c: HostConnection) -> HostPlan:
        hp = _host_plan(c, inv)
        if not hp.state.installed:
            c.reporter.would(c.name, f"install {' '.join(FIREWALL_PACKAGES)}")
        if hp.state.old_state == "root":
            c.reporter.would(c.name, f"remove the earlier version's firewall state "
                                     f"{OLD_STATE_DIR}")
        if inv.egress.restrict:
            c.reporter.info(c.name, "egress: default deny outgoing; allowed:")
            for rule in hp.rules:
                if rule.direction == "out":
                    c.reporter.info(c.name, f"  {rule.describe()}   ({rule.reason})")
        else:
            c.reporter.info(c.name, "egress: not restricted (allow outgoing)")
        _report_diff(c, hp.diff, hp.state, done=False, prune_unmanaged=False)
        if hp.refused:
            c.reporter.info(c.name, "WARNING: apply would refuse this host:\n" + hp.refused)
        if hp.state.revert_pending:
            c.reporter.info(c.name, f"WARNING: a firewall revert is pending ({REVERT_UNIT}.timer)")
        return hp

    return session.executor.each(inv.hosts, one)


def status(session: Session) -> dict[str, HostPlan]:
    """The live rules per host, each marked planned / unexpected / missing."""
    inv = session.inventory

    def one(c: HostConnection) -> HostPlan:
        hp = _host_plan(c, inv)
        st, diff, say = hp.state, hp.diff, c.reporter.info
        line = _policy_text(st)
        if st.status is not None and st.status.active:
            d = st.status.defaults
            line += f", routed {d.get('routed', '?')}, logging {st.status.logging or '?'}"
        say(c.name, line)
        satisfied = {r.key for r in diff.satisfied}
        recomment = {r.key: r for r in diff.recomment}
        for live in st.rules:
            if live.key in satisfied:
                satisfied.discard(live.key)
                say(c.name, f"  planned     {live}")
            elif live.key in recomment:
                planned_rule = recomment.pop(live.key)
                say(c.name, f"  planned     {live}   (apply sets comment "
                            f"{planned_rule.comment!r})")
            elif live.managed:
                say(c.name, f"  unexpected  {live}   (ours, not planned: apply removes it)")
            else:
                say(c.name, f"  unexpected  {live}   (not ours: apply keeps it; "
                            f"--prune-unmanaged removes it)")
        for rule in diff.add:
            say(c.name, f"  missing     {rule}")
        for direction, now, want in diff.defaults:
            say(c.name, f"  policy      default {direction} is {now or 'unknown'}, "
                        f"planned {want}")
        if diff.ipv6:
            say(c.name, "  policy      IPv6 filtering is off (IPV6=no), planned on")
        if st.revert_pending:
            say(c.name, f"WARNING: a firewall revert is pending ({REVERT_UNIT}.timer)")
        return hp

    return session.executor.each(inv.hosts, one)


# --------------------------------------------------------------------------- audit

# Runs in the vantage network namespace (or here): for every target address, the source
# address the kernel would use (UDP connect sends nothing), then a TCP connect to every
# (address, port) pair in parallel. open = accepted, closed = RST (the firewall let it
# through, nothing listens), filtered = no answer (dropped).
PROBE_PROGRAM = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
req = json.loads(sys.argv[1])
timeout = float(req["timeout"])
def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
def source(addr):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    try:
        s.connect((addr, 9))
        return s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
def probe(target):
    addr, port = target
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        return "open"
    except ConnectionRefusedError:
        return "closed"
    except (socket.timeout, TimeoutError):
        return "filtered"
    except OSError as e:
        return "filtered" if e.errno in (101, 113) else "error: %s" % e
    finally:
        s.close()
targets = [tuple(t) for t in req["targets"]]
with ThreadPoolExecutor(max_workers=max(1, min(128, len(targets)))) as pool:
    states = list(pool.map(probe, targets))
print(json.dumps({
    "sources": {a: source(a) for a in sorted({t[0] for t in targets})},
    "results": [[a, p, st] for (a, p), st in zip(targets, states)],
}))
"""


def probe_argv(request: dict, netns: str | None) -> list[str]:
    argv = [sys.executable, "-I", "-c", PROBE_PROGRAM, json.dumps(request)]
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def probe_reachability(targets: list[tuple[str, int]], netns: str | None = None, *,
                       timeout: float = PROBE_TIMEOUT) -> tuple[dict[str, str | None],
                                                                 dict[tuple[str, int], str]]:
    """-> (address -> our source address toward it, (address, port) -> state)."""
    if netns is not None and not _NETNS_RE.fullmatch(netns):
        raise BadInput(f"--netns {netns!r} is not a network namespace name")
    request = {"targets": [list(t) for t in targets], "timeout": timeout}
    try:
        proc = subprocess.run(probe_argv(request, netns), capture_output=True, text=True,
                              timeout=timeout * 4 + 30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeployError(f"audit: the reachability probe failed to run: {exc}") from None
    if proc.returncode != 0:
        where = f"in network namespace {netns}" if netns else "here"
        hint = (" (does the namespace exist? `ip netns list`; it needs root)"
                if netns else "")
        raise DeployError(f"audit: the reachability probe failed {where}{hint}: "
                          f"{proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout)
    results = {(a, int(p)): st for a, p, st in data["results"]}
    return data["sources"], results


def _resolve(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        raise DeployError(f"audit: cannot resolve {address}: {exc}") from None


def _explain(state: HostState, port: int, vantage: fw.Address, planned_keys: set) -> str:
    """Which live rules not in the plan may open ``port`` (for the audit's messages)."""
    if not state.active:
        return "ufw is not active" if state.installed else "ufw is not installed"

    def may_open(rule: LiveRule) -> bool:
        if not rule.parsed:
            return True
        if rule.key in planned_keys or rule.direction != "in" or rule.action == "deny":
            return False
        if rule.source is not None and not (rule.source.version == vantage.version
                                            and vantage in rule.source):
            return False
        return (port in rule.tcp_ports() or rule.app is not None
                or (rule.port is None and rule.proto in (None, "tcp")))

    suspects = [rule for rule in state.rules if may_open(rule)]
    if not suspects:
        return "no ufw rule outside the plan explains it (something bypassing ufw?)"
    return "live rule(s) not in the plan: " + "; ".join(str(x) for x in suspects)


# From a host to the audit's listener: bash's /dev/tcp (stock Debian; the app hosts
# may have no Python), bounded by coreutils' timeout. Exit 124: no answer (dropped).
LISTENER_PROBE = r"""out=$(timeout "$3" bash -c 'exec 3<>"/dev/tcp/$1/$2"' probe "$1" "$2" 2>&1)
rc=$?
case $rc in
  0) echo open;;
  124) echo filtered;;
  *) case $out in *refused*) echo closed;; *) printf 'error: %s\n' "$out" | tail -n 1;; esac;;
esac"""


def listener_probe_script(address: str, port: int, timeout: float = PROBE_TIMEOUT * 2
                          ) -> list[str]:
    """argv probing TCP address:port from a host: prints open / closed / filtered."""
    return ["sh", "-c", LISTENER_PROBE, "releasy-egress-probe", address, str(port),
            f"{timeout:g}"]


def parse_listener(value: str) -> tuple[fw.Address, int]:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` -> (address, port); BadInput otherwise."""
    addr, sep, port = value.rpartition(":")
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise BadInput(f"--listener {value!r}: expected ADDRESS:PORT (an IP literal, "
                       f"[v6]:PORT for IPv6)") from None
    return ip, int(port)


def _audit_egress(session: Session, states: dict[str, HostState],
                  listener: tuple[fw.Address, int]) -> bool:
    """From every host, connect to the listener; compare with the egress plan."""
    inv = session.inventory
    address, port = listener
    argv = listener_probe_script(str(address), port)
    seen = session.executor.each(
        inv.hosts, lambda c: c.run(argv, check=False, mutates=False).stdout.strip())
    ok = True
    for host in inv.hosts:
        rules = host_rules(inv, host, states[host.name])
        expected = fw.egress_allowed(rules, address, port, restrict=inv.egress.restrict)
        got = seen[host.name]
        where = f"{address}:{port}/tcp"
        if got.startswith("error"):
            ok = False
            session.reporter.error(host.name, f"egress probe to {where}: {got}")
        elif expected and got != "open":
            ok = False
            session.reporter.error(host.name, f"egress to {where} is {got} but the plan "
                                              f"allows it (is the listener up?)")
        elif not expected and got != "filtered":
            ok = False
            session.reporter.error(host.name, f"egress to {where} is {got} (the connection "
                                              f"left the host) but the plan denies it")
        else:
            session.reporter.info(host.name, f"egress to {where}: {got}, as planned")
    return ok


def _audit_applied_egress(session: Session, host: Host, st: HostState,
                          planned: list[Rule]) -> bool:
    """The applied outgoing policy and rules against the plan (what probes from outside
    cannot see)."""
    inv, r = session.inventory, session.reporter
    diff = fw.diff_host(host.name, planned, st.rules, active=st.active, defaults=st.defaults,
                        policies=fw.wanted_defaults(inv.egress.restrict))
    problems = [f"outgoing rule missing: {rule}" for rule in (*diff.add, *diff.recomment)
                if rule.direction == "out"]
    problems += [f"outgoing rule not in the plan: {rule}" for rule in diff.remove
                 if rule.direction == "out"]
    problems += [f"default outgoing is {now or 'unknown'}, the plan says {want}"
                 for direction, now, want in diff.defaults if direction == "outgoing"]
    for text in problems:
        r.error(host.name, f"egress: {text} (run `fab firewall.apply`)")
    if not problems:
        out = sum(1 for rule in diff.satisfied if rule.direction == "out")
        r.info(host.name, "egress as planned: " + (f"default deny outgoing, {out} allow rule(s)"
                                                    if inv.egress.restrict
                                                    else "not restricted"))
    return not problems


def audit(session: Session, netns: str | None, listener: str | None = None) -> bool:
    """Check reachability of every relevant port of every host (its SSH address and its
    global IPv6 addresses) against the plan from the vantage point (``netns``, or here);
    with ``listener`` (ADDR:PORT), also egress from every host to it. Report every
    difference; True when none."""
    inv = session.inventory
    target = parse_listener(listener) if listener else None
    states = session.executor.each(
        inv.hosts, lambda c: read_state(c, fw.names_to_resolve(inv, c.host)))
    rules = {h.name: host_rules(inv, h, states[h.name]) for h in inv.hosts}
    ingress = {name: [r for r in rs if r.direction == "in"] for name, rs in rules.items()}
    targets: list[tuple[str, int]] = []
    addresses: dict[str, list[str]] = {}
    for host in inv.hosts:
        st = states[host.name]
        addresses[host.name] = list(dict.fromkeys(
            [_resolve(host.address), *(str(a) for a in st.ipv6)]))
        for port in fw.audit_ports(ingress, st.rules, st.listeners):
            targets += [(a, port) for a in addresses[host.name]]
    targets = list(dict.fromkeys(targets))
    sources, results = probe_reachability(targets, netns)
    where = f"netns {netns}" if netns else "here"
    r = session.reporter
    ok = True
    for host in inv.hosts:
        st = states[host.name]
        planned_keys = {rule.key for rule in ingress[host.name]}
        for i, addr in enumerate(addresses[host.name]):
            if i == 0 and netns is None and st.ssh_client is not None:
                vantage = st.ssh_client[0]  # what the host really sees, NAT included
            else:
                src = sources.get(addr)
                if src is None:
                    r.error(host.name, f"no route from {where} to {addr}: cannot audit")
                    ok = False
                    continue
                vantage = ipaddress.ip_address(src.split("%", 1)[0])
            reachable, filtered = [], []
            for (a, port), observed in results.items():
                if a != addr:
                    continue
                expected = fw.reachable_by_plan(ingress[host.name], port, vantage)
                got = observed in ("open", "closed")
                (reachable if got else filtered).append(str(port))
                if observed.startswith("error"):
                    r.error(host.name, f"{addr} port {port}/tcp: probe error from {vantage}: "
                                       f"{observed}")
                    ok = False
                elif got and not expected:
                    ok = False
                    r.error(host.name, f"port {port}/tcp is {observed} on {addr} from "
                                       f"{vantage} ({where}) but the plan keeps it filtered: "
                                       f"{_explain(st, port, vantage, planned_keys)}")
                elif expected and not got:
                    ok = False
                    r.error(host.name, f"port {port}/tcp is filtered on {addr} from {vantage} "
                                       f"({where}) but the plan allows it (run `fab "
                                       f"firewall.status`)")
            r.info(host.name, f"audit of {addr} from {vantage} ({where}): reachable "
                              f"{', '.join(reachable) or 'none'}; filtered "
                              f"{', '.join(filtered) or 'none'}")
        if st.installed:
            ok = _audit_applied_egress(session, host, st, rules[host.name]) and ok
        if not st.active:
            r.info(host.name, "ufw is not active" if st.installed else "ufw is not installed")
        elif st.defaults is not None and not st.defaults.ipv6:
            ok = False
            r.error(host.name, "ufw's IPv6 support is off (IPV6=no in /etc/default/ufw): the "
                               "plan is not applied to IPv6 (ufw 0.36 then drops all IPv6 "
                               "but loopback); run `fab firewall.apply`")
    if target is not None:
        ok = _audit_egress(session, states, target) and ok
    return ok
