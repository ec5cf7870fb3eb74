"""Long-lived SSH channels beside the executor's one-command-per-channel runs: a local unix
socket tunnelled to a port on the host, and a remote helper spoken to line by line with a
heartbeat. The deploy lock is their user (its PostgreSQL session goes through the tunnel;
its flock holder and its watchdog are line channels).

Every channel rides on the executor's own verified, lazily opened connection to the host
(`HostConnection.transport`): no second SSH login, no second host-key check. Failures are
raised as `ChannelError` (or `TimeoutError` for a deadline passed) for the caller to word.
"""
from __future__ import annotations

import os
import selectors
import socket
import tempfile
import threading
import time
from collections.abc import Sequence

import paramiko

from .errors import DeployError, UnreachableError
from .executor import HostConnection, render

CHANNEL_TIMEOUT_S = 10.0
#: seconds between client->server SSH keepalives on a connection carrying a long-lived
#: channel (keeps NAT state alive; a dead peer is noticed by the heartbeat's reader).
SSH_KEEPALIVE_S = 5
#: a heartbeat line every HEARTBEAT_S (see `commands.lock.WATCHDOG_QUIET_S`).
HEARTBEAT_S = 3
_SSH_ERRORS = (paramiko.SSHException, EOFError, OSError)


class ChannelError(UnreachableError):
    """The SSH connection failed while opening or using a channel (exit 4 unless the caller
    words it otherwise); ``reason`` (``SSHException: ...``) is for the caller's message."""

    def __init__(self, message: str, *, host: str, reason: str) -> None:
        super().__init__(message, host=host)
        self.reason = reason


class TunnelRefused(DeployError):
    """The SSH server would not forward to the destination (forwarding off, nothing
    listening); the message says which."""


def _failed(host: str, doing: str, exc: BaseException) -> ChannelError:
    reason = f"{type(exc).__name__}: {exc}"
    return ChannelError(f"{host}: lost the SSH connection while {doing} ({reason})",
                        host=host, reason=reason)


class SshTunnel:
    """A unix socket here (``path``, in a fresh 0700 directory of ours) -> ``dest`` as seen
    from the SSH server.

    One direct-tcpip channel, opened at once (so a refused forward or a closed port is
    reported before any client tries), bridged to the first client that connects; the
    listener is closed after that one accept. Only our own user (and root) can reach the
    socket at all: a TCP listener on 127.0.0.1 would take the first connection from any
    local user. The socket is named the way libpq looks for one (``.s.PGSQL.PORT``), so
    psycopg connects with ``host=directory``.
    """

    def __init__(self, conn: HostConnection, dest: tuple[str, int], *,
                 timeout: float = CHANNEL_TIMEOUT_S) -> None:
        self.host = conn.name
        transport = conn.transport()
        transport.set_keepalive(SSH_KEEPALIVE_S)
        self.port = dest[1]
        self.directory = tempfile.mkdtemp(prefix="releasy-lock-")  # 0700
        self.path = os.path.join(self.directory, f".s.PGSQL.{self.port}")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        try:
            self._chan = transport.open_channel(
                "direct-tcpip", dest, ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as exc:
            self._cleanup()
            why = exc.text or f"code {exc.code}"
            hint = (
                "sshd refuses TCP forwarding: set `AllowTcpForwarding local` (or yes) in"
                f" {conn.name}'s sshd_config"
                if exc.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
                else f"nothing accepts connections on {dest[0]}:{dest[1]} there"
            )
            raise TunnelRefused(
                f"{conn.name}: cannot open an SSH tunnel to {dest[0]}:{dest[1]} ({why}): {hint}",
                host=conn.name,
            ) from None
        except _SSH_ERRORS as exc:
            self._cleanup()
            raise _failed(conn.name, "opening a tunnel", exc) from None
        self._client: socket.socket | None = None
        self._listener.settimeout(timeout)
        self._thread = threading.Thread(target=self._serve, name=f"tunnel-{conn.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._chan.closed and self._chan.get_transport().is_active()

    def _serve(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            self._chan.close()
            return
        finally:
            self._cleanup()
        self._client = client
        try:
            _bridge(client, self._chan)
        finally:
            client.close()
            self._chan.close()

    def _cleanup(self) -> None:
        """Close the listener and remove its socket and directory (idempotent)."""
        self._listener.close()
        for remove in (lambda: os.unlink(self.path), lambda: os.rmdir(self.directory)):
            try:
                remove()
            except OSError:
                pass

    def close(self) -> None:
        self._cleanup()
        self._chan.close()
        if self._client is not None:
            try:
                self._client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)


def _bridge(sock: socket.socket, chan: paramiko.Channel) -> None:
    """Copy bytes both ways until either side closes."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ, chan)
        sel.register(chan, selectors.EVENT_READ, sock)
        while True:
            for key, _ in sel.select():
                src = key.fileobj
                try:
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                except _SSH_ERRORS:
                    return


class LineChannel:
    """``argv`` (already rendered for sudo by the caller) running on its own session channel
    for as long as we keep it: we send it lines on its stdin and read its stdout line by
    line; its stderr is collected in ``stderr`` for messages."""

    def __init__(self, conn: HostConnection, argv: Sequence[str], *, doing: str,
                 timeout: float = CHANNEL_TIMEOUT_S) -> None:
        self.host = conn.name
        self.stderr = bytearray()
        self._transport = conn.transport()
        self._transport.set_keepalive(SSH_KEEPALIVE_S)
        try:
            self._chan = self._transport.open_session(timeout=timeout)
            self._chan.exec_command(render(argv))
        except _SSH_ERRORS as exc:
            raise _failed(conn.name, doing, exc) from None

    @property
    def finished(self) -> bool:
        """The remote command has ended, or the connection under it has."""
        return (self._chan.closed or self._chan.exit_status_ready()
                or not self._transport.is_active())

    @property
    def exit_code(self) -> int | None:
        return self._chan.exit_status if self._chan.exit_status_ready() else None

    def send(self, data: bytes, *, doing: str = "talking to a remote helper") -> None:
        try:
            self._chan.sendall(data)
        except _SSH_ERRORS as exc:
            raise _failed(self.host, doing, exc) from None

    def read_line(self, deadline: float) -> str | None:
        """One line of stdout (None at EOF); TimeoutError past ``deadline`` (monotonic)."""
        chan = self._chan
        buf = bytearray()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(chan, selectors.EVENT_READ)
                while b"\n" not in buf:
                    while chan.recv_stderr_ready():  # drained, or the fd stays readable
                        self.stderr += chan.recv_stderr(65536)
                    if chan.recv_ready():
                        data = chan.recv(1)  # byte by byte: the rest is the next read's
                        if not data:
                            break
                        buf += data
                        continue
                    if chan.eof_received or chan.closed:
                        if not chan.recv_ready():
                            break
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sel.select(min(left, 1.0))
        except _SSH_ERRORS as exc:
            raise _failed(self.host, "reading a remote helper's answer", exc) from None
        if not buf:
            return None
        return buf.decode("utf-8", "replace").rstrip("\n")

    def read_rest(self, deadline: float) -> tuple[str, str]:
        """The remaining stdout and all stderr, once the command exits (or at ``deadline``)."""
        chan = self._chan
        out = bytearray()
        while not (chan.exit_status_ready() and not chan.recv_ready()
                   and not chan.recv_stderr_ready()):
            if time.monotonic() > deadline:
                break
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                self.stderr += chan.recv_stderr(65536)
            if not chan.recv_ready() and not chan.recv_stderr_ready():
                chan.status_event.wait(0.05)
        return out.decode("utf-8", "replace"), self.stderr.decode("utf-8", "replace")

    def finish(self, wait: float = 5) -> None:
        """EOF on the command's stdin, up to ``wait`` s for it to exit, then close."""
        try:
            self._chan.shutdown_write()
            self._chan.status_event.wait(wait)
        except _SSH_ERRORS:
            pass
        finally:
            self._chan.close()

    def close(self) -> None:
        self._chan.close()


class Heartbeat:
    """Sends a line on ``channel`` every `HEARTBEAT_S` s (a daemon thread) until stopped."""

    def __init__(self, channel: LineChannel, interval: float = HEARTBEAT_S) -> None:
        self._channel = channel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,),
                                        name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._channel.send(b".\n")
            except ChannelError:
                return

    def stop(self, *, release: bool) -> None:
        """Stop beating; ``release``: tell the remote side to let go quietly first."""
        self._stop.set()
        self._thread.join(timeout=5)
        if release:
            try:
                self._channel.send(b"release\n")
            except ChannelError:
                pass
