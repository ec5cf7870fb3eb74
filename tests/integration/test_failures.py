"""Expected failures, each through the real CLI: a short message that names the host or file
and says what to do, a documented non-zero exit code, and no Python traceback (unless
--debug asks for one).

"One screen": the error block the CLI prints on stderr is at most 40 lines, even when both
app hosts fail with 30 journal lines each. Inventory variants are copies of the lab's with
absolute paths, so nothing of the lab's own inventory changes. The lab ends as it began:
the failed health check is repaired with `fab db.restore` of a dump taken just before it."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.integration.labtools import deploy_lock_held

pytestmark = pytest.mark.lab

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_LOCK_BUSY, EXIT_UNREACHABLE = 1, 2, 3, 4
ONE_SCREEN = 40
APPS = ("app1", "app2")


@pytest.fixture(scope="module")
def lab(lab_session):
    lab = lab_session.use("split", 2)
    # A brand-new database (earlier modules may have migrated it past 1.0.0), then 1.0.0.
    lab.reset("1.0.0")
    return lab


def expect_failure(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The checks every expected failure must pass; returns the error block."""
    everything = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}\n{everything}"
    assert "Traceback" not in everything, everything
    block = proc.stderr[proc.stderr.index("error: "):] if "error: " in proc.stderr else ""
    assert block, f"no error message on stderr:\n{everything}"
    assert len(block.rstrip("\n").splitlines()) <= ONE_SCREEN, block
    for needle in needles:
        assert needle in block, f"{needle!r} not in:\n{block}"
    return block


def test_bad_inventory_names_the_file_and_the_key(lab, tmp_path):
    def change(d):
        d["hosts"]["app1"]["colour"] = "blue"
        d["database"]["kind"] = "mysql"
    path = lab.inventory_variant(tmp_path, change)
    proc = lab.fab("site", inventory=path, check=False)
    expect_failure(proc, EXIT_BAD_INPUT, f"{path}: hosts.app1.colour: unknown key",
                   "database.kind", "postgres, sqlite")
    assert proc.stdout == ""  # refused before any connection


def test_missing_artifact_lists_what_is_there(lab):
    proc = lab.fab("app.setup", "--version", "9.9.9", check=False)
    expect_failure(proc, EXIT_BAD_INPUT, "release 9.9.9 not found",
                   str(lab.releases / "releasy-server-9.9.9-linux-x86_64.tar.gz"),
                   "releasy-server-1.0.0-linux-x86_64.tar.gz")


def test_checksum_mismatch_uploads_nothing(lab, tmp_path):
    tampered = tmp_path / "releases"
    tampered.mkdir()
    for name in ("releasy-server-1.0.0-linux-x86_64.tar.gz",
                 "releasy-server-1.0.0-linux-x86_64.tar.gz.sha256"):
        (tampered / name).write_bytes((lab.releases / name).read_bytes())
    with open(tampered / "releasy-server-1.0.0-linux-x86_64.tar.gz", "ab") as f:
        f.write(b"one byte more")
    path = lab.inventory_variant(tmp_path, lambda d: d["release"].update(source=str(tampered)))
    proc = lab.fab("app.setup", "--version", "1.0.0", inventory=path, check=False)
    expect_failure(proc, EXIT_BAD_INPUT,
                   f"checksum mismatch for {tampered}/releasy-server-1.0.0-linux-x86_64.tar.gz",
                   "Nothing was uploaded")


def test_unreachable_host(lab, tmp_path):
    unused = f"10.77.{lab.ident.subnet_octet}.199"
    path = lab.inventory_variant(tmp_path, lambda d: d["hosts"]["app1"].update(address=unused))
    proc = lab.fab("inventory.ping", inventory=path, check=False)
    block = expect_failure(proc, EXIT_UNREACHABLE, f"app1 (root@{unused}:22)",
                           "Is the host up, the address right")
    assert "succeeded: app2, db1, proxy1" in block  # the others were still checked
    assert f"[app1] ERROR: app1 (root@{unused}:22)" in proc.stdout  # said live, one line


def test_changed_host_key_is_refused(lab, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "impostor")], check=True)
    impostor = (tmp_path / "impostor.pub").read_text().split()
    address = f"10.77.{lab.ident.subnet_octet}.21"
    lines = [f"{address} {impostor[0]} {impostor[1]}" if line.startswith(f"{address} ")
             else line for line in (lab.state_dir / "known_hosts").read_text().splitlines()]
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(lines) + "\n")
    path = lab.inventory_variant(tmp_path, lambda d: d.update(known_hosts=str(known)))
    proc = lab.fab("inventory.ping", inventory=path, check=False)
    expect_failure(proc, EXIT_UNREACHABLE, "HOST KEY CHANGED for app1", str(known),
                   f"ssh-keygen -R '{address}'")


def test_sudo_refused_says_how_to_grant_it(lab):
    sudoers = lab.host_root("app2") / "etc/sudoers.d/deploy"
    saved = sudoers.read_bytes()
    sudoers.unlink()
    try:
        proc = lab.fab("inventory.ping", check=False)
    finally:
        sudoers.write_bytes(saved)
        os.chmod(sudoers, 0o440)
    expect_failure(proc, EXIT_FAILED, "app2: deploy cannot run commands as root without a"
                   " password", "NOPASSWD")


def test_lock_busy(lab):
    with deploy_lock_held(lab.inventory):
        proc = lab.fab("db.restore", "--file", "lab_20260101T000000Z_manual_at-1.0.0_m2.dump",
                       "--yes", check=False)
        expect_failure(proc, EXIT_LOCK_BUSY, "deploy of lab held by", "--wait SECONDS",
                       "fab deploy.lock")


def test_failed_health_check_is_one_screen_and_debug_shows_the_traceback(lab, tmp_path):
    # Repaired below with a dump of the database as it is now (1.0.0, migration level 2).
    backup = lab.fab("db.backup").stdout
    name = re.search(r"lab_\d+T\d+Z_manual_at-1\.0\.0_m2\.dump", backup).group(0)
    fast = lab.inventory_variant(tmp_path, lambda d: d.setdefault("app", {}).update(ready_timeout=5))
    try:
        # The fleet serves: the new release is rolled out host by host, so the first host
        # failing stops it there while app2 keeps serving the old one.
        proc = lab.fab("app.setup", "--version", "1.2.0-neverready", inventory=fast,
                       check=False)
        block = expect_failure(proc, EXIT_FAILED,
                               "Rolling deploy of lab to 1.2.0-neverready stopped at app1,"
                               " stage migrate (step ready)",
                               "releasy.service did not become ready within 5 s",
                               "In rotation now: app2.")
        assert "never-ready build: /health and /ready will answer 503" in block
        debug = lab.fab("--debug", "app.setup", "--version", "9.9.9", check=False)
        assert debug.returncode == EXIT_BAD_INPUT
        assert "Traceback (most recent call last)" in debug.stderr
        assert "release 9.9.9 not found" in debug.stderr
    finally:
        # 1.2.0-neverready ran migration 3, which 1.0.0 refuses: stop it, restore the dump
        # (nothing runs, so nothing is restarted), then 1.0.0 again.
        for host in APPS:
            lab.sudo(host, "systemctl", "stop", "releasy.service")
        lab.fab("db.restore", "--file", name, "--yes")
        lab.fab("app.setup", "--version", "1.0.0")
