"""One command on one raw SSH channel: ONE ``exec`` request, exact bytes in on stdin (then
EOF), stdout and stderr read as they come (optionally echoed as masked whole lines), a
deadline, and the exit status. What a failure means for the host (time-out, lost
connection) is said by `releasy_deploy.executor.host`."""
from __future__ import annotations

import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paramiko

from ..output import Reporter

# Up to this size stdin is sent before reading output; larger payloads go on a thread so a
# command that writes a lot before reading its stdin cannot deadlock on the SSH window.
INLINE_STDIN_MAX = 256 * 1024


@dataclass(frozen=True)
class Raw:
    exit_code: int
    stdout: bytes
    stderr: bytes


class ChannelTimeout(Exception):
    """The deadline passed, or no exit status came after the output closed."""


class LineEcho:
    """Prints a command's output as it comes: whole lines, masked, ``[host] | ...``
    (``[host] ! ...`` for stderr); a partial line waits for its newline or `flush`."""

    def __init__(self, name: str, reporter: Reporter, mask: Callable[[str], str],
                 extra_mask: Callable[[str], str] | None) -> None:
        self._name = name
        self._reporter = reporter
        self._mask = mask
        self._extra_mask = extra_mask
        self._pending = {False: b"", True: b""}  # partial line per stream until its newline

    def __call__(self, data: bytes, is_err: bool, final: bool = False) -> None:
        buf = self._pending[is_err] + data
        *lines, rest = buf.split(b"\n")
        if final and rest:
            lines, rest = [*lines, rest], b""
        self._pending[is_err] = rest
        for line in lines:
            text = self._mask(line.decode("utf-8", "replace"))
            if self._extra_mask is not None:
                text = self._extra_mask(text)
            self._reporter.output(self._name, text, stderr=is_err)

    def flush(self) -> None:
        self(b"", False, final=True)
        self(b"", True, final=True)


class Exchange:
    """The output read so far (``out``, ``err``, also after a failure) and the channel,
    which `close` closes (again: harmless)."""

    def __init__(self, transport: paramiko.Transport, timeout: float | None) -> None:
        self._transport = transport
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.out, self.err = bytearray(), bytearray()
        self.chan: paramiko.Channel | None = None

    def run(self, command: str, stdin: bytes | None,
            echo: LineEcho | None) -> int:
        """The command's exit status. Raises `ChannelTimeout`, or what paramiko raises
        when the connection is lost."""
        deadline = self.deadline
        chan = self.chan = self._transport.open_session()
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
                    self.out += data
                    if echo is not None:
                        echo(data, False)
                while chan.recv_stderr_ready():
                    data = chan.recv_stderr(65536)
                    self.err += data
                    if echo is not None:
                        echo(data, True)
                if (chan.eof_received or chan.closed) and not (
                    chan.recv_ready() or chan.recv_stderr_ready()
                ):
                    break
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise ChannelTimeout
                sel.select(wait)
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not chan.status_event.wait(wait if wait is not None else 30.0):
            raise ChannelTimeout
        return chan.exit_status

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()

    def raw(self, code: int) -> Raw:
        return Raw(code, bytes(self.out), bytes(self.err))


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except (OSError, paramiko.SSHException, EOFError):
        pass  # the reading side reports the broken channel
