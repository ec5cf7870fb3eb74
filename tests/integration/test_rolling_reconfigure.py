"""`fab site` on an environment that serves (proxy1, app1..app3, db1), as an operator would:
a changed app setting is applied by the change engine's rolling reconfiguration (drain,
restart, /ready, re-add, one host at a time) under mixed load through the proxy, and every
task that changes hosts takes the deploy lock."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.labtools import (assert_no_failed_request, current, deploy_lock_held,
                                       load_through_proxy, main_pid, main_pids, ready,
                                       report_load, rotation, set_log_level)

pytestmark = [pytest.mark.lab, pytest.mark.lab_shape("split", 3)]

APPS = ("app1", "app2", "app3")


@pytest.fixture(scope="module")
def lab(lab_session):
    return lab_session.use("split", apps=3)


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory) -> Path:
    path = lab.inventory_variant(tmp_path_factory.mktemp("reconfigure"))
    lab.reset("1.0.0", inventory=path)
    return path


def restart_window(lab, host, since_us: int) -> tuple[int, int]:
    """(stop began, start done) of releasy.service on ``host`` since ``since_us``, in
    microseconds of the (shared) realtime clock, from the host's journal."""
    out = lab.sudo(host, "journalctl", "-u", "releasy.service", "-o", "json", "--since",
                   f"@{since_us // 1_000_000}", "--no-pager").stdout
    stops, starts = [], []
    for line in out.splitlines():
        entry = json.loads(line)
        message, when = str(entry.get("MESSAGE", "")), int(entry["__REALTIME_TIMESTAMP"])
        if when < since_us:
            continue
        if message.startswith("Stopping "):
            stops.append(when)
        elif message.startswith("Started "):
            starts.append(when)
    assert len(stops) == 1 and len(starts) == 1, (host, stops, starts)
    return stops[0], starts[0]


def test_a_changed_setting_is_rolled_host_by_host_without_a_failed_request(lab, inventory,
                                                                          tmp_path):
    before = main_pids(lab, APPS)
    set_log_level(lab, inventory, "debug")
    since_us = int(lab.ssh("db1", "date", "+%s%6N").stdout.strip())
    with load_through_proxy(lab, tmp_path / "load") as load:
        load.wait_until(lambda p: p["ok"] >= 100, timeout=60)
        proc = lab.fab("site", inventory=inventory)
        after = load.progress()["total"]
        load.wait_until(lambda p: p["total"] >= after + 100, timeout=60)
    summary = load.summary
    report_load("fab site applying app.log_level=debug (3 app hosts)", summary)
    assert_no_failed_request(load, summary)

    assert "rolling reconfiguration done: app1, app2, app3" in proc.stdout, proc.stdout
    for h in APPS:
        assert main_pid(lab, h) != before[h], f"{h} was not restarted"
        env = lab.sudo(h, "cat", "/etc/releasy/releasy.env").stdout
        assert 'RELEASY_LOG_LEVEL="debug"' in env, env
        assert ready(lab, h) and current(lab, h) == "1.0.0"
    assert rotation(lab) == list(APPS)
    # One at a time: each host's stop..start window ends before the next one's begins.
    windows = sorted(restart_window(lab, h, since_us) for h in APPS)
    for (_, started), (next_stop, _) in zip(windows, windows[1:]):
        assert started < next_stop, windows

    again = lab.fab("site", inventory=inventory)
    assert "site: 0 changed" in again.stdout
    assert "rolling reconfiguration" not in again.stdout


def test_site_and_setups_wait_for_the_lock_held_by_another_task(lab, inventory):
    with deploy_lock_held(inventory, "9.9.9"):
        set_log_level(lab, inventory, "warn")
        pids = main_pids(lab, APPS)
        for task in (["site"], ["app.setup"], ["proxy.setup"], ["firewall.apply"],
                     ["db.setup"]):
            proc = lab.fab(*task, inventory=inventory, check=False)
            assert proc.returncode == 3, (task, proc.stdout, proc.stderr)
            assert "held by" in proc.stderr and "version=9.9.9" in proc.stderr, proc.stderr
        # Nothing was touched: the env file still says debug, nothing restarted.
        for h in APPS:
            env = lab.sudo(h, "cat", "/etc/releasy/releasy.env").stdout
            assert 'RELEASY_LOG_LEVEL="debug"' in env, env
            assert main_pid(lab, h) == pids[h]
    set_log_level(lab, inventory, "debug")
