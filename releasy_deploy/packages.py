"""Debian packages each tier installs: the one list. The lab's offline apt repository is
built from exactly these (lab/config.py imports REPO_PACKAGES).

PostgreSQL's packages carry the major in their names (postgresql-15 on Debian 12,
postgresql-17 on Debian 13): the db tier picks the major per host (see
``releasy_deploy.hostos``) and installs ``db_packages(major)``."""
import re

PROXY_PACKAGES = ("nginx", "openssl")
APP_PACKAGES = ("sqlite3", "curl")  # sqlite3: online backups (SQLite topology); curl: readiness probes
FIREWALL_PACKAGES = ("ufw",)
# tls.mode acme only: Debian's certbot (HTTP-01 through nginx's webroot; renewal timer).
ACME_PACKAGES = ("certbot",)

# Debian's metapackages: their dependency names the release's default major. Hosts are read
# for it; the lab's repository holds them so each suite's default major is in it.
PG_METAPACKAGES = ("postgresql", "postgresql-client")

_MAJOR = re.compile(r"[1-9][0-9]?")


def db_packages(major: str) -> tuple[str, str]:
    """The server and client packages of one PostgreSQL major, e.g. postgresql-17."""
    if not _MAJOR.fullmatch(major):
        raise ValueError(f"invalid PostgreSQL major {major!r}")
    return (f"postgresql-{major}", f"postgresql-client-{major}")


REPO_PACKAGES = tuple(dict.fromkeys(
    PROXY_PACKAGES + APP_PACKAGES + PG_METAPACKAGES + FIREWALL_PACKAGES + ACME_PACKAGES))
