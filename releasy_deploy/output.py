"""Thread-safe, per-host prefixed output, secret masking and an optional JSON-lines event log.

Several hosts run in parallel, so every write here emits whole lines under one lock: a
line from one host can never be split by a line from another. Everything printed or logged
goes through the `Masker` first.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

MASK = "****"
MIN_SECRET_LEN = 4
# Lines of a multi-line secret (a PEM key, an env file) are masked on their own too, since
# output is handled line by line; shorter lines ("-----", "}") would mask innocent text.
MIN_SECRET_LINE_LEN = 8


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


class Reporter:
    """Prints ``[host] ...`` lines; counts changes per host for `summary`.

    ``stream`` defaults to stdout. With ``json_path``, every event is also appended to that
    file as one JSON object per line (ts, host, event, message[, path]) for cron/monitoring.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        json_path: str | Path | None = None,
        masker: Masker | None = None,
        clock=time.monotonic,
    ) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.masker = masker or Masker()
        self._clock = clock
        self._started = clock()
        self._tally: dict[str, HostTally] = {}
        self._json: IO[str] | None = None
        if json_path is not None:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._json = path.open("a", encoding="utf-8")

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
        self._emit(host, "stage", msg, prefix=f"{stage}: ", extra={"stage": stage, **fields})

    def diff(self, host: str, path: str, unified_diff_text: str) -> None:
        self._emit(host, "diff", unified_diff_text, prefix="  ", extra={"path": path})

    # -- summary ------------------------------------------------------------------------
    def tally(self) -> dict[str, HostTally]:
        with self._lock:
            return {h: HostTally(**vars(t)) for h, t in self._tally.items()}

    def summary(self) -> str:
        """Print and return one line per host plus the elapsed time since creation."""
        elapsed = self._clock() - self._started
        tally = self.tally()
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
        lines.append(f"{len(tally)} hosts, {failed} failed, {elapsed:.1f} s")
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
        with self._lock:
            if self._json is not None:
                self._json.close()
                self._json = None

    # -- internals ----------------------------------------------------------------------
    def _out(self) -> IO[str]:
        # Resolved at write time so pytest's capsys/capfd see it.
        return self._stream if self._stream is not None else sys.stdout

    def _count(self, host: str, field: str) -> None:
        with self._lock:
            tally = self._tally.setdefault(host, HostTally())
            setattr(tally, field, getattr(tally, field) + 1)

    def _emit(
        self, host: str, event: str, msg: str, *, prefix: str = "", extra: dict | None = None
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
            out = self._out()
            out.write(block)  # one write per event, under the lock: no interleaving
            out.flush()
            record = {"host": host, "event": event, "message": text}
            if extra:
                record.update({k: self.masker(str(v)) for k, v in extra.items()})
            self._write_json(record)

    def _write_json(self, record: dict) -> None:
        if self._json is None:
            return
        record = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
        self._json.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._json.flush()
