"""ACME (``tls.mode: acme``): what runs on a proxy host, built as pure values.

Debian's certbot obtains the certificate with HTTP-01: the CA fetches
``http://NAME/.well-known/acme-challenge/TOKEN``, which nginx's port-80 server answers from
`WEBROOT`. certbot keeps its lineage under ``/etc/letsencrypt`` (cert name `CERT_NAME`);
our deploy hook copies each new certificate and key to where nginx reads them and reloads
nginx (graceful: old workers finish their requests). Renewal is Debian's own
``certbot.timer``, which re-uses the same settings and hook.
"""
from __future__ import annotations

import datetime as _dt
import re
import shlex
from dataclasses import dataclass

__all__ = [
    "WEBROOT", "CERT_NAME", "CONF_DIR", "HOOK", "CA_BUNDLE", "DROPIN", "LINEAGE",
    "RENEW_DAYS", "UNHEALTHY_DAYS", "hook_script", "dropin_text", "certonly_argv",
    "run_hook_argv", "cert_probe_shell", "parse_cert_probe", "AcmeCert",
]

WEBROOT = "/var/lib/releasy/acme"
CERT_NAME = "releasy"
CONF_DIR = "/etc/releasy/acme"
HOOK = f"{CONF_DIR}/deploy-hook"
CA_BUNDLE = f"{CONF_DIR}/ca.pem"
DROPIN = "/etc/systemd/system/certbot.service.d/releasy.conf"
LINEAGE = f"/etc/letsencrypt/live/{CERT_NAME}"
RENEW_DAYS = 30  # ask for a new certificate when fewer days are left (certbot's default)
UNHEALTHY_DAYS = 14  # `fab status` flags the certificate below this


def hook_script(cert: str, key: str) -> str:
    """certbot's deploy hook: install the new pair where nginx reads it, then reload."""
    c, k = shlex.quote(cert), shlex.quote(key)
    return f"""#!/bin/sh
# Managed by releasy-deploy: certbot runs this after each new certificate (first issue and
# every renewal). Copies it where nginx reads it and reloads nginx (no request dropped).
set -eu
src="${{RENEWED_LINEAGE:?certbot sets RENEWED_LINEAGE}}"
install -m 0600 -o root -g root "$src/privkey.pem" {k}.new
install -m 0644 -o root -g root "$src/fullchain.pem" {c}.new
mv -f {k}.new {k}
mv -f {c}.new {c}
nginx -t -q
systemctl reload nginx
"""


def dropin_text() -> str:
    """certbot.service drop-in: trust the inventory's CA bundle for the ACME server."""
    return ("# Managed by releasy-deploy: the ACME server's HTTPS certificate chains to the\n"
            "# CA bundle of tls.acme.ca_bundle (certbot uses Python requests).\n"
            f"[Service]\nEnvironment=REQUESTS_CA_BUNDLE={CA_BUNDLE}\n")


def certonly_argv(server_name: str, email: str, directory_url: str, *,
                  ca_bundle: bool) -> list[str]:
    """Obtain (or replace) the certificate for ``server_name`` via the webroot."""
    argv = ["certbot", "certonly", "--non-interactive", "--agree-tos", "--no-eff-email",
            "--email", email, "--server", directory_url, "--webroot", "-w", WEBROOT,
            "-d", server_name, "--cert-name", CERT_NAME, "--deploy-hook", HOOK,
            "--force-renewal"]
    return (["env", f"REQUESTS_CA_BUNDLE={CA_BUNDLE}", *argv] if ca_bundle else argv)


def run_hook_argv() -> list[str]:
    """Install the lineage certbot already has (when our copy is not it)."""
    return ["env", f"RENEWED_LINEAGE={LINEAGE}", HOOK]


@dataclass(frozen=True)
class AcmeCert:
    issuer: str
    self_signed: bool  # the bootstrap certificate nginx starts with
    dns_names: tuple[str, ...]
    not_after: _dt.datetime | None

    def days_left(self, now: _dt.datetime | None = None) -> float | None:
        if self.not_after is None:
            return None
        now = now or _dt.datetime.now(_dt.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400

    def covers(self, name: str) -> bool:
        return name.lower() in (n.lower() for n in self.dns_names)

    def good(self, name: str, now: _dt.datetime | None = None) -> bool:
        """Issued by a CA (not our bootstrap), for ``name``, with time to spare."""
        days = self.days_left(now)
        return (not self.self_signed and self.covers(name) and days is not None
                and days > RENEW_DAYS)


def cert_probe_shell(path: str) -> str:
    """Issuer, subject, expiry and names of the certificate at ``path`` (exit 3: none)."""
    q = shlex.quote(path)
    return (f"[ -f {q} ] || exit 3; openssl x509 -noout -nameopt RFC2253 -issuer -subject"
            f" -enddate -ext subjectAltName -in {q}")


def parse_cert_probe(out: str, code: int) -> AcmeCert | None:
    if code == 3:
        return None
    fields = dict(re.findall(r"^(issuer|subject|notAfter)=[ \t]*(.*)$", out, re.MULTILINE))
    issuer = fields.get("issuer", "").strip()
    not_after = None
    try:
        not_after = _dt.datetime.strptime(fields.get("notAfter", "").strip(),
                                          "%b %d %H:%M:%S %Y GMT").replace(
            tzinfo=_dt.timezone.utc)
    except ValueError:
        pass
    return AcmeCert(issuer=issuer, self_signed=bool(issuer) and
                    issuer == fields.get("subject", "").strip(),
                    dns_names=tuple(re.findall(r"DNS:([^,\s]+)", out)), not_after=not_after)
