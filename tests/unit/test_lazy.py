"""releasy_deploy.lazy: a module named at the top of the edge is imported on first use, once,
whichever thread gets there first, and never stands in sys.modules for the library."""
from __future__ import annotations

import importlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from releasy_deploy.lazy import import_in_background, lazy_module

ROOT = Path(__file__).resolve().parents[2]

# A slow module body: a second thread arriving while the first one runs it must wait for
# the whole module, not see it half-executed (what LazyLoader does on Python 3.11).
SLOW_MODULE = """\
import time
LOADS = globals().get("LOADS", 0) + 1
time.sleep(0.3)
ANSWER = 42
"""


@pytest.fixture
def slow_module(tmp_path, monkeypatch):
    name = f"releasy_lazy_probe_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_imported_on_first_attribute_access_not_before(slow_module):
    deferred = lazy_module(slow_module)
    assert slow_module not in sys.modules
    assert deferred.ANSWER == 42 and deferred.LOADS == 1
    assert sys.modules[slow_module].ANSWER == 42
    assert lazy_module(slow_module) is sys.modules[slow_module]  # imported: the module itself


def test_threads_arriving_together_all_see_the_whole_module(slow_module):
    deferred = lazy_module(slow_module)
    seen, failures = [], []

    def use():
        try:
            seen.append(deferred.ANSWER)
        except AttributeError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and seen == [42] * 8
    assert sys.modules[slow_module].LOADS == 1


def test_a_missing_module_fails_at_once():
    with pytest.raises(ModuleNotFoundError):
        lazy_module("releasy_deploy.no_such_module")


def test_a_submodule_is_found_without_importing_its_package(tmp_path, monkeypatch):
    # importlib.util.find_spec("pkg.sub") imports pkg: for releasy_deploy.status.render that
    # was the whole status flow on every `fab` run.
    package = tmp_path / "releasy_lazy_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('package imported')\n")
    (package / "sub.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy_module("releasy_lazy_pkg.sub")
    assert "releasy_lazy_pkg" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        lazy_module("releasy_lazy_pkg.missing")
    with pytest.raises(ModuleNotFoundError):
        lazy_module("releasy_lazy_pkg.sub.deeper")  # a plain module has no submodules


def test_loading_the_fabfile_imports_no_flow():
    # What `fab --list` and every task's start-up pay before the task runs.
    probe = ("import sys, fabfile; print(' '.join(sorted(m for m in sys.modules"
             " if m.startswith(('releasy_deploy', 'jinja2', 'psycopg', 'rich')))))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    assert set(loaded) <= {"releasy_deploy", "releasy_deploy.cli", "releasy_deploy.commands",
                           "releasy_deploy.commands.systemd", "releasy_deploy.errors",
                           "releasy_deploy.lazy"}, loaded


def test_a_background_import_is_waited_for_by_the_import_that_needs_it(slow_module):
    import_in_background(slow_module)
    deadline = time.monotonic() + 10
    while slow_module not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.01)  # the background thread has begun the module's body
    assert slow_module in sys.modules
    module = importlib.import_module(slow_module)  # arrives while that body sleeps
    assert module.ANSWER == 42 and module.LOADS == 1


def test_a_background_import_that_fails_leaves_the_error_to_the_next_import(tmp_path,
                                                                             monkeypatch):
    (tmp_path / "releasy_lazy_broken.py").write_text("raise ImportError('no driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    threads = set(threading.enumerate())
    import_in_background("releasy_lazy_broken")
    for thread in set(threading.enumerate()) - threads:
        thread.join(timeout=10)
    with pytest.raises(ImportError, match="no driver"):
        importlib.import_module("releasy_lazy_broken")
