"""Round trips are counted in the executor, one per exec request, and the CLI reports them.

Over the loopback sshd (real SSH): a small "converge" task built from the remote helpers
costs exactly the round trips its helpers promise (one per helper when nothing changes,
the upload skipped because the sha256 matches), over one connection; `cli.session()`
writes those counts (and, with RELEASY_TRACE, one timed record per command) to the JSON
log; and the real `fab inventory.ping` costs exactly one round trip per host.
"""
from __future__ import annotations

import grp
import io
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

from releasy_deploy import cli, site
from releasy_deploy.tiers import prepare
from releasy_deploy.executor import Executor, HostConnection
from releasy_deploy.output import Reporter
from releasy_deploy.facts import (Arch, CommandExists, Hostname, Kernel, MemTotal, OsRelease,
                                  PackageVersion, UserExists, read_facts)
from releasy_deploy.remote import ensure_dir, put_file

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")
FACTS = [OsRelease(), Arch(), Hostname(), Kernel(), MemTotal(), UserExists("root"),
         PackageVersion("bash"), CommandExists("sh")]


def converge(c: HostConnection, base: str, user: str) -> dict[str, int]:
    """A known task: a directory, a config file in it, then a batch of facts, owned by
    ``user``. Returns the round trips each step cost on this host."""
    cost: dict[str, int] = {}

    def step(name: str, fn) -> None:
        before = c.round_trips
        fn()
        cost[name] = c.round_trips - before

    owner = {"owner": user, "group": grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name}
    step("ensure_dir", lambda: ensure_dir(c, f"{base}/conf.d", mode=0o750, **owner))
    step("put_file", lambda: put_file(c, f"{base}/conf.d/app.conf", b"port = 8080\n",
                                      mode=0o640, **owner))
    step("facts", lambda: read_facts(c, FACTS))
    return cost


def test_first_run_and_no_op_run_cost_exactly_the_documented_round_trips(sshd):
    base = f"{sshd.dir}/rt-known-task"
    with Executor(sshd.inventory("loop"), reporter=Reporter(io.StringIO())) as ex:
        c = ex.conn("loop")
        first = converge(c, base, sshd.user)
        conf = Path(base, "conf.d/app.conf")
        written = conf.stat()
        second = converge(c, base, sshd.user)
        assert conf.stat().st_ino == written.st_ino  # not re-uploaded: the sha256 matched
        assert conf.stat().st_mtime_ns == written.st_mtime_ns
        # First run: probe + create for the directory and for the file; facts in one.
        assert first == {"ensure_dir": 2, "put_file": 2, "facts": 1}
        # No-op run: one look per helper, nothing else.
        assert second == {"ensure_dir": 1, "put_file": 1, "facts": 1}
        assert ex.round_trips == {"loop": 8}
        assert ex.connections_opened == {"loop": 1}  # one connection for the whole task


def test_a_drifted_file_costs_one_more_round_trip_than_a_no_op(sshd):
    base = f"{sshd.dir}/rt-drift"
    with Executor(sshd.inventory("loop"), reporter=Reporter(io.StringIO())) as ex:
        c = ex.conn("loop")
        converge(c, base, sshd.user)
        Path(base, "conf.d/app.conf").write_bytes(b"port = 9090\n")
        assert converge(c, base, sshd.user) == {"ensure_dir": 1, "put_file": 2, "facts": 1}


def _loopback_inventory(sshd, tmp_path: Path) -> Path:
    """A single-host inventory whose host is the loopback sshd."""
    (tmp_path / "releases").mkdir()
    path = tmp_path / "hosts.yaml"
    path.write_text(
        "environment: unit\n"
        "admin_cidrs: [127.0.0.0/8]\n"
        f"known_hosts: {sshd.known_hosts}\n"
        f"ssh: {{user: {sshd.user}, port: {sshd.port}, identity_file: {sshd.client_key},"
        " connect_timeout: 5}\n"
        "hosts:\n  solo: {address: 127.0.0.1}\n"
        "tiers: {proxy: [solo], app: [solo], db: [solo]}\n"
        "database: {kind: sqlite}\n"
        "release: {source: releases}\n"
        "tls: {mode: self-signed, server_name: releasy.test}\n")
    return path


def _events(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == kind]


def test_session_writes_round_trips_and_the_command_trace_to_the_json_log(
        sshd, tmp_path, monkeypatch):
    log = tmp_path / "events.jsonl"
    monkeypatch.setenv("RELEASY_INVENTORY", str(_loopback_inventory(sshd, tmp_path)))
    monkeypatch.setenv(cli.JSON_LOG_ENV, str(log))
    monkeypatch.setenv(cli.TRACE_ENV, "1")
    with cli.session(need_secrets=False) as s:
        cost = converge(s.executor.conn("solo"), f"{sshd.dir}/rt-session", sshd.user)
        counted = dict(s.executor.round_trips)
    assert counted == {"solo": sum(cost.values())} == {"solo": 5}
    (event,) = _events(log, "round_trips")
    assert (event["host"], event["round_trips"], event["connections"]) == ("solo", 5, 1)
    commands = _events(log, "command")
    assert [c["command"] for c in commands][0] == "(ssh connect)"
    assert len(commands) == 1 + 5 and all(c["host"] == "solo" for c in commands)
    assert all(c["exit_code"] == 0 for c in commands[1:]) and commands[0]["exit_code"] is None
    starts = [c["started_s"] for c in commands]
    assert starts == sorted(starts) and all(c["seconds"] >= 0 for c in commands)
    assert "facts OsRelease, Arch, Hostname" in commands[-1]["command"]


def test_without_trace_only_the_counts_are_logged(sshd, tmp_path, monkeypatch):
    log = tmp_path / "events.jsonl"
    monkeypatch.setenv("RELEASY_INVENTORY", str(_loopback_inventory(sshd, tmp_path)))
    monkeypatch.setenv(cli.JSON_LOG_ENV, str(log))
    monkeypatch.delenv(cli.TRACE_ENV, raising=False)
    with cli.session(need_secrets=False) as s:
        assert s.executor.trace is None
        s.executor.conn("solo").run(["true"], mutates=False)
    assert [(e["host"], e["round_trips"]) for e in _events(log, "round_trips")] == [("solo", 1)]
    assert _events(log, "command") == []


def test_fab_inventory_ping_costs_one_round_trip_per_host(sshd, tmp_path):
    """The real CLI in its own process: facts are batched, so ping is one exec request."""
    log = tmp_path / "ping.jsonl"
    env = {**os.environ, "RELEASY_INVENTORY": str(_loopback_inventory(sshd, tmp_path)),
           cli.JSON_LOG_ENV: str(log)}
    env.pop(cli.TRACE_ENV, None)
    proc = subprocess.run([FAB, "-r", str(ROOT / "fabfile"), "inventory.ping"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("solo ")
    events = _events(log, "round_trips")
    assert [(e["host"], e["round_trips"], e["connections"]) for e in events] == [("solo", 1, 1)]


def test_fab_site_checks_the_database_level_on_the_prefetched_facts(sshd, tmp_path, monkeypatch):
    """`fab site --version V` refuses a release behind the database on the facts its
    prefetch read: the check costs no round trip of its own (without them prefetched, one
    per host it reads)."""
    monkeypatch.setenv("RELEASY_INVENTORY", str(_loopback_inventory(sshd, tmp_path)))
    with cli.session(need_secrets=False) as s:
        prepare.prefetch_all(s)  # the tiers' facts only
        before = s.executor.round_trips["solo"]
        site.refuse_behind_database(s, "1.0.0")
        assert s.executor.round_trips["solo"] == before + 1
    with cli.session(need_secrets=False) as s:
        prepare.prefetch_all(s, site.behind_database_facts(s.inventory, "1.0.0"))
        assert s.executor.round_trips["solo"] == 1
        site.refuse_behind_database(s, "1.0.0")
        assert s.executor.round_trips["solo"] == 1
