"""Idempotent remote helpers: look first, act only on a difference, say what happened.

Each helper reads the host's state in ONE round trip, returns a `Change` and reports it
(changed / ok / would change) through the executor's reporter. Nothing changed means
nothing written, so a second run of any task reports only "ok" lines. In dry-run the
helpers read (probes are read-only) but never write, and show what would change.

All commands are argv lists; values reach shell snippets only as positional parameters
("$1") or through `shlex.quote`, never by string formatting.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DeployError, RemoteCommandError
from .executor import HostConnection, render_masked, tail
from .templates import FILES_DIR, render_template

MAX_DIFF_LINES = 200


@dataclass(frozen=True)
class Change:
    changed: bool
    what: str
    diff: str | None = None


def report(c: HostConnection, change: Change, *, path: str | None = None) -> Change:
    """Tell the reporter about a change (or its absence); dry-run says "would"."""
    if not change.changed:
        c.reporter.unchanged(c.name, change.what)
        return change
    if c.dry_run:
        c.reporter.would(c.name, f"change: {change.what}")
    else:
        c.reporter.changed(c.name, change.what)
    if change.diff:
        c.reporter.diff(c.name, path or change.what, change.diff)
    return change


def _mode(mode: int) -> str:
    return f"{mode:04o}"


# --------------------------------------------------------------------------------------
# Diffs
# --------------------------------------------------------------------------------------
def _as_text(data: bytes) -> str | None:
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def render_diff(old: bytes | None, new: bytes, path: str, *, secret: bool = False) -> str:
    """A unified diff for text, or a one-line summary for binary/secret content."""
    if secret:
        return "secret content changed (not shown)"
    old_text = "" if old is None else _as_text(old)
    new_text = _as_text(new)
    if old_text is None or new_text is None:
        old_len = 0 if old is None else len(old)
        return (
            f"binary content differs ({old_len} -> {len(new)} bytes,"
            f" sha256 {hashlib.sha256(new).hexdigest()[:12]}...)"
        )
    lines = list(
        difflib.unified_diff(
            old_text.splitlines(),
            new_text.splitlines(),
            fromfile="/dev/null" if old is None else f"{path} (current)",
            tofile=f"{path} (new)",
            lineterm="",
        )
    )
    if not lines:
        return "only the trailing newline differs"
    if len(lines) > MAX_DIFF_LINES:
        hidden = len(lines) - MAX_DIFF_LINES
        lines = [*lines[:MAX_DIFF_LINES], f"... ({hidden} more diff lines not shown)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Files and directories
# --------------------------------------------------------------------------------------
# Prints one line: "absent", "other", "link" or "file SHA256 OWNER GROUP MODE".
_FILE_PROBE = """if [ -L "$1" ]; then echo link
elif [ -f "$1" ]; then
  set -e
  sum=$(sha256sum < "$1")
  echo "file ${sum%% *} $(stat -c '%U %G %a' -- "$1")"
elif [ -e "$1" ]; then echo other
else echo absent
fi"""

# Prints "absent", "other" or "dir OWNER GROUP MODE" (symlinks to directories are followed).
_DIR_PROBE = """if [ -d "$1" ]; then echo "dir $(stat -L -c '%U %G %a' -- "$1")"
elif [ -e "$1" ] || [ -L "$1" ]; then echo other
else echo absent
fi"""

# chown before chmod: chown clears setuid/setgid bits.
_SET_ATTRS = 'chown -- "$2" "$1" && chmod -- "$3" "$1"'
_MKDIR = 'mkdir -p -- "$1" && chown -- "$2" "$1" && chmod -- "$3" "$1"'


@dataclass(frozen=True)
class _Stat:
    kind: str  # file | dir | link | other | absent
    sha256: str | None = None
    owner: str | None = None
    group: str | None = None
    mode: int | None = None


def parse_file_probe(line: str) -> _Stat:
    parts = line.split()
    if not parts:
        raise ValueError("empty probe output")
    if parts[0] == "file" and len(parts) == 5:
        return _Stat("file", parts[1], parts[2], parts[3], int(parts[4], 8))
    if parts[0] == "dir" and len(parts) == 4:
        return _Stat("dir", None, parts[1], parts[2], int(parts[3], 8))
    if parts[0] in ("absent", "other", "link") and len(parts) == 1:
        return _Stat(parts[0])
    raise ValueError(f"unexpected probe output {line!r}")


def _probe(c: HostConnection, script: str, path: str) -> _Stat:
    res = c.run(["sh", "-c", script, "releasy-probe", path], sudo=True, mutates=False)
    try:
        return parse_file_probe(res.stdout.strip())
    except ValueError as exc:
        raise DeployError(f"{c.name}: cannot inspect {path}: {exc}", host=c.name) from None


def _attr_changes(st: _Stat, owner: str, group: str, mode: int) -> list[str]:
    out = []
    if (st.owner, st.group) != (owner, group):
        out.append(f"owner {st.owner}:{st.group} -> {owner}:{group}")
    if st.mode != mode:
        out.append(f"mode {_mode(st.mode or 0)} -> {_mode(mode)}")
    return out


def ensure_dir(
    c: HostConnection, path: str, *, owner: str = "root", group: str = "root", mode: int = 0o755
) -> Change:
    """Directory exists with this owner/group/mode (parents created as needed, root-owned)."""
    st = _probe(c, _DIR_PROBE, path)
    if st.kind == "other":
        raise DeployError(
            f"{c.name}: {path} exists but is not a directory; move it away and re-run",
            host=c.name,
        )
    attrs = [f"{owner}:{group}", _mode(mode)]
    if st.kind == "absent":
        change = Change(True, f"dir {path} (created, {owner}:{group} {_mode(mode)})")
        if not c.dry_run:
            c.run(["sh", "-c", _MKDIR, "releasy-mkdir", path, *attrs], sudo=True)
        return report(c, change, path=path)
    diffs = _attr_changes(st, owner, group, mode)
    if not diffs:
        return report(c, Change(False, f"dir {path}"), path=path)
    change = Change(True, f"dir {path} ({', '.join(diffs)})")
    if not c.dry_run:
        c.run(["sh", "-c", _SET_ATTRS, "releasy-attrs", path, *attrs], sudo=True)
    return report(c, change, path=path)


def put_file(
    c: HostConnection,
    path: str,
    data: bytes,
    *,
    owner: str = "root",
    group: str = "root",
    mode: int = 0o644,
    secret: bool = False,
    show_diff: bool | None = None,
) -> Change:
    """File has exactly this content, owner, group and mode.

    One round trip when nothing changed (sha256 + stat in one command); one more to upload
    (atomic, see `HostConnection.put_bytes`) or to fix owner/mode. ``show_diff`` (default:
    in dry-run) reads the current content for a unified diff, one more round trip; secret
    files never show content, only "secret content changed".
    """
    if not isinstance(data, bytes):
        raise TypeError(f"put_file({path!r}) needs bytes; encode text explicitly")
    show_diff = c.dry_run if show_diff is None else show_diff
    st = _probe(c, _FILE_PROBE, path)
    if st.kind == "other":
        raise DeployError(
            f"{c.name}: {path} exists but is not a regular file; move it away and re-run",
            host=c.name,
        )
    new_sha = hashlib.sha256(data).hexdigest()
    attrs_text = f"{owner}:{group} {_mode(mode)}"
    if st.kind in ("absent", "link"):
        verb = "created" if st.kind == "absent" else "replaced a symlink"
        change = Change(
            True,
            f"file {path} ({verb}, {len(data)} bytes, {attrs_text})",
            render_diff(None, data, path, secret=secret) if show_diff else None,
        )
        if not c.dry_run:
            c.put_bytes(data, path, owner=owner, group=group, mode=mode, secret=secret)
        return report(c, change, path=path)
    if st.sha256 != new_sha:
        diff = None
        if show_diff:
            old = None if secret else c.read_file(path, sudo=True)
            diff = render_diff(old if old is not None else b"", data, path, secret=secret)
        extra = _attr_changes(st, owner, group, mode)
        what = f"file {path} (content{', ' + ', '.join(extra) if extra else ''})"
        change = Change(True, what, diff)
        if not c.dry_run:
            c.put_bytes(data, path, owner=owner, group=group, mode=mode, secret=secret)
        return report(c, change, path=path)
    diffs = _attr_changes(st, owner, group, mode)
    if not diffs:
        return report(c, Change(False, f"file {path}"), path=path)
    change = Change(True, f"file {path} ({', '.join(diffs)})")
    if not c.dry_run:
        c.run(
            ["sh", "-c", _SET_ATTRS, "releasy-attrs", path, f"{owner}:{group}", _mode(mode)],
            sudo=True,
        )
    return report(c, change, path=path)


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------
def put_template(
    c: HostConnection,
    path: str,
    name: str,
    context: Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    **kw: Any,
) -> Change:
    text = render_template(name, context, base_dir=base_dir)
    return put_file(c, path, text.encode("utf-8"), **kw)


# --------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(?::[a-z0-9-]+)?(?:=[A-Za-z0-9.+:~-]+)?\Z")
_PKG_PROBE = r"""dpkg-query -W -f='${binary:Package}\t${Package}\t${db:Status-Abbrev}\t${Version}\n' "$@" 2>/dev/null
if ls /var/lib/apt/lists/ 2>/dev/null | grep -q '_Packages$'; then echo '@lists yes'; else echo '@lists no'; fi"""
_NO_CANDIDATE = re.compile(
    r"Unable to locate package|has no installation candidate|is not available"
    r"|Version '.*' for '.*' was not found"
)


def parse_package_probe(stdout: str) -> tuple[dict[str, str], bool]:
    """-> ({installed package name: version}, apt lists present)."""
    installed: dict[str, str] = {}
    lists = False
    for line in stdout.splitlines():
        if line.startswith("@lists "):
            lists = line.split()[1] == "yes"
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            continue
        full, short, status, version = fields
        if status.strip() == "ii":
            installed[full] = version
            installed[short] = version
    return installed, lists


def missing_packages(wanted: Sequence[str], installed: Mapping[str, str]) -> list[str]:
    missing = []
    for spec in wanted:
        name, _, version = spec.partition("=")
        if name not in installed or (version and installed[name] != version):
            missing.append(spec)
    return missing


def apt_install_argv(packages: Sequence[str]) -> list[str]:
    return [
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=120",  # wait for a running unattended-upgrade, not fail
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",  # keep config files we manage
        *packages,
    ]


APT_UPDATE_ARGV = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "update", "-q"]


def ensure_packages(c: HostConnection, packages: Sequence[str]) -> Change:
    """All packages installed (``name`` or ``name=version``), with one apt-get call for all.

    Virtual packages never show as installed in dpkg: name the real package.
    """
    wanted = list(dict.fromkeys(packages))
    for p in wanted:
        if not isinstance(p, str) or not _PACKAGE.match(p):
            raise ValueError(f"invalid Debian package name {p!r}")
    if not wanted:
        return Change(False, "packages: none requested")
    names = [p.partition("=")[0] for p in wanted]
    probe = c.run(["sh", "-c", _PKG_PROBE, "releasy-pkgs", *names], mutates=False, check=False)
    installed, lists = parse_package_probe(probe.stdout)
    missing = missing_packages(wanted, installed)
    if not missing:
        return report(c, Change(False, f"packages {' '.join(wanted)}"))
    change = Change(True, f"packages: install {' '.join(missing)}")
    if c.dry_run:
        return report(c, change)
    updated = False
    if not lists:
        c.run(APT_UPDATE_ARGV, sudo=True)
        updated = True
    res = c.run(apt_install_argv(missing), sudo=True, check=False)
    if not res.ok and not updated and _NO_CANDIDATE.search(res.stderr + res.stdout):
        # Stale or missing package lists: refresh once, then retry.
        c.run(APT_UPDATE_ARGV, sudo=True)
        res = c.run(apt_install_argv(missing), sudo=True, check=False)
    if not res.ok:
        raise RemoteCommandError(
            c.name,
            render_masked(res.argv, c.mask),
            res.exit_code,
            tail(c.mask(res.stderr or res.stdout)),
            hint=f"check the package names and the apt sources on {c.name}"
            f" (apt-get update; apt-cache policy {' '.join(missing)})",
        )
    return report(c, Change(True, f"packages: installed {' '.join(missing)}"))
