"""Local command helpers for the lab (root on the developer's machine; argv lists only)."""
from __future__ import annotations

import subprocess
import sys
from typing import Sequence


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, quiet: bool = False, check: bool = True,
        input: bytes | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a local command; on failure show its output (it was captured when quiet)."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        tail = "\n".join(output.splitlines()[-25:])
        raise SystemExit(f"lab: command failed ({proc.returncode}): {' '.join(argv)}\n{tail}")
    if not quiet and proc.stderr and proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace"))
    return proc


def ok(argv: Sequence[str]) -> bool:
    return subprocess.run(list(argv), capture_output=True).returncode == 0
