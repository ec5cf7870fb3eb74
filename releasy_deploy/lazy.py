"""Modules loaded on first use, named at the top of the module that uses them.

Every `fab` run imports the whole fabfile to learn the task names, but a run executes one
task: importing every flow, tier and template engine up front cost ~0.4 s of each run
(`fab --list` included) for code the task never touches. The edge (``fabfile/``,
``cli.py``) therefore names the library modules it calls with `lazy_module` at module
level, like an import, and the module is executed on the first attribute access (the
task's body, in the main thread). The project keeps imports out of function bodies; this
keeps them at the top of the file too, where a reader looks for them.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

__all__ = ["lazy_module"]


def lazy_module(name: str) -> ModuleType:
    """The module ``name`` (absolute), executed on its first attribute access; the module
    itself when it is imported already. A missing module fails here, at once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
