"""The lab itself: hosts boot with real systemd and sshd, a second `lab.up` is a no-op, a lab
whose processes were killed from outside is recovered, and `lab.down` leaves nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


from lab import lab as lab_ops
from lab import machine, net

ROOT = Path(__file__).resolve().parents[2]
INV = str(Path(sys.executable).parent / "inv")


def inv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([INV, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def launcher_pids(ident) -> dict[str, int]:
    state = lab_ops.read_state(ident)
    return {n: h["launcher"] for n, h in state["hosts"].items()}


def test_inv_lab_up_prints_inventory_and_every_host_runs_systemd(lab_session):
    lab_session.fresh("split", 2)  # hosts no other module has provisioned (no firewall yet)
    proc = inv("lab.up")
    assert proc.returncode == 0, proc.stderr
    inventory = Path(proc.stdout.strip().splitlines()[-1])
    assert inventory == lab_session.ident.state_dir / "hosts.yaml"
    for name in ("proxy1", "app1", "app2", "db1"):
        answer = lab_ops.operator_ssh(lab_session.ident, name, "systemctl",
                                      "is-system-running", check=False).stdout.strip()
        assert answer in ("running", "degraded"), (name, answer)
    for f in ("known_hosts", "id_ed25519", "ssh_config", "secrets.yaml"):
        assert (lab_session.ident.state_dir / f).exists(), f
    assert oct((lab_session.ident.state_dir / "secrets.yaml").stat().st_mode & 0o777) == "0o600"


def test_app2_is_reached_as_a_sudo_user_not_root(lab_session):
    out = lab_ops.operator_ssh(lab_session.ident, "app2", "id", "-un").stdout.strip()
    assert out == "deploy"
    assert lab_ops.operator_ssh(lab_session.ident, "app2", "sudo", "-n", "id", "-u"
                                ).stdout.strip() == "0"


def test_second_up_is_a_no_op(lab_session):
    before = launcher_pids(lab_session.ident)
    proc = inv("lab.up")
    assert proc.returncode == 0, proc.stderr
    assert "already up" in proc.stderr
    assert launcher_pids(lab_session.ident) == before


def test_status_lists_every_host(lab_session):
    proc = inv("lab.status")
    assert proc.returncode == 0
    for name in ("proxy1", "app1", "app2", "db1"):
        assert name in proc.stdout


def test_probe_sees_ssh_from_operator_and_outside_before_any_firewall(lab_session):
    assert inv("lab.probe", "app1", "22").stdout.strip() == "open"
    assert inv("lab.probe", "app1", "22", "--source", "operator").stdout.strip() == "open"
    assert inv("lab.probe", "app1", "5999").stdout.strip() == "closed"


def test_up_recovers_a_lab_killed_from_outside(lab_session):
    ident = lab_session.ident
    victims = machine.cgroup_pids(ident) | set(launcher_pids(ident).values())
    assert victims
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc = inv("lab.up")
    assert proc.returncode == 0, proc.stderr
    assert "stale" in proc.stderr or "replacing" in proc.stderr
    for name in ("proxy1", "db1"):
        answer = lab_ops.operator_ssh(ident, name, "systemctl", "is-system-running",
                                      check=False).stdout.strip()
        assert answer in ("running", "degraded")


def test_other_topology_replaces_the_lab(lab_session):
    proc = inv("lab.up", "--topology", "single")
    assert proc.returncode == 0, proc.stderr
    state = lab_ops.read_state(lab_session.ident)
    assert list(state["hosts"]) == ["solo"]
    assert not net.netns_exists(lab_session.ident.netns("app1"))


def test_down_leaves_no_namespace_mount_process_or_cgroup(lab_session):
    ident = lab_session.ident
    pids = set(launcher_pids(ident).values()) | machine.cgroup_pids(ident)
    proc = inv("lab.down")
    assert proc.returncode == 0, proc.stderr
    assert net.list_netns(ident.prefix) == []
    assert machine.lab_mounts(ident) == []
    assert not any(machine.pid_alive(p) for p in pids)
    assert not any(d.exists() for d in machine.cgroup_dirs(ident))
    assert lab_ops.read_state(ident) is None
    links = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout
    assert ident.uplink_if not in [l["ifname"] for l in json.loads(links)]
