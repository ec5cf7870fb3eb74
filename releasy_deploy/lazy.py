"""Modules loaded on first use, named at the top of the module that uses them.

Every `fab` run imports the whole fabfile to learn the task names, but a run executes one
task: importing every flow, tier and template engine up front cost ~0.4 s of each run
(`fab --list` included) for code the task never touches. The edge (``fabfile/``,
``cli.py``) therefore names the library modules it calls with `lazy_module` at module
level, like an import, and the module is imported on the first attribute access (in the
task's body). The project keeps imports out of function bodies; this keeps them at the top
of the file too, where a reader looks for them. This is the one place that loads modules
lazily.

Not `importlib.util.LazyLoader`: it puts a placeholder in ``sys.modules``, so the library's
own ``from . import x`` would get the placeholder too and could first touch it from a
worker thread of `Executor.each`, where Python 3.11's lazy module is not thread-safe (a
second thread sees a half-executed module). The stand-in here is never in
``sys.modules``: the library's imports stay ordinary, and the first access imports the
module through the import system, whose per-module lock makes a concurrent access wait.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["lazy_module", "import_in_background"]


class _Deferred(ModuleType):
    """Stands for module ``name`` and reads every attribute through to it, importing it on
    the first access."""

    def __getattr__(self, attr: str) -> Any:
        # Only for names the stand-in itself lacks, i.e. every name of the module.
        module = self.__dict__.get("_releasy_module")
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_releasy_module"] = module
        return getattr(module, attr)


def lazy_module(name: str) -> ModuleType:
    """The module ``name`` (absolute), imported on its first attribute access; the module
    itself when it is imported already. A missing module fails here, at once."""
    if name in sys.modules:
        return sys.modules[name]
    if not _exists(name):
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    return _Deferred(name)


def _exists(name: str) -> bool:
    """Whether module ``name`` can be found, without importing any package on its way:
    ``importlib.util.find_spec("a.b.c")`` imports ``a.b`` (the whole status flow, for one).
    Each part is looked up by the path finder in its parent's directories."""
    path = None
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        module = sys.modules.get(prefix)
        if module is not None:
            path = getattr(module, "__path__", None)
            continue
        spec = importlib.machinery.PathFinder.find_spec(prefix, path)
        if spec is None:
            return False
        path = spec.submodule_search_locations
        if path is None and depth < len(parts):
            return False  # a plain module has no submodules
    return True


def import_in_background(name: str) -> None:
    """Start importing module ``name`` in a daemon thread, for a caller that is about to
    wait on its hosts and will need the module after: the import's CPU time then overlaps
    that wait instead of following it. A later ordinary import finds the module done, or
    waits for this one to finish (the import system's per-module lock). A failure is left
    for that later import to raise, where it belongs."""
    if name in sys.modules:
        return

    def load() -> None:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- raised again by the import that needs it
            pass

    threading.Thread(target=load, name=f"import {name}", daemon=True).start()
