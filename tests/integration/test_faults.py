"""Faults injected into a rolling deploy and into a rolling reconfiguration (`fab site`
applying one changed app env value) on the lab (proxy1, app1..app3, db1): the N-th
host-changing command of the run really fails on its host (``RELEASY_FAULT=N``, see
`executor.FaultInjection`), or that host's SSH connection drops there (``N:drop``). After
every such failure the fleet must be left serving: exit 1 (4 for a drop that stopped it; 0
when the failing command was one whose failure is only reported, like an audit record), a
message naming the host, the lock free, nginx answering through the proxy, no app host out
of rotation that the message does not name; and the same command run again converges. The
reconfiguration sweep runs under mixed load through the proxy: no request may fail.

`make test` tries the first, a middle and the last point; `make faults` (this module with
RELEASY_FAULT_POINTS=all) tries every one and prints how many."""
from __future__ import annotations

import re

import pytest

from tests.integration.labtools import (FAULT_COUNT, FAULT_MODES, assert_no_failed_request,
                                       current, fault_points, load_through_proxy, ready,
                                       report_load, rotation, serving_through_proxy,
                                       set_log_level)

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("split", 3)]

APPS = ("app1", "app2", "app3")
# Two releases with the same migrations, so the sweep can go back and forth between them.
RELEASES = ("1.1.0", "1.1.1")
# The sweep of `fab site` flips app.log_level between these: one changed env value a run.
LOG_LEVELS = ("debug", "warn")


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
    total = int(FAULT_COUNT.search(clean.stderr).group(1))
    assert {h: current(lab, h) for h in APPS} == dict.fromkeys(APPS, "1.1.0")
    return inventory, total


def assert_left_serving(lab, inventory, proc, where: str, mode: str) -> None:
    """After a run with an injected fault: the exit code, no traceback, a message that names
    the host, the lock free, the proxy answering, every app host out of rotation named."""
    said = proc.stdout + proc.stderr
    _suffix, marker, codes = FAULT_MODES[mode]
    assert marker in proc.stderr, f"{where}: no command was replaced\n{said}"
    assert proc.returncode in codes, f"{where}: exit {proc.returncode}\n{said}"
    assert "Traceback" not in said, f"{where}\n{said}"
    if proc.returncode != 0:  # the message names the host
        message = "\n".join(line for line in proc.stderr.splitlines()
                            if not line.startswith("fault injection:"))
        assert any(h in message for h in (*APPS, "db1", "proxy1")), \
            f"{where}: no host named\n{said}"
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


@pytest.mark.parametrize("mode", sorted(FAULT_MODES))
def test_every_injected_fault_leaves_the_fleet_serving_and_a_rerun_converges(lab, fleet, mode):
    """``fail``: the N-th host-changing command fails on its host; ``drop``: that host's SSH
    connection drops at that point instead (the command never runs; on db1 the deploy
    lock's tunnel goes with it). A drop's cause is an unreachable host: exit 4 when it
    stopped the rollout."""
    inventory, total = fleet
    assert total >= 10, f"a rolling deploy over 3 hosts ran only {total} host-changing commands"
    tried = []
    on = current(lab, "app1")
    for n in fault_points(total):
        target = RELEASES[0] if on == RELEASES[1] else RELEASES[1]
        proc = lab.fab("deploy.rolling", "--version", target, "--yes", inventory=inventory,
                       env={"RELEASY_FAULT": f"{n}{FAULT_MODES[mode][0]}"}, check=False)
        where = f"fault #{n} of {total} ({mode})"
        assert_left_serving(lab, inventory, proc, where, mode)
        # The same command again converges.
        again = lab.fab("deploy.rolling", "--version", target, "--yes", inventory=inventory)
        assert {h: current(lab, h) for h in APPS} == dict.fromkeys(APPS, target), where
        assert rotation(lab) == list(APPS), where
        assert again.returncode == 0
        on = target
        tried.append(n)
    print(f"\nfault injection ({mode}): {len(tried)} of {total} points of a rolling deploy"
          f" tried ({tried}); every one recovered and converged on a re-run")


def log_level_on(lab, host: str) -> str:
    env = lab.sudo(host, "cat", "/etc/releasy/releasy.env").stdout
    found = re.search(r'^RELEASY_LOG_LEVEL="([a-z]+)"$', env, re.MULTILINE)
    return found.group(1) if found else ""


@pytest.fixture(scope="module")
def reconfiguration(lab, fleet, tmp_path_factory):
    """An inventory of the fleet whose app.log_level the sweep flips, and the number of
    host-changing commands a clean `fab site` applying one flip runs (a rolling
    reconfiguration of the 3 app hosts). Afterwards the lab's own inventory again."""
    inventory = lab.inventory_variant(tmp_path_factory.mktemp("reconfigure"))
    set_log_level(lab, inventory, LOG_LEVELS[1])
    lab.fab("site", inventory=inventory)
    set_log_level(lab, inventory, LOG_LEVELS[0])
    clean = lab.fab("site", inventory=inventory, env={"RELEASY_FAULT": "0"})
    assert "rolling reconfiguration done: app1, app2, app3" in clean.stdout, clean.stdout
    yield inventory, int(FAULT_COUNT.search(clean.stderr).group(1))
    lab.fab("site")


@pytest.mark.parametrize("mode", sorted(FAULT_MODES))
def test_every_injected_fault_in_a_rolling_reconfiguration_keeps_the_fleet_serving(
        lab, reconfiguration, mode, tmp_path):
    """`fab site` applying a changed app.log_level (drain, restart, /ready, re-add, one host
    at a time) with a fault at step N, under mixed load through the proxy: no request
    fails, the fleet is left serving as above, and `fab site` run again applies the value
    everywhere."""
    inventory, total = reconfiguration
    assert total >= 10, f"a rolling reconfiguration ran only {total} host-changing commands"
    tried, requests = [], 0
    for n in fault_points(total):
        target = LOG_LEVELS[0] if log_level_on(lab, "app1") == LOG_LEVELS[1] else LOG_LEVELS[1]
        set_log_level(lab, inventory, target)
        where = f"fault #{n} of {total} in fab site ({mode})"
        with load_through_proxy(lab, tmp_path / f"load-{n}") as load:
            load.wait_until(lambda p: p["ok"] >= 50, timeout=60)
            proc = lab.fab("site", inventory=inventory, check=False,
                           env={"RELEASY_FAULT": f"{n}{FAULT_MODES[mode][0]}"})
            after = load.progress()["total"]
            load.wait_until(lambda p: p["total"] >= after + 50, timeout=60)
        report_load(where, load.summary)
        assert_no_failed_request(load, load.summary)
        requests += load.summary["total"]
        assert_left_serving(lab, inventory, proc, where, mode)
        # The same command again converges: the new value on every host, all in rotation.
        lab.fab("site", inventory=inventory)
        assert {h: log_level_on(lab, h) for h in APPS} == dict.fromkeys(APPS, target), where
        assert rotation(lab) == list(APPS), where
        assert all(ready(lab, h) for h in APPS), where
        tried.append(n)
    print(f"\nfault injection ({mode}): {len(tried)} of {total} points of a rolling"
          f" reconfiguration tried ({tried}), {requests} requests through the proxy meanwhile,"
          f" none failed; every one recovered and converged on a re-run")
