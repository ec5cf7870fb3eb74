"""ACME (tls.mode: acme) without a CA: the certificate probe on real openssl output, the
deploy hook certbot runs, and the certbot command line."""
from __future__ import annotations

import datetime as dt
import subprocess

from releasy_deploy.commands import acme as cmd


def probe(path) -> cmd.AcmeCert | None:
    proc = subprocess.run(["sh", "-c", cmd.cert_probe_shell(str(path))], capture_output=True,
                          text=True)
    return cmd.parse_cert_probe(proc.stdout, proc.returncode)


def make_cert(tmp_path, days: int, name: str = "releasy.example.test"):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", str(days), "-subj",
                    f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")],
                   check=True, capture_output=True)
    return tmp_path / "c.pem"


def test_probe_reads_a_real_certificate(tmp_path):
    got = probe(make_cert(tmp_path, 90))
    assert got.issuer == "CN=releasy.example.test" and got.self_signed
    assert got.dns_names == ("releasy.example.test",) and got.covers("RELEASY.example.test")
    assert 89.9 < got.days_left() <= 90
    # Self-signed is our bootstrap: never "good", however long it lasts.
    assert not got.good("releasy.example.test")
    assert probe(tmp_path / "missing.pem") is None


def test_good_means_ca_issued_for_the_name_with_more_than_30_days():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    issued = cmd.AcmeCert("CN=Pebble Intermediate CA 1", False, ("a.example",),
                          now + dt.timedelta(days=31))
    assert issued.good("a.example", now)
    assert not issued.good("b.example", now)
    assert not issued.good("a.example", now + dt.timedelta(days=2))  # 29 days left
    unreadable = cmd.parse_cert_probe("not a certificate", 1)
    assert unreadable.days_left() is None and not unreadable.good("a.example")


def test_hook_is_valid_sh_and_installs_key_before_certificate():
    script = cmd.hook_script("/etc/nginx/releasy/tls/acme.crt", "/etc/nginx/releasy/tls/acme.key")
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    lines = script.splitlines()
    key_mv = lines.index("mv -f /etc/nginx/releasy/tls/acme.key.new /etc/nginx/releasy/tls/acme.key")
    crt_mv = lines.index("mv -f /etc/nginx/releasy/tls/acme.crt.new /etc/nginx/releasy/tls/acme.crt")
    assert key_mv < crt_mv < lines.index("systemctl reload nginx")
    assert "restart" not in script  # a reload: old workers finish their requests


def test_certonly_argv():
    argv = cmd.certonly_argv("releasy.example.test", "ops@example.com",
                             "https://ca.internal/dir", ca_bundle=True)
    assert argv[:2] == ["env", "REQUESTS_CA_BUNDLE=/etc/releasy/acme/ca.pem"]
    joined = " ".join(argv)
    for part in ("certonly --non-interactive --agree-tos", "--server https://ca.internal/dir",
                 "--webroot -w /var/lib/releasy/acme", "-d releasy.example.test",
                 "--cert-name releasy", "--deploy-hook /etc/releasy/acme/deploy-hook"):
        assert part in joined
    assert cmd.certonly_argv("a.example", "o@example.com", "https://x/dir",
                             ca_bundle=False)[0] == "certbot"
