"""A no-op `fab site` on the split lab costs at most 2 SSH round trips per host (every tier's
facts in one read; the proxy also runs the smoke test), over one connection per host, as counted by the executor and reported by the real CLI in its JSON
log (the `round_trips` events written when the session ends)."""
from __future__ import annotations

import json
import re

import pytest

from releasy_deploy.inventory import load_inventory

MAX_ROUND_TRIPS_PER_HOST = 2


@pytest.fixture(scope="module")
def provisioned(split_lab):
    """The split lab with every tier set up. An earlier module may have provisioned it (and
    left some release running): converge what is there; a fresh lab gets 1.0.0."""
    installed = split_lab.ssh("app1", "test", "-L", "/opt/releasy/current", check=False)
    if installed.returncode == 0:
        split_lab.fab("site")
    else:
        split_lab.fab("site", "--version", "1.0.0")
    return split_lab


def test_a_no_op_site_costs_at_most_two_round_trips_per_host(provisioned, tmp_path):
    log = tmp_path / "site.jsonl"
    proc = provisioned.fab("site", env={"RELEASY_JSON_LOG": str(log)})
    assert re.search(r"^site: 0 changed", proc.stdout, re.MULTILINE), proc.stdout
    events = [json.loads(line) for line in log.read_text().splitlines()]
    counted = {e["host"]: (e["round_trips"], e["connections"])
               for e in events if e["event"] == "round_trips"}
    hosts = {h.name for h in load_inventory(provisioned.inventory).hosts}
    assert set(counted) == hosts, counted  # every host was looked at
    over = {h: n for h, (n, _) in counted.items() if n > MAX_ROUND_TRIPS_PER_HOST}
    assert not over, f"round trips per host above {MAX_ROUND_TRIPS_PER_HOST}: {counted}"
    assert all(conns == 1 for _, conns in counted.values()), counted
