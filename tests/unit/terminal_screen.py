"""A small terminal emulator for the tests that look at what the Reporter's live view leaves
on a screen (the unit tests of output.py, and the lab test that runs `fab site` on a pty)."""
from __future__ import annotations

import re


class Screen:
    """Just enough of a VT100: text, newline, CSI n F (n lines up, column 1), CSI J."""

    def __init__(self) -> None:
        self.lines: list[str] = [""]
        self.row = 0
        self.col = 0
        self.pending = ""  # an escape sequence split across writes

    def feed(self, data: str) -> None:
        data, self.pending = self.pending + data, ""
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                m = re.match(r"\x1b\[(\d*)([A-Za-z])", data[i:])
                if m is None and re.fullmatch(r"\x1b(\[\d*)?", data[i:]):
                    self.pending = data[i:]
                    return
                assert m, f"unexpected escape sequence {data[i:i + 8]!r}"
                n = int(m.group(1) or 1)
                if m.group(2) == "F":
                    assert self.row - n >= 0, "moved above the top of the output"
                    self.row, self.col = self.row - n, 0
                elif m.group(2) == "J":
                    self.lines[self.row] = self.lines[self.row][: self.col]
                    del self.lines[self.row + 1:]
                else:
                    raise AssertionError(f"unexpected sequence {m.group(0)!r}")
                i += len(m.group(0))
                continue
            if ch == "\n":
                self.row, self.col = self.row + 1, 0
                if self.row == len(self.lines):
                    self.lines.append("")
            elif ch == "\r":
                self.col = 0
            else:
                line = self.lines[self.row].ljust(self.col)
                self.lines[self.row] = line[: self.col] + ch + line[self.col + 1:]
                self.col += 1
            i += 1

    def text_lines(self) -> list[str]:
        lines = list(self.lines)
        while lines and lines[-1] == "":
            lines.pop()
        return lines
