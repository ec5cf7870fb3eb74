"""Faults injected into a rolling deploy on the lab (proxy1, app1..app3, db1): the N-th
host-changing command of the run really fails on its host (``RELEASY_FAULT=N``, see
`executor.FaultInjection`). After every such failure the fleet must be left serving: exit 1
(or 0 when the failing command was one whose failure is only reported, like an audit
record), the lock free, nginx answering through the proxy, no app host out of rotation that
the message does not name; and the same command run again converges.

`make test` tries the first, a middle and the last point; `make faults` (this module with
RELEASY_FAULT_POINTS=all) tries every one and prints how many."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.integration.labtools import current, ready, rotation

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("split", 3)]

APPS = ("app1", "app2", "app3")
# Two releases with the same migrations, so the sweep can go back and forth between them.
RELEASES = ("1.1.0", "1.1.1")
POINTS_ENV = "RELEASY_FAULT_POINTS"
_COUNT = re.compile(r"fault injection: (\d+) host-changing command")


@pytest.fixture(scope="module")
def lab(lab_session):
    return lab_session.use("split", apps=3)


@pytest.fixture(scope="module")
def fleet(lab, tmp_path_factory):
    """Every host on 1.1.0 and in rotation, 1.1.1 staged too; returns the number of
    host-changing commands a clean rolling deploy between the two runs."""
    inventory = lab.inventory_variant(tmp_path_factory.mktemp("faults"))
    lab.reset("1.1.0", inventory=inventory)
    # Both releases staged everywhere first, so every run of the sweep does the same steps.
    lab.fab("deploy.rolling", "--version", "1.1.1", "--yes", inventory=inventory)
    clean = lab.fab("deploy.rolling", "--version", "1.1.0", "--yes", inventory=inventory,
                    env={"RELEASY_FAULT": "0"})
    total = int(_COUNT.search(clean.stderr).group(1))
    assert {h: current(lab, h) for h in APPS} == dict.fromkeys(APPS, "1.1.0")
    return inventory, total


def points(total: int) -> list[int]:
    if os.environ.get(POINTS_ENV) == "all":
        return list(range(1, total + 1))
    return sorted({1, (total + 1) // 2, total})


def serving_through_proxy(lab) -> bool:
    """GET /ready through proxy1's TLS site from the outside namespace (the internet)."""
    proxy = f"10.77.{lab.ident.subnet_octet}.10"
    proc = subprocess.run(
        ["ip", "netns", "exec", lab.ident.outside_ns, "curl", "-ksS", "--max-time", "5",
         "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
         f"releasy.lab.test:443:{proxy}", "https://releasy.lab.test/ready"],
        capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() == "200"


def test_every_injected_fault_leaves_the_fleet_serving_and_a_rerun_converges(lab, fleet):
    inventory, total = fleet
    assert total >= 10, f"a rolling deploy over 3 hosts ran only {total} host-changing commands"
    tried = []
    on = "1.1.0"
    for n in points(total):
        target = RELEASES[0] if on == RELEASES[1] else RELEASES[1]
        proc = lab.fab("deploy.rolling", "--version", target, "--yes", inventory=inventory,
                       env={"RELEASY_FAULT": str(n)}, check=False)
        said = proc.stdout + proc.stderr
        where = f"fault #{n} of {total}"
        assert "failed on purpose" in proc.stderr, f"{where}: no command was replaced\n{said}"
        assert proc.returncode in (0, 1), f"{where}: exit {proc.returncode}\n{said}"
        assert "Traceback" not in said, f"{where}\n{said}"
        # Left serving: lock free, the proxy answers, every host out of rotation named.
        lock = lab.fab("deploy.lock", inventory=inventory)
        assert "free" in lock.stdout, f"{where}: lock not free\n{lock.stdout}"
        assert serving_through_proxy(lab), f"{where}: the proxy does not answer /ready"
        in_rotation = rotation(lab)
        assert in_rotation, f"{where}: nothing in rotation"
        for h in APPS:
            if h not in in_rotation:
                assert h in proc.stderr, f"{where}: {h} out of rotation, not named\n{said}"
            else:
                assert ready(lab, h), f"{where}: {h} in rotation but not ready"
        # The same command again converges.
        again = lab.fab("deploy.rolling", "--version", target, "--yes", inventory=inventory)
        assert {h: current(lab, h) for h in APPS} == dict.fromkeys(APPS, target), where
        assert rotation(lab) == list(APPS), where
        assert again.returncode == 0
        on = target
        tried.append(n)
    print(f"\nfault injection: {len(tried)} of {total} points of a rolling deploy tried"
          f" ({tried}); every one recovered and converged on a re-run")
