"""A no-op `fab site` on the split lab costs at most 3 SSH round trips per host, over one
connection per host, as counted by the executor and reported by the real CLI in its JSON
log (the `round_trips` events written when the session ends)."""
from __future__ import annotations

import json
import re

import pytest

from releasy_deploy.inventory import load_inventory

MAX_ROUND_TRIPS_PER_HOST = 3


@pytest.fixture(scope="module")
def provisioned(split_lab):
    """The split lab with every tier set up, whatever earlier modules left on it."""
    return split_lab.reset("1.0.0")


def test_a_no_op_site_costs_at_most_three_round_trips_per_host(provisioned, tmp_path):
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
