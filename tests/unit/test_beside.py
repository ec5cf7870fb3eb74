"""`beside.Beside`, the host steps `fab site` runs beside its own steps (the firewall of
hosts where it was off): they run at once, in their own threads; `wait` raises their
failures together, once; `finish` (a flow on its way out) reports them instead."""
from __future__ import annotations

import io
import threading

import pytest

from releasy_deploy.beside import Beside
from releasy_deploy.errors import DeployError, ParallelError
from releasy_deploy.output import Reporter


def beside() -> tuple[Beside, io.StringIO]:
    out = io.StringIO()
    return Beside(what="the firewall", label="site", reporter=Reporter(stream=out)), out


def test_steps_run_while_the_flow_goes_on_and_wait_joins_them():
    steps, _ = beside()
    flow_went_on = threading.Event()
    ran = []
    steps.start("app1", lambda: (flow_went_on.wait(5), ran.append("app1")))
    steps.start("app2", lambda: ran.append("app2"))
    flow_went_on.set()  # app1's step could only end once the flow's thread got here
    steps.wait()
    assert sorted(ran) == ["app1", "app2"]


def test_wait_raises_every_failure_once_naming_the_hosts():
    steps, _ = beside()
    steps.start("app1", lambda: None)
    steps.start("app2", lambda: (_ for _ in ()).throw(DeployError("app2: ufw refused")))

    def each_failed():  # a step that ran Executor.each on its host: its failures kept
        raise ParallelError({"db1": DeployError("db1: lockout")}, {})
    steps.start("db1", each_failed)
    with pytest.raises(ParallelError) as err:
        steps.wait()
    assert set(err.value.failures) == {"app2", "db1"}
    assert "2 of 3 hosts failed" in str(err.value) and "succeeded: app1" in str(err.value)
    steps.wait()  # already raised: nothing left to raise


def test_finish_reports_failures_instead_of_raising_them():
    steps, out = beside()
    steps.start("app2", lambda: (_ for _ in ()).throw(DeployError("app2: ufw refused")))
    steps.finish()
    assert "[app2] ERROR: the firewall, begun beside the other steps, failed too: ufw " \
           "refused" in out.getvalue()
    steps.finish()  # idempotent: a flow's unwinding may call it twice
    assert out.getvalue().count("ERROR") == 1


def test_finish_says_which_steps_it_waits_for():
    steps, out = beside()
    release = threading.Event()
    steps.start("db1", lambda: release.wait(5))
    threading.Timer(0.05, release.set).start()
    steps.finish()
    assert "[site] waiting for the firewall of db1 to end" in out.getvalue()
