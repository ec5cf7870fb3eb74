"""``tls.mode: acme`` on a proxy host: certbot, its deploy hook, renewal, the certificate.

Runs after nginx's configuration is live (its port-80 server answers HTTP-01 challenges
from `commands.acme.WEBROOT`; until the first certificate arrives nginx serves a bootstrap
self-signed one). One facts round trip decides; a certificate is requested only when the
one nginx serves is not a CA-issued one for ``tls.server_name`` with more than
`commands.acme.RENEW_DAYS` days left, so a second run requests nothing.
"""
from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass

from ..commands import acme as cmd
from ..errors import DeployError
from ..executor import HostConnection, tail
from ..facts import Fact, FileSha256, FileStat, PackageVersion, ServiceEnabled, read_facts
from ..inventory import Inventory
from ..packages import ACME_PACKAGES
from ..remote import ensure_dir, ensure_packages, put_file

__all__ = ["converge", "certificate", "CERTBOT_TIMEOUT", "CertInfo"]

CERTBOT_TIMEOUT = 300  # the CA validates over the network: bounded, generously


@dataclass(frozen=True)
class CertInfo(Fact):
    """Issuer, names and expiry of the certificate file at ``path`` (`cmd.AcmeCert`), or
    None when there is none. `fab status` reads it for the certificate nginx serves."""

    path: str

    def shell(self) -> str:
        return cmd.cert_probe_shell(self.path)

    def parse(self, out: str, code: int) -> cmd.AcmeCert | None:
        return cmd.parse_cert_probe(out, code)


def certificate(c: HostConnection, cert_path: str) -> cmd.AcmeCert | None:
    """The certificate nginx serves (read-only)."""
    return read_facts(c, [CertInfo(cert_path)], sudo=True)[CertInfo(cert_path)]


def converge(c: HostConnection, inv: Inventory, cert_path: str, key_path: str) -> None:
    acme = inv.tls.acme
    assert acme is not None
    name = inv.tls.server_name
    served_fact, lineage_fact = CertInfo(cert_path), CertInfo(f"{cmd.LINEAGE}/fullchain.pem")
    names = [*(PackageVersion(p) for p in ACME_PACKAGES), served_fact, lineage_fact,
             FileSha256(cmd.HOOK), FileSha256(cmd.CA_BUNDLE), FileSha256(cmd.DROPIN),
             ServiceEnabled("certbot.timer"), FileStat(cmd.WEBROOT)]
    got = read_facts(c, names, sudo=True)
    hook = cmd.hook_script(cert_path, key_path).encode()
    ca = acme.ca_bundle.read_bytes() if acme.ca_bundle is not None else None
    want = {cmd.HOOK: hook, cmd.CA_BUNDLE: ca, cmd.DROPIN: cmd.dropin_text().encode()
            if ca is not None else None}
    files_ok = all((got[FileSha256(p)] == hashlib.sha256(d).hexdigest()) if d else
                   got[FileSha256(p)] is None for p, d in want.items())
    packages_ok = all(got[PackageVersion(p)] for p in ACME_PACKAGES)
    timer_ok = got[ServiceEnabled("certbot.timer")] == "enabled"
    if not (files_ok and packages_ok and timer_ok and got[FileStat(cmd.WEBROOT)]):
        # These helpers report what they changed (or would) themselves.
        ensure_packages(c, ACME_PACKAGES)
        ensure_dir(c, cmd.WEBROOT, mode=0o755)
        ensure_dir(c, cmd.CONF_DIR, mode=0o755)
        put_file(c, cmd.HOOK, hook, mode=0o755)
        reload_units = False
        if ca is not None:
            put_file(c, cmd.CA_BUNDLE, ca, mode=0o644)
            ensure_dir(c, cmd.DROPIN.rsplit("/", 1)[0], mode=0o755)
            reload_units = put_file(c, cmd.DROPIN, want[cmd.DROPIN]).changed
        elif got[FileSha256(cmd.DROPIN)] is not None:
            c.run(["rm", "-f", "--", cmd.DROPIN, cmd.CA_BUNDLE], sudo=True)
            c.reporter.changed(c.name, f"{cmd.DROPIN} removed (no tls.acme.ca_bundle)")
            reload_units = True
        if reload_units and not c.dry_run:
            c.run(["systemctl", "daemon-reload"], sudo=True)
        if not timer_ok:
            c.run(["systemctl", "enable", "--now", "certbot.timer"], sudo=True)
            c.reporter.changed(c.name, "certbot.timer enabled (renewal twice a day)")
    else:
        c.reporter.unchanged(c.name, f"certbot, deploy hook, renewal timer ({cmd.HOOK})")

    served: cmd.AcmeCert | None = got[served_fact]
    if served is not None and served.good(name):
        days = served.days_left()
        c.reporter.unchanged(c.name, f"certificate for {name} from {served.issuer}"
                                     f" ({days:.0f} days left)")
        return
    lineage: cmd.AcmeCert | None = got[lineage_fact]
    if lineage is not None and lineage.good(name):
        # certbot has a good one that nginx does not serve yet (an interrupted run).
        what = f"certificate for {name} installed from {cmd.LINEAGE} (no new request)"
        if c.dry_run:
            c.reporter.would(c.name, what)
            return
        c.run(cmd.run_hook_argv(), sudo=True, timeout=120)
        c.reporter.changed(c.name, what)
        return
    why = ("a bootstrap self-signed one" if served is None or served.self_signed else
           f"not for {name}" if not served.covers(name) else "expiring soon")
    what = f"certificate for {name} requested from {acme.directory_url} (serving {why})"
    if c.dry_run:
        c.reporter.would(c.name, what)
        return
    argv = cmd.certonly_argv(name, acme.email, acme.directory_url, ca_bundle=ca is not None)
    res = c.run(argv, sudo=True, check=False, timeout=CERTBOT_TIMEOUT)
    if res.exit_code != 0:
        said = tail(c.mask(res.stderr.strip() or res.stdout.strip()), 12)
        raise DeployError(
            f"{c.name}: the ACME CA did not issue a certificate for {name}"
            f" ({acme.directory_url}); nginx keeps serving the current one.\n"
            f"  certbot said:\n" + "\n".join(f"    {ln}" for ln in said.splitlines()) +
            f"\n  Check that {name} resolves to this proxy for the CA, that port 80 is"
            f" reachable from it, and /var/log/letsencrypt/letsencrypt.log on {c.name}.",
            host=c.name)
    new = certificate(c, cert_path)
    if new is None or new.self_signed or not new.covers(name):
        raise DeployError(f"{c.name}: certbot succeeded but {cert_path} is not the new"
                          f" certificate; check {shlex.quote(cmd.HOOK)} on the host",
                          host=c.name)
    c.reporter.changed(c.name, f"{what}: issued by {new.issuer}, nginx reloaded")
