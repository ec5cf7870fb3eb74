"""Release artifacts on the operator's machine: find or download, verify, then trust.

A release tarball is only used after its sha256 matches the sum pinned for that version
(``release.sha256`` / ``sha256_file`` / a ``.sha256`` sidecar, see hosts.yaml) and after its
layout is the one upstream publishes: exactly one regular file, ``releasy-server``, at the
top level. Both checks run here, locally, before any host is contacted, so a bad artifact
changes nothing anywhere (`BadInput`, exit code 2).

URL sources are downloaded once into a cache (``~/.cache/releasy-deploy/releases/``, or
``$XDG_CACHE_HOME/releasy-deploy/releases/``) under the canonical tarball name; a cached
file is re-verified on every use and downloaded again if it no longer matches.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .commands.app import BINARY_NAME, version_key
from .errors import BadInput
from .inventory import VERSION_RE, Inventory, ReleaseSource, check_version
from .lazy import lazy_module

# Only a download needs it; it brings http.client and email (~20 ms of every run).
url_request = lazy_module("urllib.request")

__all__ = [
    "BINARY_NAME", "LocalRelease", "fetch_release", "default_cache_dir", "sha256_of",
    "verify_sha256", "check_layout", "is_stable", "available_versions", "newest_release",
]

DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before a download is abandoned
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LocalRelease:
    """A verified release tarball on the operator's machine."""

    version: str
    path: Path
    sha256: str
    size: int


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "releasy-deploy" / "releases"


def sha256_of(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def verify_sha256(path: Path, expected: str, *, label: str | None = None) -> int:
    """Raise BadInput unless ``path`` hashes to ``expected``; returns the size.

    ``label`` names the artifact in the message instead of ``path`` (e.g. a download URL).
    """
    actual, size = sha256_of(path)
    if actual != expected:
        raise BadInput(
            f"checksum mismatch for {label or path}:\n"
            f"  expected sha256 {expected}\n"
            f"  actual   sha256 {actual}\n"
            f"  Nothing was uploaded. Either the file is corrupt or tampered with (fetch it"
            f" again from the official release page), or the pinned sum is wrong (check"
            f" release.sha256 / the .sha256 file against upstream's published sums)."
        )
    return size


def check_layout(path: Path) -> None:
    """Raise BadInput unless the tarball holds exactly one regular file ``releasy-server``.

    No directories, links, device files or paths: the host unpacks exactly that one member.
    """
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadInput(f"{path} is not a readable .tar.gz archive ({exc})") from None
    problems = []
    for m in members:
        kind = ("file" if m.isreg() else "directory" if m.isdir() else
                "symlink" if m.issym() else "hard link" if m.islnk() else "special file")
        if m.name != BINARY_NAME or not m.isreg():
            problems.append(f"{kind} {m.name!r}")
    if not members:
        problems.append("nothing (the archive is empty)")
    elif len(members) > 1 and not problems:
        problems.append(f"{len(members)} copies of {BINARY_NAME!r}")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        shown = ", ".join(problems[:5]) + more
        raise BadInput(
            f"{path} does not look like an upstream release: it must hold exactly one regular"
            f" file named {BINARY_NAME!r} at the top level (no paths, no links); found {shown}"
        )


def fetch_release(inv: Inventory, version: str, *, cache_dir: Path | None = None) -> LocalRelease:
    """Locate (or download) the tarball of ``version`` and verify checksum and layout.

    Raises `BadInput` when the version is malformed, no checksum is pinned, the artifact is
    missing or cannot be downloaded, the checksum differs, or the layout is wrong.
    """
    try:
        check_version(version)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    source = inv.release
    name = source.tarball_name(version)
    location = source.location(version)
    if not source.is_url and not Path(location).is_file():
        raise BadInput(_missing_local(Path(location), version, inv))
    expected = source.expected_sha256(version)
    if expected is None:
        sidecar = "" if source.is_url else f" (or put {name}.sha256 next to the tarball)"
        raise BadInput(
            f"no checksum pinned for {version}: add it to release.sha256 in {inv.path}{sidecar}"
        )
    if source.is_url:
        path, size = _cached_download(location, name, expected, cache_dir or default_cache_dir())
    else:
        path = Path(location)
        size = verify_sha256(path, expected)
    check_layout(path)
    return LocalRelease(version=version, path=path, sha256=expected, size=size)


def _missing_local(path: Path, version: str, inv: Inventory) -> str:
    directory = path.parent
    have = (sorted(p.name for p in directory.glob("releasy-server-*.tar.gz"))
            if directory.is_dir() else [])
    listing = ", ".join(have[:8]) + (" ..." if len(have) > 8 else "") if have else "none"
    return (f"release {version} not found: no file {path} (release.source in {inv.path});"
            f" tarballs there: {listing}")


def _cached_download(url: str, name: str, expected: str, cache_dir: Path) -> tuple[Path, int]:
    """(path, size) of a verified copy of ``url`` in the cache, downloading it if needed."""
    target = cache_dir / name
    if target.is_file():
        digest, size = sha256_of(target)
        if digest == expected:
            return target, size
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _download(url, out)
        # Verified before it gets the canonical name: the cache never holds an unverified file.
        size = verify_sha256(tmp, expected, label=f"{url} (downloaded)")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, size


def _download(url: str, out: BinaryIO) -> None:
    request = url_request.Request(url, headers={"User-Agent": "releasy-deploy"})
    try:
        with url_request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise BadInput(f"cannot download {url}: HTTP {exc.code} {exc.reason}; check the version"
                       f" and release.source") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BadInput(f"cannot download {url}: {reason}; check the network and release.source"
                       ) from None


# --------------------------------------------------------------------------------------
# What a release source offers
# --------------------------------------------------------------------------------------
def is_stable(version: str) -> bool:
    return "-" not in version.partition("+")[0]


_TARBALL = re.compile(r"releasy-server-(?P<v>.+)-linux-(?P<arch>[A-Za-z0-9_]+)\.tar\.gz")


def available_versions(source: ReleaseSource) -> list[str]:
    """Versions the release source offers with a pinned checksum, oldest first. Local
    directory: its tarballs; URL: the versions pinned in release.sha256 / sha256_file."""
    found: set[str] = set()
    if source.is_url:
        found.update(source.sha256)
        if source.sha256_file is not None and source.sha256_file.is_file():
            for line in source.sha256_file.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) == 2:
                    m = _TARBALL.fullmatch(parts[1].lstrip("*"))
                    if m and m["arch"] == source.arch and VERSION_RE.fullmatch(m["v"]):
                        found.add(m["v"])
    elif source.directory is not None and source.directory.is_dir():
        for p in source.directory.iterdir():
            m = _TARBALL.fullmatch(p.name)
            if m and m["arch"] == source.arch and VERSION_RE.fullmatch(m["v"]) and p.is_file():
                try:
                    if source.expected_sha256(m["v"]) is not None:
                        found.add(m["v"])
                except Exception:  # noqa: BLE001 - a malformed sidecar: not offered
                    continue
    return sorted(found, key=version_key)


def newest_release(source: ReleaseSource, *, prereleases: bool = False) -> str | None:
    """The newest version the source offers (pre-releases like 1.2.0-rc.1 excluded)."""
    versions = [v for v in available_versions(source) if prereleases or is_stable(v)]
    return versions[-1] if versions else None
