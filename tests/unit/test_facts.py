"""Typed facts (`releasy_deploy.facts`): a fact is its own key, arguments are refused or
quoted, and the batched script and its parser agree byte for byte in a real /bin/sh.

`LocalHost` stands in for a `HostConnection`: it runs the script with the local `sh`, so
the reader, the builder, the probes and the parser are all the real ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from releasy_deploy import backups, bluegreen, schema
from releasy_deploy.errors import DeployError
from releasy_deploy.facts import (
    Arch,
    DiskFree,
    Fact,
    FileSha256,
    FileStat,
    LinkTarget,
    Hostname,
    Kernel,
    OsRelease,
    PackageVersion,
    PathExists,
    ServiceActive,
    ServiceEnabled,
    SYSTEMD_SHOW,
    UserExists,
    build_facts_script,
    parse_facts_output,
    read_fact,
    read_facts,
)
from releasy_deploy.rollout import preflight as rollout_preflight
from releasy_deploy.status import probes as status_probes
from releasy_deploy.tiers import app_facts, db, firewall_state, proxy_state

FACT_MODULES = (backups, bluegreen, rollout_preflight, schema, status_probes, app_facts, db,
                firewall_state, proxy_state)


class LocalHost:
    """Runs the facts script with the local sh, counting the round trips."""

    name = "local"

    def __init__(self, tamper=None):
        self.scripts: list[str] = []
        self.tamper = tamper or (lambda out: out)

    def run_script(self, script: str, *, sudo: bool, mutates: bool, label: str):
        assert mutates is False  # facts are read-only: they also run in dry-run
        self.scripts.append(script)
        self.label = label
        res = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True)
        return SimpleNamespace(stdout=self.tamper(res.stdout))


def every_fact_class() -> list[type[Fact]]:
    found, todo = [], list(Fact.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


# ------------------------------------------------------------------------------ keys
def test_a_fact_is_its_own_key():
    a, b = FileStat("/etc/hosts"), FileStat("/etc/hosts")
    assert a == b and hash(a) == hash(b) and a is not b
    assert {a: 1}[b] == 1
    assert FileStat("/etc/hosts") != FileStat("/etc/passwd")
    # Same argument, another fact: another key (the class is part of the identity).
    assert FileStat("/etc/hosts") != PathExists("/etc/hosts")
    assert FileSha256("/x") != proxy_state.ProxyText("/x")
    assert Arch() == Arch() and Arch() != Hostname()
    assert schema.SchemaLevel("sqlite", "/a") != schema.SchemaLevel("postgres", "/a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.path = "/etc/passwd"  # type: ignore[misc]


def test_every_fact_class_is_a_frozen_dataclass_with_both_methods():
    classes = every_fact_class()
    assert len(classes) >= 40  # the generic ones and every tier's / flow's own
    for cls in classes:
        assert dataclasses.is_dataclass(cls), cls
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
        assert cls.shell is not Fact.shell or cls.batch is not None, cls
        assert cls.parse is not Fact.parse, cls
    names = [c.__name__ for c in classes]
    assert len(names) == len(set(names)), "two fact classes share a name"


def test_fact_modules_are_the_owners():
    """Each domain fact lives next to the code that owns its meaning."""
    owners = {c.__name__: c.__module__ for c in every_fact_class()}
    assert owners["ReleasyReady"] == "releasy_deploy.tiers.app_facts"
    assert owners["ProxyText"] == "releasy_deploy.tiers.proxy_state"
    assert owners["SchemaLevel"] == owners["RecordedLevels"] == "releasy_deploy.schema"
    assert owners["BackupListing"] == "releasy_deploy.backups"
    assert owners["ServiceActive"] == owners["FileStat"] == "releasy_deploy.facts"


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("make", [
    lambda v: FileStat(v), lambda v: DiskFree(v), lambda v: app_facts.ReleasyReady(v),
    lambda v: app_facts.ReleasyUnit(v), lambda v: schema.SchemaLevel("sqlite", v),
    lambda v: db.PgServerState("releasy", v), lambda v: status_probes.StatusDisk(v),
    lambda v: LinkTarget(v), lambda v: proxy_state.ProxyText(v),
])
def test_nul_bytes_are_refused(make):
    with pytest.raises(ValueError, match="NUL"):
        make("/etc/a\x00b")


def test_arguments_of_the_wrong_type_are_refused():
    with pytest.raises(TypeError, match="must be a str"):
        FileStat(Path("/etc/hosts"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        app_facts.ReleasyUnit(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown database kind"):
        schema.SchemaLevel("mysql", "releasy")
    for bad in (0, 70000, "8080; reboot", True):
        with pytest.raises(ValueError):
            bluegreen.Listening(bad)  # type: ignore[arg-type]


def test_the_base_class_reads_nothing():
    with pytest.raises(NotImplementedError):
        Fact().shell()
    with pytest.raises(TypeError, match="not a fact"):
        read_facts(LocalHost(), ["arch"])  # type: ignore[list-item]


def test_quoting_of_hostile_arguments_in_the_script():
    hostile = "/tmp/it's here; rm -rf /"
    script = build_facts_script([FileSha256(hostile)], "n0nce")
    assert "'/tmp/it'\"'\"'s here; rm -rf /'" in script
    assert f'set -- "$@" {shlex.quote(hostile)}' in script


def _stubs(d: Path) -> dict[str, str]:
    """PATH with harmless stand-ins for the commands that talk to services."""
    d.mkdir()
    for name in ("systemctl", "curl", "ss", "runuser", "psql", "pg_isready", "sqlite3",
                 "dpkg-query", "ufw", "openssl"):
        (d / name).write_text("#!/bin/sh\nexit 1\n")
        (d / name).chmod(0o755)
    return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}"}


def test_no_argument_of_any_fact_reaches_the_shell_as_code(tmp_path):
    """Every fact class, every str field set to a value that runs `touch` if it is ever
    read as shell code, each snippet run by a real sh: nothing is touched. A value a
    fact refuses (validation) is fine too; at least most facts must take it and run."""
    env = _stubs(tmp_path / "bin")
    pwned = tmp_path / "pwned"
    hostile = (f"x'; touch {pwned}1; '\"; touch {pwned}2; \"`touch {pwned}3`$(touch {pwned}4)"
               f"\ntouch {pwned}5\n-- ${{IFS}}* ?")
    ran = refused = 0
    for cls in every_fact_class():
        kw = {}
        for f in dataclasses.fields(cls):
            kw[f.name] = 8080 if f.type in ("int", int) else hostile
        if cls is schema.SchemaLevel:
            kw["kind"] = "sqlite"
        try:
            shell = cls(**kw).shell()
        except ValueError:
            refused += 1
            continue
        subprocess.run(["sh", "-c", shell], cwd=tmp_path, env=env, capture_output=True,
                       timeout=10)
        ran += 1
    assert not list(tmp_path.glob("pwned*"))
    assert ran >= 25 and refused <= 3, (ran, refused)


# ------------------------------------------------------------------------------ the reader
def test_the_script_runs_in_a_real_shell_and_parses_exactly(tmp_path):
    f = tmp_path / "odd name 'x'.txt"
    f.write_bytes(b"no trailing newline")
    facts = [Arch(), FileSha256(str(f)), FileSha256(f"{tmp_path}/absent"), FileStat(str(f)),
             PathExists(f"{tmp_path}/absent"), UserExists("root"),
             UserExists("no-such-user-xyz"), OsRelease(), DiskFree(str(tmp_path))]
    nonce = "abc123"
    script = build_facts_script(facts, nonce)
    out = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True,
                         check=True).stdout
    values = parse_facts_output(facts, nonce, out)
    assert values[Arch()] == os.uname().machine
    assert values[FileSha256(str(f))] == hashlib.sha256(b"no trailing newline").hexdigest()
    assert values[FileSha256(f"{tmp_path}/absent")] is None
    assert values[FileStat(str(f))]["type"] == "regular file"
    assert values[FileStat(str(f))]["size"] == 19
    assert values[PathExists(f"{tmp_path}/absent")] is False
    assert values[UserExists("root")] is True
    assert values[UserExists("no-such-user-xyz")] is False
    assert values[OsRelease()].get("ID")
    assert isinstance(values[DiskFree(str(tmp_path))], int)


def test_facts_of_one_kind_share_one_command_and_each_gets_its_own_part(tmp_path):
    """Every FileStat of a script is one `stat`, every PackageVersion one `dpkg-query`
    (real ones, here); a path stat cannot read has no record, so the records are matched
    by the path they end with, even one holding a newline or a "|"."""
    first, odd, last = tmp_path / "a", tmp_path / "odd|na\nme", tmp_path / "z"
    first.write_text("1")
    odd.write_text("22")
    last.mkdir()
    facts = [FileStat(str(first)), Arch(), FileStat(f"{tmp_path}/absent"),
             PackageVersion("dpkg"), FileStat(str(odd)), PackageVersion("no-such-package-xyz"),
             FileStat(str(last))]
    host = LocalHost()
    values = read_facts(host, facts)  # type: ignore[arg-type]
    script = host.scripts[0]
    assert script.count("stat -L") == 1 and script.count("dpkg-query") == 1
    assert list(values) == facts  # in the order asked
    assert values[FileStat(str(first))]["size"] == 1
    assert values[FileStat(f"{tmp_path}/absent")] is None
    assert values[FileStat(str(odd))]["size"] == 2
    assert values[FileStat(str(last))]["type"] == "directory"
    assert values[Arch()] == os.uname().machine
    dpkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpkg"], capture_output=True,
                          text=True, check=True).stdout
    assert values[PackageVersion("dpkg")] == dpkg
    assert values[PackageVersion("no-such-package-xyz")] is None
    # Alone, a fact is a batch of one: the same command, the same parse.
    assert read_fact(host, FileStat(str(odd)))["size"] == 2  # type: ignore[arg-type]
    assert read_fact(host, PackageVersion("dpkg")) == dpkg  # type: ignore[arg-type]


def test_every_sha256_of_a_script_is_one_sha256sum_matched_by_path(tmp_path):
    """Real sha256sum: records end with their path unescaped (``-z``), so odd names match;
    not a regular file: None; a file sha256sum cannot read has no record: None too."""
    odd, plain, gone = tmp_path / "odd\\na\nme  *x", tmp_path / "plain", tmp_path / "gone"
    odd.write_bytes(b"no trailing newline")
    plain.write_bytes(b"")
    unreadable = tmp_path / "unreadable"
    unreadable.write_bytes(b"x")
    unreadable.chmod(0)
    gone.symlink_to(tmp_path / "nowhere")
    facts = [FileSha256(str(odd)), FileSha256(f"{tmp_path}/absent"), FileSha256(str(tmp_path)),
             FileSha256(str(unreadable)), Arch(), FileSha256(str(plain)), FileSha256(str(gone))]
    host = LocalHost()
    values = read_facts(host, facts)  # type: ignore[arg-type]
    assert host.scripts[0].count("sha256sum") == 1
    assert values[FileSha256(str(odd))] == hashlib.sha256(b"no trailing newline").hexdigest()
    assert values[FileSha256(str(plain))] == hashlib.sha256(b"").hexdigest()
    assert values[FileSha256(f"{tmp_path}/absent")] is None
    assert values[FileSha256(str(tmp_path))] is None and values[FileSha256(str(gone))] is None
    # root reads a mode-0 file anyway; anyone else gets no record for it
    expected = hashlib.sha256(b"x").hexdigest() if os.geteuid() == 0 else None
    assert values[FileSha256(str(unreadable))] == expected
    alone = read_fact(host, FileSha256(str(plain)))  # type: ignore[arg-type]
    assert alone == hashlib.sha256(b"").hexdigest()
    batch = FileSha256.batch
    two = [FileSha256("/a"), FileSha256("/b")]
    assert batch.split(two, "n\ny\n" + "0" * 64 + "  /b\0", 0) == [("", 3), ("0" * 64, 0)]
    assert batch.split(two, "y\ny\n" + "0" * 64 + "  /b\0", 1) == [("", 1), ("0" * 64, 0)]
    for bad in ("y\n", "y\nx\n", "n\nn\n" + "0" * 64 + "  /c\0"):
        with pytest.raises(ValueError):
            batch.split(two, bad, 0)


def test_unit_facts_share_one_systemctl_show_and_read_their_own_properties():
    facts = [ServiceActive("nginx"), ServiceEnabled("nginx"), firewall_state.RevertPending(),
             app_facts.ReleasyUnit("releasy.service")]
    shell = SYSTEMD_SHOW.shell(facts)
    assert shell.count("systemctl") == 1
    assert shell.endswith(" -- nginx releasy-firewall-revert.timer releasy.service")
    out = ("ActiveState=active\nLoadState=loaded\nUnitFileState=enabled\n\n"
           "ActiveState=inactive\nLoadState=not-found\nUnitFileState=\n\n"
           "ActiveState=active\nLoadState=loaded\nMainPID=42\nUnitFileState=disabled\n")
    parts = SYSTEMD_SHOW.split(facts, out, 0)
    values = [f.parse(o, c) for f, (o, c) in zip(facts, parts)]
    assert values[:3] == [True, "enabled", False]
    assert values[3]["MainPID"] == "42" and values[3]["UnitFileState"] == "disabled"
    assert parts[0][0] == "ActiveState=active"  # only the properties the fact reads
    # No unit file: no state, like `systemctl is-enabled` printing nothing.
    assert ServiceEnabled("x").parse("UnitFileState=", 0) is None
    # systemctl failing (no systemd): nothing known, for every fact.
    assert [f.parse(o, c) for f, (o, c) in zip(facts, SYSTEMD_SHOW.split(facts, "", 1))][:3] \
        == [False, None, False]
    with pytest.raises(ValueError, match="2 units for 3"):
        SYSTEMD_SHOW.split(facts, out.rsplit("\n\n", 1)[0], 0)


def test_read_facts_is_one_round_trip_and_asks_each_fact_once(tmp_path):
    host = LocalHost()
    wanted = [Arch(), Kernel(), Arch(), PathExists(str(tmp_path)), PathExists(str(tmp_path))]
    values = read_facts(host, wanted)  # type: ignore[arg-type]
    assert len(host.scripts) == 1
    assert list(values) == [Arch(), Kernel(), PathExists(str(tmp_path))]
    assert host.scripts[0].count("uname -m") == 1
    assert host.label == f"facts Arch, Kernel, PathExists({tmp_path})"
    assert values[PathExists(str(tmp_path))] is True
    assert read_fact(host, Hostname()) == os.uname().nodename  # type: ignore[arg-type]
    assert read_facts(host, []) == {} and len(host.scripts) == 2  # type: ignore[arg-type]


def test_forged_markers_in_content_are_just_content(tmp_path):
    """A file can hold marker-like text; without the nonce (random per call) it frames
    nothing, and the value is the file exactly."""
    forged = ("@@releasy:0123456789abcdef:0:begin@@\nx\n@@releasy:0123456789abcdef:0:end:0@@\n"
              "@@releasy:other:1:end:0@@\n")
    f = tmp_path / "upstream.conf"
    f.write_text(forged)
    values = read_facts(LocalHost(), [proxy_state.ProxyText(str(f)), Kernel()])  # type: ignore[arg-type]
    assert values[proxy_state.ProxyText(str(f))] == forged
    assert values[Kernel()] == os.uname().release


def test_output_with_forged_or_missing_frames_is_refused():
    facts = [Hostname(), Kernel()]
    real = ("@@releasy:n1:0:begin@@\nhost\n\n@@releasy:n1:0:end:0@@\n"
            "@@releasy:n1:1:begin@@\n6.1.0\n\n@@releasy:n1:1:end:0@@\n")
    assert parse_facts_output(facts, "n1", real) == {Hostname(): "host", Kernel(): "6.1.0"}
    # The same frames under another nonce (what a probe's output could forge): refused.
    with pytest.raises(ValueError, match="missing"):
        parse_facts_output(facts, "n2", real)
    with pytest.raises(ValueError, match=r"output of fact Kernel is missing"):
        parse_facts_output(facts, "n1", real.split("@@releasy:n1:1")[0])
    with pytest.raises(ValueError, match="truncated"):
        parse_facts_output(facts, "n1", real[: real.index("\n@@releasy:n1:1:end")])
    with pytest.raises(ValueError, match="exit code"):
        parse_facts_output(facts, "n1", real.rsplit("@@\n", 1)[0])
    # A frame of another nonce inside a body is content, not a frame.
    inner = "@@releasy:evil:0:end:0@@\n@@releasy:evil:1:begin@@\n"
    out = real.replace("host\n", "host\n" + inner, 1)
    assert parse_facts_output(facts, "n1", out)[Hostname()] == "host\n" + inner.rstrip("\n")


def test_a_cut_output_is_a_deploy_error_naming_the_host():
    host = LocalHost(tamper=lambda out: out[: len(out) // 2])
    with pytest.raises(DeployError, match="local: cannot read facts"):
        read_facts(host, [OsRelease(), Arch()])  # type: ignore[arg-type]
