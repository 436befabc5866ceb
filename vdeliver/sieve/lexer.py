"""Sieve's lexical level (RFC 5228 section 8.1): script text -> tokens, each with its line.

What the RFC writes as CRLF is taken as CRLF or a bare LF, and a lone CR is white space, as
Pigeonhole takes them (webmail writes both line ends, mixed); a `text:` string's lines end
in CRLF whatever the script used, as Pigeonhole gives them. Dot-stuffing: in a `text:` block
a line that is only "." ends it, and a leading "." is removed when another "." follows.
Numbers are unsigned 64-bit after their K, M or G, like Pigeonhole's. A quoted string's
backslash keeps the character after it (`\\"` is `"`, `\\q` is `q`). A hash comment may end
at the end of the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdeliver.sieve.errors import SieveSyntaxError

MAX_NUMBER = (1 << 64) - 1
QUANTIFIERS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
SPECIALS = "[](){},;"

# Token kinds
IDENTIFIER = "identifier"
TAG = "tag"
NUMBER = "number"
STRING = "string"
SPECIAL = "special"
EOF = "end of file"


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    value: str | int  # the identifier or tag name (without ':'), the string, the number, the special
    line: int

    def describe(self) -> str:
        """How an error message names what it found."""
        if self.kind == SPECIAL:
            return f"'{self.value}'"
        if self.kind == STRING:
            return "string"
        if self.kind == EOF:
            return "end of file"
        if self.kind == TAG:
            return f"tag ':{self.value}'"
        return f"{self.kind} '{self.value}'"


def _is_ident_start(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _is_ident_char(ch: str) -> bool:
    return _is_ident_start(ch) or ("0" <= ch <= "9")


def tokenize(text: str) -> list[Token]:
    """All tokens of a script, ending with an EOF token; SieveSyntaxError at the first fault."""
    return list(_Lexer(text).tokens())


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def tokens(self) -> list[Token]:
        out: list[Token] = []
        text, n = self.text, len(self.text)
        while True:
            self._skip_blank()
            if self.pos >= n:
                out.append(Token(EOF, "", self.line))
                return out
            ch = text[self.pos]
            if ch in SPECIALS:
                out.append(Token(SPECIAL, ch, self.line))
                self.pos += 1
            elif ch == '"':
                out.append(self._quoted())
            elif ch == ":":
                self.pos += 1
                if self.pos >= n or not _is_ident_start(text[self.pos]):
                    raise SieveSyntaxError(self.line, "expected a tag name after ':'")
                out.append(Token(TAG, self._identifier().lower(), self.line))
            elif "0" <= ch <= "9":
                out.append(self._number())
            elif _is_ident_start(ch):
                line = self.line
                name = self._identifier()
                if name.lower() == "text" and self.pos < n and text[self.pos] == ":":
                    self.pos += 1
                    out.append(self._multiline(line))
                else:
                    out.append(Token(IDENTIFIER, name.lower(), line))
            else:
                raise SieveSyntaxError(self.line, f"unexpected character {_show(ch)}")

    # -- white space and comments ---------------------------------------------------------

    def _skip_blank(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            ch = text[self.pos]
            if ch in " \t":
                self.pos += 1
            elif ch == "\n":
                self.pos += 1
                self.line += 1
            elif ch == "\r":
                self.pos += 1  # a lone CR is white space too, for Pigeonhole
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end  # the line end itself is white space
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    started = self.line
                    self.line += text.count("\n", self.pos)
                    raise SieveSyntaxError(self.line, "end of file before the end of a bracket comment "
                                                      f"('/* ... */') started at line {started}")
                self.line += text.count("\n", self.pos, end)
                self.pos = end + 2
            else:
                return

    # -- tokens -------------------------------------------------------------------------------

    def _identifier(self) -> str:
        text, start = self.text, self.pos
        while self.pos < len(text) and _is_ident_char(text[self.pos]):
            self.pos += 1
        return text[start:self.pos]

    def _number(self) -> Token:
        text, start = self.text, self.pos
        while self.pos < len(text) and "0" <= text[self.pos] <= "9":
            self.pos += 1
        value = int(text[start:self.pos])
        if self.pos < len(text) and text[self.pos].upper() in QUANTIFIERS:
            value *= QUANTIFIERS[text[self.pos].upper()]
            self.pos += 1
        if value > MAX_NUMBER:
            raise SieveSyntaxError(self.line, f"number exceeds the limit ({MAX_NUMBER})")
        if self.pos < len(text) and _is_ident_char(text[self.pos]):
            raise SieveSyntaxError(self.line, f"unexpected character {_show(text[self.pos])} after a number")
        return Token(NUMBER, value, self.line)

    def _quoted(self) -> Token:
        text, n, line = self.text, len(self.text), self.line
        self.pos += 1
        parts: list[str] = []
        start = self.pos
        while True:
            if self.pos >= n:
                raise SieveSyntaxError(self.line, "end of file before the end of a quoted string "
                                                  f"started at line {line}")
            ch = text[self.pos]
            if ch == '"':
                parts.append(text[start:self.pos])
                self.pos += 1
                return Token(STRING, "".join(parts), line)
            if ch == "\\":
                parts.append(text[start:self.pos])
                if self.pos + 1 >= n:
                    raise SieveSyntaxError(self.line, "end of file before the end of a quoted string "
                                                      f"started at line {line}")
                start = self.pos + 1  # the next character, whatever it is, is kept as it is
                self.pos += 2
                if text[start] == "\n":
                    self.line += 1
                continue
            if ch == "\n":
                self.line += 1
            self.pos += 1

    def _multiline(self, line: int) -> Token:
        """After `text:`: blanks, then a hash comment or the line end, then the lines up to
        a line that is only "."."""
        text, n = self.text, len(self.text)
        while self.pos < n and text[self.pos] in " \t":
            self.pos += 1
        if self.pos < n and text[self.pos] == "#":
            end = text.find("\n", self.pos)
            self.pos = n if end < 0 else end
        if text.startswith("\r\n", self.pos):
            self.pos += 2
        elif text.startswith("\n", self.pos):
            self.pos += 1
        else:
            raise SieveSyntaxError(self.line, "expected the end of the line after 'text:'")
        self.line += 1
        lines: list[str] = []
        while True:
            end = text.find("\n", self.pos)
            if end < 0:
                raise SieveSyntaxError(self.line, "end of file before the end of a multi-line string "
                                                  f"('text:' ... '.') started at line {line}")
            raw = text[self.pos:end]
            if raw.endswith("\r"):
                raw = raw[:-1]
            self.pos = end + 1
            self.line += 1
            if raw == ".":
                return Token(STRING, "".join(lines), line)
            if raw.startswith(".."):
                raw = raw[1:]
            lines.append(raw + "\r\n")


def _show(ch: str) -> str:
    return repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}"
