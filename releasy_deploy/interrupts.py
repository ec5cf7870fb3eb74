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

__all__ = ["deferred"]


@contextmanager
def deferred(what: str) -> Iterator[list[int]]:
    """Run the block with SIGINT deferred; raise KeyboardInterrupt after it when one came
    (unless the block raised already). Yields the list of signals received. Outside the
    main thread (where no signal handler can be set) it changes nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        received.append(signum)
        print(f"\nCtrl-C: still {what}; it finishes first (the steps are bounded), then"
              f" the task stops.", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
