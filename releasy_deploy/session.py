"""What one task run works with: the inventory, the secrets, the executor (SSH) and the
reporter, plus the operator's answer to "go ahead?".

The library never prompts and never exits: it asks ``Session.confirm`` (supplied by the
operator edge, `releasy_deploy.cli`) and raises typed errors (`releasy_deploy.errors`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import BadInput
from .executor import Executor
from .inventory import Inventory
from .output import Reporter
from .secrets import Secrets


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

    @property
    def dry_run(self) -> bool:
        return self.executor.dry_run
