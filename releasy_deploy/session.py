"""What one task run works with: the inventory, the secrets, the executor (SSH) and the
reporter, plus the operator's answer to "go ahead?".

The library never prompts and never exits: it asks ``Session.confirm`` (supplied by the
operator edge, `releasy_deploy.cli`) and raises typed errors (`releasy_deploy.errors`)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import BadInput
from .executor import Executor
from .inventory import Inventory
from .output import Reporter
from .secrets import Secrets


def split_names(spec: str) -> list[str]:
    """``app1,app2`` (fab's -H syntax, also --limit's and --host's) -> the names, in order,
    each once; empty items (a trailing comma) are dropped."""
    return list(dict.fromkeys(n.strip() for n in str(spec).split(",") if n.strip()))


def select_hosts(inventory: Inventory, spec: str, flag: str = "--limit") -> list[Any]:
    """The inventory's hosts named by ``spec`` (comma-separated), in inventory order.
    BadInput (exit 2) naming every unknown name and the hosts there are."""
    names = split_names(spec)
    known = [h.name for h in inventory.hosts]
    unknown = [n for n in names if n not in known]
    if not names:
        raise BadInput(f"{flag}: no host named; hosts are {', '.join(known)}")
    if unknown:
        raise BadInput(f"{flag} {spec}: {', '.join(unknown)} "
                       f"{'is' if len(unknown) == 1 else 'are'} not in {inventory.path};"
                       f" hosts are {', '.join(known)}. Nothing was changed.")
    return [h for h in inventory.hosts if h.name in names]


def refuse_unconfirmed(question: str, *, yes: bool) -> None:
    """The confirmation policy without a person to ask: go on only with ``--yes``."""
    if not yes:
        raise BadInput(f"{question}\n  nobody can answer here: re-run with --yes to confirm")


@dataclass
class Session:
    inventory: Inventory
    secrets: Secrets
    executor: Executor
    reporter: Reporter
    #: ``confirm(question, yes=...)`` returns to go ahead, raises BadInput otherwise.
    confirm: Callable[..., None] = field(default=refuse_unconfirmed)
    #: values read from the hosts once per task run, keyed by the function that reads
    #: them (e.g. the database URL: the lock and the app tier both need it).
    memo: dict[Callable[..., Any], Any] = field(default_factory=dict)
    #: what a rollout recorded in its audit entry (versions, hosts changed): for the hooks
    outcome: dict[str, Any] = field(default_factory=dict)
    #: ``--limit`` (or fab's -H): the only hosts a converging task changes; None: all.
    #: Plans (the firewall's rules, the proxies' upstreams) still derive from every host.
    limit: frozenset[str] | None = None

    def targets(self, hosts: Iterable[Any]) -> list[Any]:
        """``hosts`` within the limit (all of them without one)."""
        return [h for h in hosts if self.limit is None or h.name in self.limit]

    def limit_to(self, spec: str | None) -> None:
        """Apply ``--limit H[,H...]`` (validated against the inventory; BadInput)."""
        if spec:
            self.limit = frozenset(h.name for h in select_hosts(self.inventory, spec))

    @property
    def dry_run(self) -> bool:
        return self.executor.dry_run
