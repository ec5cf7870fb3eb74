"""The local lab for integration tests: brought up once per session (per topology), and
always torn down at the end so no host, namespace or mount outlives the test run."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lab import lab as lab_ops
from lab.config import LabIdentity, current_identity

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")


@dataclass
class LabHandle:
    ident: LabIdentity
    topology: str
    inventory: Path

    @property
    def state_dir(self) -> Path:
        return self.ident.state_dir

    @property
    def releases(self) -> Path:
        return self.ident.state_dir / "releases"

    def host_root(self, host: str) -> Path:
        """The host's root filesystem as seen from this machine (for test set-up only)."""
        return lab_ops.machine.host_dir(self.ident, host) / "root"

    def inventory_variant(self, directory: Path, change=None) -> Path:
        """A copy of the lab inventory in ``directory`` (its relative paths made absolute, so
        it works from there), changed in place by ``change(data)`` when given."""
        data = yaml.safe_load(self.inventory.read_text())
        base = self.inventory.parent
        data["known_hosts"] = str(base / data["known_hosts"])
        data["ssh"]["identity_file"] = str(base / data["ssh"]["identity_file"])
        data["release"]["source"] = str(base / data["release"]["source"])
        data["secrets"]["file"] = str(base / data["secrets"]["file"])
        acme = data["tls"].get("acme") or {}
        if "ca_bundle" in acme:
            acme["ca_bundle"] = str(base / acme["ca_bundle"])
        if change is not None:
            change(data)
        path = directory / "hosts.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def sudo(self, host: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """As root on any lab host (app2 logs in as the sudo user `deploy`)."""
        return self.ssh(host, "sudo", "-n", *argv, check=check)

    def reset_to(self, version: str, app_hosts, *, inventory: Path | None = None,
                 timeout: float = 600) -> None:
        """A brand-new database, no dumps, no recorded migration levels and no fleet record
        left by earlier modules, then `fab site --version VERSION`."""
        for host in app_hosts:
            self.sudo(host, "sh", "-c", "systemctl stop releasy.service 2>/dev/null;"
                                        " rm -f /opt/releasy/releases/*/.schema-version",
                      check=False)
        self.sudo("db1", "sh", "-c",
                  "cd / && if command -v psql >/dev/null; then runuser -u postgres -- psql"
                  " -XAtq -c 'DROP DATABASE IF EXISTS releasy WITH (FORCE)'; fi;"
                  " rm -rf /var/backups/releasy /var/lib/releasy-deploy/fleet.json")
        self.fab("site", "--version", version, inventory=inventory, timeout=timeout)

    def ssh(self, host: str, *argv: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Look at a host with the plain OpenSSH client, independently of our executor."""
        return lab_ops.operator_ssh(self.ident, host, *argv, check=check, timeout=timeout)

    def probe(self, host: str, port: int, source: str = "outside") -> str:
        return lab_ops.probe(host, port, source)

    def fab(self, *args: str, inventory: Path | None = None, check: bool = True,
            env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the operator CLI exactly as an operator would (a separate process)."""
        full_env = {**os.environ, "RELEASY_INVENTORY": str(inventory or self.inventory),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        # stdin from /dev/null, as under cron: nothing may wait for an answer.
        proc = subprocess.run([FAB, "-r", str(ROOT / "fabfile"), *args], cwd=ROOT,
                              env=full_env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        _CAPTURED.append(proc.stdout + proc.stderr)
        _remember_secrets(self)
        if check and proc.returncode != 0:
            raise AssertionError(f"fab {' '.join(args)} exited {proc.returncode}\n"
                                 f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        return proc


# Every fab output the suite captured, and every secret value that existed at the time:
# the last test greps the former for the latter.
_CAPTURED: list[str] = []
_SECRETS: set[str] = set()


def _remember_secrets(lab: "LabHandle") -> None:
    secrets_file = lab.state_dir / "secrets.yaml"
    if secrets_file.exists():
        values = yaml.safe_load(secrets_file.read_text()) or {}
        _SECRETS.update(str(v) for v in values.values() if v)
    state = lab_ops.read_state(lab.ident) or {"hosts": {}}
    for host in state["hosts"]:
        # Read from the host's filesystem directly: no SSH, nothing printed.
        password = lab.host_root(host) / "etc/releasy/database-password"
        if password.exists():
            _SECRETS.add(password.read_text().strip())


@pytest.fixture(scope="session")
def known_secrets() -> set[str]:
    return _SECRETS


@pytest.fixture(scope="session")
def captured_outputs() -> list[str]:
    return _CAPTURED


class LabSession:
    def __init__(self) -> None:
        self.ident = current_identity()
        self.current: tuple | None = None

    def use(self, topology: str = "split", apps: int = 2, database: str = "postgres",
            suite: str = "bookworm", db_suite: str = "", *, bastion: bool = False,
            acme: bool = False, proxies: int = 1) -> LabHandle:
        inventory = lab_ops.up(lab_ops.LabRequest(topology, apps, database, suite, db_suite,
                                                  bastion=bastion, acme=acme, proxies=proxies))
        self.current = (topology, apps, database, suite, db_suite, bastion, acme, proxies)
        return LabHandle(self.ident, topology, inventory)

    def fresh(self, topology: str = "split", apps: int = 2, database: str = "postgres",
              suite: str = "bookworm", db_suite: str = "", *, bastion: bool = False,
              acme: bool = False, proxies: int = 1) -> LabHandle:
        """A lab whose hosts have never been provisioned (replaces any current lab)."""
        lab_ops.down()
        return self.use(topology, apps, database, suite, db_suite, bastion=bastion, acme=acme,
                        proxies=proxies)


@pytest.fixture(scope="session")
def lab_session():
    if os.geteuid() != 0:
        pytest.fail("integration tests need root: the lab uses namespaces, mounts and nspawn")
    session = LabSession()
    try:
        yield session
    finally:
        lab_ops.down()


@pytest.fixture(scope="module")
def split_lab(lab_session) -> LabHandle:
    return lab_session.use("split", 2)
