"""Shell snippets that read small text files with the shell's own builtins (``read``,
``printf``, ``case``) instead of starting `cat`, `head`, `grep` or `tr` (pure builders).

Every no-op run reads a dozen small configuration files on every host. Each of those
programs is a fork and an exec: ~0.6 ms of the host's CPU on an idle lab host and twice
that under load, while printing a few hundred bytes with builtins takes ~0.1 ms. dash
reads one byte per system call, so builtins win only for small files (below ~3 KB):
files that grow with the fleet (ufw's rule files) keep `cat`.

What differs from `cat`: a last line without a newline gets one, NUL bytes are dropped,
and a file that cannot be opened gives exit code 2 (dash's code for a failed
redirection) where `cat` gives 1. The snippets set ``_l`` and ``_m``: callers must not
need those variables.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["print_text", "copy_stdin", "print_lines_starting", "has_line_starting",
           "read_first_word", "line_starts_pattern"]

# Every line, the last one even without its newline, with ``body`` run for each in ``$_l``.
_EACH_LINE = 'while IFS= read -r _l || [ -n "$_l" ]; do {body}; done'
_PRINT_LINE = "printf '%s\\n' \"$_l\""


def _each_line_of(path: str, body: str) -> str:
    return f"{_EACH_LINE.format(body=body)} < {path}"


def print_text(path: str) -> str:
    """Print the file ``path`` (a shell word: quoted by the caller, or ``"$var"``)."""
    return _each_line_of(path, _PRINT_LINE)


def copy_stdin() -> str:
    """Print what arrives on stdin (a few lines: ``read`` takes a byte per system call)."""
    return _EACH_LINE.format(body=_PRINT_LINE)


def line_starts_pattern(prefix: str, *, ignore_case: bool = False) -> str:
    """A `case` pattern matching lines that start with ``prefix`` (letters, digits, ``_``
    and ``=`` only: nothing a pattern would interpret)."""
    if not prefix or not all(ch.isalnum() or ch in "_=" for ch in prefix):
        raise ValueError(f"not a plain line prefix: {prefix!r}")
    if not ignore_case:
        return prefix + "*"
    return "".join(f"[{ch.upper()}{ch.lower()}]" if ch.isalpha() else ch
                   for ch in prefix) + "*"


def print_lines_starting(path: str, prefixes: Sequence[str]) -> str:
    """Print the lines of ``path`` that start with one of ``prefixes`` (``grep -E
    '^(A|B)'`` without a process); exit code 0 whether or not one matched."""
    patterns = "|".join(line_starts_pattern(p) for p in prefixes)
    return _each_line_of(path, f"case $_l in {patterns}) {_PRINT_LINE};; esac")


def has_line_starting(path: str, prefix: str, *, ignore_case: bool = False) -> str:
    """A command whose exit code is 0 when a line of ``path`` starts with ``prefix``
    (``grep -q '^PREFIX'``; 1 when none does or the file cannot be read)."""
    pattern = line_starts_pattern(prefix, ignore_case=ignore_case)
    loop = _each_line_of(path, f"case $_l in {pattern}) _m=0;; esac")
    return f'{{ _m=1; {loop}; [ "$_m" = 0 ]; }} 2>/dev/null'


def read_first_word(var: str, path: str) -> str:
    """Set the shell variable ``var`` to the first word of ``path``'s first line (empty
    when the file cannot be read or is empty)."""
    if not var.isidentifier() or not var.isascii():
        raise ValueError(f"not a shell variable name: {var!r}")
    return f"{var}=; read -r {var} _ 2>/dev/null < {path}"
