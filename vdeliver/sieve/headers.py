"""What Sieve's header, address and envelope tests see of a message.

- A header value is unfolded (a line break before a blank goes), trimmed, taken as UTF-8
  (bytes that are not become U+FFFD) and its RFC 2047 encoded words decoded; a word in an
  unknown charset or a broken encoding stays as it was written.  Never raises.
- An address list (RFC 5322 section 3.4) is read as the address test reads it: comments
  dropped, display names and groups skipped down to their mailboxes, quoted local parts
  unquoted, an obsolete route (`<@relay:user@domain>`) dropped.  Garbage gives what could
  be read, never an exception; an unparsable entry is taken whole as a local part, so that
  it can only match a key that is just as odd.
- Subaddresses (RFC 5233): `user+detail`, with "+" as the separator.

Standard library only, imported when a script runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEPARATOR = "+"
_ENCODED = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)\s+(=\?)")


@dataclass(frozen=True, slots=True)
class Address:
    localpart: str
    domain: str  # "" when the address has none

    def part(self, name: str, separator: str = SEPARATOR) -> str | None:
        """The address part a test asked for; None when there is no such part (RFC 5233: a
        :detail of an address without a separator matches nothing)."""
        if name == "localpart":
            return self.localpart
        if name == "domain":
            return self.domain
        if name in ("user", "detail"):
            user, sep, detail = self.localpart.partition(separator)
            if name == "user":
                return user
            return detail if sep else None
        return f"{self.localpart}@{self.domain}" if self.domain else self.localpart


# -- header values ------------------------------------------------------------------------------


def decode_value(raw: bytes) -> str:
    """A header field's value as a test compares it."""
    text = re.sub(rb"\r?\n(?=[ \t])", b"", raw).decode("utf-8", "replace").strip(" \t\r\n")
    if "=?" not in text:
        return text
    text = _BETWEEN_WORDS.sub(r"\1\2", text)  # blanks between two encoded words are not text
    return _ENCODED.sub(_decode_word, text)


def _decode_word(m: re.Match[str]) -> str:
    charset, encoding, payload = m.group(1).split("*", 1)[0], m.group(2).upper(), m.group(3)
    try:
        if encoding == "B":
            import base64

            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        else:
            import quopri

            data = quopri.decodestring(payload.replace("_", " ").encode("ascii"), header=True)
        return data.decode(charset)
    except (ValueError, LookupError, UnicodeError):
        return m.group(0)


# -- address lists -----------------------------------------------------------------------------------


def addresses(value: str) -> list[Address]:
    """The mailboxes of an address-list header value."""
    found: list[Address] = []
    for entry in _entries(_without_comments(value)):
        addr = _mailbox(entry)
        if addr is not None:
            found.append(addr)
    return found


def envelope_address(raw: str) -> Address:
    """An envelope address (`user@domain`, `<user@domain>`, `<>` for the null sender)."""
    text = raw.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return _addr_spec(_strip_route(text)) if text else Address("", "")


def _without_comments(text: str) -> str:
    out: list[str] = []
    depth = 0
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and (quoted or depth):
            if not depth:
                out.append(text[i:i + 2])
            i += 2
            continue
        if quoted:
            quoted = ch != '"'
            out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            quoted = ch == '"'
            out.append(ch)
        i += 1
    return "".join(out)


def _entries(text: str) -> list[str]:
    """Split at top-level commas; a group `name: a, b;` gives its members."""
    entries: list[str] = []
    current: list[str] = []
    quoted = angle = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            current.append(ch)
        elif ch == "<":
            angle = True
            current.append(ch)
        elif ch == ">":
            angle = False
            current.append(ch)
        elif not angle and ch == ":":
            current = []  # a group's display name: its members follow
        elif not angle and ch in ",;":
            entries.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def _mailbox(entry: str) -> Address | None:
    start = entry.rfind("<")
    if start >= 0:
        end = entry.find(">", start)
        inner = entry[start + 1:end if end >= 0 else len(entry)].strip()
        return _addr_spec(_strip_route(inner)) if inner else None
    return _addr_spec(entry)


def _strip_route(text: str) -> str:
    if text.startswith("@") and ":" in text:
        return text.split(":", 1)[1]
    return text


def _addr_spec(text: str) -> Address:
    text = text.strip()
    at = _last_unquoted_at(text)
    local, domain = (text[:at], text[at + 1:]) if at >= 0 else (text, "")
    return Address(_unquote(local.strip()), domain.strip())


def _last_unquoted_at(text: str) -> int:
    quoted = False
    found = -1
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted:
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == "@" and not quoted:
            found = i
        i += 1
    return found


def _unquote(local: str) -> str:
    if '"' not in local:
        return local
    out: list[str] = []
    i = 0
    while i < len(local):
        ch = local[i]
        if ch == "\\" and i + 1 < len(local):
            out.append(local[i + 1])
            i += 2
            continue
        if ch != '"':
            out.append(ch)
        i += 1
    return "".join(out)
