"""Hosts behind a jump host (bastion), on the real loopback sshd: one connection to the jump
host per executor, every target session inside it (Fabric's ``gateway=``), and host keys of
the jump host and of each target verified against known_hosts separately."""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import paramiko
import pytest

from releasy_deploy.errors import HostKeyError, UnreachableError
from releasy_deploy.executor import Executor
from releasy_deploy.inventory import JumpHost
from releasy_deploy.output import Reporter
from sshd_fixture import FakeHost, keygen


@dataclass(frozen=True)
class JumpedHost(FakeHost):
    jump: JumpHost | None = None


def bastion(sshd, **kw) -> JumpHost:
    fields = dict(name="bastion", address="127.0.0.1", private_address="127.0.0.1",
                  ssh_user=sshd.user, ssh_port=sshd.port, identity_file=sshd.client_key)
    return JumpHost(**{**fields, **kw})


def jumped_inventory(sshd, names, *, address="127.0.0.1", known_hosts=None, jump=None):
    inv = sshd.inventory(*names, known_hosts=known_hosts)
    jump = jump or bastion(sshd)
    hosts = tuple(JumpedHost(name=h.name, address=address, ssh_user=h.ssh_user,
                             ssh_port=h.ssh_port, jump=jump) for h in inv.hosts)
    return replace(inv, hosts=hosts)


def test_every_host_runs_inside_one_connection_to_the_jump_host(sshd):
    inv = jumped_inventory(sshd, ("a", "b", "c"))
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex:
        got = ex.each(inv.hosts, lambda c: c.run(["echo", "hi"], mutates=False).stdout)
        assert got == {"a": "hi\n", "b": "hi\n", "c": "hi\n"}
        assert ex.connections_opened == {"bastion": 1, "a": 1, "b": 1, "c": 1}
        # Each target's SSH session travels in a channel of the jump host's transport.
        gw = ex.gateway(inv.hosts[0].jump).transport
        for name in ("a", "b", "c"):
            sock = ex.conn(name).transport().sock
            assert isinstance(sock, paramiko.Channel) and sock.get_transport() is gw
        # The lock's tunnel and the interactive tasks use the same transport().
        ex.conn("a").transport().open_session().close()
        assert ex.connections_opened["bastion"] == 1
    assert ex._jumps == {}  # closed with the executor


def test_jump_host_that_is_an_inventory_host_shares_its_connection(sshd):
    inv = sshd.inventory("proxy1", "app1")
    proxy = inv.hosts[0]
    jump = bastion(sshd, name="proxy1", managed=True)
    app = JumpedHost(name="app1", ssh_user=sshd.user, ssh_port=sshd.port, jump=jump)
    inv = replace(inv, hosts=(proxy, app))
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex:
        ex.each(inv.hosts, lambda c: c.run(["true"], mutates=False))
        assert ex.connections_opened == {"proxy1": 1, "app1": 1}
        assert ex.conn("app1").transport().sock.get_transport() is ex.conn("proxy1").transport()


def test_target_key_is_checked_for_the_target_name_not_the_jump_host(sshd, tmp_path):
    # The jump host's key is right; the target (resolved by the jump host: "localhost")
    # has another key on record: refused as a changed key, for the target.
    other = keygen(tmp_path / "other")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts.read_text() + f"[localhost]:{sshd.port} {other}\n")
    inv = jumped_inventory(sshd, ("app1",), address="localhost", known_hosts=known)
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex, \
            pytest.raises(HostKeyError) as info:
        ex.conn("app1").run(["true"])
    assert str(info.value).startswith(f"HOST KEY CHANGED for app1 (localhost:{sshd.port})")
    # ... and an unknown one is refused too, with the fingerprint to verify.
    known.write_text(sshd.known_hosts.read_text())
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex, \
            pytest.raises(HostKeyError) as info:
        ex.conn("app1").run(["true"])
    assert str(info.value).startswith(f"host key of app1 (localhost:{sshd.port}) is not in")
    assert ex.connections_opened == {"bastion": 1}


def test_unknown_jump_host_key_is_refused_before_any_target(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    inv = jumped_inventory(sshd, ("app1",), known_hosts=known)
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex, \
            pytest.raises(HostKeyError) as info:
        ex.conn("app1").run(["true"])
    assert str(info.value).startswith(f"host key of bastion (127.0.0.1:{sshd.port}) is not in")
    assert ex.connections_opened == {}


def test_target_unreachable_from_the_jump_host_names_both(sshd):
    inv = jumped_inventory(sshd, ("app1",))
    dead = JumpedHost(name="app1", ssh_user=sshd.user, ssh_port=1, jump=inv.hosts[0].jump)
    inv = replace(inv, hosts=(dead,))
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex, \
            pytest.raises(UnreachableError) as info:
        ex.conn("app1").run(["true"])
    msg = str(info.value)
    assert msg.startswith(f"app1 ({sshd.user}@127.0.0.1:1 via jump host bastion): cannot connect")
    assert "reachable from bastion" in msg


def test_concurrent_first_use_opens_one_jump_connection(sshd):
    names = tuple(f"h{i}" for i in range(8))
    inv = jumped_inventory(sshd, names)
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex:
        barrier = threading.Barrier(len(names))

        def go(c):
            barrier.wait(5)
            return c.run(["true"], mutates=False).exit_code

        assert set(ex.each(inv.hosts, go).values()) == {0}
        assert ex.connections_opened["bastion"] == 1
