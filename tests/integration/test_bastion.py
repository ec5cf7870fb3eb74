"""Hosts behind a bastion (`inv lab.up --bastion`): app and db hosts sit on a private network
this machine has no route to; proxy1 keeps a public side; `bastion` is the jump host
(unprivileged user `jump`, no tier). Every task reaches the private hosts through one SSH
connection to the bastion per task, and their firewalls admit SSH from the bastion only."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from releasy_deploy.inventory import load_inventory

from .conftest import FAB, ROOT

pytestmark = pytest.mark.lab

PRIVATE_HOSTS = ("app1", "app2", "db1")


@pytest.fixture(scope="module")
def lab(lab_session):
    handle = lab_session.fresh("split", 2, bastion=True)
    handle.fab("site", "--version", "1.0.0")
    return handle


def events(path: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def test_a_direct_connection_to_a_private_host_fails(lab, tmp_path):
    inv = load_inventory(lab.inventory)
    with socket.socket() as s, pytest.raises(OSError) as exc:
        s.settimeout(3)
        s.connect((inv.host("app1").address, 22))
    assert exc.value.errno == errno.EHOSTUNREACH
    # Without the jump host the tasks cannot reach them either (exit 4: unreachable).
    direct = lab.inventory_variant(tmp_path, lambda d: d["ssh"].pop("jump"))
    proc = lab.fab("inventory.ping", inventory=direct, check=False)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "app1 (root@" in proc.stderr and "Unable to connect to port 22" in proc.stderr


def test_site_again_changes_nothing_over_one_bastion_connection(lab, tmp_path):
    log = tmp_path / "site.jsonl"
    proc = lab.fab("site", env={"RELEASY_JSON_LOG": str(log)})
    assert "site: 0 changed" in proc.stdout, proc.stdout
    counts = {e["host"]: e["connections"] for e in events(log, "round_trips")}
    assert counts == {"bastion": 1, "proxy1": 1, "app1": 1, "app2": 1, "db1": 1}


def test_firewall_admits_ssh_from_the_bastion_only(lab):
    inv = load_inventory(lab.inventory)
    bastion = inv.jump_hosts[0].private_address
    for host in PRIVATE_HOSTS:
        rules = lab.sudo(host, "ufw", "status").stdout
        ssh = [line for line in rules.splitlines() if line.startswith("22/tcp ")]
        assert len(ssh) == 1 and bastion in ssh[0], rules
    # ... and the lockout guard saw our SSH arrive from there (fab run: real SSH_CONNECTION).
    proc = lab.fab("run", "--tier", "db", "--", "echo $SSH_CONNECTION")
    assert f"[db1] | {bastion} " in proc.stdout, proc.stdout
    plan = lab.fab("firewall.plan")
    assert "would refuse" not in plan.stdout + plan.stderr


def test_rolling_deploy_status_and_db_shell_through_the_bastion(lab):
    lab.fab("deploy.rolling", "--version", "1.1.0", "--yes")  # lock tunnel to db1 included
    status = lab.fab("status", "--json")
    rows = json.loads(status.stdout)
    text = json.dumps(rows)
    assert '"1.1.0"' in text and '"1.0.0"' not in text
    env = {**os.environ, "RELEASY_INVENTORY": str(lab.inventory)}
    psql = subprocess.run([FAB, "-r", str(ROOT / "fabfile"), "db.psql"], input="SELECT 40 + 2;\n",
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert psql.returncode == 0 and "42" in psql.stdout, psql.stdout + psql.stderr


def test_logs_follow_through_the_bastion(lab):
    env = {**os.environ, "RELEASY_INVENTORY": str(lab.inventory), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([FAB, "-r", str(ROOT / "fabfile"), "app.logs", "--follow",
                             "--host", "app1", "--lines", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    got = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            seen.append(line)
            if len(seen) > 1 and "listening" in line:
                got.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not seen:  # following: the first line is there
            assert time.monotonic() < deadline and proc.poll() is None, seen
            time.sleep(0.1)
        lab.sudo("app1", "systemctl", "restart", "releasy.service")  # new lines arrive
        assert got.wait(30), seen
    finally:
        proc.send_signal(signal.SIGINT)  # the fab we started, by its PID
        code = proc.wait(timeout=30)
    reader.join(timeout=5)
    assert code == 0, proc.stderr.read()
