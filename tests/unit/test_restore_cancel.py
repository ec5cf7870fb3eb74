"""A restore that can be ended: the argv builders, the outcome read back from the database,
and the exit codes of an interrupted task (130 Ctrl-C, 143 SIGTERM)."""
from __future__ import annotations

import pytest

from releasy_deploy import restores
from releasy_deploy.cli import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, exit_code_for,
                                 fault_injection)
from releasy_deploy.commands import restore as restorecmd
from releasy_deploy.errors import (DeployError, RestoreFailed, StepFailed, Terminated,
                                   first_line, interruption)


RUN = "0123456789abcdef"


def test_the_restore_runs_in_its_own_session_with_its_state_directory():
    argv = restorecmd.restore_argv("/var/backups/releasy/x.dump", "releasy", RUN)
    assert argv[:4] == ["setsid", "-w", "sh", "-c"]
    assert argv[-4:] == ["/var/backups/releasy/x.dump", "releasy",
                         "/run/releasy-restore-releasy", RUN]
    script = argv[4]
    assert "--single-transaction" in script and "PGAPPNAME=releasy-restore" in script
    assert 'echo "$$" > "$state/pgid"' in script and "txid_current()" in script
    # The id goes under this run's name, in postgres's own directory inside root's.
    assert '"$state/tx/xid-$run"' in script and 'chown root:root "$state"' in script
    with pytest.raises(ValueError):
        restorecmd.restore_argv("/x.dump", "releasy; rm -rf /", RUN)
    stop = restorecmd.stop_argv("releasy", RUN, 50)
    assert stop[-4:] == ["releasy", "/run/releasy-restore-releasy", "50", RUN]
    assert "pg_terminate_backend" in stop[2] and "txid_status" in stop[2]
    # Only this run's id counts, read as postgres: none -> "not started".
    assert 'runuser -u postgres -- cat -- "$state/tx/xid-$run"' in stop[2]
    with pytest.raises(ValueError):
        restorecmd.stop_argv("releasy", RUN, -1)
    for bad in ("", "../../etc", "0123456789ABCDEF", "0123456789abcdef0"):
        with pytest.raises(ValueError, match="run id"):
            restorecmd.stop_argv("releasy", bad)
        with pytest.raises(ValueError, match="run id"):
            restorecmd.restore_argv("/x.dump", "releasy", bad)


@pytest.mark.parametrize("out,outcome", [
    ("@outcome committed\n", restorecmd.COMMITTED),
    ("noise\n@outcome aborted\n", restorecmd.ABORTED),
    ("@outcome not started\n", restorecmd.NOT_STARTED),
    ("@outcome in progress\n", restorecmd.UNKNOWN),
    ("@outcome \n", restorecmd.UNKNOWN),
    ("", restorecmd.UNKNOWN),
])
def test_the_outcome_is_what_the_database_said(out, outcome):
    assert restorecmd.parse_outcome(out) == outcome


def test_the_message_says_whether_the_restore_was_applied():
    assert "WAS fully applied" in restores.outcome_text(restorecmd.COMMITTED)
    for unchanged in (restorecmd.ABORTED, restorecmd.NOT_STARTED):
        assert "the database is unchanged" in restores.outcome_text(unchanged)
    said = restores.outcome_text(restorecmd.UNKNOWN, " (db1: timed out)")
    assert "could not be read (db1: timed out)" in said and "fab db.psql" in said


def test_an_interrupted_flow_exits_130_or_143_and_a_failed_one_1():
    assert exit_code_for(StepFailed("x", cause=KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert exit_code_for(StepFailed("x", cause=Terminated())) == EXIT_TERMINATED
    nested = StepFailed("x", cause=RestoreFailed("y", cause=Terminated(), applied=False))
    assert exit_code_for(nested) == EXIT_TERMINATED
    assert exit_code_for(StepFailed("x", cause=DeployError("boom"))) == EXIT_FAILED
    assert interruption(DeployError("boom")) is None
    assert first_line(Terminated()) == "terminated (SIGTERM)"
    assert first_line(KeyboardInterrupt()) == "interrupted (Ctrl-C)"


def test_fault_injection_fails_the_command_or_drops_the_connection():
    assert fault_injection("") is None and fault_injection("x") is None
    assert fault_injection("3:bogus") is None
    plain, drop = fault_injection("3"), fault_injection("3:drop")
    assert (plain.at, plain.drop) == (3, False) and (drop.at, drop.drop) == (3, True)
    assert [drop.due("app1", f"cmd {i}") for i in range(1, 5)] == [False, False, True, False]
    assert drop.summary() == ("fault injection: 4 host-changing command(s); #3 connection"
                              " dropped on purpose: app1: cmd 3")
