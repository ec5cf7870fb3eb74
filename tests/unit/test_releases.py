"""Release artifacts: checksum and layout verification of real tarballs, and downloads from
a real HTTP server on loopback (cache, re-download, mismatch, 404)."""
from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from lab.standin.build import build_release
from releasy_deploy.cli import EXIT_BAD_INPUT, BadInput, exit_code_for
from releasy_deploy.inventory import parse_inventory
from releasy_deploy.releases import LocalRelease, check_layout, fetch_release, sha256_of


def inventory(tmp: Path, release: dict):
    (tmp / "known_hosts").write_text("# test\n")
    data = {
        "environment": "test",
        "admin_cidrs": ["192.0.2.0/28"],
        "known_hosts": "known_hosts",
        "hosts": {"solo": {"address": "192.0.2.5"}},
        "tiers": {"proxy": ["solo"], "app": ["solo"], "db": ["solo"]},
        "database": {"kind": "sqlite"},
        "release": release,
        "tls": {"mode": "self-signed", "server_name": "releasy.test"},
    }
    return parse_inventory(data, tmp / "hosts.yaml")


def tarball(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                name, data = m
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def releases_dir(tmp_path: Path) -> Path:
    d = tmp_path / "releases"
    build_release("1.0.0", d)  # the lab's stand-in: laid out exactly like upstream's
    return d


# ------------------------------------------------------------------------ local sources
def test_local_release_is_verified_and_described(tmp_path, releases_dir):
    inv = inventory(tmp_path, {"source": "releases"})
    rel = fetch_release(inv, "1.0.0")
    path = releases_dir / "releasy-server-1.0.0-linux-x86_64.tar.gz"
    assert rel == LocalRelease("1.0.0", path, sha(path.read_bytes()), path.stat().st_size)
    assert sha256_of(path) == (rel.sha256, rel.size)


def test_checksum_mismatch_names_file_expected_and_actual(tmp_path, releases_dir):
    path = releases_dir / "releasy-server-1.0.0-linux-x86_64.tar.gz"
    good = sha(path.read_bytes())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    inv = inventory(tmp_path, {"source": "releases"})
    with pytest.raises(BadInput) as exc:
        fetch_release(inv, "1.0.0")
    msg = str(exc.value)
    assert str(path) in msg and good in msg and sha(bytes(data)) in msg
    assert exit_code_for(exc.value) == EXIT_BAD_INPUT


def test_inventory_pin_wins_over_the_sidecar(tmp_path, releases_dir):
    inv = inventory(tmp_path, {"source": "releases", "sha256": {"1.0.0": "0" * 64}})
    with pytest.raises(BadInput, match="expected sha256 0{64}"):
        fetch_release(inv, "1.0.0")


def test_no_pinned_checksum_is_refused(tmp_path, releases_dir):
    (releases_dir / "releasy-server-1.0.0-linux-x86_64.tar.gz.sha256").unlink()
    inv = inventory(tmp_path, {"source": "releases"})
    with pytest.raises(BadInput) as exc:
        fetch_release(inv, "1.0.0")
    assert str(exc.value).startswith(
        f"no checksum pinned for 1.0.0: add it to release.sha256 in {tmp_path / 'hosts.yaml'}")


def test_missing_local_tarball_lists_what_is_there(tmp_path, releases_dir):
    inv = inventory(tmp_path, {"source": "releases"})
    with pytest.raises(BadInput, match=r"release 9\.9\.9 not found.*releasy-server-1\.0\.0-linux"):
        fetch_release(inv, "9.9.9")


@pytest.mark.parametrize("version", ["1.0", "../1.0.0", "1.0.0;rm -rf /", "1.0.0\n", ""])
def test_malformed_version_is_bad_input(tmp_path, releases_dir, version):
    inv = inventory(tmp_path, {"source": "releases"})
    with pytest.raises(BadInput, match="invalid release version"):
        fetch_release(inv, version)


# ------------------------------------------------------------------------ layout
def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


@pytest.mark.parametrize("members, fragment", [
    ([("releasy-server", b"x"), ("README", b"y")], "file 'README'"),
    ([("bin/releasy-server", b"x")], "file 'bin/releasy-server'"),
    ([("./releasy-server", b"x")], "file './releasy-server'"),
    ([_dir("releasy-server")], "directory 'releasy-server'"),
    ([_link("releasy-server", "/bin/sh")], "symlink 'releasy-server'"),
    ([("x", b"x"), _link("releasy-server", "x", tarfile.LNKTYPE)], "hard link 'releasy-server'"),
    ([("releasy-server", b"x"), ("releasy-server", b"y")], "2 copies"),
    ([], "the archive is empty"),
])
def test_layout_must_be_exactly_one_regular_releasy_server(tmp_path, members, fragment):
    path = tmp_path / "r.tar.gz"
    path.write_bytes(tarball(members))
    with pytest.raises(BadInput) as exc:
        check_layout(path)
    assert fragment in str(exc.value) and str(path) in str(exc.value)


def test_layout_of_upstream_shaped_tarball_passes(tmp_path):
    path = tmp_path / "ok.tar.gz"
    path.write_bytes(tarball([("releasy-server", b"\x7fELF...")]))
    check_layout(path)


def test_not_a_gzip_archive(tmp_path):
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(BadInput, match="not a readable .tar.gz"):
        check_layout(path)


def test_bad_layout_is_refused_even_with_a_matching_checksum(tmp_path):
    d = tmp_path / "releases"
    d.mkdir()
    data = tarball([("releasy-server", b"x"), _link("evil", "/etc/shadow")])
    name = "releasy-server-2.0.0-linux-x86_64.tar.gz"
    (d / name).write_bytes(data)
    inv = inventory(tmp_path, {"source": "releases", "sha256": {"2.0.0": sha(data)}})
    with pytest.raises(BadInput, match="symlink 'evil'"):
        fetch_release(inv, "2.0.0")


# ------------------------------------------------------------------------ URL sources
class _Server:
    """A real HTTP server on loopback serving {path: bytes}; counts requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server({})
    yield s
    s.close()


def url_inventory(tmp_path: Path, port: int, sums: dict[str, str]):
    return inventory(tmp_path, {
        "source": f"http://127.0.0.1:{port}/download/v{{version}}/releasy-server-linux-{{arch}}.tar.gz",
        "sha256": sums,
    })


def test_url_template_is_filled_in(tmp_path):
    inv = url_inventory(tmp_path, 8000, {"1.2.3": "a" * 64})
    assert inv.release.location("1.2.3") == (
        "http://127.0.0.1:8000/download/v1.2.3/releasy-server-linux-x86_64.tar.gz")
    (tmp_path / "releases").mkdir()
    local = inventory(tmp_path, {"source": "releases", "arch": "arm64"})
    assert local.release.location("1.2.3") == str(
        tmp_path / "releases" / "releasy-server-1.2.3-linux-arm64.tar.gz")


def test_download_is_verified_cached_under_the_canonical_name_and_reused(tmp_path, server):
    data = tarball([("releasy-server", b"#!/bin/sh\n")])
    server.files["/download/v1.2.3/releasy-server-linux-x86_64.tar.gz"] = data
    inv = url_inventory(tmp_path, server.port, {"1.2.3": sha(data)})
    cache = tmp_path / "cache"
    rel = fetch_release(inv, "1.2.3", cache_dir=cache)
    assert rel.path == cache / "releasy-server-1.2.3-linux-x86_64.tar.gz"
    assert rel.path.read_bytes() == data and rel.sha256 == sha(data) and rel.size == len(data)
    assert fetch_release(inv, "1.2.3", cache_dir=cache) == rel
    assert len(server.requests) == 1  # second fetch came from the cache
    # A cached copy that no longer matches is downloaded again.
    rel.path.write_bytes(b"corrupted")
    assert fetch_release(inv, "1.2.3", cache_dir=cache).path.read_bytes() == data
    assert len(server.requests) == 2
    assert sorted(p.name for p in cache.iterdir()) == [rel.path.name]  # no temp files left


def test_download_with_wrong_checksum_leaves_nothing_in_the_cache(tmp_path, server):
    data = tarball([("releasy-server", b"tampered")])
    server.files["/download/v1.2.3/releasy-server-linux-x86_64.tar.gz"] = data
    inv = url_inventory(tmp_path, server.port, {"1.2.3": "b" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(BadInput) as exc:
        fetch_release(inv, "1.2.3", cache_dir=cache)
    msg = str(exc.value)
    assert "b" * 64 in msg and sha(data) in msg and f"127.0.0.1:{server.port}/download" in msg
    assert list(cache.iterdir()) == []


def test_download_404_is_bad_input(tmp_path, server):
    inv = url_inventory(tmp_path, server.port, {"1.2.3": "b" * 64})
    with pytest.raises(BadInput, match="HTTP 404"):
        fetch_release(inv, "1.2.3", cache_dir=tmp_path / "cache")


def test_url_source_without_pin_for_that_version(tmp_path, server):
    inv = url_inventory(tmp_path, server.port, {"1.2.3": "b" * 64})
    with pytest.raises(BadInput, match="no checksum pinned for 1.2.4: add it to release.sha256"):
        fetch_release(inv, "1.2.4", cache_dir=tmp_path / "cache")
    assert server.requests == []  # refused before any download
