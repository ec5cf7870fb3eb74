"""Releasy deploy tasks (`fab --list`). The inventory is ./hosts.yaml, $RELEASY_INVENTORY, or
inventories/$RELEASY_ENV.yaml over inventories/base.yaml.

Exit codes: 0 ok, 1 a step failed, 2 bad input (nothing touched), 3 deploy lock busy,
4 host unreachable or host key rejected."""
import atexit
import gc
import sys
from pathlib import Path

# A `fab` run is a short process whose imports alone leave ~30,000 objects the collector
# tracks (Fabric and paramiko; the task's flow adds more). None of them is ever garbage.
# Frozen, a full collection skips them, and so does the last one while the interpreter
# tears down at exit: 40-100 ms of CPU per run, measured on `fab --list` and a no-op site.
gc.freeze()
atexit.register(gc.freeze)

# `fab -r fabfile` from elsewhere: make the library next to this package importable.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from invoke import Collection, Task  # noqa: E402

from fabfile import (  # noqa: E402
    adhoc, app, audit_log, bluegreen, db, deploy, firewall, inventory, proxy, site, status)


def tasks_of(module) -> Collection:
    """``Collection.from_module``, minus its isinstance() on every module attribute: that
    would load the library modules a task module names lazily (releasy_deploy/lazy.py)."""
    collection = Collection(module.__name__.rpartition(".")[2])
    collection.__doc__ = module.__doc__
    for obj in vars(module).values():
        if issubclass(type(obj), Task):
            collection.add_task(obj)
    return collection


ns = Collection()
ns.add_task(site.site)
ns.add_task(status.status)
ns.add_task(adhoc.run)
ns.add_task(audit_log.audit)
for module in (inventory, db, app, proxy, firewall, deploy):
    ns.add_collection(tasks_of(module))
# Blue/green lives in its own module but belongs with the other rollouts.
ns.collections["deploy"].add_task(bluegreen.bluegreen)
