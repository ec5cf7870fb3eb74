"""The lab network: a bridge in its own namespace, the operator's uplink from the root
namespace, one namespace per host and an "outside" namespace that plays the internet.

Every namespace has an IPv4 address (10.77.N.X/24) and its IPv6 ULA twin (fd77:0:N::X/64),
so the hosts' IPv6 side is real and must be filtered like the IPv4 one. `--bastion` labs add
a private IPv4-only network (br1, 10.78.N.X/24) that only hosts join. No default route
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


def list_links(prefix: str) -> list[str]:
    """This lab's interfaces left in the machine's own namespace (a host whose set-up
    stopped between creating its veth pair and moving the ends away)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines()
             if line.count(":") >= 2]
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


def create_private_bridge(ident: LabIdentity) -> None:
    """The private network of `--bastion` labs: a second bridge that only hosts join (the
    operator and the outside namespace have no leg on it, so no route).

    IPv4 only (10.78.N.X/24): it stands for a provider's private network, which is commonly
    IPv4 only, and it keeps a private-only host's global IPv6 addresses empty, so
    `firewall.audit` has nothing unreachable to probe on IPv6 and egress rules name no
    IPv6 peers there. Hosts on both networks (proxy, bastion) keep their fd77 twin on br0."""
    run(_in(ident.switch_ns, "ip", "link", "add", PRIVATE_BRIDGE, "type", "bridge"))
    run(_in(ident.switch_ns, "ip", "link", "set", PRIVATE_BRIDGE, "up"))
    # This machine may have a default route: without this, packets for the private network
    # would leave the lab through it instead of failing at once like "no route" should.
    run(["ip", "route", "replace", "unreachable", private_subnet(ident)])


def private_subnet(ident: LabIdentity) -> str:
    return ident.private_address(0) + "/24"


PRIVATE_BRIDGE = "br1"


#: interface of a lab host -> the suffixes of its veth pair's (bridge, host) ends
VETH_SUFFIXES = {"eth0": ("-o", "-i"), "eth1": ("-p", "-j")}


def _veth_names(ident: LabIdentity, name: str, ifname: str) -> tuple[str, str]:
    """(the bridge side, the host side) of host NAME's veth pair for its IFNAME."""
    # Interface names: 15 characters at most, so long names are cut to 13; the suffix alone
    # tells the pairs of one host apart (a cut name plus an interface digit could repeat the
    # other pair's name: lab101-proxy1 for both of proxy1's interfaces).
    stem = f"{ident.prefix}-{name}"[:13]
    outer, inner = VETH_SUFFIXES[ifname]
    return stem + outer, stem + inner


def set_link(ident: LabIdentity, name: str, up: bool) -> list[str]:
    """Cut (``up=False``) or restore host NAME's network link: the bridge side of each of
    its veth pairs goes down/up, as a dead switch port would. The host keeps running and
    its own interface keeps its address; nothing it sends arrives and nothing reaches it (no
    refusal, no ICMP: a black hole). Returns the interfaces changed."""
    changed = []
    for ifname in ("eth0", "eth1"):
        outer, _ = _veth_names(ident, name, ifname)
        if ok(_in(ident.switch_ns, "ip", "link", "show", outer)):
            run(_in(ident.switch_ns, "ip", "link", "set", outer, "up" if up else "down"))
            changed.append(outer)
    if not changed:
        raise ValueError(f"lab host {name!r} has no link on the lab's switch")
    return changed


def attach(ident: LabIdentity, name: str, address: str, *, bridge: str = "br0",
           ifname: str = "eth0") -> str:
    """Put interface IFNAME of namespace lab-NAME (created when missing) on BRIDGE; returns
    the namespace name."""
    ns = ident.netns(name)
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    outer, inner = _veth_names(ident, name, ifname)
    run(["ip", "link", "add", inner, "type", "veth", "peer", "name", outer])
    run(["ip", "link", "set", outer, "netns", ident.switch_ns])
    run(_in(ident.switch_ns, "ip", "link", "set", outer, "master", bridge, "up"))
    run(["ip", "link", "set", inner, "netns", ns])
    run(_in(ns, "ip", "link", "set", inner, "name", ifname))
    run(_in(ns, "ip", "link", "set", ifname, "address", mac_for(address)))
    run(_in(ns, "ip", "addr", "add", f"{address}/24", "dev", ifname))
    if bridge == "br0":
        # The private network (--bastion) is IPv4 only: see create_private_bridge.
        _add_v6(["ip", "netns", "exec", ns], ident, address, ifname)
    run(_in(ns, "ip", "link", "set", ifname, "up"))
    run(_in(ns, "ip", "link", "set", "lo", "up"))
    return ns


def destroy(ident: LabIdentity) -> None:
    """Remove every namespace of this lab and the operator uplink (deleting a namespace
    deletes its veth ends). Safe to call on a half-built or already removed lab."""
    for ns in list_netns(ident.prefix):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for link in list_links(ident.prefix):  # deleting one end of a veth pair deletes both
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    if ok(["ip", "link", "show", ident.uplink_if]):
        subprocess.run(["ip", "link", "del", ident.uplink_if], capture_output=True)
    subprocess.run(["ip", "route", "del", "unreachable", private_subnet(ident)],
                   capture_output=True)
