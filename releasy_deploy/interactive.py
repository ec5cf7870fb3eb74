"""An interactive program on a host, on a real pseudo-terminal: what ``ssh -t HOST CMD`` does.

The executor's commands run without a terminal (exact bytes, EOF on stdin, output
collected). An interactive program (``psql``, ``sqlite3``) wants one: line editing, a prompt,
Ctrl-C that cancels a query instead of killing the session. `run_interactive` opens one more
session channel on the host's existing SSH transport (`HostConnection.transport()`: the
same verified host key and login as every other command), asks for a pty sized like the
local terminal, and copies bytes both ways until the program exits, with the local terminal
in raw mode meanwhile (keys go to the remote side as typed; the remote pty echoes them) and
restored afterwards, whatever happens. Window size changes follow (SIGWINCH).

Without a local terminal (a pipe, a test), ``pty=True`` still gives the remote program a
terminal; local stdin is then copied as it comes. ``pty=False`` runs it like a plain
``ssh HOST CMD < input``: EOF on stdin reaches the program.
"""
from __future__ import annotations

import os
import selectors
import signal
import sys
import termios
import threading
import tty
from collections.abc import Sequence

import paramiko

from .errors import UnreachableError
from .executor import HostConnection, render, render_masked

__all__ = ["run_interactive", "terminal_size"]

DEFAULT_TERM = "xterm-256color"
READ_SIZE = 32768


def terminal_size(fd: int) -> tuple[int, int]:
    """(columns, rows) of the terminal on ``fd``; 80x24 when it is not one (or unsized)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return size.columns or 80, size.lines or 24


def run_interactive(conn: HostConnection, argv: Sequence[str], *, pty: bool = True,
                    stdin_fd: int | None = None, stdout_fd: int | None = None,
                    stderr_fd: int | None = None, term: str | None = None) -> int:
    """Run ``argv`` on ``conn``'s host attached to this terminal; return its exit code.

    ``argv`` is rendered with `shlex.join` like every command (it must not hold a secret:
    command lines show in process lists). The local terminal is put in raw mode only when
    ``pty`` and stdin is a terminal; it is restored before returning.
    """
    for word in argv:
        if conn.mask.contains_secret(word):
            raise ValueError(f"refusing to run on {conn.name}: the command line would contain"
                             f" a secret value; pass it in a file or on stdin")
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.__stdout__.fileno() if stdout_fd is None else stdout_fd
    stderr_fd = sys.__stderr__.fileno() if stderr_fd is None else stderr_fd
    command = render(argv)
    display = render_masked(argv, conn.mask)
    if conn.dry_run:
        conn.reporter.would(conn.name, f"run interactively: {display}")
        return 0
    local_tty = pty and os.isatty(stdin_fd)
    for stream in (sys.stdout, sys.stderr):  # what was printed before goes first
        stream.flush()
    transport = conn.transport()  # connects (host key verified) first if needed
    try:
        chan = transport.open_session()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise UnreachableError(f"{conn.name}: cannot open a session for {display}:"
                               f" {type(exc).__name__}: {exc}", host=conn.name) from None
    try:
        if pty:
            cols, rows = terminal_size(stdin_fd if local_tty else stdout_fd)
            chan.get_pty(term=term or os.environ.get("TERM") or DEFAULT_TERM,
                         width=cols, height=rows)
        chan.exec_command(command)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        chan.close()
        raise UnreachableError(f"{conn.name}: cannot start {display}: {type(exc).__name__}:"
                               f" {exc}", host=conn.name) from None
    saved = termios.tcgetattr(stdin_fd) if local_tty else None
    previous_winch = None
    if local_tty and threading.current_thread() is threading.main_thread():
        def on_resize(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
            cols, rows = terminal_size(stdin_fd)
            try:
                chan.resize_pty(width=cols, height=rows)
            except (paramiko.SSHException, OSError):
                pass
        previous_winch = signal.signal(signal.SIGWINCH, on_resize)
    try:
        if saved is not None:
            tty.setraw(stdin_fd)
        _shuttle(chan, stdin_fd, stdout_fd, stderr_fd)
        return chan.recv_exit_status()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise UnreachableError(f"{conn.name}: {display} ended abnormally (the SSH connection"
                               f" or this terminal went away: {type(exc).__name__}: {exc})",
                               host=conn.name) from None
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        if previous_winch is not None:
            signal.signal(signal.SIGWINCH, previous_winch)
        chan.close()


def _shuttle(chan: paramiko.Channel, stdin_fd: int, stdout_fd: int, stderr_fd: int) -> None:
    """Copy local stdin -> channel and channel -> local stdout/stderr until the remote side
    closes its output (the program ended)."""
    with selectors.DefaultSelector() as sel:
        sel.register(chan, selectors.EVENT_READ, "chan")
        try:
            sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
        except (ValueError, OSError):
            # A regular file (epoll refuses those): it is all there, send it at once.
            while data := os.read(stdin_fd, READ_SIZE):
                chan.sendall(data)
            chan.shutdown_write()
        while True:
            for key, _ in sel.select(timeout=1.0):
                if key.data == "stdin":
                    data = os.read(stdin_fd, READ_SIZE)
                    if data:
                        chan.sendall(data)
                    else:  # EOF: the program sees it (without a pty) and can finish
                        sel.unregister(stdin_fd)
                        chan.shutdown_write()
            while chan.recv_ready():
                _write_all(stdout_fd, chan.recv(READ_SIZE))
            while chan.recv_stderr_ready():
                _write_all(stderr_fd, chan.recv_stderr(READ_SIZE))
            if (chan.eof_received or chan.closed) and not (
                    chan.recv_ready() or chan.recv_stderr_ready()):
                return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
