"""PostgreSQL for Releasy as data: the config files we manage (``pg_hba.conf``, our
drop-in), the app's database URL and secret files, readiness probes and the decisions
taken from what the probes saw. Pure functions only; `releasy_deploy.tiers.db` runs them.

Its siblings hold the rest, and every name stays importable from here: `pg_cluster`
(the cluster's paths, managed files' state, the host's major) and `pg_sql` (quoting, SCRAM,
SQL, psql and the server-state query).
"""
from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Mapping, Sequence
from urllib.parse import quote

from ..inventory import POSTGRES_PORT, Inventory
from ..templates import render_template
# Re-exported: the callers know one module, `commands.postgres`.
from .pg_cluster import (CLUSTER, DEFER_FILE, DROPIN_REL, HBA_REL, MANAGED_RELS, PG_HOST_SHELL,
                         SOCKET_DIR, FileState, Layout, PgHost, PgMajorRefused,
                         create_cluster_argv, file_state_shell, parse_file_state, parse_pg_host,
                         remove_defer_argv, seed_dropin_argv, select_major)
from .pg_sql import (MANAGED_SETTINGS, POSTMASTER_SETTINGS, RELOADABLE_SETTINGS,
                     ROLE_ATTRIBUTES, SCRAM_ITERATIONS, SCRAM_SALT_BYTES, RoleState,
                     ServerState, alter_database_owner_sql, alter_role_sql, check_names,
                     create_database_sql, create_role_sql, parse_server_state, pg_client_shell,
                     pool_shortfall, psql_argv, quote_conf, quote_hba_name, quote_ident,
                     quote_literal, role_attribute_drift, role_clause, saslprep, scram_matches,
                     scram_verifier, server_state_shell, server_state_sql)

SECRETS_DIR = "/etc/releasy"
PASSWORD_FILE = f"{SECRETS_DIR}/database-password"
SQLITE_PATH = "/var/lib/releasy/releasy.db"
SQLITE_URL = f"sqlite://{SQLITE_PATH}"

HBA_TEMPLATE = "postgresql/pg_hba.conf.j2"
DROPIN_TEMPLATE = "postgresql/releasy.conf.j2"

# What Debian's freshly created cluster runs with (dry-run predicts from these).
DEBIAN_DEFAULTS: Mapping[str, str] = {
    "listen_addresses": "localhost", "port": str(POSTGRES_PORT),
    "password_encryption": "scram-sha-256",
}


# --------------------------------------------------------------------------- config files


def _network(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{ip}/{ip.max_prefixlen}"


def listen_addresses(inv: Inventory) -> str:
    """Loopback, plus the db host's private address when other hosts must reach it."""
    if inv.is_single_host:
        return "localhost"
    return f"localhost,{ipaddress.ip_address(inv.db_host.private_address)}"


def desired_settings(inv: Inventory) -> dict[str, str]:
    """The managed settings as pg_settings reports them once applied."""
    return {"listen_addresses": listen_addresses(inv), "port": str(POSTGRES_PORT),
            "password_encryption": "scram-sha-256"}


@dataclass(frozen=True)
class HbaRule:
    database: str  # already quoted for pg_hba
    user: str
    address: str  # CIDR, one host
    comment: str


def hba_rules(inv: Inventory) -> list[HbaRule]:
    """One ``host`` line per client address: loopback, plus the app hosts in split.

    Loopback is always admitted: on a single host it is Releasy itself; in split it is the
    deploy lock's session, which arrives through an SSH tunnel ending on the db host (so
    5432 never has to be reachable from the operator's machine)."""
    db, user = quote_hba_name(inv.database.name), quote_hba_name(inv.database.user)
    who = "Releasy on this host" if inv.is_single_host else "deploy lock via SSH tunnel"
    loopback = [HbaRule(db, user, "127.0.0.1/32", f"{who} (IPv4 loopback)"),
                HbaRule(db, user, "::1/128", f"{who} (IPv6 loopback)")]
    if inv.is_single_host:
        return loopback
    # The inventory guarantees every host its own private address: one line per app host.
    return loopback + [HbaRule(db, user, _network(h.private_address), f"app host {h.name}")
                       for h in inv.hosts_in("app")]


def render_pg_hba(inv: Inventory) -> str:
    return render_template(HBA_TEMPLATE, {
        "environment": inv.environment, "topology": inv.topology, "rules": hba_rules(inv)})


def render_dropin(inv: Inventory) -> str:
    wanted = desired_settings(inv)
    return render_template(DROPIN_TEMPLATE, {
        "listen_addresses": quote_conf(wanted["listen_addresses"]),
        "port": int(wanted["port"]),
        "password_encryption": quote_conf(wanted["password_encryption"]),
    })


@dataclass(frozen=True)
class ManagedFile:
    path: str
    content: bytes
    owner: str
    group: str
    mode: int


def config_files(inv: Inventory, layout: Layout) -> list[ManagedFile]:
    """The files this tool owns, with the owner/mode Debian gives their neighbours."""
    return [
        ManagedFile(layout.dropin_path, render_dropin(inv).encode(), "postgres", "postgres",
                    0o644),
        ManagedFile(layout.hba_path, render_pg_hba(inv).encode(), "postgres", "postgres",
                    0o640),
    ]


# --------------------------------------------------------------------------- database URL


def database_host(inv: Inventory) -> str:
    """Where the app connects: loopback on a single host, else the db's private address."""
    if inv.is_single_host:
        return "127.0.0.1"
    return str(ipaddress.ip_address(inv.db_host.private_address))


def postgres_url(inv: Inventory, password: str) -> str:
    host = database_host(inv)
    if ipaddress.ip_address(host).version == 6:
        host = f"[{host}]"
    db = inv.database
    return (f"postgres://{quote(db.user, safe='')}:{quote(password, safe='')}"
            f"@{host}:{POSTGRES_PORT}/{quote(db.name, safe='')}")


# --------------------------------------------------------------------------- service, secret files, readiness


def service_argv(action: str, layout: Layout) -> list[str]:
    if action not in ("start", "restart", "reload"):
        raise ValueError(f"unknown service action {action!r}")
    return ["systemctl", action, layout.service]


@dataclass(frozen=True)
class SecretFile:
    owner: str
    group: str
    mode: int
    content: str = field(repr=False)


def secret_file_shell(path: str) -> str:
    """First line ``OWNER GROUP MODE``, then the content; exit 3 when absent."""
    p = shlex.quote(path)
    return f"[ -f {p} ] || exit 3; stat -L -c '%U %G %a' -- {p} && cat -- {p}"


def parse_secret_file(out: str, code: int) -> SecretFile | None:
    if code != 0:
        return None
    head, _, content = out.partition("\n")
    owner, group, mode = head.split()
    return SecretFile(owner, group, int(mode, 8), content)


def _pg_isready_args(host: str, timeout: int) -> str:
    """pg_isready's words after the program. It sends no password and reads no data, so it
    asks for no TLS: over TCP the handshake with Debian's ``ssl = on`` doubled the probe's
    cost (23 -> 11 ms)."""
    return shlex.join(["-q", "-d", "sslmode=disable", "-t", str(timeout), "-h", host,
                       "-p", str(POSTGRES_PORT)])


def pg_ready_shell(host: str, timeout: int = 30) -> str:
    """pg_isready on ``host`` (`_pg_isready_args`)."""
    return f'{pg_client_shell("pg_isready")}; "$pg_client" {_pg_isready_args(host, timeout)}'


# $1: the unit, $2: seconds. Until pg_isready answers on the socket (every 0.05 s); exit 4
# as soon as the unit failed, 3 at the deadline.
_WAIT_ACCEPTING = """{client}
end=$(( $(date +%s) + $2 ))
until "$pg_client" {args}; do
  if systemctl is-failed --quiet -- "$1"; then echo "$1 failed to start"; exit 4; fi
  if [ "$(date +%s)" -ge "$end" ]; then echo "not accepting connections after $2 s"; exit 3; fi
  sleep 0.05
done"""


def wait_accepting_argv(layout: Layout, timeout: int) -> list[str]:
    """Wait until the cluster of ``layout`` accepts connections on its socket (its start
    may still be running: Debian's pg_ctlcluster keeps checking for 2 s more)."""
    script = _WAIT_ACCEPTING.format(client=pg_client_shell("pg_isready"),
                                    args=_pg_isready_args(SOCKET_DIR, 1))
    return ["sh", "-c", script, "releasy-pg-accepting", layout.service, str(int(timeout))]


def ready_hosts(inv: Inventory) -> list[str]:
    """Where the server must answer at the end: its socket and every listen address."""
    hosts = [SOCKET_DIR, "127.0.0.1"]
    if not inv.is_single_host:
        hosts.append(database_host(inv))
    return hosts


# --------------------------------------------------------------------------- decisions


def service_action(running: Mapping[str, str], wanted: Mapping[str, str], *,
                   files_changed: bool, config_stale: bool) -> str | None:
    """``"restart"`` when a postmaster-context setting differs from what runs, ``"reload"``
    when only reloadable things changed (or a file is newer than the last load), else None."""
    if any(running.get(k) != wanted[k] for k in POSTMASTER_SETTINGS):
        return "restart"
    if files_changed or config_stale or any(
            running.get(k) != wanted[k] for k in RELOADABLE_SETTINGS):
        return "reload"
    return None


def setting_changes(running: Mapping[str, str], wanted: Mapping[str, str],
                    names: Sequence[str] = MANAGED_SETTINGS) -> list[str]:
    """Human-readable ``name 'old' -> 'new'`` for the settings that differ."""
    return [f"{n} {running.get(n)!r} -> {wanted[n]!r}" for n in names
            if running.get(n) != wanted[n]]
