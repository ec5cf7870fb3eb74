"""How the inventory reports what is wrong: `Problem` (one ``FILE: YAML.PATH: message``
line) and `InventoryError`, which carries every problem found in one run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ROOT = "(top level)"
FILE = "(file)"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file; ``path`` is the YAML path (or a file location)."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class InventoryError(Exception):
    """Every problem found in an inventory (or secrets file), one per line."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems: list[Problem] = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)
