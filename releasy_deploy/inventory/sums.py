"""The release's checksum files: ``sha256sum`` lists and ``<tarball>.sha256`` sidecars,
read when a checksum is needed (not at load time)."""
from __future__ import annotations

import re
from pathlib import Path

from .problems import FILE, InventoryError, Problem


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise InventoryError([Problem(str(path), FILE, f"cannot read: {reason}")]) from None


def _parse_sums(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Parse ``sha256sum`` output: ``<hex>  <name>`` or ``<hex> *<name>`` per line.

    Names are matched by their basename so ``./dir/name`` entries work too.
    """
    sums: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9A-Fa-f]{64}) [ *]?(\S.*)", line)
        if not m:
            problems.append((f"line {n}", "expected '<64 hex digits>  <file name>' (sha256sum format)"))
            continue
        name = m.group(2).strip().lstrip("*").rsplit("/", 1)[-1]
        digest = m.group(1).lower()
        if sums.get(name, digest) != digest:
            problems.append((f"line {n}", f"{name} is listed twice with different sums"))
        sums[name] = digest
    return sums, problems


def _parse_sidecar(path: Path, tarball: str) -> str:
    fields = _read_text(path).split()
    if not fields or not re.fullmatch(r"[0-9A-Fa-f]{64}", fields[0]):
        raise InventoryError([Problem(str(path), "line 1", "expected a sha256 hex digest (64 hex digits)")])
    if len(fields) > 1 and fields[1].lstrip("*").rsplit("/", 1)[-1] != tarball:
        raise InventoryError([Problem(str(path), "line 1", f"names {fields[1]!r}, expected {tarball!r}")])
    return fields[0].lower()
