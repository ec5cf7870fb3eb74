"""The lab network: a bridge in its own namespace, the operator's uplink from the root
namespace, one namespace per host and an "outside" namespace that plays the internet.

Every namespace has an IPv4 address (10.77.N.X/24) and its IPv6 ULA twin (fd77:0:N::X/64),
so the hosts' IPv6 side is real and must be filtered like the IPv4 one. No default route
anywhere and no forwarding: traffic stays between these addresses."""
from __future__ import annotations

import subprocess

from .config import LabIdentity
from .sh import ok, run

NETNS_DIR = "/run/netns"


def netns_exists(name: str) -> bool:
    return ok(["ip", "netns", "pids", name])


def list_netns(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def _in(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def mac_for(address: str) -> str:
    # Stable MAC per address: a new random MAC after a reboot stalls peers (stale ARP).
    octets = [int(o) for o in address.split(".")]
    return "02:77:%02x:%02x:%02x:%02x" % tuple(octets)


def _last_octet(address: str) -> int:
    return int(address.rsplit(".", 1)[1])


def _add_v6(prefix: list[str], ident: LabIdentity, address: str, dev: str) -> None:
    # nodad: usable at once (duplicate detection would delay it ~1 s; addresses are unique).
    run([*prefix, "ip", "-6", "addr", "add",
         f"{ident.address6(_last_octet(address))}/64", "dev", dev, "nodad"])


def create_switch(ident: LabIdentity) -> None:
    sw = ident.switch_ns
    run(["ip", "netns", "add", sw])
    run(_in(sw, "ip", "link", "set", "lo", "up"))
    run(_in(sw, "ip", "link", "add", "br0", "type", "bridge"))
    run(_in(sw, "ip", "link", "set", "br0", "up"))
    # The root namespace is the operator's machine on the lab network.
    up = ident.uplink_if
    run(["ip", "link", "add", up, "type", "veth", "peer", "name", "up0", "netns", sw])
    run(_in(sw, "ip", "link", "set", "up0", "master", "br0", "up"))
    run(["ip", "addr", "add", f"{ident.operator_address}/24", "dev", up])
    run(["ip", "link", "set", up, "address", mac_for(ident.operator_address)])
    run(["ip", "link", "set", up, "up"])
    _add_v6([], ident, ident.operator_address, up)
    attach(ident, "outside", ident.outside_address)


def attach(ident: LabIdentity, name: str, address: str) -> str:
    """Create namespace lab-NAME with eth0 on the bridge; returns the namespace name."""
    ns = ident.netns(name)
    run(["ip", "netns", "add", ns])
    outer = f"{ident.prefix}-{name}"[:13] + "-o"
    inner = f"{ident.prefix}-{name}"[:13] + "-i"
    run(["ip", "link", "add", inner, "type", "veth", "peer", "name", outer])
    run(["ip", "link", "set", outer, "netns", ident.switch_ns])
    run(_in(ident.switch_ns, "ip", "link", "set", outer, "master", "br0", "up"))
    run(["ip", "link", "set", inner, "netns", ns])
    run(_in(ns, "ip", "link", "set", inner, "name", "eth0"))
    run(_in(ns, "ip", "link", "set", "eth0", "address", mac_for(address)))
    run(_in(ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0"))
    _add_v6(["ip", "netns", "exec", ns], ident, address, "eth0")
    run(_in(ns, "ip", "link", "set", "eth0", "up"))
    run(_in(ns, "ip", "link", "set", "lo", "up"))
    return ns


def destroy(ident: LabIdentity) -> None:
    """Remove every namespace of this lab and the operator uplink (deleting a namespace
    deletes its veth ends). Safe to call on a half-built or already removed lab."""
    for ns in list_netns(ident.prefix):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if ok(["ip", "link", "show", ident.uplink_if]):
        subprocess.run(["ip", "link", "del", ident.uplink_if], capture_output=True)
