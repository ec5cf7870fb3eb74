"""Text shaped for a terminal: one line cut to a width (`fit`), an elapsed time in a fixed
shape (`format_elapsed`), and an error message condensed to one screen (`one_screen`).
Pure functions, unit-tested."""
from __future__ import annotations

import re

#: an error message longer than this many lines is condensed (`one_screen`).
ONE_SCREEN_LINES = 40

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
