"""Typed facts: read-only probes of a host, read in ONE round trip per host.

A fact is a small frozen dataclass whose fields are its arguments (``ServiceActive("nginx")``)
with two methods: ``shell()``, the read-only shell snippet that reads it (every value in it
through `shlex.quote`), and ``parse(out, code)``, which turns the snippet's stdout and exit
code into a typed value. The fact object is its own key: equal by value, hashable, so
``read_facts(c, [FileStat(p)])[FileStat(p)]`` is how a caller asks and reads.

The generic facts live here; a fact whose meaning belongs to a tier or a flow lives next to
that code (``tiers/app_facts.py: ReleasyReady``, ``schema.py: SchemaLevel``, ...). Nothing is
registered anywhere: a caller imports the class it reads.

Facts of one kind can share a command: a class whose ``batch`` is set (`Batch`) is read
with one `stat`, one `sha256sum`, one `dpkg-query` or one `systemctl show` for all of a
script's facts of that kind, and ``batch.split`` hands each fact its own part. A fact read
alone is a batch of one, so its ``parse`` always sees the same shape.
"""
from __future__ import annotations

import re
import secrets as _random
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .commands.shell_read import print_text
from .commands.systemd import parse_show, show_with_main_exe_shell, split_main_exes
from .errors import DeployError, UnreachableError
from .executor import HostConnection

__all__ = [
    "Fact", "Batch", "read_facts", "read_fact", "tolerant_reader", "prefetch", "build_facts_script",
    "parse_facts_output",
    "OsRelease", "Arch", "Hostname", "Kernel", "MemTotal", "Systemd", "DiskFree",
    "ServiceActive", "ServiceEnabled", "FileSha256", "FileStat", "LinkTarget", "PathExists", "UserExists",
    "GroupExists", "CommandExists", "PackageVersion", "SYSTEMD_SHOW",
]


@dataclass(frozen=True)
class Fact:
    """Base of every fact. Subclasses are ``@dataclass(frozen=True)``; their fields are
    the fact's arguments. A str field must hold a str without NUL bytes (a NUL cannot
    reach a shell intact, so it is refused rather than silently cut)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("str", str) and not isinstance(value, str):
                raise TypeError(f"{type(self).__name__}.{f.name} must be a str, not"
                                f" {type(value).__name__} ({value!r})")
            if isinstance(value, str) and "\x00" in value:
                raise ValueError(f"{type(self).__name__}.{f.name} contains a NUL byte")

    #: A `Batch` reading all of a script's facts of this class with one command, or None.
    batch = None

    def shell(self) -> str:
        """The read-only snippet (one or more lines) printing what `parse` reads."""
        if self.batch is not None:
            return self.batch.shell([self])
        raise NotImplementedError(f"{type(self).__name__}.shell")

    def parse(self, out: str, code: int) -> Any:
        """The value, from the snippet's stdout and exit code."""
        raise NotImplementedError(f"{type(self).__name__}.parse")

    def __str__(self) -> str:  # for labels and messages: "FileStat(/etc/x)"
        args = ", ".join(str(getattr(self, f.name)) for f in fields(self))
        return f"{type(self).__name__}({args})" if args else type(self).__name__


class Batch:
    """One command reading several facts of one kind (a class's ``batch``)."""

    def shell(self, facts: Sequence[Fact]) -> str:
        """The read-only snippet for all of ``facts`` (at least one, no duplicates)."""
        raise NotImplementedError(f"{type(self).__name__}.shell")

    def split(self, facts: Sequence[Fact], out: str, code: int) -> list[tuple[str, int]]:
        """Each fact's own (stdout, exit code), in order, from the snippet's; ValueError
        when the output does not fit."""
        raise NotImplementedError(f"{type(self).__name__}.split")


# --------------------------------------------------------------------------------------
# The reader: every fact of a host in one script, outputs framed by nonce'd markers
# --------------------------------------------------------------------------------------
def _markers(nonce: str, i: int) -> tuple[str, str]:
    return f"@@releasy:{nonce}:{i}:begin@@", f"@@releasy:{nonce}:{i}:end:"


def _frames(facts: Sequence[Fact]) -> list[list[Fact]]:
    """The script's frames in order: a fact alone, or every fact sharing its class's batch
    (at the place of the first of them; the probes only read, so the order is free)."""
    frames: list[list[Fact]] = []
    batched: dict[Batch, list[Fact]] = {}
    for fact in dict.fromkeys(facts):
        batch = fact.batch
        if batch is None:
            frames.append([fact])
        elif batch in batched:
            batched[batch].append(fact)
        else:
            batched[batch] = [fact]
            frames.append(batched[batch])
    return frames


def build_facts_script(facts: Sequence[Fact], nonce: str) -> str:
    """One shell script running every probe, each output framed by nonce'd markers.

    Each probe runs in a subshell with stdin from /dev/null (the script itself arrives on
    stdin, which a probe must not eat) and stderr discarded; its exit code is recorded.
    """
    parts = []
    for i, frame in enumerate(_frames(facts)):
        begin, end = _markers(nonce, i)
        batch = frame[0].batch
        snippet = frame[0].shell() if batch is None else batch.shell(frame)
        parts.append(f"printf '%s\\n' {shlex.quote(begin)}")
        parts.append(f"( {snippet}\n) </dev/null 2>/dev/null")
        # The leading \n guarantees the end marker starts a line; the parser removes it.
        parts.append(f"printf '\\n%s%s@@\\n' {shlex.quote(end)} \"$?\"")
    return "\n".join(parts) + "\n"


def parse_facts_output(facts: Sequence[Fact], nonce: str, stdout: str) -> dict[Fact, Any]:
    """{fact: value} from the script's stdout; ValueError when a frame is missing or cut."""
    values: dict[Fact, Any] = {}
    pos = 0
    for i, frame in enumerate(_frames(facts)):
        fact = frame[0]
        begin, end = _markers(nonce, i)
        b = stdout.find(begin + "\n", pos)
        if b < 0:
            raise ValueError(f"output of fact {fact} is missing")
        start = b + len(begin) + 1
        e = stdout.find("\n" + end, start)
        if e < 0:
            raise ValueError(f"output of fact {fact} is truncated")
        code_start = e + 1 + len(end)
        code_end = stdout.find("@@\n", code_start)
        if code_end < 0:
            raise ValueError(f"exit code of fact {fact} is missing")
        body = stdout[start:e]
        code = int(stdout[code_start:code_end])
        parts = [(body, code)] if fact.batch is None else fact.batch.split(frame, body, code)
        for member, (out, member_code) in zip(frame, parts, strict=True):
            values[member] = member.parse(out, member_code)
        pos = code_end + 3
    # In the order asked (a batch's later members were parsed at its first's place).
    return {fact: values[fact] for fact in facts}


def read_facts(c: HostConnection, facts: Iterable[Fact], *,
               sudo: bool = False, reuse: bool = False) -> dict[Fact, Any]:
    """Read several facts in ONE round trip (read-only: also runs in dry-run).

    ``reuse=True``: when `prefetch` read every one of them earlier in this task and nothing
    was changed on the host through this connection since, no round trip at all. Only for a
    tier's first look at a host, never in a loop that waits for a value to change."""
    wanted = list(dict.fromkeys(facts))
    for fact in wanted:
        if not isinstance(fact, Fact):
            raise TypeError(f"not a fact: {fact!r}")
    if not wanted:
        return {}
    if reuse:
        known = c.recall(wanted, sudo=sudo)
        if known is not None:
            return known
    nonce = _random.token_hex(8)  # unguessable: file content cannot forge a marker
    script = build_facts_script(wanted, nonce)
    res = c.run_script(script, sudo=sudo, mutates=False,
                       label=f"facts {', '.join(map(str, wanted))}")
    try:
        return parse_facts_output(wanted, nonce, res.stdout)
    except ValueError as exc:
        raise DeployError(f"{c.name}: cannot read facts: {exc}", host=c.name) from None


def tolerant_reader(wanted: Mapping[str, list[Fact]], tolerated: Iterable[str]):
    """For `Executor.each`: reads a host's ``wanted`` facts (sudo); for the ``tolerated``
    hosts, being unreachable is an answer (the `UnreachableError` is returned), not a
    failure."""
    spared = set(tolerated)

    def read(c: HostConnection) -> Mapping[Fact, Any] | UnreachableError:
        try:
            return read_facts(c, wanted[c.name], sudo=True)
        except UnreachableError as exc:
            if c.name in spared:
                return exc
            raise
    return read


def read_fact(c: HostConnection, fact: Fact, *, sudo: bool = False,
              reuse: bool = False) -> Any:
    return read_facts(c, [fact], sudo=sudo, reuse=reuse)[fact]


def prefetch(c: HostConnection, facts: Iterable[Fact], *, sudo: bool = True) -> dict[Fact, Any]:
    """Read what several steps will look at on this host in ONE round trip, and keep it on
    the connection: their ``read_facts(..., reuse=True)`` then costs nothing until a
    host-changing command goes through the connection (`fab site` reads every tier's facts
    of every host at once this way)."""
    values = read_facts(c, facts, sudo=sudo)
    c.remember(values, sudo=sudo)
    return values


# --------------------------------------------------------------------------------------
# Generic facts
# --------------------------------------------------------------------------------------
def _stripped(out: str, code: int) -> str | None:
    return out.strip() if code == 0 else None


@dataclass(frozen=True)
class OsRelease(Fact):
    """/etc/os-release as {KEY: value} ({} when unreadable)."""

    def shell(self) -> str:
        return print_text("/etc/os-release")

    def parse(self, out: str, code: int) -> dict[str, str]:
        result: dict[str, str] = {}
        if code != 0:
            return result
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.startswith("#"):
                try:
                    words = shlex.split(value)
                except ValueError:
                    words = [value]
                result[key.strip()] = words[0] if words else ""
        return result


@dataclass(frozen=True)
class Arch(Fact):
    """The machine hardware name (``uname -m``)."""

    def shell(self) -> str:
        return "uname -m"

    def parse(self, out: str, code: int) -> str | None:
        return _stripped(out, code)


@dataclass(frozen=True)
class Hostname(Fact):
    def shell(self) -> str:
        return "uname -n"

    def parse(self, out: str, code: int) -> str | None:
        return _stripped(out, code)


@dataclass(frozen=True)
class Kernel(Fact):
    def shell(self) -> str:
        return "uname -r"

    def parse(self, out: str, code: int) -> str | None:
        return _stripped(out, code)


@dataclass(frozen=True)
class MemTotal(Fact):
    """Total memory in bytes, or None."""

    def shell(self) -> str:
        return "cat /proc/meminfo"

    def parse(self, out: str, code: int) -> int | None:
        for line in out.splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
        return None


@dataclass(frozen=True)
class Systemd(Fact):
    """systemd runs as the init system."""

    def shell(self) -> str:
        return "[ -d /run/systemd/system ]"

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass(frozen=True)
class DiskFree(Fact):
    """Bytes available to unprivileged users on the file system of ``path``, or None."""

    path: str

    def shell(self) -> str:
        return f"df -Pk -- {shlex.quote(self.path)}"

    def parse(self, out: str, code: int) -> int | None:
        lines = out.strip().splitlines()
        if code != 0 or len(lines) < 2:
            return None
        fields_ = lines[-1].split()
        return int(fields_[3]) * 1024 if len(fields_) >= 6 else None


class _UnitBatch(Batch):
    """One ``systemctl show`` for every unit; a fact names its ``unit`` and the
    ``properties`` it reads, and gets those lines (KEY=VALUE) of its unit's block.

    systemctl prints a block per unit asked, in order, a blank line between; with
    ``--property`` every property asked is printed, even empty. LoadState is always asked
    (never empty), so no block is empty and the blocks can be counted.

    A fact whose class sets ``main_exe`` (and asks MainPID among its ``properties``) gets,
    instead of its lines, the executable of the unit's main process (exit 3 when it has
    none), read in the same frame
    (`commands.systemd.show_with_main_exe_shell`): no second systemctl for it."""

    def _units(self, facts: Sequence[Fact]) -> list[str]:
        return list(dict.fromkeys(f.unit for f in facts))  # type: ignore[attr-defined]

    def shell(self, facts: Sequence[Fact]) -> str:
        wanted = {"LoadState", *(p for f in facts for p in f.properties)}  # type: ignore[attr-defined]
        units = " ".join(shlex.quote(u) for u in self._units(facts))
        show = f"systemctl show --property={','.join(sorted(wanted))} -- {units}"
        if any(getattr(f, "main_exe", False) for f in facts):
            return show_with_main_exe_shell(show)
        return show

    def split(self, facts: Sequence[Fact], out: str, code: int) -> list[tuple[str, int]]:
        if code != 0:  # no systemd to ask: every fact reads as nothing known
            return [("", code)] * len(facts)
        units = self._units(facts)
        out, exes = split_main_exes(out)
        blocks = out.strip("\n").split("\n\n")
        if len(blocks) != len(units):
            raise ValueError(f"systemctl show printed {len(blocks)} units for {len(units)}")
        by_unit = dict(zip(units, blocks))
        parts = []
        for f in facts:
            block = by_unit[f.unit]  # type: ignore[attr-defined]
            if getattr(f, "main_exe", False):
                exe = exes.get(parse_show(block).get("MainPID", ""), "")
                parts.append((exe, 0) if exe else ("", 3))
                continue
            wanted = set(f.properties)  # type: ignore[attr-defined]
            parts.append(("\n".join(x for x in block.splitlines()
                                     if x.partition("=")[0] in wanted), 0))
        return parts


SYSTEMD_SHOW = _UnitBatch()


@dataclass(frozen=True)
class ServiceActive(Fact):
    """The unit is active (``systemctl is-active``)."""

    unit: str
    batch = SYSTEMD_SHOW
    properties = ("ActiveState",)

    def parse(self, out: str, code: int) -> bool:
        return parse_show(out).get("ActiveState") == "active"


@dataclass(frozen=True)
class ServiceEnabled(Fact):
    """The unit file's state as ``systemctl is-enabled`` says it ("enabled", "disabled",
    ...), or None (no such unit)."""

    unit: str
    batch = SYSTEMD_SHOW
    properties = ("UnitFileState",)

    def parse(self, out: str, code: int) -> str | None:
        return parse_show(out).get("UnitFileState") or None


class _Sha256Batch(Batch):
    """One ``sha256sum`` for every path that is a regular file (symlinks followed). A line
    "y" or "n" per path says which are, then sha256sum's records follow, in order: "HASH  PATH"
    ended by a NUL (``-z`` also leaves the path unescaped), so a record is matched to its
    path by its ending. A path that is not a regular file gets exit code 3; one that
    sha256sum could not read has no record and gets 1."""

    _HASH = re.compile(r"[0-9a-f]{64}(  | \*)")

    def shell(self, facts: Sequence[Fact]) -> str:
        lines = ["set --"]
        for fact in facts:
            q = shlex.quote(fact.path)  # type: ignore[attr-defined]
            lines.append(f'if [ -f {q} ]; then set -- "$@" {q}; echo y; else echo n; fi')
        lines.append('[ "$#" -eq 0 ] || sha256sum -z -- "$@"')
        return "\n".join(lines)

    def split(self, facts: Sequence[Fact], out: str, code: int) -> list[tuple[str, int]]:
        flags = out[:2 * len(facts)]
        if flags.replace("y\n", "").replace("n\n", "") or len(flags) != 2 * len(facts):
            raise ValueError(f"the sha256 probe printed {out[:80]!r}")
        parts, pos = [], len(flags)
        for fact, flag in zip(facts, flags[::2]):
            if flag == "n":
                parts.append(("", 3))
                continue
            record = self._HASH.match(out, pos)
            tail = fact.path + "\0"  # type: ignore[attr-defined]
            if record and out.startswith(tail, record.end()):
                parts.append((out[pos:pos + 64], 0))
                pos = record.end() + len(tail)
            else:  # no record: sha256sum could not read it
                parts.append(("", 1))
        if pos != len(out):
            raise ValueError(f"sha256sum printed what no path asked for: {out[pos:pos + 80]!r}")
        return parts


@dataclass(frozen=True)
class FileSha256(Fact):
    """sha256 of a regular file, or None when it is not one."""

    path: str
    batch = _Sha256Batch()

    def parse(self, out: str, code: int) -> str | None:
        return out.split()[0] if code == 0 and out.strip() else None


class _StatBatch(Batch):
    """One ``stat`` for every path. It prints a record per path it can stat, in order,
    each ending in the path itself, so a record is matched to its fact by that ending (a
    path may hold a newline); the first five fields (type, names, numbers) hold no "|"."""

    FORMAT = "%F|%U|%G|%a|%s|%n"

    def shell(self, facts: Sequence[Fact]) -> str:
        paths = " ".join(shlex.quote(f.path) for f in facts)  # type: ignore[attr-defined]
        return f"stat -L -c '{self.FORMAT}' -- {paths}"

    def split(self, facts: Sequence[Fact], out: str, code: int) -> list[tuple[str, int]]:
        parts, pos = [], 0
        for fact in facts:
            head = pos
            for _ in range(5):
                head = out.find("|", head) + 1
                if head == 0:
                    break
            tail = fact.path + "\n"  # type: ignore[attr-defined]
            if head and out.startswith(tail, head):
                parts.append((out[pos:head - 1], 0))
                pos = head + len(tail)
            else:  # no record: stat could not read this path
                parts.append(("", 1))
        if pos != len(out):
            raise ValueError(f"stat printed what no path asked for: {out[pos:pos + 80]!r}")
        return parts


@dataclass(frozen=True)
class FileStat(Fact):
    """{"type", "owner", "group", "mode", "size"} of ``path`` (symlinks followed), or None."""

    path: str
    batch = _StatBatch()

    def parse(self, out: str, code: int) -> dict[str, Any] | None:
        if code != 0 or not out.strip():
            return None
        kind, owner, group, mode, size = out.strip().split("|")
        return {"type": kind, "owner": owner, "group": group, "mode": int(mode, 8),
                "size": int(size)}


@dataclass(frozen=True)
class LinkTarget(Fact):
    """Where a symlink points, or None when ``path`` is not a symlink."""

    path: str

    def shell(self) -> str:
        q = shlex.quote(self.path)
        return f"[ -L {q} ] || exit 3; readlink -- {q}"

    def parse(self, out: str, code: int) -> str | None:
        return out.strip() if code == 0 else None


@dataclass(frozen=True)
class PathExists(Fact):
    path: str

    def shell(self) -> str:
        return f"[ -e {shlex.quote(self.path)} ]"

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass(frozen=True)
class UserExists(Fact):
    name: str

    def shell(self) -> str:
        return f"id -u -- {shlex.quote(self.name)}"

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass(frozen=True)
class GroupExists(Fact):
    name: str

    def shell(self) -> str:
        return f"getent group -- {shlex.quote(self.name)}"

    def parse(self, out: str, code: int) -> bool:
        return code == 0


@dataclass(frozen=True)
class CommandExists(Fact):
    """Where ``command -v`` finds ``name``, or None."""

    name: str

    def shell(self) -> str:
        return f"command -v {shlex.quote(self.name)}"

    def parse(self, out: str, code: int) -> str | None:
        return _stripped(out, code)


class _DpkgBatch(Batch):
    """One ``dpkg-query`` for every package: a line per package dpkg knows (name, then
    status and version); none for a package it has never heard of."""

    def shell(self, facts: Sequence[Fact]) -> str:
        names = " ".join(shlex.quote(f.package) for f in facts)  # type: ignore[attr-defined]
        return ("dpkg-query -W -f='${Package}\\t${binary:Package}\\t${db:Status-Abbrev}"
                f" ${{Version}}\\n' -- {names}")

    def split(self, facts: Sequence[Fact], out: str, code: int) -> list[tuple[str, int]]:
        known: dict[str, str] = {}
        for line in out.splitlines():
            name, arch_name, status_version = (line.split("\t", 2) + ["", ""])[:3]
            known.setdefault(name, status_version)
            known.setdefault(arch_name, status_version)
        return [(known[f.package], 0) if f.package in known else ("", 1)  # type: ignore[attr-defined]
                for f in facts]


@dataclass(frozen=True)
class PackageVersion(Fact):
    """The installed version of a Debian package, or None when not installed."""

    package: str
    batch = _DpkgBatch()

    def parse(self, out: str, code: int) -> str | None:
        # "${db:Status-Abbrev}" is three characters wide ("ii "), then the version.
        status, version = out[:3].strip(), out[3:].strip()
        return version if code == 0 and status == "ii" and version else None
