"""Thread-safe, per-host prefixed output, secret masking and an optional JSON-lines event log.

Several hosts run in parallel, so every write here emits whole lines under one lock: a
line from one host can never be split by a line from another. Everything printed or logged
goes through the `Masker` first.

Two ways to show progress, chosen once per `Reporter`:

- plain (not a terminal: cron, CI, a pipe, a test): every event is one or more whole
  ``[host] ...`` lines, nothing else;
- live (stdout is a terminal): the same lines scroll by, and under them a compact status
  block (one row per host: stage, last event, elapsed) is redrawn in place a few times a
  second. The block is erased before anything else is written (our events, and any other
  ``print`` or ``sys.stderr`` write while it is shown), so no line is ever cut by it, and
  it is gone before the summary: what stays on the screen is exactly the plain output.
  ``RELEASY_PROGRESS=plain`` turns it off; so do ``TERM=dumb`` and debug logging.

Its parts, every name still importable from here: `masking` (the `Masker`), `live_block`
(the status block and the terminal stand-in) and `screen_text` (`fit`, `format_elapsed`,
`one_screen`).
"""
from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable

# Also re-exported: callers and tests know one module, `output`.
from .live_block import (_CSI, LIVE_TICK_S, PROGRESS_ENV, HostStatus, LiveBlock, _TerminalProxy,
                         live_wanted)
from .masking import MASK, MIN_SECRET_LEN, MIN_SECRET_LINE_LEN, Masker
from .screen_text import ONE_SCREEN_LINES, fit, format_elapsed, one_screen


@dataclass
class HostTally:
    changed: int = 0
    unchanged: int = 0
    would: int = 0
    errors: int = 0

# --------------------------------------------------------------------------------------
# The reporter
# --------------------------------------------------------------------------------------
class Reporter:
    """Prints ``[host] ...`` lines; counts changes per host for `summary`.

    ``stream`` defaults to stdout. With ``json_path``, every event is also appended to that
    file as one JSON object per line (ts, host, event, message[, path]) for cron/monitoring.
    ``live``: draw the live status block (default: when the stream is a terminal, see
    `live_wanted`).
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        json_path: str | Path | None = None,
        masker: Masker | None = None,
        clock=time.monotonic,
        live: bool | None = None,
        terminal_size: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self._stream = stream
        # Re-entrant: a print() inside our own write path must not deadlock.
        self._lock = threading.RLock()
        self.masker = masker or Masker()
        self._clock = clock
        self._started = clock()
        self._tally: dict[str, HostTally] = {}
        self._json: IO[str] | None = None
        if json_path is not None:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created 0600: events name hosts, paths and versions, nothing for others to read.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._json = os.fdopen(fd, "a", encoding="utf-8")
        # Live view state (all under _lock).
        self._live_enabled = live_wanted(stream) if live is None else live
        self._live_on = False  # the block may be on screen (between start and end)
        self._live_done = False  # ended (summary/close): plain from then on
        self._block = LiveBlock()
        self._term: IO[str] | None = None  # the real terminal stream while live
        self._drawn = 0  # rows of the block currently on screen
        self._paused = 0  # >0: nothing is drawn (an interactive program owns the terminal)
        self._held = False  # a prompt without newline was written: don't draw over it
        self._tick = 0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._proxies: dict[str, _TerminalProxy] = {}
        self._terminal_size = terminal_size

    @property
    def live(self) -> bool:
        """True while the live block is in use (a terminal, and the task is running)."""
        return self._live_enabled and not self._live_done

    # -- events -------------------------------------------------------------------------
    def info(self, host: str, msg: str) -> None:
        self._emit(host, "info", msg)

    def output(self, host: str, line: str, *, stderr: bool = False) -> None:
        """One line of remote command output (echo mode)."""
        self._emit(host, "stderr" if stderr else "stdout", line, prefix="! " if stderr else "| ")

    def changed(self, host: str, what: str) -> None:
        self._count(host, "changed")
        self._emit(host, "changed", what, prefix="changed: ")

    def unchanged(self, host: str, what: str) -> None:
        self._count(host, "unchanged")
        self._emit(host, "unchanged", what, prefix="ok: ")

    def would(self, host: str, what: str) -> None:
        """Dry-run: ``what`` reads after "would", e.g. ``"run: apt-get ..."``."""
        self._count(host, "would")
        self._emit(host, "would", what, prefix="would ")

    def error(self, host: str, msg: str) -> None:
        self._count(host, "errors")
        self._emit(host, "error", msg, prefix="ERROR: ")

    def stage(self, host: str, stage: str, msg: str, **fields: object) -> None:
        """A rollout pipeline event: ``[host] <stage> msg``; fields go to the JSON log."""
        self._emit(host, "stage", msg, prefix=f"{stage}: ", extra={"stage": stage, **fields},
                   stage=stage)

    def diff(self, host: str, path: str, unified_diff_text: str) -> None:
        self._emit(host, "diff", unified_diff_text, prefix="  ", extra={"path": path})

    # -- summary ------------------------------------------------------------------------
    def tally(self) -> dict[str, HostTally]:
        with self._lock:
            return {h: HostTally(**vars(t)) for h, t in self._tally.items()}

    def summary(self) -> str:
        """Print and return one line per host plus the elapsed time since creation.

        Labels that only reported information (a pipeline's name, ``site``) are left out
        unless nothing else was reported. Ends the live block first.
        """
        self.end_live()
        elapsed = self._clock() - self._started
        tally = self.tally()
        counted = {h: t for h, t in tally.items() if t.changed or t.unchanged or t.would or t.errors}
        if counted:
            tally = counted
        width = max((len(h) for h in tally), default=0)
        lines = []
        for host in sorted(tally):
            t = tally[host]
            parts = [f"{t.changed} changed", f"{t.unchanged} unchanged"]
            if t.would:
                parts.append(f"{t.would} would change")
            parts.append(f"FAILED ({t.errors} errors)" if t.errors else "ok")
            lines.append(f"{host.ljust(width)}  " + " / ".join(parts))
        failed = sum(1 for t in tally.values() if t.errors)
        lines.append(f"{len(tally)} host{'' if len(tally) == 1 else 's'}, {failed} failed,"
                     f" {elapsed:.1f} s")
        text = "\n".join(lines)
        with self._lock:
            out = self._out()
            out.write(text + "\n")
            out.flush()
            self._write_json(
                {"host": None, "event": "summary", "message": text, "elapsed_s": round(elapsed, 3)}
            )
        return text

    def close(self) -> None:
        self.end_live()
        with self._lock:
            if self._json is not None:
                self._json.close()
                self._json = None

    # -- the live block -------------------------------------------------------------------
    def end_live(self) -> None:
        """Erase the live block for good and put sys.stdout/sys.stderr back; from now on
        this reporter prints plain lines only. Idempotent."""
        with self._lock:
            self._live_done = True
            if not self._live_on:
                return
            self._live_on = False
            self._stop.set()
            self._write_term(self._clear_seq())
            for name, proxy in self._proxies.items():
                if getattr(sys, name) is proxy:
                    setattr(sys, name, proxy.target)
            self._proxies.clear()
            ticker = self._ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(timeout=2)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hand the terminal to something else for a while (an interactive program, a
        prompt): the live block is erased and not drawn again until the block exits."""
        with self._lock:
            self._paused += 1
            if self._live_on:
                self._write_term(self._clear_seq())
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._held = False
                if self._live_on and not self._paused:
                    self._write_term(self._draw_seq())

    def _start_live(self) -> None:
        # Under _lock. The terminal is the stream resolved now; prints go through proxies.
        self._live_on = True
        self._term = self._out()
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if isinstance(current, _TerminalProxy):
                continue
            if name == "stdout" and current is not self._term:
                continue  # we write to some other stream: leave stdout alone
            try:
                if name == "stderr" and not current.isatty():
                    continue  # stderr goes elsewhere (a file): no clash with the block
            except (AttributeError, ValueError, OSError):
                continue
            proxy = _TerminalProxy(self, current)
            self._proxies[name] = proxy
            setattr(sys, name, proxy)
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick_loop, name="releasy-live",
                                        daemon=True)
        self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._stop.wait(LIVE_TICK_S):
            if not self._redraw():
                return

    def _redraw(self) -> bool:
        """One tick: redraw the block (elapsed times, spinner); False once live ended."""
        with self._lock:
            if not self._live_on:
                return False
            self._tick += 1
            if not self._paused and not self._held:
                self._write_term(self._clear_seq() + self._draw_seq())
            return True

    def _size(self) -> tuple[int, int]:
        if self._terminal_size is not None:
            return self._terminal_size()
        try:
            size = os.get_terminal_size(self._term.fileno())  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            return 80, 24
        # A pseudo-terminal nobody sized (0x0) gets the classic default.
        return size.columns or 80, size.lines or 24

    def _clear_seq(self) -> str:
        if not self._drawn:
            return ""
        # Up to the block's first row, column 1, then erase to the end of the screen.
        seq = f"{_CSI}{self._drawn}F{_CSI}J"
        self._drawn = 0
        return seq

    def _draw_seq(self) -> str:
        if self._paused or self._held:
            return ""
        width, height = self._size()
        encoding = (getattr(self._term, "encoding", "") or "").lower().replace("-", "")
        rows = self._block.rows(self._clock(), width, height, self._tick,
                                started=self._started, unicode=encoding == "utf8")
        self._drawn = len(rows)
        return "".join(row + "\n" for row in rows)

    def _write_term(self, data: str) -> None:
        if data and self._term is not None:
            self._term.write(data)
            self._term.flush()

    def _foreign_write(self, target: IO[str], text: str) -> None:
        """A write to sys.stdout/sys.stderr from outside the reporter, while live."""
        with self._lock:
            if not self._live_on:
                target.write(text)
                return
            self._write_term(self._clear_seq())
            target.write(text)
            target.flush()
            # Text not ending in a newline (an input() prompt, a partial print): draw
            # nothing under it until a line is complete or our next event.
            self._held = not text.endswith("\n") if text else self._held
            self._write_term(self._draw_seq())

    # -- internals ----------------------------------------------------------------------
    def _out(self) -> IO[str]:
        # Resolved at write time so pytest's capsys/capfd see it.
        if self._term is not None and self._live_on:
            return self._term
        out = self._stream if self._stream is not None else sys.stdout
        if isinstance(out, _TerminalProxy):
            return out.target
        return out

    def _count(self, host: str, field: str) -> None:
        with self._lock:
            tally = self._tally.setdefault(host, HostTally())
            setattr(tally, field, getattr(tally, field) + 1)

    def _emit(
        self, host: str, event: str, msg: str, *, prefix: str = "", extra: dict | None = None,
        stage: str | None = None,
    ) -> None:
        text = self.masker(str(msg))
        lines = text.splitlines() or [""]
        # The first line carries the prefix; continuation lines are indented under it.
        pad = " " * len(prefix) if prefix not in ("  ", "| ", "! ") else prefix
        block = "".join(
            f"[{host}] {prefix if i == 0 else pad}{line}\n" for i, line in enumerate(lines)
        )
        with self._lock:
            self._tally.setdefault(host, HostTally())
            if self._live_enabled and not self._live_done and not self._live_on:
                self._start_live()
            if self._live_on:
                self._block.note(host, event, text, self._clock(), stage=stage)
                self._held = False  # our own line starts a fresh line on the screen
                # Erase the block, the event's lines, the block again: ONE write.
                self._write_term(self._clear_seq() + block + self._draw_seq())
            else:
                out = self._out()
                out.write(block)  # one write per event, under the lock: no interleaving
                out.flush()
            record = {"host": host, "event": event, "message": text}
            if extra:
                # Numbers and flags stay JSON numbers and booleans; text is masked.
                record.update({k: v if isinstance(v, (bool, int, float)) or v is None
                               else self.masker(str(v)) for k, v in extra.items()})
            self._write_json(record)

    def _write_json(self, record: dict) -> None:
        if self._json is None:
            return
        record = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
        self._json.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._json.flush()
