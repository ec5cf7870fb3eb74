"""One host's connection: `HostConnection` runs commands, scripts, reads and atomic
uploads on the host's single Fabric connection (opened on first use by
`releasy_deploy.executor.connect`), one ``exec`` request each (`releasy_deploy.executor.channel`),
adds ``sudo -n --`` when the SSH user is not root, refuses command lines holding a secret,
masks secrets in everything it prints or raises, turns failures into typed errors (a failed
command, sudo refusing, a time-out, a lost connection) and skips host-changing commands in
dry-run. It also keeps the facts read earlier in the task until the host is next changed.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import paramiko
from fabric import Connection

from ..errors import CommandTimeoutError, ConnectionDropped, RemoteCommandError, SudoError
from ..output import Masker, Reporter
from .argv import (SUDO_PREFIX, render, render_masked, tail, validate_argv, with_cwd, with_env,
                   with_sudo)
from .channel import ChannelTimeout, Exchange, LineEcho, Raw
from .connect import open_connection
from .faults import INJECTED_FAULT_ARGV

if TYPE_CHECKING:
    from .pool import Executor

_ACCOUNT = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_.-]*\$?|[0-9]+)\Z")
_SUDO_DENIED = re.compile(
    r"^sudo: (?:a password is required|a terminal is required"
    r"|.*is not in the sudoers file|.*is not allowed to (?:execute|run sudo))",
    re.MULTILINE,
)
_SUDO_MISSING = re.compile(r"sudo: (?:command )?not found|sudo: No such file", re.MULTILINE)


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


class HostConnection:
    """One host, one Fabric `Connection`, opened on first use and reused for the task."""

    def __init__(self, host: Any, executor: Executor) -> None:
        self.host = host
        self.name: str = host.name
        self._ex = executor
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        # `connect_ahead`: its failure, for the first use to raise (no second time-out);
        # whether `close` came while it was still connecting (it then closes its own).
        self._ahead_error: BaseException | None = None
        self._ahead_running = False
        self._closed_meanwhile = False
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
        if self._ahead_running:
            # Not behind a connect that may wait for its time-out: it closes its own.
            self._closed_meanwhile = True
            if not self._lock.acquire(blocking=False):
                return
            self._lock.release()
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    # -- internals ----------------------------------------------------------------------
    def _result(self, full: list[str], raw: Raw) -> Result:
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
    ) -> Raw:
        self._refuse_secrets(full)
        if mutates:
            self.mutations += 1
        if mutates and self._ex.faults is not None and self._ex.faults.due(self.name, display):
            if self._ex.faults.drop:
                # Fault injection (tests): the host's SSH connection drops at this point (what
                # it carries, the deploy lock's tunnel included, goes with it).
                self.close()
                raise ConnectionDropped(
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
        raw: Raw,
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

    def _check_sudo(self, raw: Raw, display: str) -> None:
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
            if self._ahead_error is not None:
                error, self._ahead_error = self._ahead_error, None
                raise error
            return self._open()

    def connect_ahead(self) -> None:
        """Connect now, in a daemon thread, while the task still works locally (loads its
        flow): the first use then finds the connection open, or waits for it. A failure is
        raised by that first use, which does not try again (a dead host costs one time-out,
        not two)."""
        with self._lock:
            if self._ahead_running or (self._conn is not None and self._conn.is_connected):
                return
            self._ahead_running = True
            self._closed_meanwhile = False
        threading.Thread(target=self._connect_ahead, name=f"connect {self.name}",
                         daemon=True).start()

    def _connect_ahead(self) -> None:
        with self._ex.ahead_slots, self._lock:  # as many at once as `Executor.each` runs
            try:
                if not self._closed_meanwhile:
                    self._open()
            except Exception as exc:  # noqa: BLE001 -- for the first use to raise
                self._ahead_error = exc
            finally:
                self._ahead_running = False
                if self._closed_meanwhile and self._conn is not None:
                    self._conn.close()  # the task ended while this connected
                    self._conn = None

    def _open(self) -> Connection:
        """The open connection; the caller holds ``self._lock``."""
        if self._conn is None or not self._conn.is_connected:
            if self._conn is not None:
                self._conn.close()  # dropped since last use: reconnect once, cleanly
            started = time.monotonic()
            self._conn = open_connection(self.host, self._ex.inventory, self._ex.gateway)
            self._ex._count(self._ex.connections_opened, self.name)
            self._ex._trace(self.name, "(ssh connect)", started, None)
        return self._conn

    def _exec(
        self,
        command: str,
        display: str,
        *,
        stdin: bytes | None,
        timeout: float | None,
        echo: bool,
        extra_mask: Masker | None,
    ) -> Raw:
        transport = self._transport()
        self._ex._count(self._ex.round_trips, self.name)
        started = time.monotonic()
        code: int | None = None
        if echo or self._ex.echo:
            self.reporter.info(self.name, f"$ {display}")
        exchange = Exchange(transport, timeout)
        lines = LineEcho(self.name, self.reporter, self.mask, extra_mask) if echo else None
        try:
            code = exchange.run(command, stdin, lines)
        except ChannelTimeout:
            exchange.close()
            out, err = exchange.out, exchange.err
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
            raise ConnectionDropped(
                f"{self.name}: lost the SSH connection while running: {display}"
                f" ({type(exc).__name__}: {self.mask(str(exc))}). The command may or may not"
                f" have completed; check the host and re-run.",
                host=self.name,
            ) from None
        finally:
            exchange.close()
            self._ex._trace(self.name, display, started, code)
        if lines is not None:
            lines.flush()
        return exchange.raw(code)


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

