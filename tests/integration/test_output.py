"""What an operator sees from a parallel run on four hosts.

Captured (not a terminal, as under cron): every line of a first `fab site --version 1.0.0` on
a fresh split lab, where each tier's hosts work in parallel, is one whole ``[host] ...``
line or one of the known summary lines, and the lines are exactly the events of the JSON
log, one for one: nothing was cut, merged or lost. On a terminal (the real CLI under a local
pty): the live status block is drawn while the run goes on, and once it is over the screen
holds exactly those plain lines and the summary, with no trace of the block."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.integration.labtools import FabTerminal
from tests.unit.terminal_screen import Screen

pytestmark = pytest.mark.lab

HOSTS = ("proxy1", "app1", "app2", "db1")
LABELS = (*HOSTS, "site")

SUMMARY_LINE = re.compile(
    r"(?:\S+ +\d+ changed / \d+ unchanged(?: / \d+ would change)? / (?:ok|FAILED \(\d+ errors\))"
    r"|\d+ hosts?, \d+ failed, \d+\.\d s"
    r"|site: \d+ (?:changed|would change), \d+ unchanged, \d+ hosts, \d+\.\d s)")
PREFIX = {"changed": "changed: ", "unchanged": "ok: ", "would": "would ", "error": "ERROR: ",
          "stdout": "| ", "stderr": "! ", "diff": "  ", "info": ""}


def expected_lines(event: dict) -> list[str]:
    """The stdout lines the Reporter prints for one JSON-log event."""
    prefix = f"{event['stage']}: " if event["event"] == "stage" else PREFIX[event["event"]]
    pad = prefix if prefix in ("  ", "| ", "! ") else " " * len(prefix)
    lines = event["message"].splitlines() or [""]
    return [f"[{event['host']}] {prefix if i == 0 else pad}{line}"
            for i, line in enumerate(lines)]


@pytest.fixture(scope="module")
def fresh_site(lab_session, tmp_path_factory):
    # The first site on a fresh split lab (test_site looks at the same run).
    lab, proc, events = lab_session.first_site(tmp_path_factory.mktemp("output"))
    return lab, proc, [e for e in events if e.get("event") not in (
        "summary", "round_trips", "command")]


def test_parallel_site_output_is_whole_prefixed_lines(fresh_site):
    _, proc, events = fresh_site
    lines = proc.stdout.splitlines()
    assert lines, proc.stderr
    prefixed = [ln for ln in lines if ln.startswith("[")]
    for line in lines:
        m = re.match(r"\[([^\]]+)\] ", line)
        assert (m and m.group(1) in LABELS) or SUMMARY_LINE.fullmatch(line), \
            f"not a whole prefixed line nor a summary line: {line!r}"
    # One for one with the events: no line was cut in two, merged or dropped.
    expected = Counter(ln for e in events for ln in expected_lines(e))
    assert Counter(prefixed) == expected
    assert all(f"\n{h} " in "\n" + proc.stdout for h in HOSTS)  # a summary row per host


def test_the_hosts_really_ran_in_parallel(fresh_site):
    _, _, events = fresh_site
    # Within the app step both app hosts were at work at the same time: their event time
    # spans overlap (so the check above was made on interleaved output).
    spans = {}
    for e in events:
        if e["host"] in ("app1", "app2"):
            first, last = spans.get(e["host"], (e["ts"], e["ts"]))
            spans[e["host"]] = (min(first, e["ts"]), max(last, e["ts"]))
    (a_first, a_last), (b_first, b_last) = spans["app1"], spans["app2"]
    assert a_first < b_last and b_first < a_last, spans


def test_on_a_terminal_the_live_block_goes_and_the_plain_lines_stay(fresh_site):
    lab, _, _ = fresh_site
    with FabTerminal(lab.inventory, "site", TERM="xterm", RELEASY_PROGRESS="auto",
                     COLUMNS="100") as term:
        text = term.finish(120, "fab site under a terminal did not finish")
    assert term.exit_code == 0, text
    assert "\x1b[" in text and re.search(r"-- \d+ running, \d+ done", text), \
        "no live block was drawn"
    screen = Screen()
    screen.feed(text)
    final = screen.text_lines()
    assert final[-1].startswith("site: 0 changed"), final[-8:]
    for line in final:
        m = re.match(r"\[([^\]]+)\] ", line)
        assert (m and m.group(1) in LABELS) or SUMMARY_LINE.fullmatch(line), \
            f"left on the screen: {line!r}"
    assert not any(line.startswith("-- ") for line in final)


def test_hosts_go_on_as_soon_as_their_packages_are_in(fresh_site):
    """Only the database waits for the db host's install of PostgreSQL: each app host has
    its release uploaded before the db step begins, and every host's firewall (off on fresh
    hosts) is converged beside the other steps, done before the firewall step ends."""
    _, proc, _ = fresh_site
    out = proc.stdout
    assert f"[site] firewall off on {', '.join(HOSTS)}: each host's is converged" in out, out
    db_step = out.index("[site] --- db ---")
    for app in ("app1", "app2"):
        assert out.index(f"[{app}] changed: release 1.0.0 (uploaded") < db_step, out
    firewall_done = out.index("[site] firewall done in")
    for host in HOSTS:
        assert out.index(f"[{host}] changed: ufw enabled") < firewall_done, out
