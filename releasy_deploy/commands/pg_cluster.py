"""The db host's PostgreSQL cluster as data: where Debian puts cluster ``major``/main
(`Layout`), the state of the files we manage in it, and which major the host runs or gets
(one probe, parsed, then decided). Pure functions only; `releasy_deploy.tiers.db` runs them.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Mapping

from ..errors import HostRefusedError
from ..packages import db_packages

CLUSTER = "main"
SOCKET_DIR = "/var/run/postgresql"
# The files we manage, relative to a cluster's configuration directory.
DROPIN_REL = "conf.d/releasy.conf"
HBA_REL = "pg_hba.conf"
MANAGED_RELS = (DROPIN_REL, HBA_REL)


# Where postgresql-common keeps every cluster's configuration.
ETC_DIR = "/etc/postgresql"
# postgresql-common's own settings for the clusters it creates (read in ascending order).
# Ours, present only during a first install, says that the server package creates no main
# cluster: the db tier creates it once the packages are in (`create_cluster_argv`).
CREATECLUSTER_DIR = "/etc/postgresql-common/createcluster.d"
DEFER_FILE = f"{CREATECLUSTER_DIR}/zz-releasy-first-install.conf"

# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Where Debian's postgresql-common puts cluster ``major``/main: the paths, service and
    log file follow the PostgreSQL major the host runs (15 on Debian 12, 17 on Debian 13)."""

    major: str

    def __post_init__(self) -> None:
        db_packages(self.major)  # validates the major: it ends up in paths and argv

    @property
    def conf_dir(self) -> str:
        return f"{ETC_DIR}/{self.major}/{CLUSTER}"

    @property
    def main_conf(self) -> str:
        return f"{self.conf_dir}/postgresql.conf"

    @property
    def hba_path(self) -> str:
        return f"{self.conf_dir}/{HBA_REL}"

    @property
    def dropin_path(self) -> str:
        return f"{self.conf_dir}/{DROPIN_REL}"

    @property
    def service(self) -> str:
        return f"postgresql@{self.major}-{CLUSTER}"

    @property
    def log_file(self) -> str:
        return f"/var/log/postgresql/postgresql-{self.major}-{CLUSTER}.log"

    @property
    def packages(self) -> tuple[str, str]:
        return db_packages(self.major)

    @property
    def cluster(self) -> str:
        return f"{self.major}/{CLUSTER}"


# --------------------------------------------------------------------------- managed files' state


@dataclass(frozen=True)
class FileState:
    sha256: str
    owner: str
    group: str
    mode: int
    mtime: float


def file_state_shell(path: str) -> str:
    """``SHA256 OWNER GROUP MODE MTIME`` of a regular file; exit 3 when absent."""
    p = shlex.quote(path)
    return (f"[ -f {p} ] || exit 3; set -e; sum=$(sha256sum < {p}); "
            f"echo \"${{sum%% *}} $(stat -L -c '%U %G %a %.9Y' -- {p})\"")


def parse_file_state(out: str, code: int) -> FileState | None:
    if code != 0:
        return None
    sha, owner, group, mode, mtime = out.split()
    return FileState(sha, owner, group, int(mode, 8), float(mtime))


# --------------------------------------------------------------------------- the host's major

_MAJOR_RE = re.compile(r"[1-9][0-9]?")
_CLUSTER_RE = re.compile(r"[A-Za-z0-9_.-]+")
_SERVER_PKG_RE = re.compile(r"postgresql-([1-9][0-9]?)")
_DEPENDS_RE = re.compile(r"(?:^|[\s,|])postgresql-([1-9][0-9]?)(?:$|[\s,(|])")

# One probe, so the major costs no round trip of its own: the clusters that exist (and, for
# each main cluster, the state of the files we manage in it), the PostgreSQL packages
# dpkg has installed, and, only on a host without any cluster, what apt offers: the
# `postgresql` metapackage's dependency (the release's default major) and every
# postgresql-N server package. apt is not asked when a cluster exists: it then has no say.
# "deferred": our DEFER_FILE is there (a first install whose cluster is still ours to make);
# "fresh": not even ETC_DIR exists (a first install seeds our files and makes the cluster).
PG_HOST_SHELL = r"""found=
[ -e DEFER_FILE ] && echo 'deferred|'
[ -e ETC_DIR ] || [ -L ETC_DIR ] || echo 'fresh|'
for f in /etc/postgresql/*/*/postgresql.conf; do
  [ -f "$f" ] || continue
  found=1; d=${f%/postgresql.conf}; c=${d##*/}; v=${d%/*}; v=${v##*/}
  printf 'cluster|%s|%s\n' "$v" "$c"
  [ "$c" = main ] || continue
  for rel in REL_LIST; do
    p="$d/$rel"
    [ -f "$p" ] || continue
    sum=$(sha256sum < "$p") || continue
    printf 'file|%s|%s|%s %s\n' "$v" "$rel" "${sum%% *}" "$(stat -L -c '%U %G %a %.9Y' -- "$p")"
  done
done
dpkg-query -W -f='${db:Status-Abbrev}|${Package}\n' 'postgresql-[0-9]*' \
  'postgresql-client-[0-9]*' 2>/dev/null | sed -n 's/^ii *|/installed|/p'
[ -z "$found" ] || exit 0
ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || exit 0
echo lists
apt-cache show --no-all-versions postgresql 2>/dev/null | sed -n 's/^Depends: */default|/p'
apt-cache search --names-only '^postgresql-[0-9]+$' 2>/dev/null | sed 's/ .*//; s/^/offered|/'
""".replace("REL_LIST", " ".join(shlex.quote(r) for r in MANAGED_RELS)).replace(
    "DEFER_FILE", shlex.quote(DEFER_FILE)).replace("ETC_DIR", shlex.quote(ETC_DIR))


@dataclass(frozen=True)
class PgHost:
    """What the db host has and offers of PostgreSQL (one probe, parsed)."""

    clusters: tuple[tuple[str, str], ...] = ()  # (major, cluster name), sorted
    installed: frozenset[str] = frozenset()  # PostgreSQL packages dpkg has installed
    lists: bool = False  # apt's package lists exist (asked only without a cluster)
    default: str | None = None  # the release's default major (the metapackage's dependency)
    offered: tuple[str, ...] = ()  # majors apt can install
    files: Mapping[tuple[str, str], FileState] = field(default_factory=dict)  # (major, rel)
    deferred: bool = False  # DEFER_FILE exists: the main cluster is the db tier's to create
    fresh: bool = False  # ETC_DIR does not exist: a first install seeds and defers

    @property
    def cluster_majors(self) -> list[str]:
        return sorted({m for m, _ in self.clusters}, key=int)

    @property
    def server_majors(self) -> list[str]:
        return sorted({m.group(1) for p in self.installed
                       if (m := _SERVER_PKG_RE.fullmatch(p))}, key=int)


def parse_pg_host(out: str, code: int) -> PgHost:
    clusters: set[tuple[str, str]] = set()
    installed: set[str] = set()
    files: dict[tuple[str, str], FileState] = {}
    lists = deferred = fresh = False
    default = None
    offered: set[str] = set()
    for line in out.splitlines():
        tag, _, rest = line.partition("|")
        if tag == "cluster":
            major, _, name = rest.partition("|")
            if _MAJOR_RE.fullmatch(major) and _CLUSTER_RE.fullmatch(name):
                clusters.add((major, name))
        elif tag == "file":
            major, rel, st = (rest.split("|", 2) + ["", ""])[:3]
            if _MAJOR_RE.fullmatch(major) and rel in MANAGED_RELS:
                parsed = parse_file_state(st, 0) if len(st.split()) == 5 else None
                if parsed is not None:
                    files[(major, rel)] = parsed
        elif tag == "installed":
            installed.add(rest.strip())
        elif tag == "lists":
            lists = True
        elif tag == "deferred":
            deferred = True
        elif tag == "fresh":
            fresh = True
        elif tag == "default":
            found = _DEPENDS_RE.search(rest)
            default = found.group(1) if found else default
        elif tag == "offered":
            found = _SERVER_PKG_RE.fullmatch(rest.strip())
            if found:
                offered.add(found.group(1))
    return PgHost(tuple(sorted(clusters, key=lambda c: (int(c[0]), c[1]))),
                  frozenset(installed), lists, default, tuple(sorted(offered, key=int)), files,
                  deferred, fresh)


class PgMajorRefused(HostRefusedError):
    """The inventory's pin or the host's clusters rule every major out (exit 2)."""


def select_major(host: str, release: str, pg: PgHost, pin: str | None) -> str | None:
    """The PostgreSQL major ``host`` (running ``release``, e.g. "Debian 13 (trixie)") uses:

    1. the major of the cluster(s) that exist: never a second major beside a cluster;
    2. else the major of an installed server package (its cluster was removed);
    3. else the inventory's pin (database.postgres_version), when apt offers it;
    4. else the release's default: the `postgresql` metapackage's dependency.

    None when apt's package lists are not loaded yet (a fresh host): the caller refreshes
    them and asks again. Refusals name the host, its release and the versions involved."""
    pin_text = f"database.postgres_version pins {pin}"
    existing = pg.cluster_majors
    if existing:
        names = ", ".join(f"{m}/{n}" for m, n in pg.clusters)
        if pin is not None and pin not in existing:
            raise PgMajorRefused(
                f"{host}: runs PostgreSQL {' and '.join(existing)} on {release} (cluster "
                f"{names}), but {pin_text}. This tool never installs a second major beside "
                f"an existing cluster: set database.postgres_version to {existing[-1]} or "
                f"remove it (a major upgrade is pg_upgradecluster's job, done by hand).",
                host=host)
        if pin is not None:
            return pin
        if len(existing) > 1:
            raise PgMajorRefused(
                f"{host}: has clusters of several PostgreSQL majors on {release} ({names}): set "
                "database.postgres_version to the one Releasy's database lives in.", host=host)
        return existing[0]
    servers = pg.server_majors
    if servers:
        if pin is not None and pin not in servers:
            raise PgMajorRefused(
                f"{host}: has postgresql-{' postgresql-'.join(servers)} installed on {release} "
                f"(without a cluster), but {pin_text}: set database.postgres_version to "
                f"{servers[-1]}, or remove that package first.", host=host)
        return pin or servers[-1]
    if not pg.lists:
        return None
    if pin is not None:
        if pin not in pg.offered:
            offer = (f"PostgreSQL {', '.join(pg.offered)}" if pg.offered
                     else "no PostgreSQL server package")
            raise PgMajorRefused(
                f"{host}: {pin_text}, but {release} here offers {offer} (its apt sources). "
                f"Nothing was installed. Remove the pin (the release's default is "
                f"{pg.default or 'unknown'}), pin an offered major, or add an apt source "
                f"that carries postgresql-{pin}.", host=host)
        return pin
    if pg.default is None:
        raise PgMajorRefused(
            f"{host}: apt offers no `postgresql` package on {release}, so the release's default "
            "PostgreSQL major is unknown. Check the host's apt sources (apt-cache policy "
            "postgresql), or set database.postgres_version.", host=host)
    return pg.default


# --------------------------------------------------------------------------- first install

# $1: ETC_DIR, $2: the drop-in's directory, $3: the drop-in (its content on stdin),
# $4: CREATECLUSTER_DIR, $5: DEFER_FILE. The deferral is written first: a run cut off
# before the drop-in seeds both again (ETC_DIR does not exist yet).
_SEED_SCRIPT = """umask 022; if [ -e "$1" ] || [ -L "$1" ]; then exit 0; fi
mkdir -p -- "$4" && printf '%s\\n' \\
  '# releasy-deploy: the db tier creates the main cluster once the packages are in,' \\
  '# then removes this file.' 'create_main_cluster = false' > "$5.releasy-new" \\
  && mv -f -- "$5.releasy-new" "$5"
mkdir -p -- "$2" && cat > "$3.releasy-new" && mv -f -- "$3.releasy-new" "$3"
"""


def seed_dropin_argv(layout: Layout) -> list[str]:
    """Before PostgreSQL's first install: our drop-in (content on stdin) where the cluster
    will read it, and DEFER_FILE, which tells the server package not to create the main
    cluster itself (`create_main_cluster`, read by its postinst only).

    pg_createcluster keeps a conf.d it finds, so the cluster's first start already has the
    managed settings, instead of a restart for them. The cluster is created by the db tier
    right after the install (`create_cluster_argv`), and started once its files are in
    place, beside the steps that only need it to accept connections: the package's own
    start, inside the install, waited for Debian's pg_ctlcluster, which polls in 0.5 s
    steps until three connections in a row succeed (2 s or more on every first install).
    Only where ETC_DIR does not exist at all: root creates nothing inside a directory the
    postgres account may own. Root-owned; the db tier gives the drop-in the owner Debian
    gives its neighbours."""
    conf_d = layout.dropin_path.rsplit("/", 1)[0]
    return ["sh", "-c", _SEED_SCRIPT, "releasy-seed", ETC_DIR, conf_d, layout.dropin_path,
            CREATECLUSTER_DIR, DEFER_FILE]


# $1: the major, $2: DEFER_FILE. The locale is the one Debian's postinst gives a new
# cluster: its own set_system_locale (the system's locale, else C.UTF-8) where the host
# has it. cd /: pg_createcluster runs initdb as postgres, which may not enter root's cwd.
_CREATE_SCRIPT = """set -e
cd /
f=/usr/share/postgresql-common/maintscripts-functions
if [ -r "$f" ] && . "$f" && command -v set_system_locale >/dev/null 2>&1; then
  set_system_locale
else
  LANG=C.UTF-8; export LANG
fi
pg_createcluster -u postgres --no-status "$1" main
rm -f -- "$2"
rmdir -- "${2%/*}" 2>/dev/null || true"""


def create_cluster_argv(layout: Layout) -> list[str]:
    """Create the main cluster of ``layout.major`` as Debian's postinst would have (the
    same pg_createcluster call and locale; not started), then remove DEFER_FILE."""
    return ["sh", "-c", _CREATE_SCRIPT, "releasy-create-cluster", layout.major, DEFER_FILE]


def remove_defer_argv() -> list[str]:
    """DEFER_FILE left by a run cut off after the cluster was made: removed."""
    return ["sh", "-c", 'rm -f -- "$1"; rmdir -- "${1%/*}" 2>/dev/null || true',
            "releasy-defer-done", DEFER_FILE]
