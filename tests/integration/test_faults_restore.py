"""Faults injected into a restore (`fab db.restore --file NAME`) on the single-host lab
(proxy, app and SQLite database on `solo`): the N-th host-changing command of the run
really fails on the host (``RELEASY_FAULT=N``), or the host's SSH connection drops there
(``N:drop``).

A restore has downtime by design (the units stop while the data is replaced), so what must
hold is what the operator is told and what following it does. After every such failure:
exit 1 (4, or 1 for the lost lock, for a drop), no traceback, the host named, the deploy lock
free, and the paragraph true to the data: when it says the restore was applied the dump's
row is there, when it says the database is unchanged it is not. Then the operator runs the
same restore again and does what the paragraph says (`fab site` where Releasy stayed
stopped, the maintenance page off where it stayed on), and the site serves the dump's
data.

`make test` tries the first, a middle and the last point of each mode; `make faults`
(RELEASY_FAULT_POINTS=all) tries every one. The module ends with the site serving: lock
free, no maintenance page.
"""
from __future__ import annotations

import re

import pytest

from releasy_deploy.commands.nginx import maintenance_argv
from tests.integration.labtools import (FAULT_COUNT, FAULT_MODES, SOLO, fault_points,
                                       leave_serving, serving_through_proxy, sh, sqlite)

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("single", database="sqlite")]

# Failures the restore reports and goes on after: the audit record's write, the page on.
REPORTED_ONLY = ("releasy-audit /var/log/releasy-deploy",
                 maintenance_argv(True)[-1].split(";")[0])
# The row the dump holds and every faulted run finds deleted.
MARK_ID, MARK = 5151, "in the dump only"
APPLIED = ("WAS restored", "WAS fully applied")
UNCHANGED = ("the database is unchanged",)
START_AGAIN = "`fab site` starts it again"
PAGE_OFF = "fab proxy.maintenance --off"


def marked(lab) -> bool:
    return sqlite(lab, f"SELECT label FROM standin_m1 WHERE id = {MARK_ID}") == [MARK]


@pytest.fixture(scope="module")
def lab(lab_session):
    # Whatever release the modules before left live (the dump is taken from it below, at
    # the running migration level); provisioned here when the module runs on its own.
    handle = lab_session.use("single", database="sqlite")
    if not serving_through_proxy(handle, SOLO):
        handle = handle.reset("1.0.0")
    yield handle
    leave_serving(handle)


@pytest.fixture(scope="module")
def dump(lab) -> tuple[str, int]:
    """A dump holding the marked row; returns its name and the number of host-changing
    commands a clean restore of it runs."""
    sqlite(lab, f"INSERT OR REPLACE INTO standin_m1 (id, label) VALUES ({MARK_ID}, '{MARK}')")
    backup = lab.fab("db.backup").stdout
    name = next(word for word in backup.split() if word.endswith(".sqlite3")).rsplit("/")[-1]
    sqlite(lab, f"DELETE FROM standin_m1 WHERE id = {MARK_ID}")
    clean = lab.fab("db.restore", "--file", name, "--yes", env={"RELEASY_FAULT": "0"})
    assert marked(lab), "a clean restore did not bring the row back"
    return name, int(FAULT_COUNT.search(clean.stderr).group(1))


@pytest.mark.parametrize("mode", sorted(FAULT_MODES))
def test_every_injected_fault_in_a_restore_is_told_truly_and_a_rerun_restores(
        lab, dump, mode):
    name, total = dump
    assert total >= 4, f"a restore ran only {total} host-changing commands"
    tried = []
    for n in fault_points(total):
        where = f"fault #{n} of {total} in db.restore ({mode})"
        sqlite(lab, f"DELETE FROM standin_m1 WHERE id = {MARK_ID}")
        proc = lab.fab("db.restore", "--file", name, "--yes", check=False,
                       env={"RELEASY_FAULT": f"{n}{FAULT_MODES[mode][0]}"})
        said = proc.stdout + proc.stderr
        fired = next(line for line in proc.stderr.splitlines()
                     if line.startswith("fault injection:"))
        assert FAULT_MODES[mode][1] in fired, f"{where}: no command was replaced\n{said}"
        assert "Traceback" not in said, f"{where}\n{said}"
        if proc.returncode == 0:
            # Only where the restore reports and goes on: the audit record follows its last
            # change, and a page that does not come on only costs the downtime its 503s
            # (502s instead). A drop there can still stop it: the lock's session is lost.
            assert any(command in fired for command in REPORTED_ONLY), f"{where}: exit 0\n{said}"
            assert f"[{SOLO}] ERROR: " in proc.stdout, f"{where}: not reported\n{said}"
            assert marked(lab), f"{where}: exit 0, the row is missing\n{said}"
        else:
            # A drop on the single host also ends the session holding the deploy lock: the
            # run may stop on the lost lock (1) as well as on the lost connection (4).
            assert proc.returncode in set(FAULT_MODES[mode][2]) - {0}, \
                f"{where}: exit {proc.returncode}\n{said}"
            # "error: solo: ..." or, from a step run on every host, "- solo: ..."
            assert re.search(rf"^(error: |- ){SOLO}: ", proc.stderr, re.MULTILINE), \
                f"{where}: the host is not named\n{said}"
        # What the operator is told about the data is what the data is.
        claim = "no claim about the data"
        if any(words in proc.stderr for words in APPLIED):
            claim = "said: applied"
            assert marked(lab), f"{where}: said applied, the row is missing\n{said}"
        if any(words in proc.stderr for words in UNCHANGED):
            claim = "said: unchanged"
            assert not marked(lab), f"{where}: said unchanged, the row is there\n{said}"
        lock = lab.fab("deploy.lock")
        assert lock.stdout.strip() == "deploy lock of lab: free", f"{where}\n{lock.stdout}"
        # The same restore again, then what the paragraph says to do: the site serves the
        # dump's data.
        followed = [lab.fab("db.restore", "--file", name, "--yes")]
        if START_AGAIN in proc.stderr:
            followed.append(lab.fab("site"))
        if PAGE_OFF in proc.stderr:
            followed.append(lab.fab("proxy.maintenance", "--off"))
        assert marked(lab), where
        assert serving_through_proxy(lab, SOLO), (
            f"{where}: nginx does not answer /ready\n{said}\n--- then\n"
            + "\n".join(f.stdout for f in followed))
        error = next((line for line in proc.stderr.splitlines()
                      if line.startswith("error: ")), "(reported only)")
        tried.append(f"#{n}: exit {proc.returncode}, {claim}; {error[:90]}")
    print(f"\nfault injection ({mode}): {len(tried)} of {total} points of a restore tried;"
          f" each told the truth about the data and a re-run restored it:\n  "
          + "\n  ".join(tried))


def test_site_starts_the_live_unit_a_restore_left_stopped(lab, dump):
    """What the paragraph of a restore whose `start` failed tells the operator to run, on
    whichever unit serves (releasy.service, or a blue/green releasy@PORT after the blue/green
    sweep): `fab site` starts it as it is."""
    live = sh(lab, "systemctl", "list-units", "--state=active", "--plain", "--no-legend",
              "releasy.service", "releasy@*.service").split()[0]
    lab.sudo(SOLO, "systemctl", "stop", live)
    assert not serving_through_proxy(lab, SOLO)
    site = lab.fab("site")
    assert f"[{SOLO}] changed: {live} started (was inactive)" in site.stdout, site.stdout
    assert serving_through_proxy(lab, SOLO)
