"""Opening one host's SSH connection: Fabric's `Connection` with nothing taken from local
SSH or Fabric config files, the inventory's own key only, the host key checked against the
inventory's known_hosts (unknown or changed keys refused with the fingerprint and what to
do), a jump host's shared connection as the gateway, and the transport tuned (no Nagle
and no delayed acknowledgements from the first packet, keepalive, channel time-out). Every
failure is a typed error naming the host.

The known_hosts file and the private key are parsed once per process (again when the file
changes), not once per connection: paramiko's own loading re-reads the whole known_hosts
for every host, checking each line against the ones before it, which made the client's
share of a 40-host run grow with the square of the fleet."""
from __future__ import annotations

import contextlib
import socket
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import paramiko
from fabric import Config, Connection

from ..errors import HostKeyError, UnreachableError

KEEPALIVE_S = 15

T = TypeVar("T")

# PKey.from_path tells key types apart with an isinstance check on cryptography's DSA class,
# which warns that DSA is deprecated even when the key is not DSA.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"paramiko\.pkey")

_parsed: dict[tuple[str, str], tuple[tuple[int, int, int], Any]] = {}
_parsed_lock = threading.Lock()


def _parsed_file(kind: str, path: Path, parse: Callable[[Path], T]) -> T:
    """``parse(path)``, kept while the file's inode, mtime and size stay the same. The
    first caller parses; the hosts connecting at the same time wait for it and share it."""
    st = path.stat()
    state = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _parsed_lock:
        hit = _parsed.get((kind, str(path)))
        if hit is not None and hit[0] == state:
            return hit[1]
        value = parse(path)
        _parsed[(kind, str(path))] = (state, value)
        return value


def known_host_keys(known_hosts: Path, name: str) -> list[tuple[str, paramiko.PKey]]:
    """(key type, key) of every known_hosts entry for ``name`` (``address``, or
    ``[address]:port`` off port 22, as paramiko looks it up; hashed entries included)."""
    table = _parsed_file("known_hosts", known_hosts, lambda p: paramiko.HostKeys(str(p)))
    found = table.lookup(name)
    return [] if found is None else [(kind, found[kind]) for kind in found.keys()]


def identity_key(path: Path) -> paramiko.PKey | None:
    """The private key at ``path`` (with its ``-cert.pub`` if there is one), or None when
    it cannot be loaded unattended (encrypted, unknown type): paramiko then loads it
    itself and says why it cannot."""
    try:
        return _parsed_file("identity", path, paramiko.PKey.from_path)
    except Exception:  # noqa: BLE001 -- cryptography's errors vary by key type
        return None


class _AckingSocket(socket.socket):
    """A TCP socket that acknowledges what it reads at once (TCP_QUICKACK after each read).

    Right after authentication sshd sends a message of its own (OpenSSH's host key list)
    and, with Nagle on its side, holds its answer to our first channel open until that
    message is acknowledged; Linux delays the acknowledgement by 40 ms. TCP_QUICKACK does
    not stay set, so it is set again after every read."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        with contextlib.suppress(OSError):  # closed meanwhile: the next read says so
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


def _tuned_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """paramiko's Transport on ``sock``, tuned before the handshake: without Nagle (our
    authentication request otherwise waits ~40 ms for an acknowledgement) and, where the
    OS has TCP_QUICKACK (Linux), acknowledging at once (see `_AckingSocket`). Measured on
    the lab: connect to first command 125 -> 41 ms. Behind a jump host ``sock`` is a
    channel of the jump host's (tuned) connection and is used as it is."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_QUICKACK"):
            timeout = sock.gettimeout()
            sock = _AckingSocket(fileno=sock.detach())
            sock.settimeout(timeout)
    return paramiko.Transport(sock, **kwargs)


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


def _keyscan_type(key: paramiko.PKey) -> str:
    name = key.get_name()
    if name.startswith("ecdsa"):
        return "ecdsa"
    return name.removeprefix("ssh-")


class _RejectUnknownHost(paramiko.RejectPolicy):
    """RejectPolicy that raises our actionable error, with the offered fingerprint."""

    def __init__(self, host: Any, known_hosts: Path) -> None:
        self._host = host
        self._known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):  # noqa: ANN001 (paramiko API)
        h = self._host
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


def open_connection(host: Any, inv: Any, gateway_of: Callable[[Any], Connection]
                    ) -> Connection:
    """The connected, verified `Connection` to ``host`` of inventory ``inv``; a host behind
    a jump host gets ``gateway_of(jump)`` as its gateway."""
    h = host
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
        "transport_factory": _tuned_transport,
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
        kwargs.update(look_for_keys=False, allow_agent=False)
        key = identity_key(Path(identity))
        if key is not None:
            kwargs["pkey"] = key
        else:
            kwargs["key_filename"] = str(identity)
    # Explicit empty SSHConfig + lazy: no ~/.ssh/config, /etc/ssh/ssh_config or
    # invoke/fabric config files can change where or how we connect.
    config = Config(
        overrides={"load_ssh_configs": False, "forward_agent": False},
        ssh_config=paramiko.SSHConfig(),
        lazy=True,
    )
    # Behind a jump host: Fabric opens a direct-tcpip channel on the jump host's one
    # (shared, already verified) connection and runs this SSH session inside it.
    gateway = gateway_of(jump) if jump is not None else None
    conn = Connection(
        host=h.address,
        user=h.ssh_user,
        port=int(h.ssh_port),
        config=config,
        connect_kwargs=kwargs,
        forward_agent=False,
        gateway=gateway,
    )
    conn.client.set_missing_host_key_policy(_RejectUnknownHost(h, known_hosts))
    # The name paramiko looks the server's key up by.
    pattern = h.address if int(h.ssh_port) == 22 else f"[{h.address}]:{h.ssh_port}"
    try:
        for kind, key in known_host_keys(known_hosts, pattern):
            conn.client.get_host_keys().add(pattern, kind, key)
    except OSError as exc:
        raise HostKeyError(f"{h.name}: cannot read {known_hosts}: {exc}", host=h.name) from None
    try:
        conn.open()
    except HostKeyError:
        conn.client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        conn.client.close()
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
    transport = conn.client.get_transport()
    # Opening a channel (a host behind this one, the lock's tunnel) fails within the
    # connect timeout instead of paramiko's default hour.
    transport.channel_timeout = timeout
    # A host can sit idle for minutes while others work; keep NAT/firewall state alive.
    transport.set_keepalive(KEEPALIVE_S)
    return conn
