"""Ctrl-C during a recovery: noted, not obeyed, until the recovery is done.

A rollout that fails (or is interrupted) puts the changed hosts back and restores the
rotation. A second Ctrl-C in the middle of that would leave hosts out of rotation, the
very state the recovery exists to undo; the recovery's steps are bounded, so it is let
finish and the interruption is honoured afterwards.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from .errors import Terminated

__all__ = ["deferred"]


@contextmanager
def deferred(what: str) -> Iterator[list[int]]:
    """Run the block with SIGINT and SIGTERM deferred; raise KeyboardInterrupt (or
    `Terminated` for SIGTERM) after it when one came (unless the block raised already).
    Yields the list of signals received. Outside the main thread (where no signal handler
    can be set) it changes nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        received.append(signum)
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"\n{name}: still {what}; it finishes first (the steps are bounded), then"
              f" the task stops.", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt
