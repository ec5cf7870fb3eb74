"""Shared test configuration: make the repository importable from every test."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption("--lab-shard", default=None, metavar="I/N",
                     help="run shard I of N: the unit tests (shard 1 only) and the lab work"
                          " tests/integration/conftest.py assigns to it; scripts/run-tests.py"
                          " runs the N shards at once, each on its own lab (LAB_ID)")
