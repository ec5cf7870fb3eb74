"""Ctrl-C: one press ends `fab run -- 'tail -f ...'`; a second one during a recovery is
noted, not obeyed, until the recovery is done. Real signals, a real loopback sshd."""
from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest

from releasy_deploy import interrupts
from releasy_deploy.executor import Executor
from releasy_deploy.output import Reporter


def _ctrl_c_in(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def test_a_ctrl_c_during_the_block_lets_it_finish_then_interrupts():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred("restoring the rotation") as received:
            _ctrl_c_in(0.05)
            time.sleep(0.4)  # the recovery's work: not cut short
            finished.append(True)
    assert finished == [True] and received == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_ctrl_c_nothing_changes_and_errors_pass_through():
    with interrupts.deferred("x") as received:
        pass
    assert received == []
    with pytest.raises(ValueError):
        with interrupts.deferred("x"):
            raise ValueError("the recovery's own failure")


def test_one_ctrl_c_ends_a_command_that_never_ends(sshd):
    """What `fab run -- 'tail -f ...'` does: before, Ctrl-C waited for the remote command."""
    with Executor(sshd.inventory(), reporter=Reporter(io.StringIO())) as ex:
        started = time.monotonic()
        timer = _ctrl_c_in(0.5)
        with pytest.raises(KeyboardInterrupt):
            ex.each(["loop"], lambda c: c.run(["sleep", "60"], check=False),
                    close_on_interrupt=True)
        timer.join()
        assert time.monotonic() - started < 10
        # The connection comes back on next use.
        assert ex.conn("loop").run(["echo", "again"]).stdout == "again\n"
