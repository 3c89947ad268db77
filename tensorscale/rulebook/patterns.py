"""Tensor-name patterns from rules files, matched in bounded time.

Rules files come from users, and Python's `re` backtracks without bound: `match: '(.|.)*Q'` on a 40-character
tensor name would run for hours. Patterns are compiled with the `regex` package (the same syntax as `re`)
and every match has a timeout; a pattern that exceeds it is a one-line error naming the rule, so a hostile
rules file costs one timeout, not a hang. Repeat counts and pattern length are bounded when the file loads.
"""

from __future__ import annotations

import regex

from ..errors import TensorscaleError

MATCH_SECONDS = 0.25  # a real pattern matches a tensor name in microseconds
MAX_PATTERN_LENGTH = 2000


class Pattern:
    """A compiled pattern with `fullmatch(name)`, `groupindex` and `pattern`, as re.Pattern has."""

    def __init__(self, source: str, where: str):
        if not isinstance(source, str) or not source:
            raise TensorscaleError(f"{where}: a pattern must be a non-empty regular expression")
        if len(source) > MAX_PATTERN_LENGTH:
            raise TensorscaleError(f"{where}: regex is longer than {MAX_PATTERN_LENGTH} characters")
        if "\0" in source:
            raise TensorscaleError(f"{where}: regex contains a NUL character")
        try:
            self._compiled = regex.compile(source)
        except (regex.error, OverflowError, ValueError, RecursionError, MemoryError) as exc:
            raise TensorscaleError(f"{where}: regex {source!r} does not compile: {exc}") from None
        self.pattern = source
        self.where = where
        self.groupindex = dict(self._compiled.groupindex)

    def fullmatch(self, name: str):
        try:
            return self._compiled.fullmatch(name, timeout=MATCH_SECONDS)
        except TimeoutError:
            raise TensorscaleError(
                f"{self.where}: regex {self.pattern!r} took over {MATCH_SECONDS} s to match {name!r} "
                "(catastrophic backtracking); simplify it, e.g. without nested or alternated repeats"
            ) from None

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"
