"""The lab's ACME CA (`inv lab.up --acme`): Debian's `pebble` (an RFC 8555 test CA) and
`pebble-challtestsrv` as its DNS server, both in the outside namespace (the internet).

pebble validates HTTP-01 by resolving the certificate's name through challtestsrv, which
answers every A query with the proxy's public address, then fetching port 80 there: the
real path a public CA takes. pebble's own HTTPS certificate comes from a small lab CA made
here (`acme-ca.pem` beside the lab inventory: the inventory's `tls.acme.ca_bundle`).
Both processes run in the lab's cgroup, so `lab.down` ends them with the hosts."""
from __future__ import annotations

import json
import os
import shlex
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from . import machine
from .config import LabIdentity
from .sh import log, run

ACME_PORT = 14000
MANAGEMENT_PORT = 15000
DNS_PORT = 8053
EMAIL = "ops@releasy.lab.test"
START_TIMEOUT = 20.0


def directory_url(ident: LabIdentity) -> str:
    return f"https://{ident.outside_address}:{ACME_PORT}/dir"


def ca_bundle(ident: LabIdentity) -> Path:
    return ident.state_dir / "acme-ca.pem"


def _make_certs(ident: LabIdentity, d: Path) -> None:
    """A lab CA (acme-ca.pem beside the inventory) and pebble's HTTPS certificate."""
    if (d / "pebble.pem").exists() and ca_bundle(ident).exists():
        return
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-days", "3650", "-subj",
         "/CN=releasy lab ACME server CA", "-keyout", str(d / "ca.key"),
         "-out", str(ca_bundle(ident))], quiet=True)
    run(["openssl", "req", *ec, "-subj", "/CN=pebble", "-keyout", str(d / "pebble.key"),
         "-out", str(d / "pebble.csr")], quiet=True)
    ext = d / "pebble.ext"
    ext.write_text(f"subjectAltName=IP:{ident.outside_address},DNS:pebble\n"
                   "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "x509", "-req", "-in", str(d / "pebble.csr"), "-CA", str(ca_bundle(ident)),
         "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "3650", "-extfile", str(ext),
         "-out", str(d / "pebble.pem")], quiet=True)


def _spawn(ident: LabIdentity, name: str, argv: list[str], env: dict[str, str],
           logfile: Path) -> int:
    """Start ARGV in the outside namespace, inside the lab's cgroup (lab.down ends it)."""
    cgroups = machine.cgroup_dirs(ident, name)
    for d in cgroups:
        d.mkdir(parents=True, exist_ok=True)
    join = " ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))};" for d in cgroups)
    full = ["ip", "netns", "exec", ident.outside_ns, *argv]
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(["sh", "-c", f"{join} exec {shlex.join(full)}"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, start_new_session=True,
                                close_fds=True)
    return proc.pid


def _wait_port(address: str, port: int, pid: int, what: str, logfile: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not machine.pid_alive(pid):
            break
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    tail = logfile.read_text(errors="replace")[-800:] if logfile.exists() else ""
    raise SystemExit(f"lab: {what} did not start listening on {address}:{port}\n{tail}")


def start(ident: LabIdentity, proxy_address: str) -> dict[str, int]:
    """Start pebble and its DNS server; returns {name: pid}."""
    d = ident.run_dir / "acme"
    d.mkdir(parents=True, exist_ok=True)
    _make_certs(ident, d)
    at = ident.outside_address
    config = d / "pebble-config.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"{at}:{ACME_PORT}", "managementListenAddress": f"{at}:{MANAGEMENT_PORT}",
        "certificate": str(d / "pebble.pem"), "privateKey": str(d / "pebble.key"),
        # Where pebble's validator connects for HTTP-01 / TLS-ALPN-01: the real ports.
        "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}, indent=2))
    dns_log, pebble_log = d / "challtestsrv.log", d / "pebble.log"
    dns = _spawn(ident, "acme-dns", [
        "pebble-challtestsrv", "-defaultIPv4", proxy_address, "-defaultIPv6", "",
        "-dns01", f"{at}:{DNS_PORT}", "-http01", "", "-https01", "", "-tlsalpn01", "",
        "-management", f"{at}:8055"], {}, dns_log)
    # NOSLEEP: no random validation delays; NONCEREJECT=0: no random bad-nonce rejections.
    pebble = _spawn(ident, "acme-ca", ["pebble", "-config", str(config), "-dnsserver",
                                       f"{at}:{DNS_PORT}"],
                    {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}, pebble_log)
    _wait_port(at, 8055, dns, "pebble-challtestsrv", dns_log)
    _wait_port(at, ACME_PORT, pebble, "pebble", pebble_log)
    log(f"lab: ACME CA (pebble) at {directory_url(ident)}, names resolve to {proxy_address}")
    return {"acme-dns": dns, "acme-ca": pebble}


def issuing_roots(ident: LabIdentity) -> str:
    """PEM of the root pebble issues certificates under (it makes a new one at each start)."""
    ctx = ssl.create_default_context(cafile=str(ca_bundle(ident)))
    url = f"https://{ident.outside_address}:{MANAGEMENT_PORT}/roots/0"
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        return resp.read().decode()
