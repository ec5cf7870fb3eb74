"""The executor against real lab hosts: strict host keys, idempotent uploads as root and via
sudo, packages from the offline repository, and the operator CLI's exit codes."""
from __future__ import annotations


import pytest

from releasy_deploy.errors import HostKeyError, ParallelError
from releasy_deploy.executor import Executor
from releasy_deploy.inventory import load_inventory
from releasy_deploy.output import Reporter
from releasy_deploy.remote import ensure_dir, ensure_packages, put_file


@pytest.fixture(scope="module")
def inv(split_lab):
    return load_inventory(split_lab.inventory)


def inventory_copy(split_lab, tmp_path, known_hosts_text: str):
    """The lab inventory with a different known_hosts file."""
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_text)
    return split_lab.inventory_variant(tmp_path, lambda d: d.update(known_hosts=str(known)))


def test_changed_host_key_is_rejected(split_lab, tmp_path):
    lines = (split_lab.state_dir / "known_hosts").read_text().splitlines()
    app1 = next(l for l in lines if l.startswith("10.77.") and ".21 " in l)
    other = next(l for l in lines if ".100 " in l)  # db1's key, claimed for app1
    forged = [l for l in lines if l != app1] + [app1.split()[0] + " " + " ".join(other.split()[1:])]
    path = inventory_copy(split_lab, tmp_path, "\n".join(forged) + "\n")
    with Executor(load_inventory(path), reporter=Reporter()) as ex:
        with pytest.raises(HostKeyError) as err:
            ex.conn("app1").run(["true"], mutates=False)
    assert "app1" in str(err.value) and "CHANGED" in str(err.value).upper()
    proc = split_lab.fab("inventory.ping", inventory=path, check=False)
    assert proc.returncode == 4
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "app1" in proc.stderr


def test_unknown_host_key_is_rejected(split_lab, tmp_path):
    lines = (split_lab.state_dir / "known_hosts").read_text().splitlines()
    path = inventory_copy(split_lab, tmp_path, "\n".join(l for l in lines if ".22 " not in l))
    with Executor(load_inventory(path), reporter=Reporter()) as ex:
        with pytest.raises(HostKeyError) as err:
            ex.conn("app2").run(["true"], mutates=False)
        assert "known_hosts" in str(err.value)
        # Other hosts still work with the same executor.
        assert ex.conn("app1").run(["true"], mutates=False).ok


def test_upload_if_changed_as_root_and_via_sudo(inv, capsys):
    with Executor(inv, reporter=Reporter()) as ex:
        def upload(c):
            ensure_dir(c, "/srv/exec-test", owner="root", group="root", mode=0o755)
            first = put_file(c, "/srv/exec-test/a file ü.txt", b"hello\n", mode=0o640)
            second = put_file(c, "/srv/exec-test/a file ü.txt", b"hello\n", mode=0o640)
            third = put_file(c, "/srv/exec-test/a file ü.txt", b"hello\n", mode=0o600)
            return first.changed, second.changed, third.changed
        results = ex.each(["app1", "app2"], upload)
        # app2 is reached as `deploy` and writes through sudo.
        assert results == {"app1": (True, False, True), "app2": (True, False, True)}
        out = ex.conn("app2").run(["stat", "-c", "%U %a", "/srv/exec-test/a file ü.txt"],
                                  sudo=True, mutates=False).stdout.split()
        assert out == ["root", "600"]


def test_packages_install_from_the_offline_repository(inv, split_lab):
    # An earlier module's `fab site` may have installed it (the app tier does): start without.
    split_lab.sudo("app2", "sh", "-c", "! dpkg -s sqlite3 >/dev/null 2>&1 ||"
                                       " DEBIAN_FRONTEND=noninteractive apt-get purge -y -q sqlite3")
    with Executor(inv, reporter=Reporter()) as ex:
        c = ex.conn("app2")
        first = ensure_packages(c, ["sqlite3"])
        second = ensure_packages(c, ["sqlite3"])
        assert first.changed and not second.changed
        assert c.run(["sqlite3", "--version"], mutates=False).ok


def test_missing_sudo_right_is_a_clear_error(inv, split_lab):
    # The lab's root filesystems are visible from this machine: take the right away there.
    sudoers = split_lab.host_root("app2") / "etc/sudoers.d/deploy"
    saved = sudoers.read_bytes()
    sudoers.unlink()
    try:
        proc = split_lab.fab("inventory.ping", check=False)
        assert proc.returncode == 1
        assert "app2" in proc.stderr and "sudo" in proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
    finally:
        sudoers.write_bytes(saved)
        sudoers.chmod(0o440)
    assert split_lab.ssh("app2", "sudo", "-n", "true", check=False).returncode == 0


def test_parallel_failure_names_each_failed_host(inv):
    with Executor(inv, reporter=Reporter()) as ex:
        with pytest.raises(ParallelError) as err:
            ex.each(["app1", "db1"], lambda c: c.run(["sh", "-c", "exit 7"]))
    assert "app1" in str(err.value) and "db1" in str(err.value)
