"""The live status block drawn under the event lines on a terminal: whether to draw it
(`live_wanted`), its rows (`LiveBlock`, pure: no I/O, no clock), and the stand-in for
sys.stdout/sys.stderr that erases it before any other write (`_TerminalProxy`). The
`Reporter` in `output` owns the drawing."""
from __future__ import annotations

import io
import logging
import os
import sys
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Mapping

from .screen_text import fit, format_elapsed

if TYPE_CHECKING:
    from .output import Reporter

#: ``plain`` never draws the live status block; anything else: live when on a terminal.
PROGRESS_ENV = "RELEASY_PROGRESS"
#: seconds between redraws of the live block (elapsed times and the spinner move).
LIVE_TICK_S = 0.25

_CSI = "\x1b["
_SPINNER = "|/-\\"


def live_wanted(stream: IO[str] | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Should a Reporter writing to ``stream`` (None: sys.stdout) draw the live block?"""
    if environ.get(PROGRESS_ENV, "").strip().lower() == "plain":
        return False
    if environ.get("TERM", "") == "dumb":
        return False
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return False  # `fab --debug`: log lines go to stderr behind our back
    target = stream if stream is not None else sys.stdout
    if isinstance(target, _TerminalProxy):
        return False  # another reporter's block is on the screen already
    try:
        return bool(target.isatty())
    except (AttributeError, ValueError, OSError):
        return False


# --------------------------------------------------------------------------------------
# The live status block
# --------------------------------------------------------------------------------------
@dataclass
class HostStatus:
    """What the live block shows for one host (or pipeline label)."""

    label: str
    stage: str = ""
    message: str = ""
    since: float = 0.0  # when the current stage (or the first event) started
    ended: float | None = None  # a stage finished: the row is frozen
    failed: bool = False
    seq: int = 0  # first-seen order

    def elapsed(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.since


class LiveBlock:
    """The per-host status rows and the header above them (pure: no I/O, no clock)."""

    def __init__(self) -> None:
        self.hosts: dict[str, HostStatus] = {}

    def note(self, host: str, event: str, message: str, now: float, *,
             stage: str | None = None) -> None:
        first = (message.splitlines() or [""])[0]
        st = self.hosts.get(host)
        if st is None:
            st = self.hosts[host] = HostStatus(host, since=now, seq=len(self.hosts))
        if event == "stage" and stage is not None:
            if first.startswith("done in"):
                st.ended, st.message = now, f"{stage} {first}"
                return
            if first.startswith("FAILED"):
                st.ended, st.failed, st.message = now, True, first
                return
            st.stage, st.since, st.ended, st.message = stage, now, None, first
            return
        if event == "error":
            st.failed = True
            st.message = f"ERROR: {first}"
            return
        if st.ended is not None and not st.failed:
            # A finished stage, then more work on the same host: running again.
            st.ended, st.since = None, now
        prefix = {"changed": "changed: ", "unchanged": "ok: ", "would": "would ",
                  "diff": "diff ", "stdout": "| ", "stderr": "! "}.get(event, "")
        if event == "diff":
            first = message if len(message) < 80 else ""
        st.message = prefix + first

    def rows(self, now: float, width: int, height: int, tick: int, *,
             started: float, unicode: bool = False) -> list[str]:
        """Header + one row per host, each at most ``width - 1`` characters (a character
        in the last column would wrap on some terminals and break the redraw)."""
        if not self.hosts:
            return []
        width = max(20, width - 1)
        hosts = sorted(self.hosts.values(), key=lambda s: s.seq)
        running = [s for s in hosts if s.ended is None and not s.failed]
        failed = sum(1 for s in hosts if s.failed)
        done_mark, fail_mark = ("\u2713", "\u2717") if unicode else ("+", "!")
        header = (f"-- {len(running)} running, {len(hosts) - len(running) - failed} done"
                  + (f", {failed} FAILED" if failed else "")
                  + f" -- {format_elapsed(now - started)} --")
        room = max(3, height - 2)
        shown = hosts
        if len(hosts) > room:
            # Failed hosts first, then running ones, the most recently started first.
            shown = sorted(hosts, key=lambda s: (not s.failed, s.ended is not None,
                                                 -s.since))[: room - 1]
            shown.sort(key=lambda s: s.seq)
        # Column widths shrink with the terminal so the message keeps some room.
        hw = min(max(len(s.label) for s in shown), 24, max(6, width // 4))
        sw = min(max((len(s.stage) for s in shown), default=0), 12, max(4, width // 6))
        out = [fit(header, width)]
        for s in shown:
            mark = fail_mark if s.failed else done_mark if s.ended is not None else \
                _SPINNER[(tick + s.seq) % len(_SPINNER)]
            right = format_elapsed(s.elapsed(now))
            left = f"{mark} {fit(s.label, hw):<{hw}}  "
            if sw:
                left += f"{fit(s.stage, sw):<{sw}}  "
            room_msg = width - len(left) - len(right) - 1
            left += fit(s.message, room_msg).ljust(max(0, room_msg))
            out.append(fit(f"{left} {right}", width))
        if len(shown) < len(hosts):
            out.append(fit(f"   ... and {len(hosts) - len(shown)} more", width))
        return out


class _TerminalProxy(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr while the live block is shown, so a ``print``
    from anywhere erases the block first. ``fileno`` is deliberately unsupported: then
    ``input()`` writes its prompt through us (and the block steps aside) instead of going
    straight to the terminal."""

    def __init__(self, reporter: "Reporter", target: IO[str]) -> None:
        super().__init__()
        self._reporter = reporter
        self.target = target

    def write(self, text: str) -> int:
        self._reporter._foreign_write(self.target, text)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.target, "errors", None)
