"""Build stand-in `releasy-server` release tarballs laid out like upstream's.

    python -m lab.standin.build --version 1.2.3 --out DIR [--migrations N]
        [--broken-migration] [--never-ready] [--migration-seconds S] [--arch x86_64]
    python -m lab.standin.build --default-set --out DIR

Each build writes `DIR/releasy-server-{version}-linux-{arch}.tar.gz` holding one member,
the executable `releasy-server` (mode 0755, root:root, fixed mtime), and
`DIR/releasy-server-{version}-linux-{arch}.tar.gz.sha256` (`HEX  FILENAME`). Builds are
reproducible byte for byte.

Migrations depend only on their number: migration k creates table `standin_m{k}` with one
row, so a release with N+1 migrations is a superset of one with N (same checksums for the
shared ones). A broken build replaces its LAST migration with one that creates its table and
then selects from a table that does not exist: the migration fails and is rolled back, the
earlier ones stay applied.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

SOURCE = Path(__file__).with_name("releasy_server.py")
MEMBER_NAME = "releasy-server"
MEMBER_MTIME = 1704067200          # 2024-01-01T00:00:00Z; fixed for reproducible builds
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")
BEGIN_MARK = "# --- standin build parameters: begin"
END_MARK = "# --- standin build parameters: end ---"

# (version, migrations, broken_migration, never_ready)
DEFAULT_RELEASES = (
    ("1.0.0", 2, False, False),
    ("1.1.0", 3, False, False),
    ("1.1.1", 3, False, False),
    ("1.2.0-broken", 4, True, False),
    ("1.2.0-neverready", 3, False, True),
)

MISSING_TABLE = "standin_no_such_table"


def migration_sql(k: int) -> str:
    return (f"CREATE TABLE standin_m{k} (\n"
            f"    id BIGINT PRIMARY KEY,\n"
            f"    label TEXT NOT NULL\n"
            f");\n"
            f"INSERT INTO standin_m{k} (id, label) VALUES (1, 'migration {k}');\n")


def broken_migration_sql(k: int) -> str:
    return (f"CREATE TABLE standin_m{k} (\n"
            f"    id BIGINT PRIMARY KEY,\n"
            f"    label TEXT NOT NULL\n"
            f");\n"
            f"INSERT INTO standin_m{k} (id, label) SELECT id, label FROM {MISSING_TABLE};\n")


def migration_specs(count: int, broken: bool = False) -> list[tuple[int, str, str]]:
    """The embedded migrations: [(version, description, sql)], versions 1..count."""
    if count < 0:
        raise ValueError("migrations must be >= 0")
    if broken and count < 1:
        raise ValueError("a broken build needs at least one migration")
    specs = []
    for k in range(1, count + 1):
        sql = broken_migration_sql(k) if broken and k == count else migration_sql(k)
        # sqlx derives the description from the file name (0001_create_standin_m1.sql)
        specs.append((k, f"create standin m{k}", sql))
    return specs


def migration_checksum(sql: str) -> bytes:
    """What `_sqlx_migrations.checksum` holds for a migration (SHA-384 of its SQL)."""
    return hashlib.sha384(sql.encode("utf-8")).digest()


def migration_lock_key(database_name: str) -> int:
    """sqlx's PostgreSQL migration advisory-lock key (`releasy` -> 2381881093274812060)."""
    import zlib
    return 0x3D32AD9E * zlib.crc32(database_name.encode("utf-8"))


def tarball_name(version: str, arch: str = "x86_64") -> str:
    return f"releasy-server-{version}-linux-{arch}.tar.gz"


def render_executable(version: str, *, migrations: int = 2, broken_migration: bool = False,
                      never_ready: bool = False, migration_seconds: float = 0.0) -> str:
    """releasy_server.py with the build parameters baked in."""
    if not VERSION_RE.match(version):
        raise ValueError(f"invalid version {version!r} (want e.g. 1.2.3 or 1.2.3-rc.1)")
    if migration_seconds < 0:
        raise ValueError("migration_seconds must be >= 0")
    source = SOURCE.read_text(encoding="utf-8")
    start = source.find(BEGIN_MARK)
    end = source.find(END_MARK)
    if start < 0 or end < 0 or source.count(BEGIN_MARK) != 1 or source.count(END_MARK) != 1:
        raise RuntimeError(f"{SOURCE}: build parameter markers not found exactly once")
    begin_line_end = source.index("\n", start) + 1
    lines = [f"VERSION = {version!r}", "MIGRATIONS = ["]
    for v, description, sql in migration_specs(migrations, broken_migration):
        lines.append(f"    ({v!r}, {description!r},")
        lines.append(f"     {sql!r}),")
    lines.append("]")
    lines.append(f"BROKEN_MIGRATION = {bool(broken_migration)!r}")
    lines.append(f"NEVER_READY = {bool(never_ready)!r}")
    lines.append(f"MIGRATION_SECONDS = {float(migration_seconds)!r}")
    text = source[:begin_line_end] + "\n".join(lines) + "\n" + source[end:]
    compile(text, MEMBER_NAME, "exec")       # fail the build, not the deploy
    return text


def _tarball_bytes(executable: bytes) -> bytes:
    info = tarfile.TarInfo(MEMBER_NAME)
    info.size = len(executable)
    info.mode = 0o755
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = MEMBER_MTIME
    info.type = tarfile.REGTYPE
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(executable))
    packed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue()


def build_release(version: str, out_dir: Path, *, migrations: int = 2,
                  broken_migration: bool = False, never_ready: bool = False,
                  migration_seconds: float = 0.0, arch: str = "x86_64") -> Path:
    """Write the tarball and its .sha256 into out_dir; returns the tarball's path."""
    if not re.fullmatch(r"[0-9A-Za-z_]+", arch):
        raise ValueError(f"invalid arch {arch!r}")
    text = render_executable(version, migrations=migrations,
                             broken_migration=broken_migration, never_ready=never_ready,
                             migration_seconds=migration_seconds)
    data = _tarball_bytes(text.encode("utf-8"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = tarball_name(version, arch)
    path = out_dir / name
    _write_atomic(path, data)
    digest = hashlib.sha256(data).hexdigest()
    _write_atomic(out_dir / f"{name}.sha256", f"{digest}  {name}\n".encode())
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def default_releases(out_dir: Path) -> list[Path]:
    """Build the default set used by the integration tests; returns the tarball paths."""
    return [build_release(version, out_dir, migrations=n, broken_migration=broken,
                          never_ready=never_ready)
            for version, n, broken, never_ready in DEFAULT_RELEASES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.standin.build",
                                     description="Build a stand-in releasy-server tarball.")
    parser.add_argument("--version", help="release version, e.g. 1.2.3")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--migrations", type=int, default=2,
                        help="number of embedded migrations (default 2)")
    parser.add_argument("--broken-migration", action="store_true",
                        help="make the last migration fail")
    parser.add_argument("--never-ready", action="store_true",
                        help="bind, but answer 503 on /health and /ready forever")
    parser.add_argument("--migration-seconds", type=float, default=0.0,
                        help="sleep this long inside each migration it applies")
    parser.add_argument("--arch", default="x86_64")
    parser.add_argument("--default-set", action="store_true",
                        help="build the default releases instead of one")
    args = parser.parse_args(argv)
    if args.default_set:
        for path in default_releases(args.out):
            print(path)
        return 0
    if not args.version:
        parser.error("--version is required (or --default-set)")
    try:
        path = build_release(args.version, args.out, migrations=args.migrations,
                             broken_migration=args.broken_migration,
                             never_ready=args.never_ready,
                             migration_seconds=args.migration_seconds, arch=args.arch)
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
