"""The errors of a Sieve script, each with the line it is on, as the user will be shown it
(`sieve-test`, `<script>.log`, webmail) and as Pigeonhole words the same cases."""

from __future__ import annotations


class SieveError(ValueError):
    """A script that cannot be run: `line` (1-based; 0 when the whole script is at fault) and
    a one-line message."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message
        self.errors: list[SieveError] = [self]  # every error found, when a stage collects them


class SieveSyntaxError(SieveError):
    """The script does not follow the grammar of RFC 5228 section 8."""
