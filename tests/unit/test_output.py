"""The Reporter's two faces: plain prefixed lines (pipes, cron, CI) and the live block on a
terminal. The live view is checked through a small terminal emulator that understands the
only control sequences the reporter emits (CSI n F, CSI J), so the tests assert what a person
would see on the screen: during the run a status block under the event lines, and at the
end exactly the plain output, never a half-erased block or a line cut in two."""
from __future__ import annotations

import io
import os
import re
import sys
import threading

import pytest

from releasy_deploy.output import (
    LiveBlock, Reporter, fit, format_elapsed, live_wanted, one_screen,
)
from terminal_screen import Screen


# ----------------------------------------------------------------------------- a terminal
class FakeTerminal(io.TextIOBase):
    """A stream that says it is a terminal and renders into a Screen."""

    def __init__(self, slow: bool = False) -> None:
        super().__init__()
        self.screen = Screen()
        self.raw: list[str] = []
        self.slow = slow
        self._lock = threading.Lock()  # the emulator itself is not what is tested

    def write(self, data: str) -> int:
        if self.slow:  # one character at a time: an unlocked writer would interleave
            for ch in data:
                with self._lock:
                    self.raw.append(ch)
                    self.screen.feed(ch)
                os.sched_yield()
        else:
            with self._lock:
                self.raw.append(data)
                self.screen.feed(data)
        return len(data)

    def isatty(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def live_reporter(term: FakeTerminal, clock: Clock | None = None, size=(60, 20)) -> Reporter:
    return Reporter(term, live=True, clock=clock or Clock(), terminal_size=lambda: size)


# ----------------------------------------------------------------------------- plain mode
def test_plain_mode_is_whole_prefixed_lines_and_never_escape_codes():
    out = io.StringIO()
    rep = Reporter(out)
    assert not rep.live
    rep.stage("app1", "roll", "drain app1")
    rep.changed("app1", "releasy.service restarted")
    rep.info("db1", "two\nlines")
    rep.summary()
    text = out.getvalue()
    assert "\x1b" not in text
    assert text.splitlines()[:4] == [
        "[app1] roll: drain app1",
        "[app1] changed: releasy.service restarted",
        "[db1] two",
        "[db1] lines",
    ]


def test_summary_leaves_out_labels_that_only_reported_information():
    out = io.StringIO()
    clock = Clock()
    rep = Reporter(out, clock=clock)
    rep.info("site", "--- db ---")
    rep.changed("db1", "database created")
    rep.unchanged("app1", "packages")
    clock.now += 3.25
    assert rep.summary().splitlines() == [
        "app1  0 changed / 1 unchanged / ok",
        "db1   1 changed / 0 unchanged / ok",
        "2 hosts, 0 failed, 3.2 s",
    ]
    # A task that only read: every label is listed rather than none.
    only_info = Reporter(io.StringIO(), clock=clock)
    only_info.info("app1", "running 1.0.0")
    assert only_info.summary().splitlines()[0].startswith("app1  0 changed")


@pytest.mark.parametrize("env, tty, expected", [
    ({}, True, True),
    ({}, False, False),
    ({"RELEASY_PROGRESS": "plain"}, True, False),
    ({"TERM": "dumb"}, True, False),
    ({"TERM": "xterm-256color", "RELEASY_PROGRESS": "auto"}, True, True),
])
def test_live_only_on_a_terminal_unless_turned_off(env, tty, expected):
    stream = FakeTerminal() if tty else io.StringIO()
    assert live_wanted(stream, env) is expected


# ----------------------------------------------------------------------------- live mode
def test_live_block_shows_stage_host_and_elapsed_under_the_event_lines():
    term, clock = FakeTerminal(), Clock()
    rep = live_reporter(term, clock)
    rep.stage("app1", "migrate", "drain app1, switch to 1.1.0")
    clock.now += 1.5
    rep.changed("app2", "release 1.1.0 staged")
    clock.now += 2.0
    screen = term.screen.text_lines()
    # The event lines, exactly as in plain mode, then the block.
    assert screen[:2] == ["[app1] migrate: drain app1, switch to 1.1.0",
                          "[app2] changed: release 1.1.0 staged"]
    block = screen[2:]
    assert block[0].startswith("-- 2 running, 0 done -- 1.5s --")
    assert re.match(r"^\S app1  migrate  drain app1, switch to 1\.1\.0\s+1\.5s$", block[1]), block
    assert re.match(r"^\S app2  +changed: release 1\.1\.0 staged\s+0\.0s$", block[2]), block
    # A finished stage freezes its row, with a done mark.
    rep.stage("app1", "migrate", "done in 3.5 s")
    block = term.screen.text_lines()[3:]
    assert block[0].startswith("-- 1 running, 1 done")
    assert block[1].startswith("\u2713 app1") and block[1].endswith("3.5s")
    rep.close()


def test_rows_fit_the_terminal_width_so_redraws_never_wrap():
    term = FakeTerminal()
    rep = live_reporter(term, size=(40, 20))
    rep.info("a-very-long-host-name-indeed.example.com", "x" * 200)
    rep.stage("app1", "a-long-stage-name", "y" * 200)
    rows = term.screen.text_lines()[-3:]
    assert all(len(r) <= 39 for r in rows), rows
    assert rows[1].endswith("s") and "..." in rows[1]
    rep.close()


def test_block_is_capped_to_the_terminal_height():
    block = LiveBlock()
    for i in range(30):
        block.note(f"app{i}", "info", "working", float(i))
    block.note("app3", "error", "boom", 40.0)
    rows = block.rows(50.0, 80, 10, 0, started=0.0)
    assert len(rows) <= 10
    assert rows[-1].strip().startswith("... and")
    assert any("app3" in r and "ERROR: boom" in r for r in rows), rows  # failures stay


def test_after_the_run_the_screen_holds_exactly_the_plain_output():
    term, clock = FakeTerminal(slow=True), Clock()
    rep = live_reporter(term, clock)
    plain_out = io.StringIO()
    plain = Reporter(plain_out, clock=Clock())
    hosts = [f"host{i}" for i in range(5)]

    def work(host: str) -> None:
        for j in range(15):
            for r in (rep, plain):
                r.stage(host, "roll", f"step {j} of {host}\nsecond line {j}")
                r.changed(host, f"thing {j}")

    threads = [threading.Thread(target=work, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    clock.now += 2
    rep.summary()
    plain.summary()
    screen = term.screen.text_lines()
    expected = plain_out.getvalue().splitlines()
    # Same lines (thread order may differ between the two runs), each one whole.
    assert sorted(screen[:-6]) == sorted(expected[:-6])
    assert screen[-1] == "5 hosts, 0 failed, 2.0 s"
    for i, line in enumerate(screen):  # each event's two lines stay together
        m = re.fullmatch(r"\[(host\d)\] roll: step (\d+) of host\d", line)
        if m:
            assert screen[i + 1] == f"[{m[1]}]       second line {m[2]}"
    assert "\x1b[" in "".join(term.raw)  # it really was drawn and erased


def test_prints_from_elsewhere_go_above_the_block_and_stdout_is_restored(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    rep = Reporter(live=True, clock=Clock(), terminal_size=lambda: (60, 20))
    rep.info("app1", "first")
    assert sys.stdout is not term  # a proxy while the block is shown
    print("a table row from the task")
    rep.info("app1", "second")
    assert term.screen.text_lines()[:3] == ["[app1] first", "a table row from the task",
                                            "[app1] second"]
    rep.close()
    assert sys.stdout is term
    assert term.screen.text_lines() == ["[app1] first", "a table row from the task",
                                        "[app1] second"]


def test_a_prompt_is_not_drawn_over_and_paused_hands_over_the_terminal(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    rep = Reporter(live=True, clock=Clock(), terminal_size=lambda: (60, 20))
    rep.info("db1", "ready")
    # input() writes its prompt through sys.stdout because the proxy has no fileno().
    with pytest.raises(io.UnsupportedOperation):
        sys.stdout.fileno()
    sys.stdout.write("Restore? [y/N] ")
    sys.stdout.flush()
    assert rep._redraw()  # a tick of the redraw thread
    assert term.screen.text_lines() == ["[db1] ready", "Restore? [y/N] "]
    term.write("y\n")  # what the terminal echoes
    with rep.paused():
        rep.info("db1", "while paused: plain lines only")
        assert rep._redraw()
        assert term.screen.text_lines() == ["[db1] ready", "Restore? [y/N] y",
                                            "[db1] while paused: plain lines only"]
    assert term.screen.text_lines()[3].startswith("-- 1 running")  # drawn again
    rep.close()
    assert term.screen.text_lines() == ["[db1] ready", "Restore? [y/N] y",
                                        "[db1] while paused: plain lines only"]


def test_a_second_reporter_while_one_is_live_stays_plain(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("RELEASY_PROGRESS", raising=False)
    rep = Reporter(clock=Clock(), terminal_size=lambda: (60, 20))
    assert rep.live  # auto: stdout is a terminal
    rep.info("app1", "first")
    assert not Reporter().live  # would otherwise fight over the screen
    rep.close()
    assert not rep.live


def test_secrets_are_masked_in_the_block_too():
    term = FakeTerminal()
    rep = live_reporter(term)
    rep.masker.add(["hunter2-secret"])
    rep.info("db1", "password is hunter2-secret")
    assert "hunter2" not in "".join(term.raw)
    rep.close()


# ----------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("seconds, text", [(0, "0.0s"), (4.25, "4.2s"), (65, "1m05s"),
                                           (3725, "1h02m")])
def test_format_elapsed(seconds, text):
    assert format_elapsed(seconds) == text


def test_fit_cuts_and_flattens():
    assert fit("a\nb\tc", 10) == "a b c"
    assert fit("\x1b[31mred\x1b[0m", 20) == " [31mred [0m"  # no escape reaches the block
    assert fit("abcdefghij", 6) == "abc..."
    assert fit("abc", 0) == ""


def journal_failure(host: str, lines: int = 30) -> str:
    return "\n".join([
        f"- {host}: releasy.service did not become ready within 60 s (GET /ready).",
        "      Last 30 lines of `journalctl -u releasy.service`:",
        *[f"        Nov 26 {host} releasy[1]: line {i}" for i in range(lines)],
        "      Fix the cause above and re-run; `fab app.setup --version PREVIOUS` switches"
        " back.",
    ])


def test_one_screen_keeps_first_lines_hints_and_the_end_of_each_block():
    text = "\n".join(["2 of 2 hosts failed:", journal_failure("app1"), journal_failure("app2"),
                      "succeeded: none"])
    short = one_screen(text, 40)
    lines = short.splitlines()
    assert len(lines) <= 40
    assert lines[0] == "2 of 2 hosts failed:" and lines[-1] == "succeeded: none"
    for host in ("app1", "app2"):
        assert f"- {host}: releasy.service did not become ready within 60 s (GET /ready)." in lines
        assert f"        Nov 26 {host} releasy[1]: line 29" in lines  # the end is kept
        assert f"        Nov 26 {host} releasy[1]: line 0" not in lines
    assert sum("Fix the cause above" in line for line in lines) == 2
    assert short.count("earlier lines not shown; --debug shows all") == 2


def test_one_screen_leaves_short_messages_alone_and_bounds_anything():
    assert one_screen("a\n    b\n    c", 40) == "a\n    b\n    c"
    flat = "\n".join(f"line {i}" for i in range(100))
    bounded = one_screen(flat, 40).splitlines()
    assert len(bounded) == 40 and bounded[-1].startswith("... and 61 more lines")
