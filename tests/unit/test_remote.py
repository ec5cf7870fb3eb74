"""Idempotent helpers: table-driven with canned replies, then for real over loopback SSH."""
from __future__ import annotations

import grp
import hashlib
import io
import os
import pwd
import shlex
from pathlib import Path

import pytest

from releasy_deploy.errors import DeployError, RemoteCommandError
from releasy_deploy.executor import Executor, HostConnection
from releasy_deploy.executor.channel import Raw
from releasy_deploy.facts import (
    Arch,
    DiskFree,
    FileSha256,
    Hostname,
    OsRelease,
    PackageVersion,
    ServiceActive,
    UserExists,
    read_fact,
    read_facts,
)
from releasy_deploy.output import Reporter
from releasy_deploy.remote import (
    Change,
    apt_install_argv,
    ensure_dir,
    ensure_packages,
    missing_packages,
    parse_file_probe,
    parse_package_probe,
    put_file,
    put_template,
    render_diff,
    render_template,
)

from sshd_fixture import FakeHost, FakeInventory, FakeSecrets, FakeSSH

TEMPLATES = Path(__file__).parent / "templates"
SECRET = "Zq9-very-secret-password"


# --------------------------------------------------------------------------------------
# Canned-reply connection: real HostConnection, SSH exec replaced by a script of replies
# --------------------------------------------------------------------------------------
class Scripted:
    def __init__(self, *, dry_run: bool = False, user: str = "root") -> None:
        self.out = io.StringIO()
        host = FakeHost("web1", ssh_user=user, ssh_port=1)
        inv = FakeInventory(Path("/x/hosts.yaml"), Path("/x/known_hosts"), FakeSSH(), (host,))
        self.ex = Executor(inv, dry_run=dry_run, reporter=Reporter(self.out))
        self.c: HostConnection = self.ex.conn("web1")
        self.sent: list[list[str]] = []
        self.replies: list[Raw] = []
        self.c._exec = self._exec  # type: ignore[method-assign]

    def reply(self, stdout: str = "", code: int = 0, stderr: str = "") -> Scripted:
        self.replies.append(Raw(code, stdout.encode(), stderr.encode()))
        return self

    def _exec(self, command: str, display: str, **kw) -> Raw:
        self.sent.append(shlex.split(command))
        if not self.replies:
            raise AssertionError(f"unexpected command: {command}")
        return self.replies.pop(0)


# --------------------------------------------------------------------------------------
# Pure units
# --------------------------------------------------------------------------------------
def test_render_diff_text_binary_secret_and_absent():
    diff = render_diff(b"a\nb\nc\n", b"a\nB\nc\n", "/etc/x")
    assert diff.splitlines() == [
        "--- /etc/x (current)",
        "+++ /etc/x (new)",
        "@@ -1,3 +1,3 @@",
        " a",
        "-b",
        "+B",
        " c",
    ]
    assert render_diff(None, b"new\n", "/etc/x").splitlines()[:3] == ["--- /dev/null", "+++ /etc/x (new)", "@@ -0,0 +1 @@"]
    assert render_diff(b"\x00\x01", b"\x00\x02", "/bin/x").startswith("binary content differs (2 -> 2 bytes")
    assert render_diff(b"\xff\xfe", b"text", "/x").startswith("binary content differs")
    assert render_diff(b"pw=old", b"pw=new", "/x", secret=True) == "secret content changed (not shown)"
    assert render_diff(b"a", b"a\n", "/x") == "only the trailing newline differs"
    long = render_diff(b"", "".join(f"{i}\n" for i in range(500)).encode(), "/x")
    assert long.splitlines()[-1] == "... (303 more diff lines not shown)"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("absent", ("absent", None, None, None, None)),
        ("link", ("link", None, None, None, None)),
        ("file " + "a" * 64 + " root adm 640", ("file", "a" * 64, "root", "adm", 0o640)),
        ("dir www-data www-data 2775", ("dir", None, "www-data", "www-data", 0o2775)),
    ],
)
def test_parse_file_probe(line, expected):
    st = parse_file_probe(line)
    assert (st.kind, st.sha256, st.owner, st.group, st.mode) == expected


def test_parse_file_probe_rejects_garbage():
    with pytest.raises(ValueError):
        parse_file_probe("file abc")


def test_render_template_strict_keeps_newline_no_escaping():
    text = render_template(
        "vhost.conf.j2",
        {"port": 8080, "names": ["a.example", "b.example"], "note": "<b>&'\"</b>"},
        base_dir=TEMPLATES,
    )
    assert text.endswith("}\n")
    assert "listen 8080;" in text and "server_name a.example b.example;" in text
    assert "<b>&'\"</b>" in text  # no HTML escaping in config files
    with pytest.raises(DeployError, match="'port' is undefined"):
        render_template("vhost.conf.j2", {"names": [], "note": ""}, base_dir=TEMPLATES)
    with pytest.raises(DeployError, match="not found"):
        render_template("nope.j2", {}, base_dir=TEMPLATES)


@pytest.mark.parametrize(
    ("stdout", "installed", "lists"),
    [
        ("nginx\tnginx\tii \t1.22\nufw\tufw\trc \t0.36\n@lists yes\n", {"nginx": "1.22"}, True),
        ("libc6:amd64\tlibc6\tii \t2.36\n@lists no\n", {"libc6:amd64": "2.36", "libc6": "2.36"}, False),
        ("", {}, False),
    ],
)
def test_parse_package_probe(stdout, installed, lists):
    assert parse_package_probe(stdout) == (installed, lists)


def test_missing_packages_and_install_argv():
    assert missing_packages(["nginx", "ufw", "curl=7.88"], {"nginx": "1", "curl": "7.74"}) == ["ufw", "curl=7.88"]
    argv = apt_install_argv(["ufw", "postgresql-15"])
    assert argv[:4] == ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install"]
    assert "--no-install-recommends" in argv and argv[-2:] == ["ufw", "postgresql-15"]


# --------------------------------------------------------------------------------------
# ensure_packages, table-driven with canned replies
# --------------------------------------------------------------------------------------
def test_ensure_packages_all_present_is_one_round_trip():
    s = Scripted().reply("nginx\tnginx\tii \t1\nufw\tufw\tii \t2\n@lists yes\n", code=0)
    change = ensure_packages(s.c, ["nginx", "ufw"])
    assert change == Change(False, "packages nginx ufw")
    assert len(s.sent) == 1 and s.sent[0][:2] == ["sh", "-c"] and s.sent[0][-2:] == ["nginx", "ufw"]
    assert s.out.getvalue() == "[web1] ok: packages nginx ufw\n"


def test_ensure_packages_installs_all_missing_in_one_call_via_sudo():
    s = Scripted(user="deploy").reply("nginx\tnginx\tii \t1\n@lists yes\n", code=1).reply("done")
    change = ensure_packages(s.c, ["nginx", "ufw", "curl"])
    assert change.changed and change.what == "packages: installed ufw curl"
    assert s.sent[0][0] == "sh"  # the probe needs no root
    assert s.sent[1] == ["sudo", "-n", "--", *apt_install_argv(["ufw", "curl"])]
    assert s.out.getvalue() == "[web1] changed: packages: installed ufw curl\n"


def test_ensure_packages_updates_lists_when_absent_or_stale():
    s = Scripted().reply("@lists no\n").reply().reply()
    ensure_packages(s.c, ["ufw"])
    assert [a[2:4] for a in s.sent[1:]] == [["apt-get", "update"], ["apt-get", "install"]]

    s = Scripted().reply("@lists yes\n").reply(code=100, stderr="E: Unable to locate package ufw").reply().reply()
    ensure_packages(s.c, ["ufw"])
    assert [a[3] for a in s.sent[1:]] == ["install", "update", "install"]

    s = Scripted().reply("@lists yes\n").reply(code=100, stderr="E: dpkg was interrupted")
    with pytest.raises(RemoteCommandError, match="dpkg was interrupted"):
        ensure_packages(s.c, ["ufw"])


def test_ensure_packages_dry_run_and_validation():
    s = Scripted(dry_run=True).reply("@lists yes\n")
    change = ensure_packages(s.c, ["ufw"])
    assert change.changed and len(s.sent) == 1
    assert s.out.getvalue() == "[web1] would change: packages: install ufw\n"
    with pytest.raises(ValueError):
        ensure_packages(s.c, ["ufw; rm -rf /"])


def test_put_file_with_canned_replies_counts_round_trips():
    data = b"hello\n"
    sha = hashlib.sha256(data).hexdigest()
    s = Scripted().reply(f"file {sha} root root 644\n")
    assert put_file(s.c, "/etc/x", data) == Change(False, "file /etc/x")
    assert len(s.sent) == 1
    s = Scripted().reply(f"file {sha} root root 600\n").reply()
    assert put_file(s.c, "/etc/x", data).what == "file /etc/x (mode 0600 -> 0644)"
    assert s.sent[1][-3:] == ["/etc/x", "root:root", "0644"]
    assert len(s.sent) == 2


# --------------------------------------------------------------------------------------
# Real SSH
# --------------------------------------------------------------------------------------
def _ex(sshd, out: io.StringIO, **kw) -> Executor:
    return Executor(sshd.inventory("loop"), reporter=Reporter(out), **kw)


def _owner(path: str) -> tuple[str, str, int]:
    st = os.stat(path)
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o7777


def test_put_file_changed_then_unchanged_then_attrs(sshd):
    path = f"{sshd.dir}/app.conf"
    out = io.StringIO()
    user = sshd.user
    with _ex(sshd, out) as ex:
        c = ex.conn("loop")
        kw = {"owner": user, "group": user, "mode": 0o640}
        first = put_file(c, path, b"a=1\n", **kw)
        second = put_file(c, path, b"a=1\n", **kw)
        assert first.changed and "created" in first.what
        assert second == Change(False, f"file {path}")
        assert Path(path).read_bytes() == b"a=1\n" and _owner(path) == (user, user, 0o640)
        before = ex.round_trips["loop"]
        assert put_file(c, path, b"a=1\n", owner=user, group=user, mode=0o600).what == (
            f"file {path} (mode 0640 -> 0600)"
        )
        assert ex.round_trips["loop"] - before == 2  # probe + one chown/chmod
        assert put_file(c, path, b"a=1\n", owner="nobody", group="nogroup", mode=0o600).what == (
            f"file {path} (owner {user}:{user} -> nobody:nogroup)"
        )
        assert _owner(path) == ("nobody", "nogroup", 0o600)
        before = ex.round_trips["loop"]
        assert put_file(c, path, b"a=2\n", owner="nobody", group="nogroup", mode=0o600).what == (
            f"file {path} (content)"
        )
        assert ex.round_trips["loop"] - before == 2  # probe + atomic upload
        assert not put_file(c, path, b"a=2\n", owner="nobody", group="nogroup", mode=0o600).changed
    lines = out.getvalue().splitlines()
    assert lines[0] == f"[loop] changed: file {path} (created, 4 bytes, {user}:{user} 0640)"
    assert lines[1] == f"[loop] ok: file {path}"
    assert lines[-1] == f"[loop] ok: file {path}"


def test_put_template_over_ssh(sshd):
    path = f"{sshd.dir}/vhost.conf"
    with _ex(sshd, io.StringIO()) as ex:
        ctx = {"port": 80, "names": ["café.example"], "note": "日本"}
        kw = {"owner": sshd.user, "group": sshd.user, "base_dir": TEMPLATES}
        assert put_template(ex.conn("loop"), path, "vhost.conf.j2", ctx, **kw).changed
        assert not put_template(ex.conn("loop"), path, "vhost.conf.j2", ctx, **kw).changed
    assert "server_name café.example;" in Path(path).read_text(encoding="utf-8")


def test_ensure_dir_idempotent_and_fixes_mode(sshd):
    path = f"{sshd.dir}/deep/er/dir"
    out = io.StringIO()
    with _ex(sshd, out) as ex:
        c = ex.conn("loop")
        kw = {"owner": sshd.user, "group": sshd.user}
        assert ensure_dir(c, path, mode=0o750, **kw).changed
        assert ensure_dir(c, path, mode=0o750, **kw) == Change(False, f"dir {path}")
        assert _owner(path)[2] == 0o750
        assert ensure_dir(c, path, mode=0o755, **kw).what == f"dir {path} (mode 0750 -> 0755)"
        assert not ensure_dir(c, path, mode=0o755, **kw).changed
        Path(f"{sshd.dir}/plainfile").write_text("x")
        with pytest.raises(DeployError, match="is not a directory"):
            ensure_dir(c, f"{sshd.dir}/plainfile")
    assert out.getvalue().splitlines()[1] == f"[loop] ok: dir {path}"


def test_dry_run_changes_nothing_and_shows_a_diff(sshd):
    path = f"{sshd.dir}/dry.conf"
    Path(path).write_text("listen 80;\nworkers 2;\n")
    os.chmod(path, 0o644)
    out = io.StringIO()
    with _ex(sshd, out, dry_run=True) as ex:
        c = ex.conn("loop")
        kw = {"owner": sshd.user, "group": sshd.user}
        change = put_file(c, path, b"listen 8080;\nworkers 2;\n", **kw)
        assert change.changed and change.diff is not None
        assert ensure_dir(c, f"{sshd.dir}/dry-dir", **kw).changed
        assert put_file(c, f"{sshd.dir}/dry-new", b"x\n", **kw).changed
        res = c.run(["touch", f"{sshd.dir}/dry-touched"])
        assert res.dry_run
        assert read_fact(c, Arch())  # read-only probes still run
    assert Path(path).read_text() == "listen 80;\nworkers 2;\n"
    assert not Path(f"{sshd.dir}/dry-dir").exists()
    assert not Path(f"{sshd.dir}/dry-new").exists()
    assert not Path(f"{sshd.dir}/dry-touched").exists()
    text = out.getvalue()
    assert f"[loop] would change: file {path} (content)\n" in text
    assert "[loop]   -listen 80;\n[loop]   +listen 8080;\n" in text
    assert f"[loop] would change: dir {sshd.dir}/dry-dir (created" in text
    assert f"[loop] would run: touch {sshd.dir}/dry-touched" in text


def test_facts_batch_into_exactly_one_round_trip(sshd):
    with _ex(sshd, io.StringIO()) as ex:
        c = ex.conn("loop")
        c.run(["true"])  # connect first
        before = ex.round_trips["loop"]
        values = read_facts(
            c,
            [
                OsRelease(),
                Arch(),
                Hostname(),
                DiskFree(str(sshd.dir)),
                ServiceActive("releasy-no-such-unit"),
                FileSha256(str(sshd.known_hosts)),
                UserExists("root"),
                PackageVersion("bash"),
            ],
        )
        assert ex.round_trips["loop"] - before == 1
        assert read_fact(c, Arch()) == values[Arch()]
        assert ex.round_trips["loop"] - before == 2
    assert values[OsRelease()]["ID"] and values[UserExists("root")] is True
    assert values[ServiceActive("releasy-no-such-unit")] is False
    assert values[DiskFree(str(sshd.dir))] > 0
    assert values[PackageVersion("bash")]
    assert values[FileSha256(str(sshd.known_hosts))] == hashlib.sha256(
        sshd.known_hosts.read_bytes()
    ).hexdigest()


def test_ensure_packages_present_over_ssh(sshd):
    out = io.StringIO()
    with _ex(sshd, out) as ex:
        change = ensure_packages(ex.conn("loop"), ["bash", "coreutils"])
        assert change == Change(False, "packages bash coreutils")
        assert ex.round_trips == {"loop": 1}


def test_secret_never_reaches_output_or_errors(sshd, capsys):
    out = io.StringIO()
    path = f"{sshd.dir}/app.env"
    content = f"DB_PASSWORD={SECRET}\n".encode()
    secrets = FakeSecrets({"DB_PASSWORD": SECRET})
    seen: list[str] = []
    with _ex(sshd, out, secrets=secrets) as ex:
        c = ex.conn("loop")
        kw = {"owner": sshd.user, "group": sshd.user, "mode": 0o600, "secret": True}
        first = put_file(c, path, content, **kw, show_diff=True)
        assert first.diff == "secret content changed (not shown)"
        assert not put_file(c, path, content, **kw).changed
        # A command that prints the secret: streamed output and the result's error are masked.
        c.run(["cat", path], echo=True)
        with pytest.raises(RemoteCommandError) as info:
            c.run(["sh", "-c", 'cat "$1" >&2; exit 4', "sh", path])
        seen.append(str(info.value))
        # The upload itself failing (missing directory) must not leak content either.
        with pytest.raises(RemoteCommandError) as info:
            put_file(c, f"{sshd.dir}/missing-dir/app.env", content, **kw)
        seen.append(str(info.value))
        seen.append(repr(info.value))
    assert Path(path).read_bytes() == content and _owner(path)[2] == 0o600
    with _ex(sshd, out, secrets=secrets, dry_run=True) as ex:
        change = put_file(ex.conn("loop"), path, f"DB_PASSWORD={SECRET}-2\n".encode(), **kw)
        assert change.diff == "secret content changed (not shown)"
    seen.append(out.getvalue())
    seen.append(capsys.readouterr().out)
    assert "[loop] | DB_PASSWORD=****" in out.getvalue()
    for text in seen:
        assert SECRET not in text
        assert SECRET[:10] not in text
