"""Debian packages each tier installs: the one list. The lab's offline apt repository is
built from exactly these (lab/config.py imports them)."""

PROXY_PACKAGES = ("nginx", "openssl")
APP_PACKAGES = ("sqlite3", "curl")  # sqlite3: online backups (SQLite topology); curl: readiness probes
DB_PACKAGES = ("postgresql-15", "postgresql-client-15")
FIREWALL_PACKAGES = ("ufw",)
# tls.mode acme only: Debian's certbot (HTTP-01 through nginx's webroot; renewal timer).
ACME_PACKAGES = ("certbot",)

ALL_PACKAGES = tuple(dict.fromkeys(
    PROXY_PACKAGES + APP_PACKAGES + DB_PACKAGES + FIREWALL_PACKAGES + ACME_PACKAGES))
