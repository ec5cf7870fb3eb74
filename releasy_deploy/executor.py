"""The one place that talks SSH.

Tier code builds remote commands as argv lists (pure functions) and hands them to a
`HostConnection`, which renders them once with `shlex.join`, adds ``sudo -n --`` when the
SSH user is not root, runs them over the host's single Fabric connection, masks secrets in
everything it prints or raises, and skips mutating commands in dry-run.

Design notes (why, not what):
- Fabric's `Connection` opens and authenticates the session, but we verify host keys
  ourselves: Fabric installs AutoAddPolicy and ignores ``UserKnownHostsFile``, so we load the
  inventory's known_hosts into the paramiko client and reject anything unknown or changed.
- Commands run on a raw channel of the Fabric transport rather than through Invoke's
  Runner: the Runner decodes stdin as text (binary uploads would be mangled) and polls it on
  a thread; a channel gives exact bytes in and out, a guaranteed EOF on stdin and one
  ``exec`` request per command, which is also what `round_trips` counts.
- Secrets never travel in a command line (Fabric 3 inlines ``env=`` into it): content goes
  on stdin, and an argv that contains a known secret value is refused before it is sent.
"""
from __future__ import annotations

import re
import selectors
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paramiko
from fabric import Config, Connection

from .errors import (
    CommandTimeoutError,
    DeployError,
    HostKeyError,
    ParallelError,
    RemoteCommandError,
    SudoError,
    UnreachableError,
)
from .output import Masker, Reporter

T = TypeVar("T")

SUDO_PREFIX: tuple[str, ...] = ("sudo", "-n", "--")
STDERR_TAIL_LINES = 20
KEEPALIVE_S = 15
# Hosts worked on at once. Past the bound hosts wait for a free worker, a second wave of
# connection set-ups: 20 lab hosts took 0.39 s with 16 workers, 0.29 s with 32.
MAX_PARALLEL = 32
# Up to this size stdin is sent before reading output; larger payloads go on a thread so a
# command that writes a lot before reading its stdin cannot deadlock on the SSH window.
INLINE_STDIN_MAX = 256 * 1024
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ACCOUNT = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_.-]*\$?|[0-9]+)\Z")
_SUDO_DENIED = re.compile(
    r"^sudo: (?:a password is required|a terminal is required"
    r"|.*is not in the sudoers file|.*is not allowed to (?:execute|run sudo))",
    re.MULTILINE,
)
_SUDO_MISSING = re.compile(r"sudo: (?:command )?not found|sudo: No such file", re.MULTILINE)


# --------------------------------------------------------------------------------------
# Pure helpers (unit-tested without SSH)
# --------------------------------------------------------------------------------------
def validate_argv(argv: Sequence[str]) -> list[str]:
    """Return argv as a list after checking it is a non-empty list of NUL-free str."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of str, not one string: build commands as lists")
    items = list(argv)
    if not items:
        raise ValueError("argv is empty")
    for i, item in enumerate(items):
        # The value itself is not shown: it might be a secret.
        if not isinstance(item, str):
            raise TypeError(f"argv[{i}] is {type(item).__name__}, not str (convert it explicitly)")
        if "\x00" in item:
            raise ValueError(f"argv[{i}] contains a NUL byte, which no remote command can receive")
    return items


def render(argv: Sequence[str]) -> str:
    """Render an argv list as one POSIX shell command line (every word quoted as needed)."""
    return shlex.join(validate_argv(argv))


def render_masked(argv: Sequence[str], mask: Callable[[str], str]) -> str:
    """Render for display: mask each word before quoting, so quoting cannot split a secret."""
    return shlex.join(mask(a) for a in validate_argv(argv))


def with_sudo(argv: Sequence[str], *, is_root: bool) -> list[str]:
    """Prefix ``sudo -n --`` for non-root users; ``-n`` fails fast instead of prompting."""
    items = validate_argv(argv)
    return items if is_root else [*SUDO_PREFIX, *items]


def with_env(argv: Sequence[str], env: Mapping[str, str] | None) -> list[str]:
    """Prefix ``env K=V ...`` (visible in the process list: never for secrets)."""
    items = validate_argv(argv)
    if not env:
        return items
    pairs = []
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"invalid environment variable name {key!r}")
        pairs.append(f"{key}={value}")
    return ["env", *pairs, *items]


def with_cwd(argv: Sequence[str], cwd: str | None) -> list[str]:
    items = validate_argv(argv)
    if cwd is None:
        return items
    if not cwd.startswith("/"):
        raise ValueError(f"cwd must be an absolute path, got {cwd!r}")
    return ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *items]


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def secret_values(secrets: Any) -> dict[str, str]:
    """Accept a Secrets object (``.values`` mapping), a plain mapping, or None."""
    if secrets is None:
        return {}
    if isinstance(secrets, Mapping):
        return {str(k): v for k, v in secrets.items() if isinstance(v, str)}
    values = getattr(secrets, "values", None)
    if isinstance(values, Mapping):
        return {str(k): v for k, v in values.items() if isinstance(v, str)}
    raise TypeError("secrets must be a Secrets object with a .values mapping, or a mapping")


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


def _keyscan_type(key: paramiko.PKey) -> str:
    name = key.get_name()
    if name.startswith("ecdsa"):
        return "ecdsa"
    return name.removeprefix("ssh-")


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    host: str
    argv: tuple[str, ...]  # as sent, including any sudo/env prefix
    exit_code: int
    # Not in repr: output may hold secrets (a cat of an env file) and reprs end up in logs.
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    dry_run: bool = False  # True: a mutating command that was only reported, not run

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class CommandTrace:
    """When and how long one exec request (or, as ``(ssh connect)``, one connection set-up)
    took on a host; recorded only by an `Executor` made with ``trace=True`` (the benchmark
    splits a rollout's time with it)."""

    host: str
    command: str  # the masked display form, never the raw command line
    started_s: float  # since the executor was created
    seconds: float
    exit_code: int | None  # None: connection set-up, time-out or lost connection


@dataclass(frozen=True)
class _Raw:
    exit_code: int
    stdout: bytes
    stderr: bytes


class _RejectUnknownHost(paramiko.RejectPolicy):
    """RejectPolicy that raises our actionable error, with the offered fingerprint."""

    def __init__(self, hc: HostConnection, known_hosts: Path) -> None:
        self._hc = hc
        self._known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):  # noqa: ANN001 (paramiko API)
        h = self._hc.host
        raise HostKeyError(
            f"host key of {h.name} ({h.address}:{h.ssh_port}) is not in {self._known_hosts}:"
            f" verify the fingerprint and add it"
            f" (ssh-keyscan -p {h.ssh_port} -t {_keyscan_type(key)} {h.address}"
            f" >> {self._known_hosts}).\n"
            f"  The host offered {_fingerprint(key)}; compare it with"
            f" `ssh-keygen -lf /etc/ssh/ssh_host_{_keyscan_type(key)}_key.pub` run on the"
            f" host's console before trusting it.",
            host=h.name,
        )


# --------------------------------------------------------------------------------------
# One host
# --------------------------------------------------------------------------------------
class HostConnection:
    """One host, one Fabric `Connection`, opened on first use and reused for the task."""

    def __init__(self, host: Any, executor: Executor) -> None:
        self.host = host
        self.name: str = host.name
        self._ex = executor
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        #: host-changing commands sent on this connection (what makes remembered facts stale)
        self.mutations = 0
        self._remembered: tuple[int, bool, dict[Any, Any]] | None = None

    def __repr__(self) -> str:
        state = "open" if self._conn is not None and self._conn.is_connected else "closed"
        h = self.host
        return f"<HostConnection {h.name} {h.ssh_user}@{h.address}:{h.ssh_port} {state}>"

    # -- context ------------------------------------------------------------------------
    @property
    def dry_run(self) -> bool:
        return self._ex.dry_run

    @property
    def reporter(self) -> Reporter:
        return self._ex.reporter

    @property
    def mask(self) -> Masker:
        return self._ex.masker

    @property
    def round_trips(self) -> int:
        return self._ex.round_trips.get(self.name, 0)

    def command_argv(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> list[str]:
        """The exact argv that `run` sends (pure: no SSH)."""
        full = with_env(with_cwd(argv, cwd), env)
        if sudo:
            full = with_sudo(full, is_root=self.host.is_root)
        return full

    # -- values read earlier in this task ------------------------------------------------
    def remember(self, values: Mapping[Any, Any], *, sudo: bool) -> None:
        """Keep read-only probe results (facts) for `recall`, until this connection next
        sends a host-changing command."""
        self._remembered = (self.mutations, sudo, dict(values))

    def recall(self, keys: Iterable[Any], *, sudo: bool) -> dict[Any, Any] | None:
        """The remembered values of every one of ``keys`` (read with the same ``sudo``), or
        None when one is missing or the host was changed since through this connection."""
        kept = self._remembered
        if kept is None or kept[0] != self.mutations or kept[1] != sudo:
            return None
        values = kept[2]
        wanted = list(keys)
        if not all(k in values for k in wanted):
            return None
        return {k: values[k] for k in wanted}

    # -- running ------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        check: bool = True,
        mutates: bool = True,
        stdin: bytes | None = None,
        timeout: float | None = None,
        echo: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Result:
        """Run one command. ``mutates=False`` marks read-only probes that dry-run still runs.

        ``echo=True`` streams the output (masked, whole lines, ``[host] | ...``).
        Raises `RemoteCommandError` on non-zero exit when ``check``; `SudoError` whenever
        sudo itself refused (even with ``check=False``: that is a setup problem).
        """
        full = self.command_argv(argv, sudo=sudo, env=env, cwd=cwd)
        self._refuse_secrets(full)  # also in dry-run: the bug is in the caller either way
        display = render_masked(full, self.mask)
        if mutates and self.dry_run:
            self.reporter.would(self.name, f"run: {display}")
            return Result(self.name, tuple(full), 0, "", "", dry_run=True)
        raw = self._run_raw(full, display, stdin=stdin, timeout=timeout, echo=echo, check=check,
                            mutates=mutates)
        return self._result(full, raw)

    def run_script(
        self,
        script: str,
        *,
        sudo: bool = False,
        check: bool = True,
        mutates: bool = True,
        timeout: float | None = None,
        echo: bool = False,
        args: Sequence[str] = (),
        shell: str = "sh",
        label: str | None = None,
    ) -> Result:
        """Run a whole script as ONE round trip: ``sh -s -- ARGS`` with the script on stdin.

        Used to batch many probes. The script travels on stdin, so it never shows in the
        process list; build it from `shlex.quote`d parts (or pass values as ``args``,
        which are argv words and must not be secret).
        """
        argv = [shell, "-s", "--", *args] if args else [shell, "-s"]
        full = with_sudo(argv, is_root=self.host.is_root) if sudo else validate_argv(argv)
        self._refuse_secrets(full)
        summary = label or next((ln.strip() for ln in script.splitlines() if ln.strip()), "")
        if len(summary) > 70:
            summary = summary[:67] + "..."
        display = f"{render_masked(full, self.mask)}  # script: {self.mask(summary)}"
        if mutates and self.dry_run:
            self.reporter.would(self.name, f"run: {display}")
            return Result(self.name, tuple(full), 0, "", "", dry_run=True)
        raw = self._run_raw(
            full, display, stdin=script.encode(), timeout=timeout, echo=echo, check=check,
            mutates=mutates,
        )
        return self._result(full, raw)

    def read_file(self, path: str, *, sudo: bool = False) -> bytes | None:
        """The file's bytes, or None if it does not exist (read-only: runs in dry-run)."""
        _check_path(path)
        argv = ["sh", "-c", '[ -e "$1" ] || exit 3; exec cat -- "$1"', "releasy-read", path]
        full = with_sudo(argv, is_root=self.host.is_root) if sudo else argv
        display = render_masked(full, self.mask)
        raw = self._run_raw(full, display, check=False)
        if raw.exit_code == 3 and not raw.stdout:
            return None
        if raw.exit_code != 0:
            self._raise_failed(display, raw)
        return raw.stdout

    def put_bytes(
        self,
        data: bytes,
        path: str,
        *,
        owner: str = "root",
        group: str = "root",
        mode: int = 0o644,
        secret: bool = False,
    ) -> bool:
        """Atomically write ``data`` to ``path`` in ONE round trip (as root, via sudo if needed).

        The content goes on stdin into a ``mktemp`` file (created 0600) in the target's own
        directory, which is chowned/chmodded and then renamed over the target, so readers see
        the old or the new file, never half of one. Returns True when written; False in
        dry-run (reported as "would write"). The directory must exist.
        """
        _check_path(path)
        for label, account in (("owner", owner), ("group", group)):
            if not _ACCOUNT.match(account):
                raise ValueError(f"invalid {label} {account!r} for {path}")
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"invalid mode {mode!r} for {path}")
        if self.dry_run:
            what = "secret content" if secret else f"{len(data)} bytes"
            self.reporter.would(self.name, f"write: {path} ({what}, {owner}:{group} {mode:04o})")
            return False
        argv = ["sh", "-c", _PUT_SCRIPT, "releasy-put", path, f"{owner}:{group}", f"{mode:04o}"]
        full = with_sudo(argv, is_root=self.host.is_root)
        extra = None
        if secret:
            # The content itself is not in Secrets; mask its lines in case a tool echoes them.
            extra = Masker(data.decode("utf-8", "replace").splitlines())
        self._run_raw(
            full,
            f"write {path} ({owner}:{group} {mode:04o})",
            stdin=data,
            check=True,
            mutates=True,
            extra_mask=extra,
            hint=f"make sure the directory of {path} exists (ensure_dir) and the"
            f" owner/group exist on {self.name}, then re-run",
        )
        return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    # -- internals ----------------------------------------------------------------------
    def _result(self, full: list[str], raw: _Raw) -> Result:
        return Result(
            self.name,
            tuple(full),
            raw.exit_code,
            raw.stdout.decode("utf-8", "replace"),
            raw.stderr.decode("utf-8", "replace"),
        )

    def _run_raw(
        self,
        full: list[str],
        display: str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        echo: bool = False,
        check: bool = True,
        extra_mask: Masker | None = None,
        hint: str | None = None,
        mutates: bool = False,
    ) -> _Raw:
        self._refuse_secrets(full)
        if mutates:
            self.mutations += 1
        if mutates and self._ex.faults is not None and self._ex.faults.due(self.name, display):
            if self._ex.faults.drop:
                # Fault injection (tests): the host's SSH connection drops at this point (what
                # it carries, the deploy lock's tunnel included, goes with it).
                self.close()
                raise UnreachableError(
                    f"{self.name}: lost the SSH connection while running: {display}"
                    f" (injected connection drop, RELEASY_FAULT). The command did not run;"
                    f" check the host and re-run.", host=self.name)
            # Fault injection (tests): this host-changing command really fails on the host.
            full, stdin = list(INJECTED_FAULT_ARGV), None
        raw = self._exec(
            render(full), display, stdin=stdin, timeout=timeout, echo=echo, extra_mask=extra_mask
        )
        if full[: len(SUDO_PREFIX)] == list(SUDO_PREFIX):
            self._check_sudo(raw, display)
        if check and raw.exit_code != 0:
            self._raise_failed(display, raw, extra_mask=extra_mask, hint=hint)
        return raw

    def _raise_failed(
        self,
        display: str,
        raw: _Raw,
        *,
        extra_mask: Masker | None = None,
        hint: str | None = None,
    ) -> None:
        text = raw.stderr.decode("utf-8", "replace") or raw.stdout.decode("utf-8", "replace")
        text = self.mask(text)
        if extra_mask is not None:
            text = extra_mask(text)
        raise RemoteCommandError(self.name, display, raw.exit_code, tail(text), hint=hint)

    def _refuse_secrets(self, full: list[str]) -> None:
        if not self.mask:
            return
        for word in full:
            if self.mask.contains_secret(word):
                names = [n for n, v in self._ex.secrets.items() if Masker([v]).contains_secret(word)]
                raise ValueError(
                    f"refusing to run on {self.name}: the command line would contain the"
                    f" value of secret {', '.join(names) or '(unnamed)'}; command lines are"
                    f" visible in process lists and logs. Pass it on stdin (run(stdin=...))"
                    f" or write it with put_file(secret=True)."
                )

    def _check_sudo(self, raw: _Raw, display: str) -> None:
        if raw.exit_code == 0:
            return
        err = raw.stderr.decode("utf-8", "replace")
        user = self.host.ssh_user
        if _SUDO_DENIED.search(err):
            said = next(
                (ln.strip() for ln in err.splitlines() if ln.startswith("sudo:")), err.strip()
            )
            raise SudoError(
                f"{self.name}: {user} cannot run commands as root without a password"
                f" (sudo said: {self.mask(said)}).\n"
                f"  Command: {display}\n"
                f"  Fix: connect as root (ssh_user: root in the inventory), or grant"
                f" passwordless sudo on {self.name}:\n"
                f"    echo '{user} ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/releasy"
                f" && chmod 0440 /etc/sudoers.d/releasy && visudo -cf /etc/sudoers.d/releasy",
                host=self.name,
            )
        if raw.exit_code == 127 and _SUDO_MISSING.search(err):
            raise SudoError(
                f"{self.name}: sudo is not installed, but {user} is not root.\n"
                f"  Fix: install sudo and grant {user} passwordless sudo, or connect as root.",
                host=self.name,
            )

    def transport(self) -> paramiko.Transport:
        """The connected SSH transport, for channels of our own (e.g. the deploy lock's
        tunnel); connects first if needed."""
        return self._transport()

    def _transport(self) -> paramiko.Transport:
        return self.connection().transport

    def connection(self) -> Connection:
        """The connected Fabric `Connection` (connects first if needed); a jump host's is
        the ``gateway=`` of the hosts behind it."""
        with self._lock:
            if self._conn is None or not self._conn.is_connected:
                if self._conn is not None:
                    self._conn.close()  # dropped since last use: reconnect once, cleanly
                started = time.monotonic()
                self._conn = self._connect()
                self._ex._trace(self.name, "(ssh connect)", started, None)
            return self._conn

    def _connect(self) -> Connection:
        h = self.host
        inv = self._ex.inventory
        known_hosts = Path(inv.known_hosts)
        jump = getattr(h, "jump", None)
        via = f" via jump host {jump.name}" if jump is not None else ""
        where = f"{h.name} ({h.ssh_user}@{h.address}:{h.ssh_port}{via})"
        if not known_hosts.is_file():
            raise HostKeyError(
                f"{h.name}: known_hosts file {known_hosts} does not exist: create it with the"
                f" verified host keys (ssh-keyscan -p {h.ssh_port} {h.address} >> {known_hosts},"
                f" after comparing fingerprints on the host's console)",
                host=h.name,
            )
        timeout = float(inv.ssh.connect_timeout)
        kwargs: dict[str, Any] = {
            "timeout": timeout,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
        }
        # A jump host may have its own key; every other host uses the inventory's.
        identity = getattr(h, "identity_file", inv.ssh.identity_file)
        if identity is not None:
            if not Path(identity).is_file():
                raise UnreachableError(
                    f"{h.name}: identity file {identity} (inventory ssh.identity_file) does"
                    f" not exist",
                    host=h.name,
                )
            # Only the inventory's key: no agent, no ~/.ssh/id_* guessing.
            kwargs.update(key_filename=str(identity), look_for_keys=False, allow_agent=False)
        # Explicit empty SSHConfig + lazy: no ~/.ssh/config, /etc/ssh/ssh_config or
        # invoke/fabric config files can change where or how we connect.
        config = Config(
            overrides={"load_ssh_configs": False, "forward_agent": False},
            ssh_config=paramiko.SSHConfig(),
            lazy=True,
        )
        # Behind a jump host: Fabric opens a direct-tcpip channel on the jump host's one
        # (shared, already verified) connection and runs this SSH session inside it.
        gateway = self._ex.gateway(jump) if jump is not None else None
        conn = Connection(
            host=h.address,
            user=h.ssh_user,
            port=int(h.ssh_port),
            config=config,
            connect_kwargs=kwargs,
            forward_agent=False,
            gateway=gateway,
        )
        conn.client.set_missing_host_key_policy(_RejectUnknownHost(self, known_hosts))
        try:
            conn.client.load_host_keys(str(known_hosts))
        except OSError as exc:
            raise HostKeyError(f"{h.name}: cannot read {known_hosts}: {exc}", host=h.name) from None
        try:
            conn.open()
        except HostKeyError:
            conn.client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            conn.client.close()
            pattern = h.address if int(h.ssh_port) == 22 else f"[{h.address}]:{h.ssh_port}"
            raise HostKeyError(
                f"HOST KEY CHANGED for {h.name} ({h.address}:{h.ssh_port}): {known_hosts}"
                f" expected {_fingerprint(exc.expected_key)} got"
                f" {_fingerprint(exc.key)}. Not connecting: this is what a man-in-the-middle"
                f" looks like.\n"
                f"  If the host was reinstalled, remove the old line from {known_hosts}"
                f" (ssh-keygen -R '{pattern}' -f {known_hosts}) and add the new key after"
                f" verifying its fingerprint on the host's console.",
                host=h.name,
            ) from None
        except paramiko.AuthenticationException as exc:
            conn.client.close()
            key = f"the key {identity}" if identity else "your SSH keys"
            raise UnreachableError(
                f"{where}: authentication failed ({exc}). Check that {key} is in"
                f" ~{h.ssh_user}/.ssh/authorized_keys on the host and that ssh_user is right.",
                host=h.name,
            ) from None
        except (TimeoutError, socket.timeout) as exc:
            conn.client.close()
            raise UnreachableError(
                f"{where}: timed out after {timeout:g} s connecting ({exc or 'timeout'}). Is the"
                f" host up, the address right and port {h.ssh_port} open in its firewall?",
                host=h.name,
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            conn.client.close()
            raise UnreachableError(
                f"{where}: cannot connect: {exc or type(exc).__name__}. Is the host up, the"
                f" address right and sshd listening on port {h.ssh_port}"
                + (f" (and reachable from {jump.name})?" if jump is not None else "?"),
                host=h.name,
            ) from None
        # Without this every round trip stalls ~40 ms on Nagle + delayed ACK (48 -> 13 ms).
        transport = conn.client.get_transport()
        if isinstance(transport.sock, socket.socket):  # behind a jump host: a channel
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Opening a channel (a host behind this one, the lock's tunnel) fails within the
        # connect timeout instead of paramiko's default hour.
        transport.channel_timeout = timeout
        # A host can sit idle for minutes while others work; keep NAT/firewall state alive.
        transport.set_keepalive(KEEPALIVE_S)
        self._ex._count(self._ex.connections_opened, self.name)
        return conn

    def _exec(
        self,
        command: str,
        display: str,
        *,
        stdin: bytes | None,
        timeout: float | None,
        echo: bool,
        extra_mask: Masker | None,
    ) -> _Raw:
        transport = self._transport()
        self._ex._count(self._ex.round_trips, self.name)
        started = time.monotonic()
        code: int | None = None
        if echo or self._ex.echo:
            self.reporter.info(self.name, f"$ {display}")
        deadline = None if timeout is None else time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        pending = {False: b"", True: b""}  # echo: partial line per stream until its newline

        def emit(data: bytes, is_err: bool, final: bool = False) -> None:
            buf = pending[is_err] + data
            *lines, rest = buf.split(b"\n")
            if final and rest:
                lines, rest = [*lines, rest], b""
            pending[is_err] = rest
            for line in lines:
                text = self.mask(line.decode("utf-8", "replace"))
                if extra_mask is not None:
                    text = extra_mask(text)
                self.reporter.output(self.name, text, stderr=is_err)

        chan = None
        try:
            chan = transport.open_session()
            chan.exec_command(command)
            if stdin and len(stdin) > INLINE_STDIN_MAX:
                threading.Thread(target=_feed, args=(chan, stdin), daemon=True).start()
            else:
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()  # EOF: `sh -s`, `cat >` and friends stop reading
            with selectors.DefaultSelector() as sel:
                # The channel's fileno is readable when stdout or stderr has data, or at EOF.
                sel.register(chan, selectors.EVENT_READ)
                while True:
                    while chan.recv_ready():
                        data = chan.recv(65536)
                        out += data
                        if echo:
                            emit(data, False)
                    while chan.recv_stderr_ready():
                        data = chan.recv_stderr(65536)
                        err += data
                        if echo:
                            emit(data, True)
                    if (chan.eof_received or chan.closed) and not (
                        chan.recv_ready() or chan.recv_stderr_ready()
                    ):
                        break
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        raise _Timeout
                    sel.select(wait)
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not chan.status_event.wait(wait if wait is not None else 30.0):
                raise _Timeout
            code = chan.exit_status
        except _Timeout:
            if chan is not None:
                chan.close()
            text = self.mask(err.decode("utf-8", "replace") or out.decode("utf-8", "replace"))
            raise CommandTimeoutError(
                self.name,
                display,
                None,
                tail(extra_mask(text) if extra_mask else text),
                hint=(
                    f"the command did not finish within {timeout:g} s and was abandoned;"
                    if timeout is not None
                    else "the command closed its output but never reported an exit status;"
                )
                + f" check what it waits for on {self.name} (locks, prompts, network)",
            ) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.close()
            raise UnreachableError(
                f"{self.name}: lost the SSH connection while running: {display}"
                f" ({type(exc).__name__}: {self.mask(str(exc))}). The command may or may not"
                f" have completed; check the host and re-run.",
                host=self.name,
            ) from None
        finally:
            if chan is not None:
                chan.close()
            self._ex._trace(self.name, display, started, code)
        if echo:
            emit(b"", False, final=True)
            emit(b"", True, final=True)
        return _Raw(code, bytes(out), bytes(err))


class _Timeout(Exception):
    pass


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except (OSError, paramiko.SSHException, EOFError):
        pass  # the reading side reports the broken channel


def _check_path(path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise ValueError(f"remote path must be an absolute str path, got {path!r}")


# The target's directory must exist. mktemp makes the temp file 0600 owned by the (sudo)
# user, so secret content is never readable by others, even for a moment.
_PUT_SCRIPT = """set -eu
tmp=$(mktemp "$(dirname "$1")/.releasy-put.XXXXXXXX")
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
chown "$2" "$tmp"
chmod "$3" "$tmp"
mv -f "$tmp" "$1"
trap - EXIT"""


# --------------------------------------------------------------------------------------
# All hosts
# --------------------------------------------------------------------------------------
#: What an injected fault runs instead of the host-changing command it replaces.
INJECTED_FAULT_ARGV = ("sh", "-c", "echo 'injected fault (RELEASY_FAULT)' >&2; exit 97")


class FaultInjection:
    """A test hook for recovery paths (``RELEASY_FAULT=N``): the N-th host-changing command
    of the task (a mutating run, script or upload, counted across hosts in the order they
    start) is replaced by one that fails on its host; with ``drop`` (``RELEASY_FAULT=N:drop``)
    the host's SSH connection is closed there instead. ``at=0`` only counts them."""

    def __init__(self, at: int, *, drop: bool = False) -> None:
        self.at = at
        self.drop = drop
        self.count = 0
        self.fired: str | None = None  # "host: command" of the one that failed
        self._lock = threading.Lock()

    def due(self, host: str, display: str) -> bool:
        with self._lock:
            self.count += 1
            if self.count != self.at:
                return False
            self.fired = f"{host}: {display}"
            return True

    def summary(self) -> str:
        how = "connection dropped on purpose" if self.drop else "failed on purpose"
        fired = f"; #{self.at} {how}: {self.fired}" if self.fired else ""
        return f"fault injection: {self.count} host-changing command(s){fired}"


class Executor:
    """Owns every SSH connection of one task: one per host, opened lazily, closed at the end."""

    def __init__(
        self,
        inventory: Any,
        *,
        dry_run: bool = False,
        reporter: Reporter | None = None,
        secrets: Any = None,
        max_parallel: int = MAX_PARALLEL,
        trace: bool = False,
        faults: FaultInjection | None = None,
        echo: bool = False,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be >= 1")
        self.inventory = inventory
        self.dry_run = dry_run
        self.reporter = reporter if reporter is not None else Reporter()
        self.secrets: dict[str, str] = secret_values(secrets)
        # Share the reporter's masker so everything it prints is masked too.
        self.masker: Masker = self.reporter.masker
        self.masker.add(self.secrets.values())
        self.max_parallel = max_parallel
        #: host name -> exec requests sent (each command, script, read or upload is one).
        self.round_trips: dict[str, int] = {}
        #: host name -> SSH connections opened (1 per task unless a connection dropped).
        self.connections_opened: dict[str, int] = {}
        #: with ``trace=True``: every connection set-up and exec request, in finishing order.
        self.trace: list[CommandTrace] | None = [] if trace else None
        self.faults = faults
        #: fab -e/--echo: print every command (masked) on its host's line before it runs.
        self.echo = echo
        self.created_at = time.time()  # wall clock; trace times are relative to it
        self._created = time.monotonic()
        self._conns: dict[str, HostConnection] = {}
        self._jumps: dict[str, HostConnection] = {}  # jump hosts that are not inventory hosts
        self._lock = threading.Lock()

    def _count(self, counter: dict[str, int], name: str) -> None:
        with self._lock:
            counter[name] = counter.get(name, 0) + 1

    def _trace(self, name: str, command: str, started: float, exit_code: int | None) -> None:
        if self.trace is None:
            return
        record = CommandTrace(name, self.masker(command), round(started - self._created, 4),
                              round(time.monotonic() - started, 4), exit_code)
        with self._lock:
            self.trace.append(record)

    def host(self, host_or_name: Any) -> Any:
        if not isinstance(host_or_name, str):
            return host_or_name
        for h in self.inventory.hosts:
            if h.name == host_or_name:
                return h
        known = ", ".join(h.name for h in self.inventory.hosts)
        raise DeployError(
            f"unknown host {host_or_name!r} (inventory {getattr(self.inventory, 'path', '?')}"
            f" has: {known})"
        )

    def conn(self, host_or_name: Any) -> HostConnection:
        host = self.host(host_or_name)
        with self._lock:
            hc = self._conns.get(host.name)
            if hc is None:
                hc = self._conns[host.name] = HostConnection(host, self)
            return hc

    def gateway(self, jump: Any) -> Connection:
        """The connected `Connection` to a jump host, opened once per task and shared by
        every host behind it (one TCP connection, many SSH sessions in its channels). An
        inventory host that is also a jump host uses its own, single connection."""
        if getattr(jump, "managed", False):
            return self.conn(jump.name).connection()
        with self._lock:
            hc = self._jumps.get(jump.name)
            if hc is None:
                hc = self._jumps[jump.name] = HostConnection(jump, self)
        return hc.connection()

    def each(self, hosts: Iterable[Any], fn: Callable[[HostConnection], T], *,
             close_on_interrupt: bool = False) -> dict[str, T]:
        """Run ``fn(conn)`` for every host on a bounded thread pool.

        Every host runs to completion; failures are reported as they happen and then raised
        together as one `ParallelError`. Returns host name -> result in the given order.
        ``close_on_interrupt``: on Ctrl-C, close these hosts' connections (ending commands
        that would never end by themselves, e.g. `tail -f`) instead of waiting for them;
        they reconnect on next use.
        """
        targets = [self.host(h) for h in hosts]
        if not targets:
            return {}
        results: dict[str, T] = {}
        failures: dict[str, BaseException] = {}
        workers = min(self.max_parallel, len(targets))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="releasy-host") as pool:
            futures = {pool.submit(fn, self.conn(h)): h.name for h in targets}
            try:
                for fut in self._completed(futures):
                    name = futures[fut]
                    try:
                        results[name] = fut.result()
                    except Exception as exc:  # noqa: BLE001 - collected, re-raised below
                        failures[name] = exc
                        msg = (str(exc) if isinstance(exc, DeployError)
                               else f"{type(exc).__name__}: {exc}")
                        # One line now; the full text comes once, in the final error.
                        first = (msg.splitlines() or [""])[0].removeprefix(f"{name}: ")
                        self.reporter.error(name, first + (" (details below)" if "\n" in msg
                                                           else ""))
            except KeyboardInterrupt:
                if close_on_interrupt:
                    for fut in futures:
                        fut.cancel()
                    for h in targets:
                        self.conn(h).close()
                raise
        if failures:
            raise ParallelError(failures, results, mask=self.masker)
        return {h.name: results[h.name] for h in targets}

    @staticmethod
    def _completed(futures):
        """as_completed, waking up regularly so Ctrl-C reaches the main thread at once."""
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            yield from finished

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            jumps, self._jumps = list(self._jumps.values()), {}
        # Hosts behind a jump host first: their sessions run inside its connection.
        conns.sort(key=lambda hc: getattr(hc.host, "jump", None) is None)
        for hc in [*conns, *jumps]:
            hc.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
