"""The database tier: PostgreSQL on the inventory's db host, ready for Releasy.

The major is read from the host, never assumed: the cluster that exists, else the
inventory's pin (database.postgres_version), else the release's default (Debian 12: 15,
Debian 13: 17); paths, service and log file follow it (`commands.postgres.Layout`).

`setup` reads everything it needs in ONE round trip (OS release, clusters and packages,
the password file, the managed config files, the running server's settings, role and
database, readiness), then acts only on differences: install, generate the password once,
write the config files, restart only for a postmaster-context setting (listen_addresses,
port) or else reload, create/fix the role and database. A second run costs that one round
trip and changes nothing. With ``database.kind: sqlite`` there is no PostgreSQL at all.

The role's password lives on the db host only (/etc/releasy/database-password, root 0600),
so any operator machine gets the same one. It is read over SSH stdout, masked at once,
checked against the role's SCRAM verifier locally, and set (when needed) as a verifier
computed locally, on psql's stdin: it never appears in argv, output or the server's logs.
"""
from __future__ import annotations

import hashlib
import secrets as _random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping
from urllib.parse import quote

from ..commands import postgres as pg
from ..errors import BadInput, DeployError
from ..executor import HostConnection
from ..facts import Fact, OsRelease, PathExists, read_fact, read_facts
from ..hostos import HostRelease, check_release
from ..inventory import Inventory
from ..remote import APT_UPDATE_ARGV, ensure_dir, ensure_packages, put_file
from ..session import Session

if TYPE_CHECKING:
    from ..beside import Beside

__all__ = ["setup", "database_url", "psql", "state_facts", "install_state", "seed_config",
           "SQLITE_URL", "PgServerState", "PgFileState", "PgSecretFile", "PgReady",
           "PgInstallation"]

PASSWORD_PLACEHOLDER = "PASSWORD-NOT-GENERATED-YET"
FIRST_START_TIMEOUT = 60  # seconds until a new, empty cluster must accept connections
SQLITE_URL = pg.SQLITE_URL  # database.kind sqlite: the URL every app host gets


# --------------------------------------------------------------------------- probes

@dataclass(frozen=True)
class PgServerState(Fact):
    """The server's view of ``database`` and role ``user`` (`commands.postgres.ServerState`),
    or None when it does not answer."""

    database: str
    user: str

    def shell(self) -> str:
        return pg.server_state_shell(self.database, self.user)

    def parse(self, out: str, code: int) -> pg.ServerState | None:
        return pg.parse_server_state(out, code)


@dataclass(frozen=True)
class PgFileState(Fact):
    """sha256, owner, group, mode and mtime of a managed file (`commands.postgres.FileState`)."""

    path: str

    def shell(self) -> str:
        return pg.file_state_shell(self.path)

    def parse(self, out: str, code: int) -> pg.FileState | None:
        return pg.parse_file_state(out, code)


@dataclass(frozen=True)
class PgSecretFile(Fact):
    """A root-only secret file (`commands.postgres.SecretFile`), or None."""

    path: str

    def shell(self) -> str:
        return pg.secret_file_shell(self.path)

    def parse(self, out: str, code: int) -> pg.SecretFile | None:
        return pg.parse_secret_file(out, code)


@dataclass(frozen=True)
class PgReady(Fact):
    """pg_isready answers on ``host`` (a socket directory or an address)."""

    host: str

    def shell(self) -> str:
        return pg.pg_ready_shell(self.host)

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass(frozen=True)
class PgInstallation(Fact):
    """The host's PostgreSQL clusters, packages and, without a cluster, what apt offers
    (`commands.postgres.PgHost`): where the major comes from."""

    def shell(self) -> str:
        return pg.PG_HOST_SHELL

    def parse(self, out: str, code: int) -> pg.PgHost:
        return pg.parse_pg_host(out, code)


@dataclass(frozen=True)
class HostState:
    """What one probe round trip saw on the db host."""

    release: HostRelease
    layout: pg.Layout | None  # None: a fresh host whose apt lists are not loaded yet
    missing_packages: tuple[str, ...]
    cluster_exists: bool
    cluster_deferred: bool  # our first-install file says: the main cluster is ours to create
    fresh: bool  # no /etc/postgresql at all: a first install makes the cluster itself
    secrets_dir_exists: bool
    password_file: pg.SecretFile | None = field(repr=False)
    files: Mapping[str, pg.FileState | None]
    ready: Mapping[str, bool]  # socket dir / address -> pg_isready answered
    server: pg.ServerState | None  # None: not installed, stopped or not answering

    @property
    def config_stale(self) -> bool:
        """A managed file is newer than the configuration the server last loaded."""
        if self.server is None:
            return False
        return any(f is not None and f.mtime > self.server.conf_loaded_at
                   for f in self.files.values())


def state_facts(inv: Inventory) -> list[Fact]:
    """What the db tier looks at on the db host (one round trip; `fab site` prefetches it)."""
    db = inv.database
    return [OsRelease(), PgInstallation(), PathExists(pg.SECRETS_DIR),
            PgSecretFile(pg.PASSWORD_FILE),
            # readiness first: the state query then meets a server that finished starting
            *(PgReady(h) for h in pg.ready_hosts(inv)), PgServerState(db.name, db.user)]


def install_state(c: HostConnection, inv: Inventory) -> HostState:
    """The db host's state with the PostgreSQL packages it needs (``layout.packages``) and
    those missing, from the facts `fab site` prefetched. A host whose apt lists were never
    loaded gets `apt-get update` first (not in a dry-run: it predicts from the release,
    like `setup`). When packages are missing, the major and why are said here, where they
    are decided (after the install the db tier finds the cluster that exists)."""
    state = _first_look(c, inv)
    if state.missing_packages:
        _report_major(c, inv, state)
    return state


def seed_config(c: HostConnection, inv: Inventory, state: HostState) -> None:
    """Right before PostgreSQL's first install on this host (``state``: its state before
    it): our drop-in where the new cluster reads it (`commands.pg_cluster.seed_dropin_argv`),
    so it starts listening where the app hosts connect and needs no restart, and the file
    that keeps the package from making the cluster (`_create_cluster` makes it, after)."""
    if c.dry_run or not state.missing_packages or state.cluster_exists:
        return
    c.run(pg.seed_dropin_argv(state.layout), sudo=True, stdin=pg.render_dropin(inv).encode())
    c.reporter.changed(c.name, f"file {state.layout.dropin_path} (before the install: the"
                               f" new cluster starts with it)")


def _first_look(c: HostConnection, inv: Inventory) -> HostState:
    """The db host's state with a PostgreSQL layout: what `fab site` prefetched when it
    can. A fresh host without apt lists: which majors it offers is unknown until apt-get
    update, which a dry-run does not run: it predicts from the release."""
    state = _read_state(c, inv, reuse=True)
    if state.layout is None and c.dry_run:
        state = _predicted(c, inv, state)
    elif state.layout is None:
        c.run(APT_UPDATE_ARGV, sudo=True)
        state = _read_state(c, inv)
        if state.layout is None:
            raise DeployError(
                f"{c.name}: apt-get update left no package lists in /var/lib/apt/lists: check "
                f"the apt sources on {c.name} (apt-get update; apt-cache policy postgresql).",
                host=c.name)
    return state


def _read_state(c: HostConnection, inv: Inventory, *, reuse: bool = False) -> HostState:
    db = inv.database
    ready = {h: PgReady(h) for h in pg.ready_hosts(inv)}
    server = PgServerState(db.name, db.user)
    seen = read_facts(c, state_facts(inv), sudo=True, reuse=reuse)
    release = check_release(c.name, seen[OsRelease()])  # before anything is changed
    host: pg.PgHost = seen[PgInstallation()]
    major = pg.select_major(c.name, release.label, host, db.postgres_version)
    layout = None if major is None else pg.Layout(major)
    secret = seen[PgSecretFile(pg.PASSWORD_FILE)]
    if secret is not None:
        c.mask.add([secret.content.strip()])  # before anything could print it
    state = seen[server]
    if state is not None and state.role is not None and state.role.verifier:
        c.mask.add([state.role.verifier])
    return HostState(
        release=release,
        layout=layout,
        missing_packages=() if layout is None else tuple(
            p for p in layout.packages if p not in host.installed),
        cluster_exists=major is not None and (major, pg.CLUSTER) in host.clusters,
        cluster_deferred=host.deferred,
        fresh=host.fresh,
        secrets_dir_exists=seen[PathExists(pg.SECRETS_DIR)],
        password_file=secret,
        files={} if layout is None else {
            f"{layout.conf_dir}/{rel}": host.files.get((major, rel)) for rel in pg.MANAGED_RELS},
        ready={h: seen[n] for h, n in ready.items()},
        server=state,
    )


# --------------------------------------------------------------------------- public API


def psql(conn: HostConnection, sql: str, *, database: str | None = None,
         mutates: bool = True) -> str:
    """Run ``sql`` (on stdin, never argv) as the postgres superuser; return psql's
    unaligned, tuples-only stdout. Stops at the first error (RemoteCommandError).
    ``mutates=False`` marks a read-only query that also runs in dry-run."""
    res = conn.run(pg.psql_argv(database), sudo=True, stdin=sql.encode("utf-8"),
                   mutates=mutates, cwd="/")
    return res.stdout


def database_url(session: Session) -> str:
    """RELEASY_DATABASE_URL for the app hosts. For PostgreSQL this reads the password from
    the db host (one round trip) and registers it with the masker before returning."""
    inv = session.inventory
    if inv.database.kind == "sqlite":
        return pg.SQLITE_URL
    if database_url in session.memo:
        return session.memo[database_url]
    c = session.executor.conn(inv.db_host)
    found = read_fact(c, PgSecretFile(pg.PASSWORD_FILE), sudo=True, reuse=True)
    if found is None:
        if session.dry_run:
            session.reporter.info(c.name, (
                f"dry-run: {pg.PASSWORD_FILE} does not exist yet (`fab db.setup` generates "
                f"it); the database URL uses the placeholder {PASSWORD_PLACEHOLDER}"))
            return pg.postgres_url(inv, PASSWORD_PLACEHOLDER)
        raise DeployError(
            f"{c.name}: no database password at {pg.PASSWORD_FILE}: run `fab db.setup` first "
            "(it generates the password and creates the database role)", host=c.name)
    password = found.content.strip()
    c.mask.add([password, quote(password, safe="")])
    if not password:
        raise DeployError(_empty_password_message(c.name), host=c.name)
    url = session.memo[database_url] = pg.postgres_url(inv, password)
    return url


def setup(session: Session, *, yes: bool = False, beside: Beside | None = None) -> None:
    """PostgreSQL (the major read from the host) installed and configured on the db host;
    role, database and password in place; the cluster answering on every listen address.
    Honours session.dry_run. A running server whose change needs a restart (a
    postmaster-context setting: downtime for every app host) is restarted only once the
    operator agreed (``yes``, or the question on a terminal), asked before anything is
    written; a change that a reload applies is reloaded without asking.

    ``beside``: where the first start of a cluster made just now may end (`fab site`):
    this returns once the server accepts connections, and the caller waits for the
    start's end (Debian's pg_ctlcluster checks for 2 s more) with its later steps. Without
    it the start is waited for here."""
    inv = session.inventory
    host = inv.db_host
    if not session.targets([host]):
        session.reporter.info(host.name, "not in --limit: the db tier is left as it is")
        return
    if inv.database.kind == "sqlite":
        session.reporter.info(host.name, (
            "database.kind is sqlite: nothing to do for the db tier (no PostgreSQL; the app "
            f"tier owns {pg.SQLITE_PATH})"))
        return
    try:
        pg.check_names(inv.database.name, inv.database.user)
    except ValueError as exc:
        raise BadInput(f"{inv.path}: {exc}") from None
    ex = session.executor
    state = ex.each([host], lambda c: _first_look(c, inv))[host.name]
    restart = restart_needed(inv, state)
    if restart and not session.dry_run:
        session.confirm(f"{host.name}: PostgreSQL must be RESTARTED to apply {restart}. That"
                        f" is DOWNTIME: Releasy cannot reach its database for the length of the"
                        f" restart (requests fail meanwhile). Restart it now?", yes=yes)
    ex.each([host], lambda c: _setup_host(c, inv, state, beside))


def restart_needed(inv: Inventory, state: HostState) -> str:
    """The running server's postmaster-context settings that differ from the inventory's
    ("" when none, or when nothing can be served from it yet: no server running, or no
    application database in it; a first start is no downtime). Pure."""
    if state.server is None or state.server.database_owner is None:
        return ""
    return ", ".join(pg.setting_changes(state.server.settings, pg.desired_settings(inv),
                                        pg.POSTMASTER_SETTINGS))


# --------------------------------------------------------------------------- steps


def _setup_host(c: HostConnection, inv: Inventory, state: HostState,
                beside: Beside | None = None) -> None:
    layout = state.layout
    _report_major(c, inv, state)
    seed_config(c, inv, state)
    if _ensure_packages(c, state):
        state = _read_state(c, inv)
    created = False
    if not state.missing_packages and not state.cluster_exists and state.cluster_deferred:
        state, created = _create_cluster(c, state), True
    elif state.cluster_deferred and state.cluster_exists:
        _finish_deferral(c)
    if not state.missing_packages and not state.cluster_exists:
        raise DeployError(
            f"{c.name}: PostgreSQL {layout.major} is installed but its cluster "
            f"{layout.cluster} does not exist ({layout.main_conf} is missing). Create it "
            f"with `pg_createcluster {layout.major} {pg.CLUSTER} --start` on {c.name} "
            "(or restore it), then re-run.", host=c.name)
    password = _ensure_password(c, state)
    files_changed = _ensure_config_files(c, inv, state)
    state = _ensure_service(c, inv, state, files_changed,
                            beside=beside if created else None)
    _check_ready(c, state)
    _warn_pool_shortfall(c, inv, state.server)
    _ensure_role_and_database(c, inv, state.server, password)


def _create_cluster(c: HostConnection, state: HostState) -> HostState:
    """The main cluster, made after a first install whose package was told not to
    (`commands.pg_cluster.seed_dropin_argv`), or after a run cut off in between. Not
    started: its files go in first. Returns the state from then on (its managed files are
    Debian's new ones or our seeded drop-in: all written next, whatever they hold)."""
    layout = state.layout
    files = {path: None for path in state.files}
    if c.dry_run:
        c.reporter.would(c.name, f"create cluster {layout.cluster} (pg_createcluster)")
        return replace(state, cluster_exists=True, files=files)
    c.run(pg.create_cluster_argv(layout), sudo=True)
    c.reporter.changed(c.name, f"cluster {layout.cluster} created (pg_createcluster, as the"
                               " package would have; started once its files are in)")
    return replace(state, cluster_exists=True, cluster_deferred=False, files=files)


def _finish_deferral(c: HostConnection) -> None:
    """Our first-install file outlived the cluster's creation (a run cut off right after
    it): removed, so that later installs of PostgreSQL behave as Debian's again."""
    if c.dry_run:
        c.reporter.would(c.name, f"remove {pg.DEFER_FILE} (left by a first install)")
        return
    c.run(pg.remove_defer_argv(), sudo=True)
    c.reporter.changed(c.name, f"removed {pg.DEFER_FILE} (left by a first install)")


def _predicted(c: HostConnection, inv: Inventory, state: HostState) -> HostState:
    """The state a dry-run assumes on a host whose package lists were never loaded."""
    pin = inv.database.postgres_version
    layout = pg.Layout(pin or state.release.default_pg_major)
    why = "database.postgres_version" if pin else f"the default of {state.release.short}"
    c.reporter.info(c.name, (
        f"the package lists are empty: `apt-get update` would run first, then PostgreSQL "
        f"{layout.major} ({why}) be checked against what apt offers"))
    return replace(state, layout=layout, missing_packages=layout.packages,
                   files={f"{layout.conf_dir}/{rel}": None for rel in pg.MANAGED_RELS})


def _report_major(c: HostConnection, inv: Inventory, state: HostState) -> None:
    c.reporter.info(c.name, f"{state.release.label}: PostgreSQL {state.layout.major} "
                            f"({_why_major(inv, state)})")


def _why_major(inv: Inventory, state: HostState) -> str:
    if state.cluster_exists:
        return f"its cluster {state.layout.cluster} exists"
    if inv.database.postgres_version:
        return "database.postgres_version"
    if not state.missing_packages:
        return "installed"
    return f"the default of {state.release.short}"


def _ensure_packages(c: HostConnection, state: HostState) -> bool:
    """True when packages were installed just now."""
    packages = state.layout.packages
    if not state.missing_packages:
        c.reporter.unchanged(c.name, f"packages {' '.join(packages)}")
        return False
    ensure_packages(c, packages)
    return not c.dry_run


def _empty_password_message(host: str) -> str:
    return (f"{host}: {pg.PASSWORD_FILE} is empty. Put the role's password back in it, or "
            "delete the file so that `fab db.setup` generates a new one and sets it on the "
            "role (app hosts then need a redeploy to pick it up).")


def _ensure_password(c: HostConnection, state: HostState) -> str | None:
    """The role's password from the db host, generated once. None in a dry-run that would
    generate it (nothing is stored, so there is no password to use yet)."""
    found = state.password_file
    if found is None:
        if not state.secrets_dir_exists:
            ensure_dir(c, pg.SECRETS_DIR)  # created only: other tiers may manage its mode
        password = _random.token_urlsafe(32)
        c.mask.add([password])
        put_file(c, pg.PASSWORD_FILE, (password + "\n").encode(), owner="root", group="root",
                 mode=0o600, secret=True)
        return None if c.dry_run else password
    password = found.content.strip()
    if not password:
        raise DeployError(_empty_password_message(c.name), host=c.name)
    if (found.owner, found.group, found.mode) != ("root", "root", 0o600):
        # Same content: put_file only fixes owner and mode.
        put_file(c, pg.PASSWORD_FILE, found.content.encode(), owner="root", group="root",
                 mode=0o600, secret=True)
    else:
        c.reporter.unchanged(c.name, f"file {pg.PASSWORD_FILE}")
    return password


def _ensure_config_files(c: HostConnection, inv: Inventory, state: HostState) -> bool:
    changed = False
    for f in pg.config_files(inv, state.layout):
        seen = state.files.get(f.path)
        if (seen is not None and seen.sha256 == hashlib.sha256(f.content).hexdigest()
                and (seen.owner, seen.group, seen.mode) == (f.owner, f.group, f.mode)):
            c.reporter.unchanged(c.name, f"file {f.path}")
            continue
        put_file(c, f.path, f.content, owner=f.owner, group=f.group, mode=f.mode)
        changed = True
    return changed


def _ensure_service(c: HostConnection, inv: Inventory, state: HostState,
                    files_changed: bool, *, beside: Beside | None = None) -> HostState:
    """Restart, reload, start or leave the server; returns the state after any action.
    ``beside``: a new cluster's first start ends there, once it accepts connections."""
    wanted = pg.desired_settings(inv)
    server = state.server
    service = state.layout.service
    if server is None and c.dry_run and state.missing_packages and state.fresh:
        c.reporter.would(c.name, f"create cluster {state.layout.cluster} after installing"
                                 f" (the package is told not to), then start {service} with"
                                 " the managed settings")
        return state
    if server is None and c.dry_run and state.missing_packages:
        # The package would start the cluster with Debian's defaults; predict from those.
        action = pg.service_action(pg.DEBIAN_DEFAULTS, wanted, files_changed=True,
                                   config_stale=False)
        if action:
            why = ", ".join(pg.setting_changes(pg.DEBIAN_DEFAULTS, wanted)) or "config files"
            c.reporter.would(c.name, f"{action} {service} after installing ({why})")
        return state
    if server is None:
        if c.dry_run:
            c.reporter.would(c.name, f"start {service} (it does not answer now)")
            return state
        def start() -> None:
            c.run(pg.service_argv("start", state.layout), sudo=True)
        if beside is None:
            start()
            c.reporter.changed(c.name, f"service {service} started (it was not answering)")
            return _read_state(c, inv)
        beside.start(c.name, start)
        waited = c.run(pg.wait_accepting_argv(state.layout, FIRST_START_TIMEOUT), sudo=True,
                       check=False)
        if not waited.ok:
            why = waited.stdout.strip() or f"exit code {waited.exit_code}"
            raise DeployError(
                f"{c.name}: PostgreSQL {state.layout.cluster}, made and started just now: {why}."
                f" Check `systemctl status {service}` and {state.layout.log_file} on {c.name},"
                " fix the cause and re-run (the cluster stays; the re-run starts it).",
                host=c.name)
        c.reporter.changed(c.name, f"service {service} started (a new cluster: accepting"
                                   " connections; its start ends beside the next steps)")
        return _read_state(c, inv)

    action = pg.service_action(server.settings, wanted, files_changed=files_changed,
                               config_stale=state.config_stale)
    if action is None:
        c.reporter.unchanged(c.name, f"service {service} (running the managed settings)")
        return state
    if action == "restart":
        why = (", ".join(pg.setting_changes(server.settings, wanted, pg.POSTMASTER_SETTINGS))
               + "; downtime: asked first")
    else:
        reasons = pg.setting_changes(server.settings, wanted, pg.RELOADABLE_SETTINGS)
        if files_changed:
            reasons.append("config files changed")
        elif state.config_stale:
            reasons.append("config files are newer than the running configuration")
        why = ", ".join(reasons)
    if c.dry_run:
        c.reporter.would(c.name, f"{action} {service} ({why})")
        return state
    c.run(pg.service_argv(action, state.layout), sudo=True)
    c.reporter.changed(c.name, f"service {service} {action}ed ({why})")
    after = _read_state(c, inv)
    if after.server is not None:
        still = pg.setting_changes(after.server.settings, wanted)
        if still:
            raise DeployError(
                f"{c.name}: after the {action}, PostgreSQL still runs with {'; '.join(still)}: "
                f"a later file overrides {state.layout.dropin_path} (ALTER SYSTEM's "
                "postgresql.auto.conf or another conf.d file). See `SELECT name, setting, sourcefile FROM "
                f"pg_settings` as postgres on {c.name}, remove the override and re-run.",
                host=c.name)
    return after


def _check_ready(c: HostConnection, state: HostState) -> None:
    if c.dry_run:
        return  # nothing was changed, so the current answers say nothing about the result
    silent = [h for h, ok in state.ready.items() if not ok]
    layout = state.layout
    if state.server is None or silent:
        where = ", ".join(silent) or "its socket"
        raise DeployError(
            f"{c.name}: PostgreSQL {layout.cluster} is not accepting connections on "
            f"{where}. Check `systemctl status {layout.service}` and {layout.log_file} on "
            f"{c.name}, fix the cause and re-run.", host=c.name)
    c.reporter.info(c.name, f"{layout.service} accepting connections on "
                            f"{', '.join(state.ready)}")


def _warn_pool_shortfall(c: HostConnection, inv: Inventory, server: pg.ServerState) -> None:
    """A warning when the app's pools may open more connections than the server takes."""
    if c.dry_run:
        return  # a dry run may have no server to ask yet
    # A single host runs two instances while blue/green switches.
    instances = 2 if inv.is_single_host else len(inv.hosts_in("app"))
    short = pg.pool_shortfall(server.limits, instances, inv.app.database_max_connections)
    if short:
        c.reporter.info(c.name, f"WARNING: {short}")


def _ensure_role_and_database(c: HostConnection, inv: Inventory,
                              server: pg.ServerState | None, password: str | None) -> None:
    """Role (attributes, password) and database (owner), in one psql call when needed."""
    db = inv.database
    changes: list[str] = []
    statements: list[str] = []
    verifier = None
    if password is not None:
        verifier = pg.scram_verifier(password)
        c.mask.add([verifier])
    role = server.role if server is not None else None
    if role is None:
        changes.append(f"role {db.user} (created: {pg.role_clause()}, password from "
                       f"{pg.PASSWORD_FILE})")
        if verifier is not None:
            statements.append(pg.create_role_sql(db.user, verifier))
    else:
        drift = pg.role_attribute_drift(role.attributes)
        password_ok = password is not None and pg.scram_matches(password, role.verifier)
        if drift or not password_ok:
            what = ([f"attributes {' '.join(drift)}"] if drift else []) + (
                [] if password_ok else [f"password set from {pg.PASSWORD_FILE}"])
            changes.append(f"role {db.user} ({', '.join(what)})")
            if verifier is not None or password_ok:
                statements.append(pg.alter_role_sql(
                    db.user, attributes=bool(drift), verifier=None if password_ok else verifier))
        else:
            c.reporter.unchanged(c.name, f"role {db.user}")
    owner = server.database_owner if server is not None else None
    if owner is None:
        changes.append(f"database {db.name} (created, owner {db.user}, UTF8)")
        statements.append(pg.create_database_sql(db.name, db.user))
    elif owner != db.user:
        changes.append(f"database {db.name} (owner {owner} -> {db.user})")
        statements.append(pg.alter_database_owner_sql(db.name, db.user))
    else:
        c.reporter.unchanged(c.name, f"database {db.name} (owner {db.user})")
    if not changes:
        return
    if c.dry_run:
        for change in changes:
            c.reporter.would(c.name, f"change: {change}")
        return
    psql(c, "\n".join(statements) + "\n")
    for change in changes:
        c.reporter.changed(c.name, change)
