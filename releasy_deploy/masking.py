"""Secret masking: every value known to be secret is replaced by ``****`` in everything
printed or logged (`Masker`, shared by the reporter and the executor)."""
from __future__ import annotations

import re
import threading
from collections.abc import Iterable

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
