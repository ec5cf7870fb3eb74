"""The lab's Debian suites: which suite each host runs, flag validation, and the image cache
keyed on the suite (pure: nothing is built)."""
from __future__ import annotations

import pytest

from lab import image, net
from lab.config import LabIdentity, topology_hosts
from lab.lab import LabRequest


def test_the_default_lab_stays_bookworm():
    req = LabRequest().normalized()
    assert {req.suite_of(s) for s in topology_hosts("split", 2)} == {"bookworm"}


def test_a_mixed_lab_puts_only_the_db_host_on_the_other_suite():
    req = LabRequest("split", 2, suite="trixie", db_suite="bookworm").normalized()
    assert {s.name: req.suite_of(s) for s in topology_hosts("split", 2)} == {
        "proxy1": "trixie", "app1": "trixie", "app2": "trixie", "db1": "bookworm"}
    # The request is what lab.up compares to decide "already up": the suites are part of it.
    assert req != LabRequest("split", 2, suite="trixie").normalized()


def test_suites_are_validated():
    with pytest.raises(SystemExit, match="--suite must be one of bookworm, trixie"):
        LabRequest(suite="bullseye").normalized()
    with pytest.raises(SystemExit, match="--db-suite must be one of"):
        LabRequest(db_suite="sid").normalized()
    with pytest.raises(SystemExit, match="--db-suite needs --topology split"):
        LabRequest("single", suite="trixie", db_suite="bookworm").normalized()
    single = LabRequest("single", suite="trixie").normalized()
    assert single.suite_of(topology_hosts("single", 1)[0]) == "trixie"


def test_the_image_cache_keys_on_the_suite():
    assert image.base_dir("bookworm") != image.base_dir("trixie")
    assert image.base_dir("trixie").name.startswith("base-trixie-")
    assert image.repo_dir("trixie").name.startswith("apt-repo-trixie-")
    assert image.base_dir("bookworm").name.split("-")[-1] != \
        image.base_dir("trixie").name.split("-")[-1]


@pytest.mark.parametrize("lab_id", ["", "7", "35", "101", "200"])
def test_veth_names_fit_and_never_repeat_whatever_the_lab_id(lab_id):
    """A 3-digit LAB_ID (the test shards' 101, 102) cuts `lab101-proxy1`: both of proxy1's
    interfaces (public and the bastion's private network) still get their own pair."""
    ident = LabIdentity(lab_id)
    names = [end for host in ("proxy1", "proxy2", "bastion", "app1", "app40", "db1", "solo")
             for ifname in ("eth0", "eth1") for end in net._veth_names(ident, host, ifname)]
    assert len(set(names)) == len(names)
    assert max(map(len, names)) <= 15
