"""systemd: argv builders, EnvironmentFile quoting and `systemctl show` parsing (pure).

EnvironmentFile= syntax (systemd.exec(5), env-file.c): a value in double quotes keeps
everything verbatim except that a backslash before one of ``" \\ ` $`` yields that
character; systemd does no ``$VAR`` expansion in these files. So every value is written
double-quoted with exactly those four characters escaped, which round-trips any text
without NUL, CR or LF. Those three are refused: a value with a line break could not be
told apart from the next assignment by a person reading the file, and no setting needs one.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

#: ActiveState values of a unit whose process may still be running (a stop must wait).
RUNNING_STATES = frozenset({"active", "activating", "reloading", "deactivating"})

__all__ = [
    "UNIT_RE", "ENV_NAME_RE", "check_unit", "quote_env_value", "env_assignment",
    "systemctl", "daemon_reload_argv", "show_argv", "parse_show",
    "journal_argv", "DEFAULT_LOG_LINES", "verify_argv", "SHOW_PROPERTIES",
]

# unit names we manage: name[@instance].service
UNIT_RE = re.compile(r"[A-Za-z0-9_.:-]+(?:@[A-Za-z0-9_.:-]*)?\.(?:service|socket|timer|target)")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPED = re.compile(r'(["\\`$])')
# NUL, line breaks, BOM and Unicode noncharacters are not valid in an EnvironmentFile.
_INVALID = re.compile("[\x00\r\n\ufeff\ufdd0-\ufdef\ufffe\uffff]")

SHOW_PROPERTIES = ("LoadState", "ActiveState", "SubState", "UnitFileState", "MainPID",
                   "NeedDaemonReload", "Result")


def check_unit(unit: str) -> str:
    if not isinstance(unit, str) or not UNIT_RE.fullmatch(unit):
        raise ValueError(f"invalid systemd unit name {unit!r}")
    return unit


def quote_env_value(value: str) -> str:
    """``value`` as one double-quoted EnvironmentFile value (see the module docstring)."""
    if not isinstance(value, str):
        raise TypeError(f"environment values must be str, got {type(value).__name__}")
    if _INVALID.search(value):
        # The value is not shown: it may be a secret.
        raise ValueError("environment value contains NUL, CR, LF, a BOM or a Unicode"
                         " noncharacter, which an EnvironmentFile cannot hold")
    return '"' + _ESCAPED.sub(r"\\\1", value) + '"'


def env_assignment(name: str, value: str) -> str:
    if not ENV_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid environment variable name {name!r}")
    try:
        return f"{name}={quote_env_value(value)}"
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def systemctl(verb: str, *units: str) -> list[str]:
    """``systemctl VERB UNIT...`` for verbs that take unit names."""
    if verb not in ("start", "stop", "restart", "enable", "disable", "reset-failed",
                    "is-active", "is-enabled", "reload", "try-restart"):
        raise ValueError(f"unsupported systemctl verb {verb!r}")
    if not units:
        raise ValueError(f"systemctl {verb} needs a unit")
    return ["systemctl", verb, *(check_unit(u) for u in units)]


def daemon_reload_argv() -> list[str]:
    return ["systemctl", "daemon-reload"]


def show_argv(unit: str, properties: Sequence[str] = SHOW_PROPERTIES) -> list[str]:
    return ["systemctl", "show", f"--property={','.join(properties)}", check_unit(unit)]


def parse_show(stdout: str) -> dict[str, str]:
    """``systemctl show`` KEY=VALUE lines -> dict (missing keys are simply absent)."""
    out: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            out[key] = value
    return out


_MAIN_EXE_TAIL = r"""printf '%s\n@exe\n' "$s"
printf '%s\n' "$s" | while IFS= read -r l; do
  case $l in
    MainPID=|MainPID=0|MainPID=*[!0-9]*) ;;
    MainPID=*) p=${l#MainPID=}; printf '%s %s\n' "$p" "$(readlink "/proc/$p/exe")" ;;
  esac
done"""


def show_with_main_exe_shell(show: str) -> str:
    """``show`` (a ``systemctl show`` command line asking MainPID) printed as is, then a
    line ``@exe`` and ``PID EXECUTABLE`` for every main process it names
    (`split_main_exes`); a process gone meanwhile has an empty executable. Exits with
    systemctl's status when that fails."""
    return f"s=$({show}) || exit\n{_MAIN_EXE_TAIL}"


def split_main_exes(out: str) -> tuple[str, dict[str, str]]:
    """(systemctl's output, {PID: executable}) from `show_with_main_exe_shell`'s output."""
    show, _, exes = out.partition("\n@exe\n")
    found = {}
    for line in exes.splitlines():
        pid, _, exe = line.partition(" ")
        if pid.isdigit() and exe:
            found[pid] = exe
    return show, found


# `fab app.logs`: journal lines per host unless --lines says otherwise.
DEFAULT_LOG_LINES = 50


def journal_argv(unit: str, lines: int = 30) -> list[str]:
    if not isinstance(lines, int) or isinstance(lines, bool) or not 1 <= lines <= 10000:
        raise ValueError(f"lines must be an integer 1..10000, got {lines!r}")
    return ["journalctl", "--unit", check_unit(unit), "--lines", str(lines), "--no-pager",
            "--output", "short-iso", "--quiet"]


def verify_argv(paths: Sequence[str]) -> list[str]:
    if not paths:
        raise ValueError("nothing to verify")
    for p in paths:
        if not p.startswith("/"):
            raise ValueError(f"unit path must be absolute, got {p!r}")
    return ["systemd-analyze", "verify", "--man=no", *paths]


def property_is(props: Mapping[str, str], key: str, *values: str) -> bool:
    return props.get(key) in values
