"""`fab db.restore` as data: the plan `plan_restore` makes from what preflight read, and a
failure at every step run by the real sequence runner with the flow's real logic
(`RestoreActions`), only what touches the hosts replaced by recorders: what is put back,
in which order, and what the paragraph says (with the exit code it leads to)."""
from __future__ import annotations

import io
from datetime import datetime, timezone

import pytest

from releasy_deploy import backups
from releasy_deploy.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, exit_code_for
from releasy_deploy.db_state import AppUnits, DbState
from releasy_deploy.engine.sequence import plan_undo, run_sequence
from releasy_deploy.errors import DeployError, RestoreFailed, StepFailed, Terminated
from releasy_deploy.output import Reporter
from releasy_deploy.pipeline import Pipeline
from releasy_deploy.restore_flow import RestoreActions, plan_restore

T0 = datetime(2026, 11, 26, 8, 0, 0, tzinfo=timezone.utc)
RUNS = {"releasy.service": "active"}
IDLE = {"releasy.service": "inactive"}


def _dump(purpose=backups.MANUAL, hour=0):
    return backups.parse_backup_name(backups.snapshot_name(
        "lab", T0.replace(hour=hour), "1.0.0", 2, "postgres", purpose))


DUMP = _dump()
SAFETY = _dump(backups.PRE_RESTORE, hour=9)


def state(*idle_too: str) -> DbState:
    apps = {h: AppUnits(h, "1.0.0", RUNS, {"1.0.0": 2}) for h in ("app1", "app2")}
    apps.update({h: AppUnits(h, "1.0.0", IDLE, {"1.0.0": 2}) for h in idle_too})
    return DbState([DUMP], 2, apps, {})


def test_the_plan_stops_only_what_runs_and_says_what_undoes_each_step():
    plan = plan_restore(state("app3"), DUMP, db="db1", proxies=("proxy1",))
    assert plan.kinds == ("backup", "maintenance", "stop", "restore", "start", "page_off")
    assert plan.step("stop").hosts == plan.step("start").hosts == ("app1", "app2")
    assert plan.describe() == [
        "1. backup: save the current database (migration level 2) to a new pre-restore dump"
        " on db1",
        "2. maintenance: maintenance page on for the downtime (503 with Retry-After) on proxy1"
        " (undone by: maintenance page off as it was, once Releasy is back)",
        "3. stop: stop releasy.service on app1, app2 (undone by: start them again and wait"
        " for /ready)",
        f"4. restore: restore {DUMP.name} (migration level 2) on db1",
        "5. start: start the same units again, wait for /ready on app1, app2",
        "6. maintenance: maintenance page off (kept on if it was on before) on proxy1",
    ]
    assert plan.notes == (f"restore {DUMP.describe()}",)


def test_with_nothing_running_nothing_is_stopped_or_started():
    st = DbState([DUMP], 2, {"solo": AppUnits("solo", None, IDLE, {})}, {})
    plan = plan_restore(st, DUMP, db="solo", proxies=("solo",))
    assert plan.kinds == ("backup", "maintenance", "restore", "page_off")


class Recording(RestoreActions):
    """The flow's logic as it is; what would touch a host only logs (and fails on cue)."""

    def __init__(self, fail: dict[str, BaseException]) -> None:
        super().__init__(None, state("app3"), DUMP, "db1")
        self.log: list[str] = []
        self.fail = fail

    def _do(self, what: str, key: str):
        self.log.append(what)
        if key in self.fail:
            raise self.fail.pop(key)

    def take_dump(self):
        self._do("dump", "backup")
        return SAFETY

    def switch_page(self, on):
        self._do(f"page {'on' if on else 'off'}", "page on" if on else "page off")
        return False

    def end_page(self):
        self._do("page off", "page off")

    def stop_units(self, hosts):
        self._do(f"stop {','.join(hosts)}", "stop")

    def restore_dump(self):
        self._do("restore", "restore")

    def start_units(self, hosts):
        self._do(f"start {','.join(hosts)}", "start")


def run(**fail: BaseException):
    acts = Recording({k.replace("_", " "): v for k, v in fail.items()})
    plan = plan_restore(acts.st, DUMP, db="db1", proxies=("proxy1",))
    pipe = Pipeline("db.restore", Reporter(io.StringIO()))
    try:
        run_sequence(plan, acts.table(), pipe=pipe, lock=None, on_failure=acts.failed)
    except BaseException as exc:  # noqa: BLE001 - returned for the assertions
        return acts.log, exc, pipe
    return acts.log, None, pipe


FORWARD = ["dump", "page on", "stop app1,app2", "restore", "start app1,app2", "page off"]


def test_a_restore_runs_every_step_in_order():
    log, exc, pipe = run()
    assert exc is None and log == FORWARD
    assert [t.stage for t in pipe.timings] == ["backup", "maintenance", "stop", "restore",
                                               "start", "maintenance"]


def test_the_safety_dump_failing_changes_nothing_and_keeps_its_own_message():
    said = DeployError("db1: saving the current database before the restore failed")
    log, exc, _ = run(backup=said)
    assert log == ["dump"] and exc is said


def paragraph(exc) -> str:
    return " ".join(str(exc).split())


@pytest.mark.parametrize("at,cause,code", [
    ("page on", KeyboardInterrupt(), EXIT_INTERRUPTED),
    ("stop", DeployError("app2: systemctl stop failed"), EXIT_FAILED),
])
def test_before_the_restore_began_the_database_is_unchanged(at, cause, code):
    log, exc, pipe = run(**{at.replace(" ", "_"): cause})
    reached = FORWARD[: FORWARD.index(at if at != "stop" else "stop app1,app2") + 1]
    put_back = ["page off"] if at == "page on" else ["start app1,app2", "page off"]
    assert log == [*reached, *put_back]
    assert [t.stage for t in pipe.timings if t.stage == "failed"] == ["failed"] * len(put_back)
    text = paragraph(exc)
    assert isinstance(exc, StepFailed) and exit_code_for(exc) == code
    assert "The restore had not begun: the database is unchanged." in text
    if at == "page on":
        assert f"db1: the restore of {DUMP.name} stopped: interrupted (Ctrl-C)" in text
        assert "Nothing had been stopped." in text
    else:
        assert text.startswith("app2: systemctl stop failed")
        assert "What was running was started again." in text
    assert f"re-run `fab db.restore --file {DUMP.name}`" in text and SAFETY.path in text


@pytest.mark.parametrize("applied,cause,code", [
    (False, Terminated(), EXIT_TERMINATED),
    (True, KeyboardInterrupt(), EXIT_INTERRUPTED),
    (None, DeployError("db1: timed out"), EXIT_FAILED),
])
def test_a_restore_that_did_not_finish_starts_what_ran_and_says_what_the_database_read(
        applied, cause, code):
    said = RestoreFailed("db1: restoring it stopped\n  (what the database said)",
                         host="db1", cause=cause, applied=applied)
    log, exc, _ = run(restore=said)
    assert log == [*FORWARD[:4], "start app1,app2", "page off"]
    text = paragraph(exc)
    assert exit_code_for(exc) == code
    assert text.startswith("db1: restoring it stopped (what the database said)")
    assert "had not begun" not in text
    if applied:
        assert "What was running was started again (on the restored data)." in text
        assert f"To go back to the data from before the restore: `fab db.restore --file" \
               f" {SAFETY.name}`" in text
    else:
        assert "What was running was started again." in text
        assert f"re-run `fab db.restore --file {DUMP.name}`" in text


def test_when_starting_again_fails_too_the_page_stays_on():
    log, exc, _ = run(restore=RestoreFailed("db1: failed", applied=False),
                      start=DeployError("app1: releasy.service did not become ready"))
    assert log == [*FORWARD[:4], "start app1,app2"]  # no "page off"
    text = paragraph(exc)
    assert ("Starting Releasy again failed as well (app1: releasy.service did not become"
            " ready): check the app hosts; the maintenance page stays on") in text


@pytest.mark.parametrize("cause,code,kind", [
    (DeployError("app1: releasy.service did not become ready"), EXIT_FAILED, DeployError),
    (Terminated(), EXIT_TERMINATED, StepFailed),
])
def test_once_restored_nothing_is_put_back_and_the_page_stays_on(cause, code, kind):
    assert plan_undo(plan_restore(state(), DUMP, db="db1", proxies=("p",)), "start") == ()
    log, exc, _ = run(start=cause)
    assert log == FORWARD[:5]
    assert type(exc) is kind and exit_code_for(exc) == code
    text = paragraph(exc)
    assert text.startswith(f"the database WAS restored from {DUMP.name}, but Releasy did not"
                           " come back on every app host")
    assert f"{SAFETY.path} on db1 (`fab db.restore --file {SAFETY.name}` goes back" in text
    assert "once the cause is fixed, `fab site` starts it again" in text
    assert "The maintenance page stays on until `fab proxy.maintenance --off`" in text


@pytest.mark.parametrize("cause,code", [
    (KeyboardInterrupt(), EXIT_INTERRUPTED),
    # What `maintenance_page.end_downtime` raises when a proxy keeps the page: the restore
    # must not exit 0 while clients get 503s.
    (DeployError("proxy1: maintenance page not switched off"), EXIT_FAILED),
])
def test_the_page_not_coming_off_at_the_end_says_so(cause, code):
    log, exc, _ = run(page_off=cause)
    assert log == FORWARD
    assert exit_code_for(exc) == code
    text = paragraph(exc)
    assert "WAS restored" in text and "Releasy is back, but the maintenance page was not" \
        " switched off" in text
    assert "`fab proxy.maintenance --off` ends it" in text
