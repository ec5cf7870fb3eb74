"""Local developer tasks (`inv --list`): the multi-host lab and the Releasy stand-in.

Operator tasks that act on servers live in fabfile/ (`fab --list`)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from invoke import Collection, Exit, task

from lab import lab as lab_ops
from lab.config import current_identity


def _require_root() -> None:
    if os.geteuid() != 0:
        raise Exit("the lab needs root (network namespaces, overlay mounts, systemd-nspawn)", 2)


@task(help={"topology": "split (proxy1, app1..appN, db1) or single (one host: solo)",
            "apps": "number of app hosts in the split topology (default 2)",
            "database": "single topology only: postgres (default) or sqlite",
            "suite": "Debian suite of the hosts: bookworm (12, default) or trixie (13)",
            "db_suite": "split topology: another suite for the db host (a mixed fleet)",
            "bastion": "app and db hosts on a private network, reached through a `bastion`"
                       " jump host (the proxy keeps a public side)",
            "acme": "certificates from an ACME CA: pebble in the outside namespace",
            "proxies": "number of proxy hosts in the split topology (default 1)"})
def up(c, topology="split", apps=2, database="postgres", suite="bookworm", db_suite="",
       bastion=False, acme=False, proxies=1):
    """Bring up the lab (no-op when that lab is already up); prints the inventory path."""
    _require_root()
    path = lab_ops.up(lab_ops.LabRequest(topology, int(apps), database, suite, db_suite,
                                         bastion=bastion, acme=acme, proxies=int(proxies)))
    print(path)


@task
def down(c):
    """Stop every lab host; remove its namespaces, mounts, cgroups and processes."""
    _require_root()
    lab_ops.down()


@task
def status(c):
    """List the lab's hosts, addresses, login user and systemd state."""
    rows = lab_ops.status()
    if not rows:
        print("lab: not up")
        return
    print(f"{'HOST':<10} {'ADDRESS':<14} {'TIERS':<14} {'USER':<8} {'SUITE':<9} STATE")
    for r in rows:
        print(f"{r['host']:<10} {r['address']:<14} {r['tiers']:<14} {r['user']:<8} "
              f"{r['suite']:<9} {r['state']}")
    print(f"inventory: {current_identity().state_dir / 'hosts.yaml'}")


@task(help={"host": "lab host name (or address)", "port": "TCP port",
            "source": "outside (default), operator, or a lab host name"})
def probe(c, host, port, source="outside"):
    """Print open / closed / filtered for HOST:PORT as seen from the outside namespace."""
    _require_root()
    print(lab_ops.probe(host, int(port), source))


@task(help={"host": "lab host name", "seconds": "restore the link after this long (default 60)"})
def cut(c, host, seconds=60):
    """Black-hole a lab host (its switch port goes down) for SECONDS, then restore it."""
    _require_root()
    with lab_ops.link_cut(host, max_seconds=float(seconds)):
        print(f"{host}: link cut for {seconds} s (Ctrl-C restores it now)")
        try:
            time.sleep(float(seconds))
        except KeyboardInterrupt:
            pass
    print(f"{host}: link restored")


@task(help={"port": "TCP port", "seconds": "stop after this long (default 600)"})
def listen(c, port, seconds=600):
    """A TCP listener in the outside namespace (for `fab firewall.audit --listener`)."""
    _require_root()
    proc = lab_ops.start_listener(int(port), lifetime=float(seconds))
    print(f"listening on {lab_ops.current_identity().outside_address}:{port} for {seconds} s "
          f"(Ctrl-C stops it)")
    try:
        proc.wait()
    except KeyboardInterrupt:
        lab_ops.stop_listener(proc)


@task(help={"version": "release version, e.g. 1.2.3",
            "migrations": "number of embedded migrations (default 2)",
            "broken_migration": "make the last migration fail",
            "never_ready": "bind but answer 503 on /ready forever",
            "migration_seconds": "sleep this long in each migration it applies",
            "out": "output directory (default: the lab's releases directory)"})
def build(c, version, migrations=2, broken_migration=False, never_ready=False,
          migration_seconds=0.0, out=None):
    """Write a stand-in releasy-server-V-linux-x86_64.tar.gz (+ .sha256) like upstream's."""
    from lab.standin.build import build_release
    out_dir = Path(out) if out else current_identity().state_dir / "releases"
    path = build_release(version, out_dir, migrations=int(migrations),
                         broken_migration=broken_migration, never_ready=never_ready,
                         migration_seconds=float(migration_seconds))
    print(path)


lab_ns = Collection("lab", up, down, status, probe, listen, cut)
standin_ns = Collection("standin", build)
ns = Collection(lab_ns, standin_ns)
