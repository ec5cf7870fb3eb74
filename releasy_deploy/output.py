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
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable, Mapping

MASK = "****"
MIN_SECRET_LEN = 4
# Lines of a multi-line secret (a PEM key, an env file) are masked on their own too, since
# output is handled line by line; shorter lines ("-----", "}") would mask innocent text.
MIN_SECRET_LINE_LEN = 8

#: ``plain`` never draws the live status block; anything else: live when on a terminal.
PROGRESS_ENV = "RELEASY_PROGRESS"
#: seconds between redraws of the live block (elapsed times and the spinner move).
LIVE_TICK_S = 0.25
#: an error message longer than this many lines is condensed (`one_screen`).
ONE_SCREEN_LINES = 40

_CSI = "\x1b["
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPINNER = "|/-\\"


class Masker:
    """Replaces every known secret value (len >= 4) by ``****``; thread-safe to extend."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        new: set[str] = set()
        for value in values:
            if not isinstance(value, str):
                continue
            if len(value) >= MIN_SECRET_LEN:
                new.add(value)
            if "\n" in value:
                new.update(
                    line.strip()
                    for line in value.splitlines()
                    if len(line.strip()) >= MIN_SECRET_LINE_LEN
                )
        with self._lock:
            if new - self._values:
                self._values |= new
                # Longest first, so a secret that contains another is masked whole.
                ordered = sorted(self._values, key=len, reverse=True)
                self._regex = re.compile("|".join(re.escape(v) for v in ordered))

    def __bool__(self) -> bool:
        return bool(self._values)

    def __call__(self, text: str) -> str:
        regex = self._regex
        if regex is None or not text:
            return text
        return regex.sub(MASK, text)

    def contains_secret(self, text: str) -> bool:
        regex = self._regex
        return bool(regex is not None and text and regex.search(text))


@dataclass
class HostTally:
    changed: int = 0
    unchanged: int = 0
    would: int = 0
    errors: int = 0


# --------------------------------------------------------------------------------------
# Pure helpers (unit-tested)
# --------------------------------------------------------------------------------------
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


def fit(text: str, width: int) -> str:
    """``text`` on one line of at most ``width`` characters (cut with ``...``); control
    characters (line breaks, a remote program's colour codes) become spaces."""
    text = _CONTROL.sub(" ", text)
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    return text[: max(0, width - 3)] + "..." if width > 3 else text[:width]


def format_elapsed(seconds: float) -> str:
    """``4.2s``, ``1m05s``, ``1h02m``: short and fixed in shape."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def one_screen(text: str, max_lines: int = ONE_SCREEN_LINES) -> str:
    """Condense an error message to at most ``max_lines`` lines, keeping what matters.

    Messages are a first line, then detail blocks (indented lines: a command's output, a
    journal tail), then what to do. Long blocks are cut from the top, keeping their last
    lines (where a failure shows) and saying how many were left out; every other line
    (the hosts' first lines, the hints) is kept. Texts already short are returned as is.
    """
    lines = text.splitlines()
    if len(lines) <= max_lines:
        return text
    # Runs of consecutive lines at the same indentation (>= 4 spaces): the detail blocks.
    runs: list[tuple[int, int]] = []  # (start, end) of each run worth cutting
    i = 0
    while i < len(lines):
        indent = _indent(lines[i])
        j = i + 1
        while j < len(lines) and indent >= 4 and _indent(lines[j]) == indent and lines[j].strip():
            j += 1
        if indent >= 4 and j - i >= 3:
            runs.append((i, j))
        i = j if j > i else i + 1
    fixed = len(lines) - sum(end - start for start, end in runs)
    budget = max_lines - fixed
    # The largest per-run cap such that every run cut to it (plus a "... N more" line) fits.
    longest = max((end - start for start, end in runs), default=0)
    cap = None
    for keep in range(longest, 1, -1):
        used = sum(n if n <= keep else keep + 1 for n in (end - start for start, end in runs))
        if used <= budget:
            cap = keep
            break
    if cap is None:
        cap = 2
    out: list[str] = []
    pos = 0
    for start, end in runs:
        out.extend(lines[pos:start])
        block = lines[start:end]
        if len(block) > cap:
            dropped = len(block) - cap
            pad = " " * _indent(block[0])
            out.append(f"{pad}... ({dropped} earlier lines not shown; --debug shows all)")
            out.extend(block[-cap:])
        else:
            out.extend(block)
        pos = end
    out.extend(lines[pos:])
    if len(out) > max_lines:  # many hosts each with a line of their own: keep the top
        hidden = len(out) - (max_lines - 1)
        out = out[: max_lines - 1] + [f"... and {hidden} more lines (--debug shows all)"]
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


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
