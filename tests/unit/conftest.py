"""Session fixture: one real sshd on loopback for the executor/remote tests.

Helpers live in sshd_fixture.py; its directory is put on sys.path here so test modules can
`from sshd_fixture import ...` whatever pytest import mode is configured.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sshd_fixture import Sshd, running_sshd  # noqa: E402


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Sshd:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server
