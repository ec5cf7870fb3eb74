"""A no-op `fab site` on the split lab costs at most NO_OP_SITE_ROUND_TRIPS SSH round trips
per host and exactly one, its read, per app host (the audit record of a run that changed
nothing goes to the database host only), over one connection per host, as counted by the
executor and reported by the real CLI in its JSON log (the `round_trips` events written
when the session ends)."""
from __future__ import annotations

import json
import re

import pytest

from releasy_deploy.inventory import load_inventory
from tests.integration.labtools import (AUDIT_LOG, NO_OP_SITE_APP_HOST_ROUND_TRIPS,
                                       NO_OP_SITE_ROUND_TRIPS, audit_line_counts,
                                       site_round_trips)


@pytest.fixture(scope="module")
def provisioned(split_lab):
    """The split lab with every tier set up, whatever earlier modules left on it."""
    return split_lab.reset("1.0.0")


def test_a_no_op_site_costs_a_few_round_trips_per_host(provisioned, tmp_path):
    inv = load_inventory(provisioned.inventory)
    hosts = {h.name for h in inv.hosts}
    logged = audit_line_counts(provisioned, hosts)
    out, counted = site_round_trips(provisioned, tmp_path / "site.jsonl")
    assert re.search(r"^site: 0 changed", out, re.MULTILINE), out
    assert set(counted) == hosts, counted  # every host was looked at
    over = {h: n for h, (n, _) in counted.items() if n > NO_OP_SITE_ROUND_TRIPS}
    assert not over, f"round trips per host above {NO_OP_SITE_ROUND_TRIPS}: {counted}"
    apps = {h.name for h in inv.hosts_in("app")}
    assert {counted[h][0] for h in apps} == {NO_OP_SITE_APP_HOST_ROUND_TRIPS}, counted
    assert all(conns == 1 for _, conns in counted.values()), counted
    # The run is in the trail, on the database host only: no other host's log grew.
    db = inv.db_host.name
    assert audit_line_counts(provisioned, hosts) == {**logged, db: logged[db] + 1}
    record = json.loads(provisioned.sudo(db, "tail", "-n1", AUDIT_LOG).stdout)
    assert record["action"] == "site" and record["result"] == "ok" and record["changed"] == {}


def test_a_no_op_site_with_its_version_costs_what_one_without_does(provisioned, tmp_path):
    """`fab site --version V` checks V against the database's migration level on the facts
    its first read took: not one round trip more on any host (the db host's level and
    backups are read with every tier's facts)."""
    _, plain = site_round_trips(provisioned, tmp_path / "plain.jsonl")
    out, pinned = site_round_trips(provisioned, tmp_path / "pinned.jsonl", "--version", "1.0.0")
    assert re.search(r"^site: 0 changed", out, re.MULTILINE), out
    assert pinned == plain
