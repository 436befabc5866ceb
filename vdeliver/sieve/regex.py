"""The `:regex` match type (draft-ietf-sieve-regex-01): POSIX extended regular expressions,
matched with RE2 (the google-re2 package), never with Python's backtracking `re`.

RE2 runs in time linear in the value, whatever the key: a user's `(a+)+$` cannot stall a
delivery.  `re2` is imported only when a script requires "regex"; without it such a script
does not compile (unavailable() says why), it never falls back to `re`.

A key is read as POSIX ERE, as Pigeonhole's regcomp(REG_EXTENDED) reads it, and translated
into RE2's syntax, every literal character escaped:

- `.` any character (a newline too), `[...]` bracket expressions with ranges, `[:alpha:]`
  and the other eleven classes, `[=a=]` and `[.a.]` for one character; a backslash inside
  brackets is itself (POSIX), `]` first and `-` first or last are literal;
- `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`, `{,n}` and stacked ones (`a**`); counts up to 1000
  (RE2's limit);
- `^` and `$` anchor at the start and end of the value only; `(...)` groups, `|`;
- a backslash before any other non-alphanumeric character takes it literally; before a
  letter or digit (`\\w`, `\\b`, back-references `\\1`) the key is refused: POSIX leaves those
  undefined and the draft asks for a syntax error;
- the leftmost match, and of those the longest (POSIX; RE2's longest_match).

Comparators: i;octet is case-sensitive, i;ascii-casemap is not (RE2's case folding, which
also folds non-ASCII letters), i;ascii-numeric is refused.  Match variables: ${0} the whole
match, ${1}... the groups (an unmatched group is ""), at most MAX_MATCH_VALUES of them, as
Pigeonhole keeps.  A compiled pattern may use at most MAX_MEM bytes (RE2's max_mem).
"""

from __future__ import annotations

import functools
from typing import Any

MAX_MEM = 1 << 20  # bytes a compiled pattern may take; larger is refused
MAX_MATCH_VALUES = 32  # ${0} .. ${31}, as Pigeonhole's SIEVE_MAX_MATCH_VALUES
COMPARATORS = ("i;octet", "i;ascii-casemap")
CLASSES = frozenset({"alnum", "alpha", "blank", "cntrl", "digit", "graph", "lower", "print", "punct", "space",
                     "upper", "xdigit"})
_QUOTE = frozenset("\\.[]()*+?{}|^$")


class RegexError(ValueError):
    """A key that is not a valid POSIX ERE, or that RE2 cannot take."""


def unavailable() -> str | None:
    """Why :regex cannot be used here (google-re2 is not installed), or None."""
    try:
        _re2()
    except ImportError:
        return "extension 'regex' needs the google-re2 package (module re2), which is not installed"
    return None


@functools.cache
def _re2() -> Any:
    import re2  # type: ignore[import-untyped,import-not-found,unused-ignore]

    return re2


def quote(value: str) -> str:
    """`set :quoteregex`: a backslash before each character special in an ERE, so that the
    value used as a :regex key matches itself."""
    return "".join("\\" + c if c in _QUOTE else c for c in value)


# -- POSIX ERE -> RE2 ------------------------------------------------------------------------------


def translate(pattern: str) -> str:
    """The RE2 form of a POSIX ERE; RegexError when it is not one (or uses what we refuse)."""
    return _Parser(pattern).alternation(top=True)


def _lit(ch: str) -> str:
    """One character as RE2 takes it literally, in or out of brackets."""
    return ch if (ch.isascii() and ch.isalnum()) or ord(ch) > 127 else f"\\x{{{ord(ch):x}}}"


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0
        self.depth = 0

    def error(self, message: str) -> RegexError:
        return RegexError(message)

    def peek(self) -> str:
        return self.p[self.i] if self.i < len(self.p) else ""

    def alternation(self, top: bool = False) -> str:
        branches = [self.branch()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.branch())
        if top and self.i < len(self.p):
            raise self.error(f"unexpected '{self.p[self.i]}'")  # not reached: ')' at the top is literal
        return "|".join(branches)

    def branch(self) -> str:
        pieces: list[str] = []
        while self.i < len(self.p):
            ch = self.p[self.i]
            if ch == "|" or (ch == ")" and self.depth > 0):
                break
            pieces.append(self.piece())
        return "".join(pieces)

    def piece(self) -> str:
        atom, repeatable = self.atom()
        quantifiers = 0
        while True:
            q = self.quantifier()
            if q is None:
                return atom
            if not repeatable:
                raise self.error("a repetition operator (*, +, ?, {}) needs something before it")
            # RE2 refuses a repetition of a repetition (a**): group the first one.
            atom = (f"(?:{atom})" if quantifiers else atom) + q
            quantifiers += 1

    def quantifier(self) -> str | None:
        ch = self.peek()
        if ch in ("*", "+", "?"):
            self.i += 1
            return ch
        if ch != "{":
            return None
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end >= 0 else ""
        low, comma, high = body.partition(",")
        if end < 0 or not (low.isascii() and high.isascii()) or not (low.isdigit() or (comma and not low)) \
                or (high and not high.isdigit()):
            raise self.error("unmatched or invalid '{' (a count is {m}, {m,}, {m,n} or {,n})")
        self.i = end + 1
        lo = int(low) if low else 0
        if int(high or lo) > 1000 or lo > 1000:
            raise self.error("a repetition count is at most 1000")
        if high and int(high) < lo:
            raise self.error(f"invalid repetition count {{{body}}}")
        return f"{{{lo}{',' if comma else ''}{high}}}"

    def atom(self) -> tuple[str, bool]:
        ch = self.p[self.i]
        self.i += 1
        if ch == "(":
            self.depth += 1
            inner = self.alternation()
            if self.peek() != ")":
                raise self.error("unmatched '('")
            self.i += 1
            self.depth -= 1
            return f"({inner})", True
        if ch in ("*", "+", "?", "{"):
            raise self.error("a repetition operator (*, +, ?, {}) needs something before it")
        if ch == "^":
            return "^", False
        if ch == "$":
            return "$", False
        if ch == ".":
            return ".", True
        if ch == "[":
            return self.bracket(), True
        if ch == "\\":
            if self.i >= len(self.p):
                raise self.error("trailing backslash")
            nxt = self.p[self.i]
            self.i += 1
            if nxt.isascii() and nxt.isalnum():
                what = "back-references" if nxt.isdigit() else f"'\\{nxt}'"
                raise self.error(f"{what} are not POSIX extended regular expressions (not supported)"
                                 if nxt.isdigit() else f"{what} is not a POSIX extended regular expression")
            return _lit(nxt), True
        return _lit(ch), True

    def bracket(self) -> str:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        items: list[str] = []
        first = True
        while True:
            if self.i >= len(self.p):
                raise self.error("unmatched '['")
            ch = self.p[self.i]
            if ch == "]" and not first:
                self.i += 1
                break
            first = False
            start, start_is_char = self.bracket_item()
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                end, end_is_char = self.bracket_item()
                if not (start_is_char and end_is_char):
                    raise self.error("a character class cannot end a range")
                if ord(end) < ord(start):
                    raise self.error(f"invalid range '{start}-{end}'")
                items.append(f"{_lit(start)}-{_lit(end)}")
            elif start_is_char:
                items.append(_lit(start))
            else:
                items.append(start)
        return "[" + ("^" if negate else "") + "".join(items) + "]"

    def bracket_item(self) -> tuple[str, bool]:
        """One character of a bracket expression (True), or a class such as [:alpha:] (False)."""
        ch = self.p[self.i]
        if ch == "[" and self.i + 1 < len(self.p) and self.p[self.i + 1] in ":=.":
            kind = self.p[self.i + 1]
            end = self.p.find(kind + "]", self.i + 2)
            if end < 0:
                raise self.error(f"unmatched '[{kind}'")
            name = self.p[self.i + 2:end]
            self.i = end + 2
            if kind == ":":
                if name not in CLASSES:
                    raise self.error(f"unknown character class '[:{name}:]'")
                return f"[:{name}:]", False
            if len(name) != 1:
                raise self.error(f"unknown collating element '[{kind}{name}{kind}]'")
            return name, True
        self.i += 1
        return ch, True


# -- compiling and matching -------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def compile_key(pattern: str, comparator: str, capture: bool) -> Any:
    """The compiled RE2 of a key under a comparator; RegexError when it cannot be."""
    if comparator not in COMPARATORS:
        raise RegexError(f"comparator '{comparator}' cannot do :regex (only i;octet and i;ascii-casemap)")
    translated = translate(pattern)
    re2 = _re2()
    options = re2.Options()
    options.longest_match = True  # POSIX: leftmost-longest
    options.dot_nl = True  # POSIX regcomp without REG_NEWLINE
    options.case_sensitive = comparator == "i;octet"
    options.never_capture = not capture
    options.max_mem = MAX_MEM
    options.log_errors = False
    try:
        return re2.compile(translated, options)
    except re2.error as exc:
        text = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        if "too large" in text or "too big" in text:
            text = f"pattern too large (more than {MAX_MEM >> 10} KiB compiled)"
        raise RegexError(text) from None


def check(pattern: str, comparator: str) -> None:
    """RegexError unless the key compiles (the validator's check of a constant key)."""
    compile_key(pattern, comparator, False)


def search(comparator: str, value: str, key: str, capture: bool) -> list[str] | None:
    """None when the key does not match anywhere in the value; else ${0}, ${1}, ... (only
    ${0} when not `capture`).  RegexError for a key that does not compile."""
    m = compile_key(key, comparator, capture).search(value)
    if m is None:
        return None
    if not capture:
        return [m.group(0)]
    groups = [m.group(0), *(g if g is not None else "" for g in m.groups())]
    return groups[:MAX_MATCH_VALUES]


def match_any(comparator: str, values: list[str], keys: list[str], capture: bool) -> list[str] | None:
    """The match values of the first value and key that match, or None.  A key that does not
    compile (built from variables at run time) matches nothing, as in Pigeonhole."""
    for value in values:
        for key in keys:
            try:
                groups = search(comparator, value, key, capture)
            except RegexError:
                continue
            if groups is not None:
                return groups
    return None
