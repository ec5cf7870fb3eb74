"""Executor: pure unit tests first, then tests against the real loopback sshd (conftest)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
import socket
import subprocess
import _thread
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from releasy_deploy.errors import (
    CommandTimeoutError,
    HostKeyError,
    ParallelError,
    RemoteCommandError,
    SudoError,
    UnreachableError,
)
from releasy_deploy.executor import (
    Executor,
    HostConnection,
    Result,
    render,
    render_masked,
    with_sudo,
)
from releasy_deploy.executor import connect
from releasy_deploy.executor.channel import Raw
from releasy_deploy.output import Masker, Reporter

from sshd_fixture import FakeHost, FakeInventory, FakeSecrets, FakeSSH, keygen

TRICKY = [
    "plain",
    "with space",
    "it's",
    'say "hi"',
    "$(rm -rf /)",
    "`id`",
    "$HOME",
    "a;b&&c|d>e<f",
    "line1\nline2",
    "tab\there",
    "*",
    "~root",
    "-n",
    "",
    "café",
    "日本",
    "back\\slash",
    "#comment",
]


def offline_inventory(*hosts: FakeHost, tmp: Path = Path("/nonexistent")) -> FakeInventory:
    """Hosts on a port nobody listens on: any accidental connection attempt fails loudly."""
    return FakeInventory(
        path=tmp / "hosts.yaml",
        known_hosts=tmp / "known_hosts",
        ssh=FakeSSH(identity_file=None, connect_timeout=1.0),
        hosts=hosts or (FakeHost("web1", ssh_port=1),),
    )


@dataclass(frozen=True)
class PretendNonRoot(FakeHost):
    """Logs in as root (all the loopback sshd allows) but is treated as a sudo user."""

    @property
    def is_root(self) -> bool:
        return False


# --------------------------------------------------------------------------------------
# render / argv building
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["echo", "hello"], "echo hello"),
        (["echo", "with space"], "echo 'with space'"),
        (["echo", "it's"], "echo 'it'\"'\"'s'"),
        (["echo", "$(id)"], "echo '$(id)'"),
        (["echo", ""], "echo ''"),
        (["echo", "café", "日本"], "echo 'café' '日本'"),
        (["printf", "%s\n", "a\nb"], "printf '%s\n' 'a\nb'"),
    ],
)
def test_render_table(argv, expected):
    assert render(argv) == expected


def test_render_round_trips_through_a_posix_shell_parser():
    for value in TRICKY:
        assert shlex.split(render(["cmd", value])) == ["cmd", value]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("echo hi", TypeError),
        (b"echo", TypeError),
        ([], ValueError),
        (["echo", 3], TypeError),
        (["echo", Path("/tmp")], TypeError),
        (["echo", "a\x00b"], ValueError),
    ],
)
def test_render_rejects(bad, error):
    with pytest.raises(error):
        render(bad)


def test_render_masked_masks_each_word_before_quoting():
    mask = Masker(["pa'ss-word"])
    shown = render_masked(["psql", "--password=pa'ss-word"], mask)
    assert "pa'ss" not in shown and "ss-word" not in shown
    assert shown == "psql '--password=****'"


def test_with_sudo_prefixes_only_non_root():
    assert with_sudo(["systemctl", "restart", "nginx"], is_root=True) == [
        "systemctl",
        "restart",
        "nginx",
    ]
    assert with_sudo(["systemctl", "restart", "nginx"], is_root=False) == [
        "sudo",
        "-n",
        "--",
        "systemctl",
        "restart",
        "nginx",
    ]


@pytest.mark.parametrize(
    ("host", "kw", "expected"),
    [
        (FakeHost("r"), {"sudo": True}, ["id", "-u"]),
        (FakeHost("u", ssh_user="deploy"), {"sudo": False}, ["id", "-u"]),
        (FakeHost("u", ssh_user="deploy"), {"sudo": True}, ["sudo", "-n", "--", "id", "-u"]),
        (
            FakeHost("u", ssh_user="deploy"),
            {"sudo": True, "env": {"LC_ALL": "C"}, "cwd": "/opt/my app"},
            ["sudo", "-n", "--", "env", "LC_ALL=C", "sh", "-c",
             'cd "$1" && shift && exec "$@"', "sh", "/opt/my app", "id", "-u"],
        ),
    ],
)
def test_command_argv(host, kw, expected):
    ex = Executor(offline_inventory(host))
    assert ex.conn(host.name).command_argv(["id", "-u"], **kw) == expected


def test_command_argv_rejects_bad_env_and_relative_cwd():
    ex = Executor(offline_inventory())
    c = ex.conn("web1")
    with pytest.raises(ValueError):
        c.command_argv(["true"], env={"BAD NAME": "x"})
    with pytest.raises(ValueError):
        c.command_argv(["true"], cwd="relative/dir")


# --------------------------------------------------------------------------------------
# masking, secrets in argv, dry-run (no SSH)
# --------------------------------------------------------------------------------------
def test_masker():
    m = Masker(["abc", "s3cret-value", "s3cret", "-----BEGIN KEY-----\nAAAAbbbbCCCC\n-----END KEY-----"])
    assert m("abc s3cret s3cret-value") == "abc **** ****"  # "abc" is too short to mask
    assert m("key line: AAAAbbbbCCCC") == "key line: ****"
    assert not Masker([])
    assert Masker([])("anything") == "anything"


def test_secret_in_argv_is_refused_without_showing_it(capsys):
    out = io.StringIO()
    ex = Executor(
        offline_inventory(),
        secrets=FakeSecrets({"DB_PASSWORD": "hunter2-very-secret"}),
        reporter=Reporter(out),
        dry_run=True,
    )
    with pytest.raises(ValueError) as info:
        ex.conn("web1").run(["psql", "-c", "ALTER ROLE x PASSWORD 'hunter2-very-secret'"])
    assert "DB_PASSWORD" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in out.getvalue() + capsys.readouterr().out


def test_secrets_accepts_plain_mapping():
    ex = Executor(offline_inventory(), secrets={"TOKEN": "tok-123456"}, reporter=Reporter(io.StringIO()))
    assert ex.masker("x tok-123456 y") == "x **** y"


def test_dry_run_reports_mutating_commands_and_never_connects():
    out = io.StringIO()
    ex = Executor(offline_inventory(), dry_run=True, reporter=Reporter(out))
    res = ex.conn("web1").run(["rm", "-rf", "/opt/releasy/old release"])
    assert res.dry_run and res.ok
    assert out.getvalue() == "[web1] would run: rm -rf '/opt/releasy/old release'\n"
    assert ex.round_trips == {}
    assert ex.conn("web1").put_bytes(b"x", "/etc/x") is False
    assert "[web1] would write: /etc/x (1 bytes, root:root 0644)" in out.getvalue()
    # Read-only commands are run even in dry-run: here that means trying to connect.
    with pytest.raises(HostKeyError):
        ex.conn("web1").run(["true"], mutates=False)


def test_result_repr_hides_output():
    r = Result("h", ("cat", "/etc/app.env"), 0, "PASSWORD=x", "")
    assert "PASSWORD" not in repr(r)
    assert r.ok and not Result("h", ("false",), 1, "", "").ok


def scripted(hc: HostConnection, *replies: Raw) -> list[str]:
    """Replace the SSH exec of one HostConnection by canned replies; return sent commands."""
    sent: list[str] = []
    queue = list(replies)

    def fake_exec(command, display, **kw):
        sent.append(command)
        return queue.pop(0)

    hc._exec = fake_exec  # type: ignore[method-assign]
    return sent


@pytest.mark.parametrize(
    "stderr",
    [
        b"sudo: a password is required\n",
        b"deploy is not in the sudoers file.  This incident will be reported.\n".join(
            [b"sudo: ", b""]
        ),
        b"sudo: a terminal is required to read the password; either use the -S option\n",
    ],
)
def test_sudo_refusal_becomes_sudo_error(stderr):
    host = FakeHost("db1", ssh_user="deploy")
    ex = Executor(offline_inventory(host), reporter=Reporter(io.StringIO()))
    hc = ex.conn("db1")
    sent = scripted(hc, Raw(1, b"", stderr))
    with pytest.raises(SudoError) as info:
        hc.run(["systemctl", "reload", "nginx"], sudo=True, check=False)
    assert sent == ["sudo -n -- systemctl reload nginx"]
    msg = str(info.value)
    assert msg.startswith("db1: deploy cannot run commands as root without a password")
    assert "NOPASSWD" in msg and "ssh_user: root" in msg


def test_sudo_missing_becomes_sudo_error():
    host = FakeHost("db1", ssh_user="deploy")
    ex = Executor(offline_inventory(host), reporter=Reporter(io.StringIO()))
    hc = ex.conn("db1")
    scripted(hc, Raw(127, b"", b"bash: line 1: sudo: command not found\n"))
    with pytest.raises(SudoError, match="sudo is not installed"):
        hc.run(["true"], sudo=True)


def test_failed_command_error_is_masked_and_actionable():
    ex = Executor(
        offline_inventory(),
        secrets=FakeSecrets({"API_KEY": "key-0123456789"}),
        reporter=Reporter(io.StringIO()),
    )
    hc = ex.conn("web1")
    scripted(hc, Raw(2, b"", b"".join(f"noise {i}\n".encode() for i in range(40)) + b"bad key key-0123456789\n"))
    with pytest.raises(RemoteCommandError) as info:
        hc.run(["app", "check"])
    err = info.value
    assert err.exit_code == 2 and err.host == "web1"
    assert "key-0123456789" not in str(err)
    assert "bad key ****" in str(err)
    assert "noise 0" not in str(err)  # only the tail
    assert str(err).startswith("web1: remote command failed (exit code 2): app check")
    # check=False returns the (unmasked) result instead
    scripted(hc, Raw(2, b"out", b"err"))
    res = hc.run(["app", "check"], check=False)
    assert (res.exit_code, res.stdout, res.stderr) == (2, "out", "err")


def test_parallel_error_lists_each_failing_host():
    err = ParallelError(
        {"b": RemoteCommandError("b", "false", 1, "boom"), "a": KeyError("k")},
        {"c": 1},
    )
    text = str(err)
    assert text.splitlines()[0] == "2 of 3 hosts failed:"
    assert "- a: KeyError: 'k'" in text
    assert "- b: remote command failed (exit code 1): false" in text
    assert text.splitlines()[-1] == "succeeded: c"


# --------------------------------------------------------------------------------------
# Reporter
# --------------------------------------------------------------------------------------
class SlowStream(io.StringIO):
    """Writes one character at a time and yields: unlocked writers would interleave."""

    def write(self, s: str) -> int:
        for ch in s:
            super().write(ch)
            os.sched_yield()
        return len(s)


def test_reporter_never_interleaves_lines_across_threads():
    stream = SlowStream()
    rep = Reporter(stream)
    hosts = [f"host{i}" for i in range(6)]

    def work(host: str) -> None:
        for j in range(40):
            rep.info(host, f"message {j} from {host}\nsecond line {j} from {host}")

    threads = [threading.Thread(target=work, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6 * 40 * 2
    for line in lines:
        host = line[1 : line.index("]")]
        assert line in (
            f"[{host}] {kind} {j} from {host}"
            for j in range(40)
            for kind in ("message", "second line")
        ), line
    # each event's two lines stay together
    for first, second in zip(lines[::2], lines[1::2]):
        assert first.replace("message", "second line") == second


def test_reporter_events_summary_and_json_lines(tmp_path):
    out = io.StringIO()
    clock = iter([100.0, 112.5])
    rep = Reporter(out, json_path=tmp_path / "log" / "events.jsonl", clock=lambda: next(clock))
    rep.masker.add(["topsecret"])
    rep.changed("web1", "file /etc/a")
    rep.unchanged("web1", "dir /opt")
    rep.would("web2", "run: systemctl restart x")
    rep.error("web2", "boom topsecret")
    rep.diff("web1", "/etc/a", "--- a\n+++ b\n-x\n+y")
    text = rep.summary()
    rep.close()
    printed = out.getvalue().splitlines()
    assert printed[:8] == [
        "[web1] changed: file /etc/a",
        "[web1] ok: dir /opt",
        "[web2] would run: systemctl restart x",
        "[web2] ERROR: boom ****",
        "[web1]   --- a",
        "[web1]   +++ b",
        "[web1]   -x",
        "[web1]   +y",
    ]
    assert text.splitlines() == [
        "web1  1 changed / 1 unchanged / ok",
        "web2  0 changed / 0 unchanged / 1 would change / FAILED (1 errors)",
        "2 hosts, 1 failed, 12.5 s",
    ]
    events = [json.loads(line) for line in (tmp_path / "log" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["changed", "unchanged", "would", "error", "diff", "summary"]
    assert events[3]["message"] == "boom ****"
    assert events[4]["path"] == "/etc/a"
    assert all("ts" in e for e in events)


# --------------------------------------------------------------------------------------
# Real SSH (loopback sshd from conftest)
# --------------------------------------------------------------------------------------
def test_run_prefixes_output_and_reuses_one_connection(sshd):
    out = io.StringIO()
    with Executor(sshd.inventory("app1"), reporter=Reporter(out)) as ex:
        c = ex.conn("app1")
        res = c.run(["sh", "-c", "echo one; echo two >&2; printf 'no newline'"], echo=True)
        c.run(["true"])
        assert res.stdout == "one\nno newline" and res.stderr == "two\n"
        assert ex.connections_opened == {"app1": 1}
        sock = c._conn.client.get_transport().sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert isinstance(sock, connect._AckingSocket) == hasattr(socket, "TCP_QUICKACK")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[app1] $ sh -c ")
    assert set(lines[1:]) == {"[app1] | one", "[app1] ! two", "[app1] | no newline"}
    # stdout lines keep their order
    assert lines.index("[app1] | one") < lines.index("[app1] | no newline")


def test_transport_is_tuned_before_the_handshake_and_reads_as_before():
    # paramiko calls the factory on the connected socket, before key exchange and
    # authentication: the ones that stalled on Nagle and delayed acknowledgements.
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=7.5)
        peer, _ = server.accept()
        transport = connect._tuned_transport(client)
        sock = transport.sock
        try:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert sock.gettimeout() == transport._active_check_timeout  # paramiko's poll
            if hasattr(socket, "TCP_QUICKACK"):
                assert isinstance(sock, connect._AckingSocket) and client.fileno() == -1
            peer.sendall(b"SSH-2.0-x\r\n")
            assert sock.recv(64) == b"SSH-2.0-x\r\n"
            peer.close()
            assert sock.recv(64) == b""  # the peer's close reads as EOF, no error
        finally:
            sock.close()  # the transport never started, so it owns nothing to close
            peer.close()
        with pytest.raises(OSError):
            sock.recv(64)  # closed here: an error, as with a plain socket


def test_tricky_argv_reaches_the_remote_intact(sshd):
    with Executor(sshd.inventory(), reporter=Reporter(io.StringIO())) as ex:
        res = ex.conn("loop").run(["printf", "%s\\0", *TRICKY], mutates=False)
    assert res.stdout.split("\0")[:-1] == TRICKY


def test_binary_stdin_round_trip_including_large_payload(sshd, tmp_path):
    blob = bytes(range(256)) * 2000  # 512 KiB: also exercises the threaded stdin path
    with Executor(sshd.inventory(), reporter=Reporter(io.StringIO())) as ex:
        c = ex.conn("loop")
        target = f"{sshd.dir}/blob.bin"
        assert c.put_bytes(blob, target, owner=sshd.user, group=sshd.user, mode=0o640)
        assert c.read_file(target) == blob
        assert c.read_file(f"{sshd.dir}/does-not-exist") is None
        st = os.stat(target)
        assert oct(st.st_mode & 0o7777) == "0o640"
        res = c.run(["wc", "-c"], stdin=blob, mutates=False)
        assert res.stdout.strip() == str(len(blob))
    leftovers = [p for p in os.listdir(sshd.dir) if p.startswith(".releasy-put")]
    assert leftovers == []


def test_unknown_host_key_is_rejected(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ex = Executor(sshd.inventory(known_hosts=empty), reporter=Reporter(io.StringIO()))
    with pytest.raises(HostKeyError) as info:
        ex.conn("loop").run(["true"])
    msg = str(info.value)
    assert msg.startswith(f"host key of loop (127.0.0.1:{sshd.port}) is not in {empty}")
    assert f"ssh-keyscan -p {sshd.port} -t ed25519 127.0.0.1" in msg
    assert "SHA256:" in msg
    assert empty.read_text() == ""  # nothing was auto-added
    assert ex.round_trips == {}


def test_changed_host_key_is_rejected(sshd, tmp_path):
    other_pub = keygen(tmp_path / "other_host_key")
    changed = tmp_path / "known_hosts"
    changed.write_text(f"[127.0.0.1]:{sshd.port} {other_pub}\n")
    ex = Executor(sshd.inventory(known_hosts=changed), reporter=Reporter(io.StringIO()))
    with pytest.raises(HostKeyError) as info:
        ex.conn("loop").run(["true"])
    msg = str(info.value)
    assert msg.startswith(f"HOST KEY CHANGED for loop (127.0.0.1:{sshd.port})")
    assert "expected ssh-ed25519 SHA256:" in msg and "got ssh-ed25519 SHA256:" in msg
    assert f"remove the old line from {changed}" in msg


def _true_on(inv) -> bool:
    """`true` on the inventory's host "loop" with a new executor, closed after."""
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex:
        return ex.conn("loop").run(["true"]).ok


def test_an_edited_known_hosts_is_read_again_by_the_next_connection(sshd, tmp_path):
    """known_hosts is parsed once per process and reused: an edit (a key replaced, the
    file the same size) is seen by the next connection, in both directions."""
    other_pub = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts.read_text())
    inv = sshd.inventory(known_hosts=known)
    assert _true_on(inv)
    known.write_text(f"[127.0.0.1]:{sshd.port} {other_pub}\n")
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED"):
        _true_on(inv)
    known.write_text(sshd.known_hosts.read_text())
    assert _true_on(inv)
    # Hashed entries (ssh-keygen -H) are found too.
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True,
                   capture_output=True)
    assert known.read_text().startswith("|1|")
    assert _true_on(inv)


def test_a_replaced_or_encrypted_identity_is_loaded_again(sshd, tmp_path):
    """The private key is loaded once per process and reused until the file changes: a
    key replaced by one the host does not know fails as before, and so does an encrypted
    one (paramiko loads it and says why)."""
    key = tmp_path / "id"
    key.write_bytes(sshd.client_key.read_bytes())
    key.chmod(0o600)
    inv = sshd.inventory()
    inv = dataclasses.replace(inv, ssh=dataclasses.replace(inv.ssh, identity_file=key))
    assert _true_on(inv)
    key.unlink()
    keygen(key)  # a new key, not in authorized_keys
    with pytest.raises(UnreachableError, match="authentication failed"):
        _true_on(inv)
    key.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)],
                   check=True, capture_output=True)
    with pytest.raises(UnreachableError, match="authentication failed"):
        _true_on(inv)


def test_missing_known_hosts_and_unreachable_port(sshd, tmp_path):
    ex = Executor(sshd.inventory(known_hosts=tmp_path / "nope"), reporter=Reporter(io.StringIO()))
    with pytest.raises(HostKeyError, match="does not exist"):
        ex.conn("loop").run(["true"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound but not listening: connection refused
        inv = FakeInventory(
            path=sshd.dir / "hosts.yaml",
            known_hosts=sshd.known_hosts,
            ssh=FakeSSH(identity_file=sshd.client_key, connect_timeout=2.0),
            hosts=(FakeHost("down", ssh_port=closed_port),),
        )
        with pytest.raises(UnreachableError, match=r"^down \(root@127.0.0.1:\d+\): cannot connect"):
            Executor(inv, reporter=Reporter(io.StringIO())).conn("down").run(["true"])


def test_round_trips_are_counted_exactly(sshd):
    with Executor(sshd.inventory("a", "b"), reporter=Reporter(io.StringIO())) as ex:
        a = ex.conn("a")
        a.run(["true"])  # 1
        a.run(["false"], check=False)  # 2
        a.run_script("echo one\necho two\n", mutates=False)  # 3
        a.put_bytes(b"data", f"{sshd.dir}/rt.txt", owner=sshd.user, group=sshd.user)  # 4
        a.read_file(f"{sshd.dir}/rt.txt")  # 5
        ex.conn("b").run(["true"])
        assert ex.round_trips == {"a": 5, "b": 1}
        assert a.round_trips == 5
        assert ex.connections_opened == {"a": 1, "b": 1}


def test_command_timeout_and_reconnect_after_close(sshd):
    with Executor(sshd.inventory(), reporter=Reporter(io.StringIO())) as ex:
        c = ex.conn("loop")
        with pytest.raises(CommandTimeoutError, match="did not finish within 0.3 s"):
            c.run(["sleep", "10"], timeout=0.3)
        assert c.run(["echo", "still usable"]).stdout == "still usable\n"
        c.close()
        assert c.run(["echo", "again"]).stdout == "again\n"
        assert ex.connections_opened == {"loop": 2}


def test_each_runs_hosts_concurrently(sshd, tmp_path):
    names = ("h1", "h2", "h3")
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    barrier = threading.Barrier(len(names), timeout=20)
    # Each remote command checks in, then waits (bounded) until all three are inside at
    # once: only possible if the three SSH sessions really overlap.
    wait_all = (
        'touch "$1/$2"; i=0; while [ "$(ls "$1" | wc -l)" -lt 3 ]; do'
        ' i=$((i+1)); [ "$i" -gt 400 ] && exit 7; sleep 0.05; done; echo "$2 met all"'
    )

    def task(c: HostConnection) -> str:
        barrier.wait()  # local proof: all three workers are running at the same time
        return c.run(["sh", "-c", wait_all, "sh", str(rendezvous), c.name], mutates=False).stdout

    with Executor(sshd.inventory(*names), reporter=Reporter(io.StringIO())) as ex:
        results = ex.each(names, task)
        assert results == {n: f"{n} met all\n" for n in names}
        assert list(results) == list(names)
        assert ex.connections_opened == {n: 1 for n in names}


def test_each_is_bounded_and_collects_failures(sshd):
    active = 0
    peak = 0
    lock = threading.Lock()
    out = io.StringIO()

    def task(c: HostConnection) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            c.run(["sleep", "0.2"], mutates=False)
            if c.name == "bad":
                c.run(["sh", "-c", "echo nope >&2; exit 3"])
            return 1
        finally:
            with lock:
                active -= 1

    names = ("n1", "n2", "bad", "n3", "n4")
    with Executor(sshd.inventory(*names), reporter=Reporter(out), max_parallel=2) as ex:
        with pytest.raises(ParallelError) as info:
            ex.each(names, task)
    assert peak <= 2
    err = info.value
    assert set(err.failures) == {"bad"} and set(err.results) == {"n1", "n2", "n3", "n4"}
    assert isinstance(err.failures["bad"], RemoteCommandError)
    assert "- bad: remote command failed (exit code 3)" in str(err)
    assert "[bad] ERROR: remote command failed (exit code 3)" in out.getvalue()


@pytest.fixture
def fake_sudo(sshd):
    """A stand-in `sudo` first in the sessions' PATH (sudo is not installed on this machine).

    It insists on exactly ``-n --`` and, while ``sudo.deny`` exists, answers like real sudo
    does for a user without a NOPASSWD rule. The real non-root path runs in the lab suite.
    """
    script = sshd.fakebin / "sudo"
    deny = sshd.fakebin / "sudo.deny"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "-n" ] && [ "$2" = "--" ] || { echo "fake sudo: bad args: $*" >&2; exit 99; }\n'
        f'[ -e {shlex.quote(str(deny))} ] && {{ echo "sudo: a password is required" >&2; exit 1; }}\n'
        "shift 2\n"
        'echo "$*" >> "$(dirname "$0")/sudo.log"\n'
        'exec "$@"\n'
    )
    script.chmod(0o755)
    yield deny
    for p in (script, deny, sshd.fakebin / "sudo.log"):
        p.unlink(missing_ok=True)


def test_non_root_host_goes_through_sudo(sshd, fake_sudo):
    host = PretendNonRoot("nr", ssh_user=sshd.user, ssh_port=sshd.port)
    inv = FakeInventory(
        path=sshd.dir / "hosts.yaml",
        known_hosts=sshd.known_hosts,
        ssh=FakeSSH(identity_file=sshd.client_key),
        hosts=(host,),
    )
    with Executor(inv, reporter=Reporter(io.StringIO())) as ex:
        c = ex.conn("nr")
        res = c.run(["id", "-u"], sudo=True)
        assert res.argv == ("sudo", "-n", "--", "id", "-u") and res.stdout == "0\n"
        assert c.run(["id", "-u"]).argv == ("id", "-u")  # sudo=False: no prefix
        assert c.put_bytes(b"x\n", f"{sshd.dir}/via-sudo.txt", owner=sshd.user, group=sshd.user)
        assert (sshd.fakebin / "sudo.log").read_text().splitlines()[0] == "id -u"
        fake_sudo.write_text("")
        with pytest.raises(SudoError, match="^nr: root cannot run commands as root without"):
            c.run(["systemctl", "reload", "nginx"], sudo=True)


# --------------------------------------------------------------------------------------
# connect_ahead: connecting while the task still loads its flow
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def silent_listener():
    """A TCP port that accepts connections and never speaks (an SSH banner time-out); yields
    (port, the number of connections accepted so far)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], lambda: len(accepted)
    finally:
        done.set()
        thread.join(timeout=5)
        for s in accepted:
            s.close()
        server.close()


def silent_inventory(sshd, port: int) -> FakeInventory:
    return FakeInventory(path=sshd.dir / "hosts.yaml", known_hosts=sshd.known_hosts,
                         ssh=FakeSSH(identity_file=sshd.client_key, connect_timeout=1.0),
                         hosts=(FakeHost("mute", ssh_port=port),))


def wait_for(condition, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("connect ")]


def test_connect_ahead_opens_the_connection_the_first_use_then_finds(sshd):
    with Executor(sshd.inventory("a", "b"), reporter=Reporter(io.StringIO())) as ex:
        ex.connect_ahead(["a", "b"])
        for thread in ahead_threads():
            thread.join(timeout=30)
        assert ex.connections_opened == {"a": 1, "b": 1}  # before any command
        assert ex.conn("a").run(["echo", "ok"]).stdout == "ok\n"
        ex.connect_ahead(["a"])  # connected already: nothing more
        assert ex.connections_opened == {"a": 1, "b": 1}


def test_a_failed_connect_ahead_is_raised_by_the_first_use_without_a_second_attempt(sshd):
    with silent_listener() as (port, attempts):
        with Executor(silent_inventory(sshd, port), reporter=Reporter(io.StringIO())) as ex:
            ex.connect_ahead(["mute"])
            with pytest.raises(UnreachableError, match=r"^mute \(root@127.0.0.1:\d+\)"):
                ex.conn("mute").run(["true"])  # waits for the connect ahead, raises its error
            assert attempts() == 1  # one time-out, not two
            with pytest.raises(UnreachableError):
                ex.conn("mute").run(["true"])  # a later use tries again
            assert attempts() == 2


def test_closing_does_not_wait_for_a_connect_ahead(sshd):
    with silent_listener() as (port, attempts):
        ex = Executor(silent_inventory(sshd, port), reporter=Reporter(io.StringIO()))
        ex.connect_ahead(["mute"])
        wait_for(lambda: attempts() == 1)  # connecting: the banner never comes
        ex.close()
        assert [t.is_alive() for t in ahead_threads()] == [True]  # close() did not wait
        for thread in ahead_threads():
            thread.join(timeout=30)
        assert ex.connections_opened == {}


def test_a_ctrl_c_in_each_tells_the_hosts_still_running_to_begin_nothing_new():
    """The pool waits for every host's function after a Ctrl-C (an apt run is not cut
    off); `interrupted` lets such a function skip its next step (`fab site` then begins no
    firewall on a host whose install ended after the Ctrl-C)."""
    inv = offline_inventory(FakeHost("a", ssh_port=1), FakeHost("b", ssh_port=1))
    ex = Executor(inv, reporter=Reporter(io.StringIO()))
    seen_after = []
    interrupted = threading.Event()
    both_running = threading.Barrier(2, timeout=5)

    def task(c: HostConnection) -> None:  # no connection is opened
        both_running.wait()
        if c.name == "a":
            time.sleep(0.2)  # the main thread is past starting the workers, waiting on them
            _thread.interrupt_main()  # what a Ctrl-C does to the main thread
            interrupted.set()
            return
        interrupted.wait(5)
        time.sleep(0.5)  # the main thread meanwhile turned the signal into KeyboardInterrupt
        seen_after.append(ex.interrupted)

    assert not ex.interrupted
    with pytest.raises(KeyboardInterrupt):
        ex.each(["a", "b"], task)
    assert seen_after == [True]
