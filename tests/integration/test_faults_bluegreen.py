"""Faults injected into a blue/green deploy (`fab deploy.bluegreen --version V`) on the
single-host lab (proxy, app and SQLite database on `solo`): the N-th host-changing command
of the run really fails on the host (``RELEASY_FAULT=N``, see `executor.FaultInjection`), or
the host's SSH connection drops there (``N:drop``), under steady load through nginx. After
every such failure: no request failed, exit 1 (4 for a drop: the host became unreachable),
a message naming the host and the stage, no traceback, the deploy lock free, nginx answering
/ready through the proxy on the one upstream the deploy left live; and the same command run
again converges (V live, one instance running and enabled).

`make test` tries the first, a middle and the last point of each mode; `make faults`
(RELEASY_FAULT_POINTS=all) tries every one and prints how many. The module runs last on the
single-host shape, on a fresh lab (test_bluegreen, before it, leaves releasy@PORT units
live), and ends with the site serving: lock free, no maintenance page.
"""
from __future__ import annotations

import re

import pytest

from releasy_deploy.bluegreen import STAGES
from tests.integration.labtools import (FAULT_COUNT, FAULT_MODES, SOLO, fault_points,
                                       leave_serving, running, serving_through_proxy, sh,
                                       steady_load, upstreams, version_on)

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("single", database="sqlite")]

# Two releases at the same migration level, so the sweep can go back and forth between them.
RELEASES = ("1.1.0", "1.1.1")
# What a run stopped by the fault must exit with: a failed host-changing command is a failed
# deploy; a dropped connection makes the host unreachable.
EXIT = {"fail": 1, "drop": 4}
# The command that appends the audit record (`audit.write`), the last of a deploy.
AUDIT_WRITE = "releasy-audit /var/log/releasy-deploy"


def live_version(lab) -> str:
    """The version answering on the one port the proxy's upstream lists."""
    (server,) = upstreams(lab)
    return version_on(lab, int(server.rsplit(":", 1)[1]))


def assert_converged(lab, version: str, where: str) -> None:
    """``version`` live on the one upstream port, that instance running and enabled, the
    other one and releasy.service stopped and disabled."""
    (server,) = upstreams(lab)
    port = int(server.rsplit(":", 1)[1])
    assert version_on(lab, port) == version, where
    assert running(lab, f"releasy@{port}.service") == ("active", "enabled"), where
    others = [f"releasy@{p}.service" for p in (8080, 8081) if p != port] + ["releasy.service"]
    for other in others:
        assert running(lab, other) == ("inactive", "disabled"), f"{where}: {other}"
    assert sh(lab, "readlink", "/opt/releasy/current") == f"releases/{version}", where


@pytest.fixture(scope="module")
def lab(lab_session):
    # A fresh lab: the modules before it on this shape (test_bluegreen) leave releasy@PORT
    # instances live, which a reset does not undo. A bring-up from the cache takes seconds.
    handle = lab_session.fresh("single", database="sqlite").reset("1.0.0")
    yield handle
    leave_serving(handle)


@pytest.fixture(scope="module")
def total(lab) -> int:
    """Both releases staged and handed over to the releasy@ instances first, so every run
    of the sweep does the same steps; returns the number of host-changing commands a clean
    blue/green deploy between the two runs."""
    lab.fab("deploy.bluegreen", "--version", RELEASES[0], "--yes")
    lab.fab("deploy.bluegreen", "--version", RELEASES[1], "--yes")
    clean = lab.fab("deploy.bluegreen", "--version", RELEASES[0], "--yes",
                    env={"RELEASY_FAULT": "0"})
    assert_converged(lab, RELEASES[0], "clean run")
    return int(FAULT_COUNT.search(clean.stderr).group(1))


@pytest.mark.parametrize("mode", sorted(FAULT_MODES))
def test_every_injected_fault_in_a_bluegreen_deploy_keeps_the_site_serving(
        lab, total, mode, tmp_path):
    """``fail``: the N-th host-changing command fails on the host; ``drop``: the host's SSH
    connection drops at that point instead (the command never runs). Under steady load
    through nginx: no request fails, the run stops with a message naming host and stage,
    the lock is free, nginx serves; the same command again puts V live."""
    assert total >= 5, f"a blue/green deploy ran only {total} host-changing commands"
    tried, requests = [], 0
    for n in fault_points(total):
        target = RELEASES[0] if live_version(lab) == RELEASES[1] else RELEASES[1]
        where = f"fault #{n} of {total} in deploy.bluegreen ({mode})"
        with steady_load(lab, tmp_path / f"load-{n}") as load:
            proc = lab.fab("deploy.bluegreen", "--version", target, "--yes", check=False,
                           env={"RELEASY_FAULT": f"{n}{FAULT_MODES[mode][0]}"})
        said = proc.stdout + proc.stderr
        assert load.summary["failed"] == 0, f"{where}: {load.summary['first_failures']}"
        requests += load.summary["total"]
        fired = next(line for line in proc.stderr.splitlines()
                     if line.startswith("fault injection:"))
        assert FAULT_MODES[mode][1] in fired, f"{where}: no command was replaced\n{said}"
        assert "Traceback" not in said, f"{where}\n{said}"
        if AUDIT_WRITE in said[said.index(fired):]:
            # The audit record comes after the deploy's last change: its failure is only
            # reported (on the host's line), the deploy itself succeeded.
            assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{said}"
            assert f"[{SOLO}] ERROR: " in proc.stdout, f"{where}: not reported\n{said}"
            assert_converged(lab, target, where)
        else:
            assert proc.returncode == EXIT[mode], f"{where}: exit {proc.returncode}\n{said}"
            # The paragraph's first line names the host and the stage.
            assert re.search(rf"^error: {SOLO}: .*stage '({'|'.join(STAGES)})'", proc.stderr,
                             re.MULTILINE), f"{where}: host and stage not named\n{said}"
        lock = lab.fab("deploy.lock")
        assert lock.stdout.strip() == "deploy lock of lab: free", f"{where}\n{lock.stdout}"
        assert serving_through_proxy(lab, SOLO), f"{where}: nginx does not answer /ready"
        assert live_version(lab) in RELEASES, where  # the upstream port answers
        # The same command again converges.
        again = lab.fab("deploy.bluegreen", "--version", target, "--yes")
        assert "Traceback" not in again.stdout + again.stderr, where
        assert_converged(lab, target, where)
        tried.append(f"#{n} {fired.split(' on purpose: ', 1)[1].splitlines()[0][:60]}")
    print(f"\nfault injection ({mode}): {len(tried)} of {total} points of a blue/green deploy"
          f" tried, {requests} requests through nginx meanwhile, none failed; every"
          f" one recovered and converged on a re-run:\n  " + "\n  ".join(tried))
