"""Probing the network, from both ends (pure): what a host reports about it (the address
and port it sees for our SSH connection, its listening TCP sockets, its DNS resolvers, what
a name resolves to there, its global IPv6 addresses), the shells that read each and their
parsers; and whether a TCP connection gets through, from a vantage point to the hosts (a
local program, run here or in a network namespace) or from a host to a listener.
"""
from __future__ import annotations

import ipaddress
import json
import re
import shlex
import sys

from .shell_read import print_text
from .ufw import Address

__all__ = [
    "SSH_CLIENT_PROBE", "LISTENERS_PROBE", "RESOLVERS_PROBE", "IPV6_PROBE", "resolve_shell",
    "ip_literal", "parse_ssh_connection", "parse_listeners", "parse_resolvers",
    "parse_getent_hosts", "parse_ipv6_addresses", "PROBE_TIMEOUT", "PROBE_PROGRAM",
    "probe_argv", "LISTENER_PROBE", "listener_probe_script",
]

PROBE_TIMEOUT = 1.5

# --------------------------------------------------------------------------- what a host reports

# Who are we, as the host sees us? sudo resets the environment, so when $SSH_CONNECTION is
# not ours directly, read it from the nearest ancestor that has it (sudo itself, or the
# login shell): /proc/PID/environ is readable as root.
SSH_CLIENT_PROBE = r"""if [ -n "${SSH_CONNECTION:-}" ]; then printf '%s\n' "$SSH_CONNECTION"; exit 0; fi
pid=$$
while [ "${pid:-0}" -gt 1 ]; do
  conn=$(tr '\0' '\n' < "/proc/$pid/environ" | sed -n 's/^SSH_CONNECTION=//p' | head -n 1)
  if [ -n "$conn" ]; then printf '%s\n' "$conn"; exit 0; fi
  pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status")
done
exit 1"""
LISTENERS_PROBE = "ss -ltnH"
# resolv.conf, then systemd-resolved's upstreams (for when resolv.conf points at its stub).
RESOLVERS_PROBE = (f"{print_text('/etc/resolv.conf')}; echo; echo @resolved;"
                   f" {print_text('/run/systemd/resolve/resolv.conf')}")
# The kernel's own list (no `ip` process); absent when IPv6 is off.
IPV6_PROBE = print_text("/proc/net/if_inet6")


def resolve_shell(name: str) -> str:
    """The addresses ``name`` resolves to on the host (`parse_getent_hosts`)."""
    return f"getent ahosts -- {shlex.quote(name)}"


def ip_literal(name: str) -> Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def parse_ssh_connection(value: str) -> tuple[Address, int] | None:
    """``$SSH_CONNECTION`` ("client_ip client_port server_ip server_port") ->
    (client address as the host sees it, server port); None if malformed."""
    parts = value.split()
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    try:
        addr = ipaddress.ip_address(parts[0].split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, int(parts[3])


def parse_listeners(text: str) -> list[tuple[str, int]]:
    """``ss -ltnH`` -> [(local address, port)]; the address without brackets or %iface."""
    out = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        local = cols[3]
        addr, sep, port = local.rpartition(":")
        if not sep or not port.isdigit():
            continue
        addr = addr.strip("[]").split("%", 1)[0]
        out.append((addr, int(port)))
    return out

def parse_resolvers(text: str) -> tuple[Address, ...]:
    """The resolvers a host uses: ``nameserver`` lines of /etc/resolv.conf, then, after a
    line ``@resolved``, those of systemd-resolved's upstream file. A loopback resolver
    (resolved's stub, a local cache) is reached over loopback, always allowed; when it is
    there, the upstream file names where that stub forwards to."""
    main, _, upstream = text.partition("\n@resolved\n")

    def servers(part: str) -> list[Address]:
        found = []
        for line in part.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                ip = ip_literal(words[1].split("%", 1)[0])
                if ip is not None:
                    found.append(ip)
        return found

    mine = servers(main)
    if any(ip.is_loopback for ip in mine):
        mine += servers(upstream)
    return tuple(dict.fromkeys(ip for ip in mine if not ip.is_loopback))


def parse_getent_hosts(text: str) -> tuple[Address, ...]:
    """``getent ahosts NAME`` -> its unique addresses, in order."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if words:
            ip = ip_literal(words[0])
            if ip is not None:
                found.append(ip)
    return tuple(dict.fromkeys(found))


def parse_ipv6_addresses(text: str) -> tuple[ipaddress.IPv6Address, ...]:
    """/proc/net/if_inet6 -> the host's global IPv6 addresses (what ``ip -6 addr show scope
    global`` lists). Each line: the address as 32 hex digits, the interface index, the prefix
    length, the scope (00: global), flags, the interface name."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 6 and words[3] == "00" and re.fullmatch(r"[0-9a-fA-F]{32}", words[0]):
            found.append(ipaddress.IPv6Address(int(words[0], 16)))
    return tuple(dict.fromkeys(found))


# --------------------------------------------------------------------------- does it get through

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
